"""The ``finalize`` stage: the RGBA result and the job's outcome (CPU only)."""
from tasks.stage import stage_task

finalize = stage_task("finalize")
