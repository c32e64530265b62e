"""The GPU benchmark's plumbing on the CPU: ``bench/gpu_throughput.py --tiny`` runs both stacks (LISA
grounding, and visible masks given) and their reference-structured baselines through real workers, a
Redis of its own and the dispatcher, and writes a complete record."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_mps import control_calls, fake_mps_control

ROOT = Path(__file__).resolve().parents[1]

STAGES = ("ground", "segment", "occlusion", "inpaint", "finalize")


@pytest.mark.slow
def test_benchmark_runs_both_stacks_and_baselines_on_tiny_models(tmp_path):
    out = tmp_path / "record.json"
    command = [sys.executable, "bench/gpu_throughput.py", "--tiny", "--images", "2", "--baseline-images", "1",
               "--steps", "2", "--passes", "1", "--no-compile", "--models", str(tmp_path / "models"), "--out", str(out),
               "--mps"]
    if shutil.which("redis-server"):
        command += ["--redis-server", shutil.which("redis-server")]
    env = {**os.environ, "PATH": f"{fake_mps_control(tmp_path)}{os.pathsep}{os.environ['PATH']}"}
    res = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["mps"] is True  # the workers ran as clients of a daemon started, then told to quit
    calls = control_calls(record["mps_log_tail"])
    assert [(args, stdin) for args, _, stdin in calls] == [("-d", ""), ("", "quit")], record["mps_log_tail"]
    assert len({pipe for _, pipe, _ in calls}) == 1  # one daemon: quit went to the one started
    for stack, baseline in (("ours", "baseline"), ("ours_masks_given", "baseline_masks_given")):
        ours = record[stack]
        assert ours["statuses"] == {"completed": 2} and ours["passes"] == [1]
        assert record[baseline]["statuses"] == ["completed"] and record[f"speedup{stack[4:]}"] > 0
        assert all(ours["stage_seconds_per_image"][stage] > 0 for stage in STAGES)
        assert {stage for stage, calls in ours["jobs_per_call"].items() if calls["calls"] >= 1} == \
            {"ground", "segment", "occlusion", "inpaint"}
        models = {name for calls in ours["model_calls"].values() for name in calls}
        assert {"GroundingDino.detect", "SamSegmenter.segment", "StableDiffusionInpainter.inpaint"} <= models
        assert ours["denoising"]["calls"] >= 1 and ours["denoising"]["timed_sample_steps"] > 0
    assert "LisaGrounder.generate" in {n for calls in record["ours"]["model_calls"].values() for n in calls}
    assert "LisaGrounder.generate" not in {n for calls in record["ours_masks_given"]["model_calls"].values()
                                           for n in calls}


@pytest.mark.slow
def test_benchmark_runs_the_baseline_alone(tmp_path):
    out = tmp_path / "record.json"
    command = [sys.executable, "bench/gpu_throughput.py", "--tiny", "--images", "1", "--baseline-images", "1",
               "--steps", "2", "--passes", "1", "--datasets", "masks_given", "--no-distributed",
               "--models", str(tmp_path / "models"), "--out", str(out)]
    res = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["baseline"]["statuses"] == ["completed"] and record["baseline"]["images_per_hour"] > 0
    assert not {"ours", "speedup", "mps"} & set(record)  # no workers started, no ratio without them


def test_console_script_is_written_where_the_project_is_not_installed(tmp_path, monkeypatch):
    import workers.launch
    from bench.gpu_throughput import ensure_console_script

    script = tmp_path / "bin" / "amodal"
    script.parent.mkdir()
    monkeypatch.setattr(workers.launch, "AMODAL", [str(script)])
    ensure_console_script()
    res = subprocess.run([str(script), "worker", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0 and "--stage" in res.stdout, res.stderr
    before = script.stat().st_mtime_ns
    ensure_console_script()  # an existing script is left alone
    assert script.stat().st_mtime_ns == before


def test_full_size_grounding_dino_tokenizer_keeps_tag_words_whole(tmp_path):
    from transformers import AutoTokenizer

    from amodal.models import grounding_dino
    from amodal.models.ram_plus import tag_list
    from bench.fullsize import write_word_tokenizer

    grounding_dino.write_tiny(tmp_path)
    write_word_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    # the ids Grounding DINO hard-codes stay where bert-base-uncased has them
    assert tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]", ".", "?"]) == [101, 102, 1012, 1029]
    assert tokenizer.tokenize("Milk can. T-shirt.") == ["milk", "can", ".", "t", "-", "shirt", "."]
    words = [len(tag.split()) for tag in tag_list()[:200]]
    tokens = [len(ids) for ids in tokenizer(tag_list()[:200], add_special_tokens=False)["input_ids"]]
    assert sum(tokens) <= 1.3 * sum(words)  # about a token a word, as bert-base-uncased spells these tags


def test_lisa_timing_script_loads_a_checkpoint_folder(tiny_models, tmp_path, paper_examples):
    from amodal.models.registry import LISA_DIR

    out = tmp_path / "lisa.json"
    photo = next(paper_examples.glob("images/*.jpg"))
    command = [sys.executable, str(ROOT / "bench" / "lisa_full_size.py"), "--checkpoint", str(tiny_models / LISA_DIR),
               "--device", "cpu", "--batch", "2", "--repeats", "2", "--new-tokens", "4", "--image", str(photo),
               "--out", str(out)]
    res = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["batch"] == 2 and record["new_tokens"] == 4 and len(record["ground_s"]) == 2
    assert record["quantization"] == "none" and record["loaded_from"].startswith("checkpoint folder")
    assert record["mask_pixels"] > 0  # the scripted answers reach [SEG], so SAM decodes a mask
    res = subprocess.run(command + ["--quantization", "8bit"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600)
    # the option reaches the loader, which refuses it here (no bitsandbytes, or no CUDA device)
    assert res.returncode != 0 and "8-bit and 4-bit loading" in res.stderr.strip().splitlines()[-1]


def test_sam_encoder_script_compares_index_builds_and_compiled_masks(tmp_path):
    out = tmp_path / "sam.json"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "sam_encoder.py"), "--device", "cpu", "--tiny",
                          "--batch", "2", "--repeats", "1", "--out", str(out)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["encoder"] == "tiny" and record["device_index_max_abs_diff"] == 0.0
    assert record["eager_host_index_s"] > 0 and record["eager_device_index_s"] > 0 and record["compiled_s"] > 0
    masks = record["compiled_masks"]  # float32 on the CPU: compiling moves no mask by more than a few pixels
    assert masks["masks"] == 2 * 5 and masks["min_iou"] > 0.99 and masks["pixels_differing"] < 1e-3


@pytest.mark.slow
def test_inpaint_call_script_times_a_call_in_phases_and_compares_variants(tmp_path):
    out = tmp_path / "record.json"
    res = subprocess.run([sys.executable, "bench/inpaint_call.py", "--tiny", "--calls", "1", "--warmup", "1",
                          "--models", str(tmp_path / "models"), "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    variants = json.loads(out.read_text())["variants"]
    assert set(variants) == {"eager_vae", "compiled_vae"}
    for variant in variants.values():
        median = variant["median_s"]
        assert all(median[phase] > 0 for phase in ("text", "vae_encode", "loop", "vae_decode", "wall_s"))
        assert median["wall_s"] > median["loop"]
    assert variants["compiled_vae"]["options"] == {"compile_vae": True}
    assert variants["compiled_vae"]["vs_eager_vae_uint8"]["max_abs"] <= 2


def test_first_outcome_seconds_is_the_first_sample_with_an_outcome():
    from bench.gpu_throughput import first_outcome_seconds

    progress = [(0.0, 0), (0.5, 0), (10.0, 0), (10.5, 4), (11.0, 4), (14.5, 8)]
    assert first_outcome_seconds(progress) == 10.5
