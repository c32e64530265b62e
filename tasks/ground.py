"""The ``ground`` stage: the visible mask (given, or from the query)."""
from tasks.stage import stage_task

ground = stage_task("ground")
