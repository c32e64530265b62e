"""CUDA MPS for a host whose GPUs each serve several stage processes (``amodal launch --mps``).

Without MPS the processes' CUDA contexts take turns on a GPU in time slices: a process whose kernels
are small and whose host waits are many (the segment stage) waits out the others' slices every time.
Under MPS every process is a client of one server per GPU and their kernels run on the GPU together
(docs/design.md, "Stages"). The control daemon is NVIDIA's own
(``nvidia-cuda-mps-control``, shipped with the driver); this module starts it in folders of the
deployment's choosing, gives the workers the variables that make them its clients, and stops it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from amodal.errors import ServiceError, UsageError

CONTROL = "nvidia-cuda-mps-control"
# Where NVIDIA's container runtime mounts the driver's programs when they are not on PATH.
DRIVER_BIN = Path("/usr/local/nvidia/bin")


def control_binary() -> str:
    """The control daemon's program: on ``PATH``, else beside the mounted driver."""
    found = shutil.which(CONTROL) or shutil.which(CONTROL, path=str(DRIVER_BIN))
    if not found:
        raise UsageError(f"--mps: {CONTROL} is not on PATH nor in {DRIVER_BIN} (it comes with the NVIDIA driver)")
    return found


class MpsDaemon:
    """One MPS control daemon: its pipes in ``pipe_dir`` (short: it holds Unix sockets), its logs in
    ``log_dir``; :attr:`env` makes a process started with it a client."""

    def __init__(self, pipe_dir: Path, log_dir: Path, control: str | None = None) -> None:
        self.pipe_dir, self.log_dir = Path(pipe_dir).absolute(), Path(log_dir).absolute()
        self.control = control or control_binary()
        self.running = False

    @property
    def env(self) -> dict[str, str]:
        return {"CUDA_MPS_PIPE_DIRECTORY": str(self.pipe_dir), "CUDA_MPS_LOG_DIRECTORY": str(self.log_dir)}

    def _control(self, *args: str, command: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([self.control, *args], input=command, env={**os.environ, **self.env},
                              capture_output=True, text=True, timeout=60)

    def start(self) -> None:
        """Start the daemon (``-d``); it starts a GPU's server when the first client connects."""
        self.pipe_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        done = self._control("-d")
        if done.returncode:
            said = (done.stdout + done.stderr).strip() or f"exit code {done.returncode}"
            raise ServiceError(f"the CUDA MPS daemon did not start: {said} (its log: {self.log_dir})")
        self.running = True

    def stop(self) -> None:
        """Ask the daemon to quit; it waits for its clients to exit (stop them first)."""
        if self.running:
            self._control(command="quit\n")
            self.running = False

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the daemon's and its servers' logs."""
        return "".join(p.read_text(errors="replace")[-chars:] for p in sorted(self.log_dir.glob("*.log")))

    def __enter__(self) -> "MpsDaemon":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
