"""The distributed verbs as users type them, against a real S3 server (SeaweedFS) and Redis:
``amodal launch`` starts the stage workers, ``amodal submit`` and ``amodal status`` follow a dataset,
and the settings given on each command line or in the environment reach the results."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import NamedTuple

import psutil
import pytest

from tests.browser import page_facts
from tests.cluster import AMODAL, amodal, outside_repository
from tests.synthetic import synthetic_dataset
from tests.test_mps import control_calls, fake_mps_control

pytestmark = pytest.mark.slow
STAGES = ("ground", "segment", "occlusion", "inpaint", "finalize")


def launch_env(redis_url: str, storage: str, models: Path, server) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith(("AMODAL_", "AWS_"))}
    env.update(server.env, AMODAL_BROKER_URL=redis_url, AMODAL_STORAGE_URL=storage, AMODAL_MODEL_DIR=str(models),
               AMODAL_SETTINGS=json.dumps({"dtype": "float32"}), AMODAL_INPAINT_FLUSH="0.3",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


class Launch(NamedTuple):
    """A running ``amodal launch``: its environment, its process and its MPS daemon's control log."""

    env: dict[str, str]
    proc: subprocess.Popen
    control_log: Path


@pytest.fixture
def launched(tmp_path, redis_url, seaweed_server, seaweed_bucket, tiny_models):
    """``amodal launch --gpus 1 --mps`` (every stage's worker, a fake MPS control program first on PATH)
    under a worker-side ``--set``, until it is stopped; stopped, it has sent the daemon ``quit``."""
    env = launch_env(redis_url, f"s3://{seaweed_bucket}/data", tiny_models, seaweed_server)
    env["PATH"] = f"{fake_mps_control(tmp_path)}{os.pathsep}{env['PATH']}"
    logs = tmp_path / "logs"
    control_log = logs / "mps" / "control.log"
    proc = subprocess.Popen([*AMODAL, "launch", "--gpus", "1", "--mps", "--logs", str(logs),
                             "--set", "compile_unet=false"],
                            env=env, cwd=outside_repository(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        wait_for_workers(env, proc, logs)
        yield Launch(env, proc, control_log)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    calls = [(args, stdin) for args, _, stdin in control_calls(control_log.read_text())]
    assert proc.returncode == 0 and calls == [("-d", ""), ("", "quit")], calls  # stopped, it told the daemon


def wait_for_workers(env: dict, proc: subprocess.Popen, logs: Path, timeout: float = 600) -> None:
    """Until ``amodal status --workers`` lists a worker of every stage whose models are warm."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        res = amodal(env, "status", "--workers", timeout=60)
        live = {line.split()[0] for line in res.stdout.splitlines() if line.strip()}
        warm = all("models loaded and warmed" in (logs / f"{stage}-gpu0.log").read_text(errors="replace")
                   for stage in STAGES[:-1] if (logs / f"{stage}-gpu0.log").exists())
        if live >= set(STAGES) and warm:
            return
        time.sleep(2)
    raise TimeoutError("the launched workers did not come up:\n" + "\n".join(
        p.read_text(errors="replace")[-2000:] for p in logs.glob("*.log")))


def test_launch_submit_status_and_report(launched, tmp_path):
    """Settings reach job.json from every way in: the producer's AMODAL_SETTINGS and --set, the workers'
    AMODAL_SETTINGS and launch --set; status follows the run and writes a page that loads. Under ``--mps``
    the daemon was started once in an absolute pipe folder, and the workers are its clients."""
    calls = control_calls(launched.control_log.read_text())
    assert len(calls) == 1 and calls[0][0] == "-d", calls
    pipe = calls[0][1]
    assert Path(pipe).is_absolute() and Path(pipe).is_dir(), pipe
    children = psutil.Process(launched.proc.pid).children()
    assert children
    assert [child.environ().get("CUDA_MPS_PIPE_DIRECTORY") for child in children] == [pipe] * len(children)
    env = dict(launched.env)
    images, annotations = synthetic_dataset(tmp_path, count=4, given=4)
    # the robust preset, so that every row with tiny models gets a result
    env["AMODAL_SETTINGS"] = json.dumps({"preset": "robust", "num_inference_steps": 2, "max_passes": 1, "seed": 1})
    res = amodal(env, "submit", "--images", str(images), "--annotations", str(annotations), "--dataset", "cmds",
                 "--set", "seed=3", "-q")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["recorded"] == 4 and "recorded 4 rows" in res.stderr

    waited = amodal(env, "status", "--dataset", "cmds", "--wait", "--interval", "1", timeout=900)
    assert waited.returncode == 0, waited.stderr
    counts = json.loads(waited.stdout)
    assert counts["total"] == 4 and counts["completed"] + counts["unoccluded"] == 4, counts
    assert "cmds" in waited.stderr  # progress was shown

    manifest = [json.loads(line) for line in amodal(env, "status", "--dataset", "cmds", "--manifest").stdout.splitlines()]
    assert len(manifest) == 4
    from amodal.storage import open_storage

    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    store = open_storage(env["AMODAL_STORAGE_URL"])
    for line in manifest:
        record = json.loads(store.get(f"results/cmds/{line['job_id']}/job.json"))
        settings = record["settings"]
        assert settings["num_inference_steps"] == 2 and settings["max_passes"] == 1  # producer AMODAL_SETTINGS
        assert settings["seed"] == 3  # producer --set, over its AMODAL_SETTINGS
        assert settings["dtype"] == "float32"  # the workers' AMODAL_SETTINGS
        assert settings["compile_unet"] is False  # launch --set, handed to every worker
        assert line["quality"] is not None and isinstance(line["flags"], list)

    flagged = [json.loads(line) for line in
               amodal(env, "status", "--dataset", "cmds", "--manifest", "--flagged").stdout.splitlines()]
    assert flagged == [line for line in manifest if line["flags"]]
    assert counts["flagged"] == len(flagged)  # counted from markers, not by reading each result

    report = tmp_path / "report"
    res = amodal(env, "status", "--dataset", "cmds", "--report", str(report))
    assert res.returncode == 0, res.stderr
    facts = page_facts(report / "index.html", width=1400)
    completions = sum(store.exists(f"results/cmds/{line['job_id']}/amodal_completion.png") for line in manifest)
    assert len(facts["images"]) == 4 + completions and all(i["ok"] for i in facts["images"]), facts["images"]
    assert facts["scroll_width"] <= facts["client_width"], facts  # fits 1,400 px
    records = [link for link in facts["links"] if link["text"] == "job.json"]
    assert len(records) == 4 and all(link["exists"] for link in records), facts["links"]
    limited = tmp_path / "limited"
    res = amodal(env, "status", "--dataset", "cmds", "--report", str(limited), "--limit", "2")
    assert res.returncode == 0 and json.loads(res.stdout)["pages"] == 1, res.stderr
    assert len([link for link in page_facts(limited / "index.html")["links"] if link["text"] == "job.json"]) == 2


def test_status_wait_names_what_is_missing_and_gives_up(tmp_path, redis_url, seaweed_server, seaweed_bucket,
                                                      paper_examples):
    """No worker runs. ``status --wait`` shows progress at once and names the missing dispatcher; with
    ``--timeout`` it exits 1 in one line. With ``amodal dispatch`` alone, the jobs wait in ground's queue
    and it names the stage that has no worker."""
    env = launch_env(redis_url, f"s3://{seaweed_bucket}/data", tmp_path, seaweed_server)
    res = amodal(env, "submit", "--images", str(paper_examples / "images"), "--annotations",
                 str(paper_examples / "example_annotation.json"), "--dataset", "idle", "-q")
    assert res.returncode == 0, res.stderr
    waited = amodal(env, "status", "--dataset", "idle", "--wait", "--interval", "0.5", "--stall", "2",
                    "--timeout", "4", timeout=120)
    assert waited.returncode == 1, waited.stderr
    assert "idle" in waited.stderr and "0/7" in waited.stderr and "waiting 7" in waited.stderr, waited.stderr
    assert "no dispatcher at work (has never run)" in waited.stderr, waited.stderr
    last = waited.stderr.strip().splitlines()[-1]
    assert last.startswith("amodal: idle: no progress for") and "--timeout 4" in last, last

    dispatcher = subprocess.Popen([*AMODAL, "dispatch"], env=env, cwd=outside_repository(),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while json.loads(amodal(env, "status", "--dataset", "idle").stdout)["stages"]["ground"]["queued"] < 7:
            assert time.monotonic() < deadline
            time.sleep(1)
        waited = amodal(env, "status", "--dataset", "idle", "--wait", "--interval", "0.5", "--stall", "2",
                        "--timeout", "6", timeout=120)
    finally:
        dispatcher.terminate()
        dispatcher.wait(timeout=30)
    assert waited.returncode == 1 and "ground 7 queued, 0 in work, 0 done" in waited.stderr, waited.stderr
    assert "7 jobs queued for ground and no live ground worker: start `amodal worker --stage ground`" in \
        waited.stderr, waited.stderr


def test_launch_stopped_while_the_daemon_starts(tmp_path, redis_url, seaweed_server, seaweed_bucket, tiny_models):
    """SIGTERM to ``amodal launch --mps`` while the MPS daemon is still starting: it starts no worker, tells
    the daemon to quit and exits 0, leaving no process behind."""
    env = launch_env(redis_url, f"s3://{seaweed_bucket}/data", tiny_models, seaweed_server)
    env["PATH"] = f"{fake_mps_control(tmp_path, start_seconds=4)}{os.pathsep}{env['PATH']}"
    logs = tmp_path / "logs"
    control_log = logs / "mps" / "control.log"
    proc = subprocess.Popen([*AMODAL, "launch", "--gpus", "1", "--mps", "--logs", str(logs)], env=env,
                            cwd=outside_repository(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not (control_log.exists() and control_log.read_text()) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # the launcher alone, as `kill PID` sends it, while `-d` still runs
    try:
        out = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out
    calls = [(args, stdin) for args, _, stdin in control_calls(control_log.read_text())]
    assert calls == [("-d", ""), ("", "quit")], calls
    assert not list(logs.glob("*.log")), list(logs.iterdir())  # no worker nor dispatcher was started
