"""``amodal flower``: Flower on the project's Celery app and broker, never without basic auth.

Flower serves Prometheus metrics at ``/metrics`` and a liveness probe at ``/healthcheck`` without
credentials (a scraper needs none: keep the port on a trusted network); every page and every
``/api/...`` call asks for them. Flower's own ``FLOWER_*`` variables (``FLOWER_ADDRESS``,
``FLOWER_PURGE_OFFLINE_WORKERS``, ...) still apply.
"""
from __future__ import annotations

import errno
import os
import re

from amodal.errors import ServiceError, UsageError

_CREDENTIAL = re.compile(r"[^:,\s]+:[^,\s]+")


def basic_auth_from_env() -> str:
    """``FLOWER_BASIC_AUTH``: ``user:password``, or several pairs joined by commas (Flower splits
    the list on commas, so no password may hold one). Raises :class:`UsageError` if unset or malformed."""
    value = os.environ.get("FLOWER_BASIC_AUTH", "")
    if not value or not all(_CREDENTIAL.fullmatch(pair) for pair in value.split(",")):
        raise UsageError("set FLOWER_BASIC_AUTH to user:password (no spaces or commas; several pairs separated "
                         "by commas); Flower is not started without auth")
    return value


def run_flower(port: int, broker_url: str | None = None) -> None:
    """Serve Flower on ``port`` (all interfaces unless ``FLOWER_ADDRESS`` says otherwise) until
    stopped. ``broker_url`` overrides ``AMODAL_BROKER_URL``. Raises :class:`ServiceError` if the port is taken."""
    auth = basic_auth_from_env()
    from tasks.app import app

    if broker_url:
        app.conf.broker_url = broker_url
    try:  # in-process: the credentials never reach a command line that `ps` could show
        app.start(["flower", f"--port={port}", f"--basic-auth={auth}"])
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        raise ServiceError(f"port {port} is in use; pick another with --port") from None
