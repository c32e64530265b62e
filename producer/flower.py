"""``amodal flower``: Flower on the project's broker, behind basic auth.

Flower serves Prometheus metrics at ``/metrics`` and a liveness probe at ``/healthcheck`` without
credentials (so a scraper needs none); every page and API under it asks for them.
"""
from __future__ import annotations

import os
import re


def basic_auth_from_env() -> str:
    """``FLOWER_BASIC_AUTH`` (``user:password``), checked; Flower is never started open."""
    value = os.environ.get("FLOWER_BASIC_AUTH", "")
    if not re.fullmatch(r"[^:\s]+:\S+", value):
        raise SystemExit("amodal flower: set FLOWER_BASIC_AUTH to user:password (Flower is not started without auth)")
    return value


def run_flower(port: int, broker_url: str | None = None) -> None:
    auth = basic_auth_from_env()
    from tasks.app import app

    if broker_url:
        app.conf.broker_url = broker_url
    app.start(["flower", f"--port={port}", "--address=0.0.0.0", f"--basic-auth={auth}"])
