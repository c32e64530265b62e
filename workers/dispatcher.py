"""The dispatcher's loop inside every stage worker, so that no deployment depends on one process.

``amodal worker`` starts it as a child process once its consumer is ready (:func:`start`) and stops it
at shutdown (:func:`stop`). A child of its own keeps the loop's threads and connections out of the
worker's parent, which forks replacement pool processes. All of them wait on the dispatch lock
(``producer.dispatch``); one works. The child ends when its worker's process is gone, killed or not,
so the lock it held is released, or expires after ``AMODAL_DISPATCH_LOCK_SECONDS``, and another
worker's loop takes over.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

from amodal.config import environment
from amodal.logs import configure_logging
from producer.dispatch import run_dispatcher

PARENT_POLL = 1.0  # seconds between two checks that the worker is alive


def start(name: str) -> subprocess.Popen:
    """Start the loop for the worker ``name`` (its node name, recorded as the lock's holder), in this
    process group so that a signal to the worker's group reaches it."""
    return subprocess.Popen([sys.executable, "-m", "workers.dispatcher", name, str(os.getpid())])


def stop(child: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds."""
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()


def _follow(parent: int, done: threading.Event) -> None:
    """Set ``done`` once ``parent`` is no longer this process's parent (it exited or was killed)."""
    while not done.wait(PARENT_POLL):
        if os.getppid() != parent:
            done.set()


def main(argv: list[str]) -> None:
    name, parent = argv[0], int(argv[1])
    configure_logging("INFO", environment().log_format == "json")
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    threading.Thread(target=_follow, args=(parent, done), daemon=True, name="follow-worker").start()
    run_dispatcher(done, name=name)


if __name__ == "__main__":
    main(sys.argv[1:])
