"""The ``occlusion`` stage: occlusion order, and the loop's decision to finish or inpaint again."""
from tasks.stage import stage_task

occlusion = stage_task("occlusion")
