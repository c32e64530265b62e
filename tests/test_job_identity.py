"""A job is the same work only with the same bytes: its id covers the input image's and visible mask's bytes
and the fingerprint of every checkpoint the stack loads, for `run`, `submit` and `eval`."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from amodal.cli.evaluate import evaluate
from amodal.evaluation.generator import synthetic_samples
from amodal.images import encode_png
from amodal.provenance import stack_checkpoints, weight_fingerprints
from amodal.runner import run_local
from amodal.settings import Settings
from producer.client import Client
from tests.synthetic import Oracle, occluded_scene
from tests.test_eval import oracle_run


class FolderOracle(Oracle):
    """The scene's stand-ins, as loaded from a model folder."""

    def __init__(self, model_dir: Path) -> None:
        super().__init__(occluded_scene())
        self.model_dir = model_dir


def fake_model_dir(root: Path, settings: Settings) -> Path:
    """A model folder with a small file at every checkpoint path the stack loads."""
    for entry in stack_checkpoints(settings):
        path = root / entry
        if Path(entry).suffix:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"weights of " + entry.encode())
        else:
            path.mkdir(parents=True, exist_ok=True)
            (path / "model.safetensors").write_bytes(b"weights of " + entry.encode())
    return root


def rows(root: Path) -> tuple[Path, Path]:
    """Two rows of the occluded scene (a ball under a box), each with its visible mask."""
    scene = occluded_scene()
    images = root / "images"
    images.mkdir(parents=True)
    target = scene.shapes[0].label
    lines = []
    for name in ("a", "b"):
        (images / f"{name}.png").write_bytes(encode_png(scene.render()))
        (images / f"{name}_mask.png").write_bytes(encode_png(np.where(scene.visible(target), 255, 0).astype(np.uint8)))
        lines.append({"image": f"{name}.png", "query": target, "visible_mask": f"{name}_mask.png"})
    annotations = root / "rows.jsonl"
    annotations.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return images, annotations


def touch_pixel(path: Path, value: int) -> None:
    """Rewrite an image with one corner pixel changed (the objects stay where they are)."""
    from PIL import Image

    pixels = np.array(Image.open(path))
    pixels[0, 0] = value
    path.write_bytes(encode_png(pixels))


def drop_mask_pixel(path: Path) -> None:
    """Rewrite a mask with its first set pixel cleared."""
    from PIL import Image

    pixels = np.array(Image.open(path))
    y, x = np.argwhere(pixels > 0)[0]
    pixels[y, x] = 0
    path.write_bytes(encode_png(pixels))


def change_weight(model_dir: Path, settings: Settings) -> None:
    first = model_dir / stack_checkpoints(settings)[0]
    target = first if first.is_file() else next(p for p in first.rglob("*") if p.is_file())
    target.write_bytes(target.read_bytes() + b" retrained")


def test_run_resumes_the_same_bytes_and_redoes_changed_images_masks_and_weights(tmp_path):
    settings = Settings()
    models = fake_model_dir(tmp_path / "models", settings)
    images, annotations = rows(tmp_path)
    out = tmp_path / "out"

    def run() -> dict[str, str]:
        outcomes = run_local(images, annotations, out, FolderOracle(models), settings, progress=False)
        assert {o.status for o in outcomes} == {"completed"}
        return {o.image: o.job_id for o in outcomes}

    first = run()
    assert first["a.png"] != first["b.png"]  # the same bytes under two names are two rows
    record = out / first["a.png"] / "job.json"
    written = record.stat().st_mtime_ns
    assert run() == first and record.stat().st_mtime_ns == written  # resumed, not run again

    touch_pixel(images / "a.png", 7)
    changed = run()
    assert changed["a.png"] != first["a.png"] and changed["b.png"] == first["b.png"]

    drop_mask_pixel(images / "b_mask.png")
    masked = run()
    assert masked["b.png"] != changed["b.png"] and masked["a.png"] == changed["a.png"]

    before = weight_fingerprints(models, settings)
    change_weight(models, settings)
    assert weight_fingerprints(models, settings) != before
    reweighted = run()
    assert not set(reweighted.values()) & set(masked.values())


def test_submit_records_new_jobs_for_changed_images_masks_and_weights(tmp_path):
    settings = Settings()
    models = fake_model_dir(tmp_path / "models", settings)
    images, annotations = rows(tmp_path)
    storage = (tmp_path / "store").as_uri()

    def submit() -> dict[str, str]:
        client = Client(storage_url=storage, settings=settings, model_dir=models)
        client.submit_dataset(images, annotations, "d", progress=False)
        return {line["image"]: line["job_id"] for line in client.manifest("d")}

    first = submit()
    assert submit() == first
    touch_pixel(images / "a.png", 7)
    changed = submit()
    assert changed["a.png"] != first["a.png"] and changed["b.png"] == first["b.png"]
    drop_mask_pixel(images / "b_mask.png")
    masked = submit()
    assert masked["b.png"] != changed["b.png"] and masked["a.png"] == changed["a.png"]
    change_weight(models, settings)
    assert not set(submit().values()) & set(masked.values())



def test_eval_into_the_same_folder_never_scores_old_results_against_new_truth(tmp_path, scorer):
    old = {0: synthetic_samples(3, seed=0)}
    evaluate(old, tmp_path, oracle_run(old), scorer, Settings(), None, progress=False)
    first = {line["image"]: line["job_id"] for line in map(json.loads, (tmp_path / "seed-0/run/manifest.jsonl").open())}
    record = tmp_path / "seed-0/run" / first["row00000.png"] / "job.json"
    written = record.stat().st_mtime_ns
    again = evaluate(old, tmp_path, oracle_run(old), scorer, Settings(), None, progress=False)
    assert record.stat().st_mtime_ns == written  # the same rows resume

    new = {0: synthetic_samples(3, seed=7)}  # other rows under the same names, in the same folder
    report = evaluate(new, tmp_path, oracle_run(new), scorer, Settings(), None, progress=False)
    second = {line["image"]: line["job_id"] for line in map(json.loads, (tmp_path / "seed-0/run/manifest.jsonl").open())}
    assert not set(first.values()) & set(second.values())
    assert report["methods"]["ours"]["failure_rate"]["mean"] == 0.0
    # near 1: the colour-matching oracle is exact only up to the window's resampling on the striped objects
    assert report["methods"]["ours"]["hidden_iou"]["mean"] == pytest.approx(1.0, abs=0.06)
    assert again["methods"]["ours"]["hidden_iou"]["mean"] == pytest.approx(1.0, abs=0.06)


def test_weight_fingerprints_sample_large_files(tmp_path, monkeypatch):
    """Files past the whole-file limit are fingerprinted by size and spread blocks: a change anywhere in a
    block, or of the size, changes the fingerprint."""
    import amodal.provenance as provenance

    monkeypatch.setattr(provenance, "WHOLE_FILE_LIMIT", 1000)
    monkeypatch.setattr(provenance, "BLOCK", 100)
    path = tmp_path / "big.bin"
    data = bytearray(os.urandom(5000))
    path.write_bytes(bytes(data))
    before = provenance.checkpoint_fingerprint(path)
    data[-1] ^= 1  # the last block is always read
    path.write_bytes(bytes(data))
    assert provenance.checkpoint_fingerprint(path) != before
