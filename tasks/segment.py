"""The ``segment`` stage: tags, scene instances and prompt, or re-segmentation of inpainted windows,
for many jobs per model call (``tasks.batching``)."""
from tasks.batching import batched_stage

segment = batched_stage("segment")
