"""The Celery application, configured from ``celeryconfig.py``."""
from celery import Celery

app = Celery("amodal")
app.config_from_object("celeryconfig")
app.conf.include = ["tasks.stages"]


def send_stage(stage: str, job_id: str, version: int, countdown: float | None = None, producer=None) -> None:
    """Enqueue the step ``stage`` of a job at ``version`` (by task name: no task import needed); many sends
    in a row share one ``producer`` (``app.producer_or_acquire()``)."""
    app.send_task(f"amodal.{stage}", args=[job_id, version], queue=stage, countdown=countdown, producer=producer)
