"""The stages a job moves through, each described once (docs/design.md, "Stages").

Queues, task registration, workers and their pool sizes, placement, warm-up, the command's choices,
the benchmark and the compose services all read this table. A stage's step, the function of its name in
``amodal.steps``, runs over a batch of jobs (a stage that is not batched takes batches of one); its models
are the :class:`ModelSet` attributes it uses, which is what its worker loads, warms and checks for in the
model folder.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    gpu: bool  # its worker pins one GPU
    batch: int  # jobs per model call by default (AMODAL_<STAGE>_BATCH); 1: one job per call
    flush: float  # seconds a partial batch waits for more jobs (AMODAL_<STAGE>_FLUSH)
    processes: int  # pool processes per worker by default, each holding the stage's models
    cost: float  # busy GPU seconds per image, for placement when no benchmark record is given
    models: tuple[str, ...]  # the ModelSet attributes its step uses

    @property
    def batched(self) -> bool:
        return self.batch > 1


# Batch sizes: inpaint 16 measured 1,043 images/hour on one H100 against 849 at 8
# (bench/results/gpu_throughput_clip_tagger.json, gpu_throughput_b8.json); segment 4 cut the stage's time per
# image from 1.88 s to 1.47 s, 8 cut it no further and, with SAM encoding 8 at once, took the card to 78 GiB
# (gpu_throughput_segment_batch*.json); occlusion: a job asks about 2(N-1) pairs, so 8 jobs fill InstaOrder's
# batch of 64; ground: LISA-13B's language model decodes 16 prompts in 0.071 s per query, 8 in 0.12 and one
# alone in 0.84 (one H200, bf16); with every stage sharing the card under MPS, 16 jobs per call took the
# stage's busy time from 0.37 s per image at 8 to 0.18 (gpu_throughput_lisa_mps_48.json, _lisa_48.json).
# Processes: two segment processes overlap one's CPU work with the other's GPU work, 2,971 against 2,547
# images/hour (gpu_throughput_segment2.json, _segment1.json); two inpaint processes 3,204 against 2,911
# (gpu_throughput_inpaint2.json, _segment_batch4.json) for 13 GiB more; a third made the diffusion calls
# smaller, 3,047 against 3,566 (gpu_throughput_lisa_mps_inpaint3.json, _lisa_mps.json). Costs: busy seconds
# per image / processes at the paper's settings on one H100 with every stage sharing it (gpu_throughput.json);
# ground's is LISA's, batched, on one H200 (gpu_throughput_lisa.json; 0.02 s with masks given). Finalize
# runs two processes: one, at 0.45 s a job (likely large windows from random-weight LISA's noisy masks), was busy
# through the default stack's last 15 s of 129 after the last diffusion call (gpu_throughput_lisa_mps_vae.json);
# with two the last outcome still came 15 s after it (gpu_throughput_lisa_mps_finalize2.json).
STAGES: tuple[Stage, ...] = (
    Stage("ground", gpu=True, batch=16, flush=0.2, processes=1, cost=0.40, models=("grounder",)),
    Stage("segment", gpu=True, batch=4, flush=0.2, processes=2, cost=0.99,
          models=("tagger", "detector", "segmenter", "prompt_chooser", "clip")),
    Stage("occlusion", gpu=True, batch=8, flush=0.2, processes=1, cost=0.11, models=("occlusion",)),
    Stage("inpaint", gpu=True, batch=16, flush=0.5, processes=2, cost=0.92, models=("inpainter",)),
    Stage("finalize", gpu=False, batch=1, flush=0.1, processes=2, cost=0.0, models=()),
)
BY_NAME: dict[str, Stage] = {stage.name: stage for stage in STAGES}
NAMES: tuple[str, ...] = tuple(BY_NAME)
GPU_STAGES: tuple[str, ...] = tuple(s.name for s in STAGES if s.gpu)
BATCHED_STAGES: tuple[str, ...] = tuple(s.name for s in STAGES if s.batched)
