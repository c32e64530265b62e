"""The ``inpaint`` stage: requests from many jobs go through one diffusion call (``tasks.batching``)."""
from tasks.batching import batched_stage

inpaint = batched_stage("inpaint")
