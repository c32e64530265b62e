"""Which stage workers go on which GPUs of a host, from the measured per-stage cost.

A stage with ``k`` workers gives each ``1/k`` of its per-image GPU time. For every choice of worker
counts (1 to the number of GPUs per stage) the workers are placed heaviest first on the least-loaded
GPU, never two of one stage on one GPU; the plan whose busiest GPU carries least wins, since the
busiest GPU sets the host's images per hour. On a tie the plan with more workers wins: GPUs that
each hold the whole pipeline do not wait on each other, and losing one leaves whole pipelines
running. ``finalize`` runs on the CPU.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

from amodal.stages import GPU_STAGES, STAGES
from tasks.nodes import stage_of

# Busy GPU seconds per image of each stage (amodal.stages); a plan made from a benchmark record (--costs)
# replaces them.
DEFAULT_COSTS = {stage.name: stage.cost for stage in STAGES if stage.gpu}


@dataclass(frozen=True)
class Slot:
    stage: str
    gpu: int | None  # None: CPU

    @property
    def args(self) -> list[str]:
        return ["--stage", self.stage] + ([] if self.gpu is None else ["--gpu", str(self.gpu)])


def _place(gpus: int, counts: dict[str, int], costs: dict[str, float]) -> tuple[float, list[Slot]]:
    """Heaviest worker first onto the least-loaded GPU without that stage; (max load, slots)."""
    load = [0.0] * gpus
    placed: list[Slot] = []
    workers = sorted(((costs[s] / counts[s], s) for s in GPU_STAGES for _ in range(counts[s])), reverse=True)
    for share, stage in workers:
        taken = {slot.gpu for slot in placed if slot.stage == stage}
        gpu = min((g for g in range(gpus) if g not in taken), key=lambda g: (load[g], g))
        load[gpu] += share
        placed.append(Slot(stage, gpu))
    return max(load), placed


def plan(gpus: int, costs: dict[str, float] | None = None, finalize_workers: int = 1) -> list[Slot]:
    if gpus < 1:
        raise ValueError("a plan needs at least one GPU")
    costs = costs or DEFAULT_COSTS
    best: tuple[float, int, list[Slot]] | None = None
    for choice in itertools.product(range(1, gpus + 1), repeat=len(GPU_STAGES)):
        peak, slots = _place(gpus, dict(zip(GPU_STAGES, choice)), costs)
        key = (round(peak, 9), -len(slots), slots)
        if best is None or key[:2] < best[:2]:
            best = key
    return best[2] + [Slot("finalize", None)] * finalize_workers


def gpu_loads(slots: list[Slot], costs: dict[str, float]) -> dict[int, float]:
    """Expected GPU seconds per image each GPU carries under a plan."""
    counts: dict[str, int] = {}
    for s in slots:
        counts[s.stage] = counts.get(s.stage, 0) + 1
    loads: dict[int, float] = {}
    for s in slots:
        if s.gpu is not None:
            loads[s.gpu] = loads.get(s.gpu, 0.0) + costs[s.stage] / counts[s.stage]
    return loads


def costs_from_benchmark(path: Path) -> dict[str, float]:
    """Per-image busy seconds per stage from a record of ``bench/gpu_throughput.py``, divided by the
    stage's pool processes (its processes' busy times overlap on one GPU)."""
    ours = json.loads(Path(path).read_text())["ours"]
    pools = ours.get("processes_per_worker", {})
    return {s: float(ours["stage_seconds_per_image"][s]) / max([n for w, n in pools.items() if stage_of(w) == s] or [1])
            for s in GPU_STAGES}
