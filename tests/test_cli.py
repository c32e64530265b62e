"""The ``amodal`` command as users type it: the installed console script, from outside the repository.

Every mistake ends in one line that says what is wrong and what to do, with exit code 2 for bad usage
or input and 1 for a service that cannot be reached; ``AMODAL_DEBUG=1`` shows the traceback.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import venv
from pathlib import Path

import pytest

from tests.cluster import amodal, outside_repository

ROOT = Path(__file__).resolve().parents[1]


def user_env(**changes: str) -> dict[str, str]:
    """This environment without any AMODAL_* or AWS_* variable, nor PYTHONPATH, plus ``changes``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AMODAL_", "AWS_")) and k != "PYTHONPATH"}
    env.update(AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE="/nonexistent", AWS_SHARED_CREDENTIALS_FILE="/nonexistent")
    env.update(changes)
    return env


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_line_error(res: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """The command failed with ``code`` and one line holding ``words``, and no traceback."""
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == code, (res.returncode, res.stderr)
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("amodal: ") and "Traceback" not in res.stderr, res.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture
def dataset_files(tmp_path, paper_examples) -> tuple[Path, Path]:
    return paper_examples / "images", paper_examples / "example_annotation.json"


def test_help_describes_every_verb_and_option():
    res = amodal(user_env(), "--help")
    assert res.returncode == 0
    for verb in ("run", "models", "submit", "status", "export", "worker", "launch", "flower", "eval"):
        assert f"\n    {verb} " in res.stdout, verb
        sub = amodal(user_env(), verb, "--help")
        assert sub.returncode == 0, sub.stderr
        options = [line for line in sub.stdout.splitlines() if line.strip().startswith("--")]
        for line in options:  # every option has a help text on its line or the next
            assert len(line.split(None, 1)) == 2 or line.strip().split()[-1].isupper(), line
    for args in (("models", "tiny", "--help"), ("models", "download", "--help")):
        res = amodal(user_env(), *args)
        assert res.returncode == 0 and "dir " in res.stdout and "folder" in res.stdout


def test_help_shows_defaults_once_marks_required_options_and_describes_every_verb():
    top = amodal(user_env(), "--help").stdout
    verbs = ("run", "models", "submit", "status", "worker", "launch", "flower", "settings", "dispatch", "eval",
             "metrics")
    for verb in verbs:
        assert f"\n    {verb} " in top, verb
        text = amodal(user_env(), verb, "--help").stdout
        description = text.split("\n\n")[1]
        assert not description.startswith(("options:", "positional")) and len(description) > 20, (verb, text)
        flat = " ".join(text.split())
        assert "(default: None)" not in flat and "(default: False)" not in flat, (verb, text)
        for chunk in flat.split(" --")[1:]:
            assert chunk.count("default") <= 1, (verb, chunk)
    status = " ".join(amodal(user_env(), "status", "--help").stdout.split())
    assert "(default: 2.0)" in status and "(default: 500)" in status
    submit = " ".join(amodal(user_env(), "submit", "--help").stdout.split())
    assert submit.count("(required)") == 2 and "record" in submit  # --images, --dataset (--annotations: not with shards)
    version = amodal(user_env(), "--version")
    assert version.returncode == 0 and version.stdout.split()[0] == "amodal" and version.stdout.split()[1][0].isdigit()


def test_settings_lists_every_setting_with_type_default_and_meaning():
    from dataclasses import fields

    from amodal.settings import Settings

    res = amodal(user_env(), "settings", "--json")
    assert res.returncode == 0, res.stderr
    listed = [json.loads(line) for line in res.stdout.splitlines()]
    assert [s["name"] for s in listed] == [f.name for f in fields(Settings)]
    for item, f in zip(listed, fields(Settings)):
        assert item["default"] == f.default and item["type"] and item["meaning"], item
    table = amodal(user_env(), "settings").stdout
    assert all(f.name in table for f in fields(Settings)) and "denoising steps" in table
    assert 'robust' in table and 'composite="feather"' in table  # the presets, with what each sets
    unknown = amodal(user_env(), "run", "--images", "x", "--annotations", "y", "--out", "z", "--set", "bogus=1")
    one_line_error(unknown, 2, "unknown setting 'bogus'", "amodal settings")


def test_a_closed_pipe_ends_quietly(tmp_path, paper_examples, redis_url):
    """``amodal status --dataset D --manifest | head -3`` as a shell runs it: three lines, no traceback."""
    env = user_env(AMODAL_STORAGE_URL=f"file://{tmp_path / 'store'}", AMODAL_BROKER_URL=redis_url)
    submit = amodal(env, "submit", "--images", str(paper_examples / "images"), "--annotations",
                    str(paper_examples / "example_annotation.json"), "--dataset", "piped", "-q")
    assert submit.returncode == 0, submit.stderr
    assert "recorded 7 rows" in submit.stderr and json.loads(submit.stdout)["recorded"] == 7
    for command in ("amodal status --dataset piped --manifest | head -3", "amodal settings | head -1",
                    "amodal --help | head -1"):
        res = subprocess.run(["bash", "-o", "pipefail", "-c", command], env={**env, "PATH": f"{ROOT / '.venv/bin'}:"
                             f"{env['PATH']}"}, cwd=outside_repository(), capture_output=True, text=True, timeout=120)
        assert res.stderr == "" and res.returncode in (0, 141), (command, res.returncode, res.stderr)
        assert 1 <= len(res.stdout.splitlines()) <= 3


def test_services_without_their_settings_say_so_in_one_line(tmp_path):
    """``dispatch``, ``metrics``, ``flower``, ``launch`` and ``worker`` as typed with a variable missing or wrong."""
    storage = f"file://{tmp_path / 'store'}"
    cases = [
        (user_env(), ("dispatch",), 2, "AMODAL_STORAGE_URL"),
        (user_env(), ("metrics",), 2, "AMODAL_STORAGE_URL"),
        (user_env(AMODAL_STORAGE_URL=storage, AMODAL_BROKER_URL="filesystem://"), ("metrics",), 2, "Redis"),
        (user_env(), ("flower",), 2, "FLOWER_BASIC_AUTH"),
        (user_env(), ("launch", "--gpus", "1"), 2, "AMODAL_"),
        (user_env(), ("worker", "--stage", "finalize"), 2, "AMODAL_STORAGE_URL"),
        (user_env(AMODAL_LOG_FORMAT="xml"), ("status", "--dataset", "d"), 2, "AMODAL_LOG_FORMAT"),
        (user_env(), ("status", "--dataset", "d", "--timeout", "5"), 2, "--wait"),
        (user_env(), ("status", "--dataset"), 2, "--dataset"),
        (user_env(), ("statu",), 2, "invalid choice"),
    ]
    for env, args, code, words in cases:
        one_line_error(amodal(env, *args, timeout=120), code, words)


def test_log_format_json_gives_one_object_per_line(tmp_path, redis_url):
    """``amodal --log-format json dispatch``: every line on stderr is a JSON object a collector can read."""
    env = user_env(AMODAL_STORAGE_URL=f"file://{tmp_path / 'store'}", AMODAL_BROKER_URL=redis_url,
                   AMODAL_DISPATCH_LOCK_SECONDS="5")
    proc = subprocess.Popen([str(ROOT / ".venv/bin/amodal"), "--log-format", "json", "dispatch"], env=env,
                            cwd=outside_repository(), stderr=subprocess.PIPE, text=True)
    try:
        first = json.loads(proc.stderr.readline())
    finally:
        proc.terminate()
        rest = proc.communicate(timeout=30)[1]
    assert first["level"] == "INFO" and first["logger"] == "producer.dispatch" and "dispatching:" in first["message"]
    assert all(isinstance(json.loads(line), dict) for line in rest.splitlines() if line.strip())


def test_misuse_gives_one_line_and_its_exit_code(tmp_path, dataset_files, redis_url, seaweed_server, seaweed_bucket):
    """Against a real S3 server (SeaweedFS checks credentials) and a broker that is not there."""
    images, annotations = dataset_files
    storage = f"file://{tmp_path / 'store'}"
    no_broker = f"redis://127.0.0.1:{dead_port()}/0"
    submit = ("submit", "--images", str(images), "--annotations", str(annotations), "--dataset", "d")
    s3 = {k: v for k, v in seaweed_server.env.items() if not k.endswith(("KEY_ID", "ACCESS_KEY"))}
    creds = {k: v for k, v in seaweed_server.env.items() if k not in s3}
    s3_bucket = seaweed_bucket
    cases = [
        ("status without storage", user_env(), ("status", "--dataset", "d"), 2, "AMODAL_STORAGE_URL"),
        ("submit without storage", user_env(), submit, 2, "AMODAL_STORAGE_URL"),
        ("unknown dataset", user_env(AMODAL_STORAGE_URL=storage, AMODAL_BROKER_URL=redis_url),
         ("status", "--dataset", "nope"), 2, "no dataset named 'nope'"),
        ("broker not answering", user_env(AMODAL_STORAGE_URL=storage, AMODAL_BROKER_URL=no_broker), submit, 1,
         "does not answer"),
        ("annotations missing", user_env(AMODAL_STORAGE_URL=storage, AMODAL_BROKER_URL=redis_url),
         ("submit", "--images", str(images), "--annotations", str(tmp_path / "none.json"), "--dataset", "d"), 2,
         "--annotations: no such file"),
        ("images not a folder", user_env(AMODAL_STORAGE_URL=storage, AMODAL_BROKER_URL=redis_url),
         ("submit", "--images", str(annotations), "--annotations", str(annotations), "--dataset", "d"), 2,
         "--images: not a folder"),
        ("S3 without credentials", user_env(AMODAL_STORAGE_URL=f"s3://{s3_bucket}/p", **s3),
         ("status", "--dataset", "d"), 2, "credentials"),
        ("S3 wrong credentials", user_env(AMODAL_STORAGE_URL=f"s3://{s3_bucket}/p", **s3,
                                          AWS_ACCESS_KEY_ID="wrong", AWS_SECRET_ACCESS_KEY="wrong"),
         ("status", "--dataset", "d"), 2, "credentials"),
        ("bucket missing", user_env(AMODAL_STORAGE_URL="s3://no-such-bucket-here/p", **s3, **creds),
         ("status", "--dataset", "d"), 2, "no-such-bucket-here"),
        ("S3 endpoint down", user_env(AMODAL_STORAGE_URL=f"s3://{s3_bucket}/p", **creds,
                                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{dead_port()}", AWS_DEFAULT_REGION="us-east-1",
                                      AMODAL_STORAGE_RETRY_SECONDS="0"),
         ("status", "--dataset", "d"), 1, "127.0.0.1"),
        ("malformed AMODAL_SETTINGS", user_env(AMODAL_SETTINGS="{max_passes: 2"), ("run", "--images", str(images),
         "--annotations", str(annotations), "--out", str(tmp_path / "o")), 2, "AMODAL_SETTINGS is not a JSON object"),
        ("unknown setting", user_env(), ("run", "--images", str(images), "--annotations", str(annotations), "--out",
                                         str(tmp_path / "o"), "--set", "max_pases=2"), 2, "max_pases"),
        ("setting of the wrong type", user_env(), ("run", "--images", str(images), "--annotations", str(annotations),
                                                   "--out", str(tmp_path / "o"), "--set", "max_passes=many"), 2,
         "max_passes"),
        ("malformed AMODAL_* number", user_env(AMODAL_INPAINT_BATCH="lots", AMODAL_STORAGE_URL=storage),
         ("status", "--dataset", "d"), 2, "AMODAL_INPAINT_BATCH"),
        ("run without a model folder", user_env(), ("run", "--images", str(images), "--annotations", str(annotations),
                                                    "--out", str(tmp_path / "o")), 2, "AMODAL_MODEL_DIR"),
        ("worker with an incomplete model folder", user_env(AMODAL_MODEL_DIR=str(tmp_path), AMODAL_STORAGE_URL=storage),
         ("worker", "--stage", "inpaint"), 2, "stable-diffusion-2-inpainting"),
    ]
    seen = {}
    for name, env, args, code, words in cases:
        seen[name] = one_line_error(amodal(env, *args, timeout=120), code, words)
    # the traceback is there for whoever asks for it
    debug = amodal(user_env(AMODAL_DEBUG="1"), "status", "--dataset", "d")
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    print(json.dumps(seen, indent=1))


def test_run_with_a_wrong_model_folder_stops_before_any_work(tmp_path, dataset_files):
    images, annotations = dataset_files
    (tmp_path / "models").mkdir()
    out = tmp_path / "out"
    res = amodal(user_env(), "run", "--images", str(images), "--annotations", str(annotations), "--out", str(out),
                 "--models", str(tmp_path / "models"), "--set", "grounder=gdino_sam", "--set", "tagger=clip")
    one_line_error(res, 2, "model checkpoint not found", "amodal models download")
    assert not out.exists()  # no empty manifest, no progress bar


def test_settings_reach_job_json_from_set_and_amodal_settings(tmp_path, tiny_models):
    """``amodal run``: AMODAL_SETTINGS, then --set over it, both recorded in each result's job.json."""
    from tests.synthetic import synthetic_dataset

    images, annotations = synthetic_dataset(tmp_path, count=1)
    out = tmp_path / "out"
    env = user_env(AMODAL_SETTINGS=json.dumps({"num_inference_steps": 3, "max_passes": 1, "grounder": "gdino_sam",
                                               "tagger": "clip", "seed": 5}))
    res = amodal(env, "run", "--images", str(images), "--annotations", str(annotations), "--out", str(out),
                 "--models", str(tiny_models), "--set", "seed=7", "-q")
    assert res.returncode == 0, res.stderr
    records = [json.loads(p.read_text()) for p in out.glob("*/job.json")]
    assert records
    for record in records:
        assert record["settings"]["num_inference_steps"] == 3  # from AMODAL_SETTINGS
        assert record["settings"]["seed"] == 7  # --set wins over AMODAL_SETTINGS


def test_non_editable_install_runs_a_worker_and_a_submit(tmp_path, redis_url, paper_examples):
    """``pip install .`` (what the container does) into a fresh environment: celeryconfig comes with the
    package, and a worker and a submit work from outside the repository."""
    wheels = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(wheels), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    fresh = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(fresh)
    site = subprocess.run([str(fresh / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # the dependencies come from this environment's site-packages, after the fresh one's own
    ours = [p for p in sys.path if p.endswith("site-packages")]
    (Path(site) / "deps.pth").write_text("\n".join(ours) + "\n")
    wheel = next(wheels.glob("amodal-*.whl"))
    installed = subprocess.run([str(fresh / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps",
                                "--no-index", str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr
    script = fresh / "bin" / "amodal"
    env = user_env(AMODAL_BROKER_URL=redis_url, AMODAL_STORAGE_URL=f"file://{tmp_path / 'store'}")
    where = subprocess.run([str(fresh / "bin" / "python"), "-c", "import amodal, celeryconfig; "
                            "print(amodal.__file__); print(celeryconfig.__file__)"],
                           env=env, cwd=outside_repository(), capture_output=True, text=True, check=True)
    assert all(line.startswith(site) for line in where.stdout.split()), where.stdout
    worker = subprocess.Popen([str(script), "worker", "--stage", "finalize"], env=env, cwd=outside_repository(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        submit = subprocess.run([str(script), "submit", "--images", str(paper_examples / "images"), "--annotations",
                                 str(paper_examples / "example_annotation.json"), "--dataset", "installed", "-q"],
                                env=env, cwd=outside_repository(), capture_output=True, text=True, timeout=300)
        assert submit.returncode == 0, submit.stderr
        assert json.loads(submit.stdout)["recorded"] == 7
        deadline = time.monotonic() + 120
        while True:  # the worker answers pings once its consumer is up
            workers = subprocess.run([str(script), "status", "--workers"], env=env, cwd=outside_repository(),
                                     capture_output=True, text=True, timeout=60)
            assert workers.returncode == 0, workers.stderr
            if "finalize@" in workers.stdout or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert "finalize@" in workers.stdout, (workers.stdout, workers.stderr)
    finally:
        worker.terminate()
        output = worker.communicate(timeout=90)[0]
    assert "ModuleNotFoundError" not in output and " ready." in output, output[-3000:]


def test_the_command_loads_no_torch_before_a_worker_pins_its_gpu():
    """``amodal worker`` sets CUDA_VISIBLE_DEVICES before torch loads: building the command's parser (every
    verb's options) must not import it."""
    res = subprocess.run([sys.executable, "-c", "import sys; from amodal.cli import build_parser; build_parser(); "
                          "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))"],
                         env=user_env(), cwd=outside_repository(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]", res.stdout
