"""Start and supervise a host's stage workers (``amodal launch``), one process group each.

Every worker runs the dispatcher's loop (``workers.dispatcher``), which starts submitted jobs and
recovers stalled ones; one at a time holds its lock in Redis, so a deployment has one at work as long
as any worker lives. :meth:`WorkerGroup.start_dispatcher` starts ``amodal dispatch`` apart, for a
group that runs no worker.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from workers.main import GPU_STAGES, processes
from workers.placement import Slot
from workers.warmup import WARM_MESSAGE
from producer.dispatch import READY_MESSAGE as DISPATCH_READY

# The console script installed beside this interpreter: workers start the way users start them.
AMODAL = [str(Path(sys.executable).parent / "amodal")]
DISPATCH = "dispatch"  # the dispatcher's name in a group


def slot_name(slot: Slot) -> str:
    return slot.stage if slot.gpu is None else f"{slot.stage}-gpu{slot.gpu}"


@dataclass
class WorkerGroup:
    """Worker processes of one host; each writes its log to ``logs/<name>.log`` and runs in ``cwd``."""

    env: dict
    logs: Path
    cwd: Path | None = None
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    slots: dict[str, Slot] = field(default_factory=dict)
    pools: dict[str, int] = field(default_factory=dict)  # pool processes of each worker
    stopping: bool = False  # set by SIGTERM or SIGINT once :meth:`catch_stop_signals` is called

    def start(self, slot: Slot, concurrency: int | None = None) -> str:
        name = slot_name(slot)
        if name in self.procs:
            name = f"{name}-{len([n for n in self.procs if n.startswith(name)])}"
        pool = ["--concurrency", str(concurrency)] if concurrency else []
        self._spawn(name, ["worker", *slot.args, *pool, "--loglevel", "info"])
        self.slots[name] = slot
        self.pools[name] = concurrency or processes(slot.stage)
        return name

    def start_dispatcher(self) -> str:
        self._spawn(DISPATCH, [DISPATCH])
        return DISPATCH

    def _spawn(self, name: str, args: list[str]) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen([*AMODAL, *args], env=self.env, cwd=self.cwd, stdout=log,
                                                stderr=subprocess.STDOUT, start_new_session=True)

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_ready(self, names=None, timeout: float = 600) -> None:
        """Until each worker's log says its consumer is up and the models of each pool process are warm."""
        deadline = time.monotonic() + timeout
        for name in names or list(self.procs):
            while not self._ready(name):
                if self.procs[name].poll() is not None:
                    raise RuntimeError(f"worker {name} exited:\n{self.log(name)[-3000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"worker {name} not ready:\n{self.log(name)[-3000:]}")
                time.sleep(0.5)

    def _ready(self, name: str) -> bool:
        log = self.log(name)
        if name == DISPATCH:
            return DISPATCH_READY in log
        warm = self.slots[name].stage not in GPU_STAGES or log.count(WARM_MESSAGE) >= self.pools[name]
        return " ready." in log and warm

    def signal(self, name: str, sig: int) -> None:
        """Signal a worker's whole process group (the parent and its pool children)."""
        os.killpg(self.procs[name].pid, sig)

    def stop(self, timeout: float = 90) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    def catch_stop_signals(self) -> None:
        """From now on SIGTERM and SIGINT set :attr:`stopping` instead of ending this process: called before
        anything is started, a stop that comes while the group starts still stops what was started."""

        def _stop(*_) -> None:
            self.stopping = True

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)

    def supervise(self, poll: float = 5.0) -> None:
        """Restart any process that exits, until SIGTERM or SIGINT stops the whole group."""
        self.catch_stop_signals()
        while not self.stopping:
            for name, proc in list(self.procs.items()):
                if proc.poll() is not None:
                    print(f"{name} exited with {proc.returncode}; restarting", file=sys.stderr)
                    del self.procs[name]
                    if name == DISPATCH:
                        self.start_dispatcher()
                    else:
                        self.start(self.slots.pop(name), concurrency=self.pools.pop(name))
            time.sleep(poll)
        self.stop()
