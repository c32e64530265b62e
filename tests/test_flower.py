"""Flower for real: basic auth on, workers listed, Prometheus metrics served."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[1]
AUTH = ("watcher", "s3cret-pw")


def start_flower(env: dict, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "amodal.cli", "flower", "--port", str(port)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for _ in range(200):
        try:
            requests.get(f"http://127.0.0.1:{port}/healthcheck", timeout=1)
            return proc
        except requests.ConnectionError:
            if proc.poll() is not None:
                raise RuntimeError(proc.stdout.read())
            time.sleep(0.1)
    proc.kill()
    raise TimeoutError("flower did not start")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env(redis_url: str) -> dict:
    return dict(os.environ, AMODAL_BROKER_URL=redis_url, FLOWER_BASIC_AUTH=":".join(AUTH),
                PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def test_flower_refuses_without_credentials_and_serves_metrics(redis_url):
    port = free_port()
    proc = start_flower(flower_env(redis_url), port)
    try:
        base = f"http://127.0.0.1:{port}"
        assert requests.get(f"{base}/api/workers", timeout=10).status_code == 401
        assert requests.get(f"{base}/api/workers", auth=("watcher", "wrong"), timeout=10).status_code == 401
        ok = requests.get(f"{base}/api/workers", auth=AUTH, timeout=10)
        assert ok.status_code == 200 and isinstance(ok.json(), dict)
        metrics = requests.get(f"{base}/metrics", timeout=10)
        assert metrics.status_code == 200 and "flower_" in metrics.text
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    assert AUTH[1] not in output  # the password is never printed


def test_flower_needs_basic_auth(redis_url):
    env = flower_env(redis_url)
    env.pop("FLOWER_BASIC_AUTH")
    res = subprocess.run([sys.executable, "-m", "amodal.cli", "flower", "--port", str(free_port())], env=env,
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "FLOWER_BASIC_AUTH" in res.stderr


@pytest.mark.parametrize("value", ["nopassword", "user:", ":pw", "a b:c"])
def test_malformed_auth_is_refused(monkeypatch, value):
    from producer.flower import basic_auth_from_env

    monkeypatch.setenv("FLOWER_BASIC_AUTH", value)
    with pytest.raises(SystemExit):
        basic_auth_from_env()
