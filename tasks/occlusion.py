"""The ``occlusion`` stage: the occluders of many jobs' targets in one InstaOrder call (``tasks.batching``),
then each job's loop decision."""
from tasks.batching import batched_stage

occlusion = batched_stage("occlusion")
