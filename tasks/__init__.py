"""Celery tasks, one module per stage: load the job's state, run its step through `amodal`, route it on."""
