"""Every stage's Celery task, one per row of the stage table (amodal.stages).

All stages follow one job protocol (``tasks.batching``): a stage that is not batched takes batches of one.
"""
from amodal.stages import NAMES
from tasks.batching import batched_stage

TASKS = {name: batched_stage(name) for name in NAMES}
