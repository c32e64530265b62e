"""Placement of stage workers on a host's GPUs."""
from __future__ import annotations

import json

import pytest

from workers.main import GPU_STAGES
from workers.placement import DEFAULT_COSTS, Slot, costs_from_benchmark, gpu_loads, plan


@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
def test_every_stage_placed_and_gpus_balanced(gpus):
    slots = plan(gpus)
    assert {s.stage for s in slots} == set(GPU_STAGES) | {"finalize"}
    assert all(s.gpu is None for s in slots if s.stage == "finalize")
    assert all(0 <= s.gpu < gpus for s in slots if s.stage != "finalize")
    pairs = [(s.stage, s.gpu) for s in slots if s.gpu is not None]
    assert len(pairs) == len(set(pairs))  # never two workers of one stage on one GPU
    loads = gpu_loads(slots, DEFAULT_COSTS)
    assert len(loads) == gpus  # every GPU has work
    ideal = sum(DEFAULT_COSTS[s] for s in GPU_STAGES) / gpus
    assert max(loads.values()) == pytest.approx(ideal, rel=0.05)


def test_skewed_costs_give_the_heavy_stage_more_gpus():
    costs = {"ground": 0.01, "segment": 0.01, "occlusion": 0.01, "inpaint": 1.0}
    slots = plan(4, costs)
    assert sum(s.stage == "inpaint" for s in slots) == 4
    loads = gpu_loads(slots, costs)
    assert max(loads.values()) < 0.27


def test_plan_from_benchmark_record(tmp_path):
    record = {"ours": {"stage_seconds_per_image": {"ground": 0.0, "segment": 0.2, "occlusion": 0.1,
                                                   "inpaint": 0.9, "finalize": 0.01}}}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(record))
    costs = costs_from_benchmark(path)
    assert costs == {"ground": 0.0, "segment": 0.2, "occlusion": 0.1, "inpaint": 0.9}
    assert Slot("inpaint", 0) in plan(1, costs)
    record["ours"]["processes_per_worker"] = {"segment-gpu0": 2, "inpaint-gpu0": 3, "ground-gpu0": 1, "finalize": 1}
    path.write_text(json.dumps(record))
    assert costs_from_benchmark(path) == {"ground": 0.0, "segment": 0.1, "occlusion": 0.1, "inpaint": 0.3}


def test_plan_needs_a_gpu():
    with pytest.raises(ValueError):
        plan(0)


def test_a_tie_goes_to_a_whole_pipeline_on_every_gpu():
    costs = {stage: 1.0 for stage in GPU_STAGES}  # two stages per GPU would carry the same peak load
    slots = plan(2, costs)
    assert {(s.stage, s.gpu) for s in slots if s.gpu is not None} == {(st, g) for st in GPU_STAGES for g in (0, 1)}


def test_a_worker_is_ready_once_every_pool_process_is_warm(tmp_path):
    from workers.launch import WorkerGroup
    from workers.warmup import WARM_MESSAGE

    group = WorkerGroup({}, tmp_path)
    group.slots["segment-gpu0"], group.pools["segment-gpu0"] = Slot("segment", 0), 2
    log = tmp_path / "segment-gpu0.log"
    log.write_text(f"segment worker: {WARM_MESSAGE} in 1.0 s\nsegment-gpu0@host ready.\n")
    assert not group._ready("segment-gpu0")
    log.write_text(log.read_text() + f"segment worker: {WARM_MESSAGE} in 1.2 s\n")
    assert group._ready("segment-gpu0")
