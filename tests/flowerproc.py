"""Flower as a real process for tests: ``amodal flower`` on a free port, started as users start it (the
installed console script, from a folder outside the repository), and what its API reports."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import requests

ROOT = Path(__file__).resolve().parents[1]
AMODAL = str(Path(sys.executable).parent / "amodal")  # the installed console script


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env(broker_url: str, auth: tuple[str, str] | None) -> dict[str, str]:
    """This process's environment with the broker, the credentials (none: unset) and loopback only;
    the repository is not on ``PYTHONPATH``, so Flower runs from what is installed."""
    env = dict(os.environ, AMODAL_BROKER_URL=broker_url, FLOWER_ADDRESS="127.0.0.1")
    paths = [p for p in env.pop("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != ROOT]
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    env.pop("FLOWER_BASIC_AUTH", None)
    if auth:
        env["FLOWER_BASIC_AUTH"] = ":".join(auth)
    return env


def run_amodal_flower(env: dict[str, str], port: int, **kwargs) -> subprocess.Popen:
    """``amodal flower --port PORT`` under ``env``, run from the temporary folder (outside the repository)."""
    return subprocess.Popen([AMODAL, "flower", "--port", str(port)], env=env, cwd=tempfile.gettempdir(), text=True,
                            **kwargs)


def launch_flower(env: dict[str, str], port: int, timeout: float = 60) -> subprocess.Popen:
    """``amodal flower --port PORT`` under ``env``, returned once ``/healthcheck`` answers."""
    proc = run_amodal_flower(env, port, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            requests.get(f"http://127.0.0.1:{port}/healthcheck", timeout=1)
            return proc
        except requests.ConnectionError:
            if proc.poll() is not None:
                raise RuntimeError(f"flower exited: {proc.stdout.read()}")
            time.sleep(0.1)
    proc.kill()
    raise TimeoutError(f"flower did not answer on port {port} within {timeout} s")


def start_flower(broker_url: str, port: int, auth: tuple[str, str]) -> tuple[str, Callable[[], str]]:
    """Flower on ``port`` against ``broker_url``; returns its base URL and ``stop`` (which returns
    everything the process printed)."""
    proc = launch_flower(flower_env(broker_url, auth), port)

    def stop() -> str:
        proc.terminate()
        try:
            return proc.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.communicate()[0]

    return f"http://127.0.0.1:{port}", stop


def flower_workers(base_url: str, auth: tuple[str, str], workername: str | None = None) -> dict:
    """``/api/workers`` after asking the workers afresh: node name -> what Flower knows of it (the
    tasks each holds, ``active`` and others, only when asked about one ``workername``)."""
    params = {"refresh": 1, **({"workername": workername} if workername else {})}
    response = requests.get(f"{base_url}/api/workers", params=params, auth=auth, timeout=30)
    response.raise_for_status()
    return response.json()
