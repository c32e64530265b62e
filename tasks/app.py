"""The Celery application, configured from ``celeryconfig.py``, and the producers' way to reach its broker."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from celery import Celery
from kombu import Connection, Producer

from amodal.config import environment

app = Celery("amodal")
app.config_from_object("celeryconfig")
app.conf.include = ["tasks.stages"]


@contextmanager
def broker(url: str | None = None) -> Iterator[Connection]:
    """A connection of its own to ``url`` (default: ``AMODAL_BROKER_URL`` as it is now, not as it was when
    the app was configured), closed on exit: producers never share the app's pool, which is bound to the
    first broker it reached."""
    with app.connection_for_write(url or environment().broker_url) as connection:
        yield connection


@contextmanager
def publisher(url: str | None = None) -> Iterator[Producer]:
    """A producer on :func:`broker`; many sends in a row share it."""
    with broker(url) as connection:
        yield Producer(connection)


def send_stage(stage: str, job_id: str, version: int, countdown: float | None = None,
               producer: Producer | None = None) -> None:
    """Enqueue the step ``stage`` of a job at ``version`` (by task name: no task import needed); workers send
    on the app's pool, producers on a :func:`publisher`."""
    app.send_task(f"amodal.{stage}", args=[job_id, version], queue=stage, countdown=countdown, producer=producer)
