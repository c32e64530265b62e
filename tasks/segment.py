"""The ``segment`` stage: tags, scene instances and prompt; re-segmentation of inpainted windows."""
from tasks.stage import stage_task

segment = stage_task("segment")
