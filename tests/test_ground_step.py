"""The ground step over a batch of jobs: given masks read, the others grounded in one grounder call."""
from __future__ import annotations

import numpy as np

from amodal import artifacts as art
from amodal.canvas import neutral_background
from amodal.images import encode_png
from amodal.settings import Settings
from amodal.state import JobState
from amodal.steps import Context, ground
from amodal.storage import LocalStorage
from tests.synthetic import Oracle, occluded_scene


def test_jobs_without_a_mask_are_grounded_in_one_call(tmp_path):
    scene = occluded_scene()
    target = scene.shapes[0].label
    inputs = LocalStorage(tmp_path / "in")
    inputs.put("scene.png", encode_png(scene.render()))
    inputs.put("mask.png", encode_png(np.where(scene.visible(target), 255, 0).astype(np.uint8)))
    oracle = Oracle(scene)
    seen: list[list[str]] = []
    batch = oracle.ground_batch
    oracle.ground_batch = lambda images, queries: seen.append(list(queries)) or batch(images, queries)
    ctx = Context(store=LocalStorage(tmp_path / "out"), inputs=inputs, models=oracle, background=neutral_background())
    settings = Settings().to_dict()

    def job(i: int, query: str, image: str = "scene.png", mask: str | None = None) -> JobState:
        return JobState(job_id=f"j{i}", dataset="d", image_key=image, query=query, settings=settings, mask_key=mask,
                        result_prefix=f"results/d/j{i}")

    states = [job(0, target), job(1, target, mask="mask.png"), job(2, "unicorn"), job(3, target, image="gone.png"),
              job(4, target)]
    ground(states, ctx)
    assert seen == [[target, "unicorn", target]]  # one call, for the three readable jobs without a mask
    assert [s.stage for s in states] == ["segment", "segment", "finalize", "finalize", "segment"]
    assert [s.status for s in states] == [None, None, "no_target", "invalid", None]
    assert [s.backends.get("ground") for s in states] == ["oracle", "given", "oracle", None, "oracle"]
    for i in (0, 1, 4):
        np.testing.assert_array_equal(art.get_mask(ctx.store, states[i].key(art.VISIBLE)), scene.visible(target))
        assert states[i].image_size == (scene.height, scene.width)
