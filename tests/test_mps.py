"""The CUDA MPS control daemon's start and stop (workers.mps), against a fake ``nvidia-cuda-mps-control``
that logs each call: there is no GPU here."""
from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

import workers.mps
from amodal.errors import ServiceError, UsageError
from workers.mps import CONTROL, MpsDaemon, control_binary


def fake_mps_control(folder: Path, fail: str | None = None, start_seconds: float = 0) -> Path:
    """Write a fake control program into ``folder/bin`` and return that folder (to put first on PATH). Each
    call appends ``args=... pipe=... stdin=...`` to ``$CUDA_MPS_LOG_DIRECTORY/control.log`` (stdin only
    read when called with no arguments); given ``fail``, it then prints that on stderr and exits 1. Starting
    (``-d``) then takes ``start_seconds``."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / CONTROL
    script.write_text(
        "#!/bin/sh\n"
        'echo "args=$* pipe=$CUDA_MPS_PIPE_DIRECTORY stdin=$(if [ $# -eq 0 ]; then cat; fi)"'
        ' >> "$CUDA_MPS_LOG_DIRECTORY/control.log"\n'
        f'if [ "$1" = -d ]; then sleep {start_seconds}; fi\n'
        + (f"echo {shlex.quote(fail)} >&2\nexit 1\n" if fail is not None else ""))
    script.chmod(0o755)
    return bin_dir


def control_calls(log: str) -> list[tuple[str, str, str]]:
    """The fake's calls in a control log's text: (arguments, pipe directory, stdin) each."""
    return [re.fullmatch(r"args=(.*?) pipe=(.*) stdin=(.*)", line).groups() for line in log.splitlines() if line]


def on_path(monkeypatch: pytest.MonkeyPatch, bin_dir: Path) -> None:
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_daemon_starts_in_its_folders_and_quits_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Entering starts ``-d`` with the folders made and named (absolute) in its environment; leaving sends
    ``quit``; a second stop sends nothing; the log tail is the logs' text."""
    on_path(monkeypatch, fake_mps_control(tmp_path))
    monkeypatch.chdir(tmp_path)
    pipe, log = tmp_path / "mps" / "pipe", tmp_path / "mps" / "log"
    with MpsDaemon(Path("mps/pipe"), Path("mps/log")) as daemon:
        assert daemon.running and pipe.is_dir() and log.is_dir()
        assert daemon.env == {"CUDA_MPS_PIPE_DIRECTORY": str(pipe), "CUDA_MPS_LOG_DIRECTORY": str(log)}
        assert control_calls((log / "control.log").read_text()) == [("-d", str(pipe), "")]
    assert not daemon.running
    assert control_calls((log / "control.log").read_text()) == [("-d", str(pipe), ""), ("", str(pipe), "quit")]
    daemon.stop()
    text = (log / "control.log").read_text()
    assert len(control_calls(text)) == 2
    assert daemon.log_tail() == text and daemon.log_tail(5) == text[-5:]


def test_control_binary_on_path_or_beside_the_driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Neither on PATH nor in DRIVER_BIN: a usage error naming the program; only in DRIVER_BIN: found there."""
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(workers.mps, "DRIVER_BIN", tmp_path / "driver")
    with pytest.raises(UsageError, match=CONTROL):
        control_binary()
    with pytest.raises(UsageError, match=CONTROL):
        MpsDaemon(tmp_path / "pipe", tmp_path / "log")
    monkeypatch.setattr(workers.mps, "DRIVER_BIN", fake_mps_control(tmp_path / "driver"))
    assert control_binary() == str(tmp_path / "driver" / "bin" / CONTROL)


def test_failed_start_raises_with_what_the_program_said(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A control program that exits 1: a service error holding its message, not running, and stop sends
    nothing."""
    on_path(monkeypatch, fake_mps_control(tmp_path, fail="cannot reach the driver"))
    daemon = MpsDaemon(tmp_path / "pipe", tmp_path / "log")
    with pytest.raises(ServiceError, match="cannot reach the driver"):
        daemon.start()
    assert not daemon.running
    daemon.stop()
    assert control_calls((tmp_path / "log" / "control.log").read_text()) == [("-d", str(tmp_path / "pipe"), "")]
