"""The warm-up's order across a host's worker processes (workers/warmup.py)."""
from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import torch._inductor.runtime.cache_dir_utils  # noqa: F401  (imported once, before the processes fork)

from workers.warmup import first_on_this_host

KEY = {"settings": {"compile_unet": True}, "size": 512, "batch": 16}


def _warm(cache: str, out: str, seconds: float, key: dict, fail: bool = False) -> None:
    """One process's warm-up: the times it entered and left the block, appended to ``out``."""
    import os

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    try:
        with first_on_this_host("inpaint", key):
            entered = time.monotonic()
            Path(out + ".entered").touch()
            time.sleep(seconds)
            left = time.monotonic()
            if fail:
                raise RuntimeError("out of memory while compiling")
    except RuntimeError:
        pass
    with open(out, "a") as f:
        f.write(f"{entered} {left}\n")


def _run(tmp_path: Path, count: int, seconds: float = 1.0, key: dict = KEY, fail_first: bool = False):
    """Start ``count`` processes together; each one's (entered, left), sorted by entry."""
    out = tmp_path / "times.txt"
    out.unlink(missing_ok=True)
    Path(f"{out}.entered").unlink(missing_ok=True)
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=_warm, args=(str(tmp_path / "cache"), str(out), seconds, key, fail_first and i == 0))
             for i in range(count)]
    for p in procs:
        p.start()
        while fail_first and p is procs[0] and not Path(f"{out}.entered").exists():
            time.sleep(0.05)  # the failing one takes the lock first
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return sorted(tuple(map(float, line.split())) for line in out.read_text().splitlines())


def _overlapping(times) -> bool:
    return any(b_in < a_out for (_, a_out), (b_in, _) in zip(times, times[1:]))


def test_the_first_warm_up_on_a_host_runs_alone_and_the_rest_together(tmp_path):
    """Until one process has warmed, the others wait (then they load its graphs from the cache); once one has,
    every later process warms at once."""
    first = _run(tmp_path, 3)
    assert not _overlapping(first[:2])  # the first alone
    assert first[1][0] >= first[0][1]
    assert _overlapping(first[1:])  # the two that waited, together
    again = _run(tmp_path, 3)
    assert again[-1][0] < again[0][1]  # all three at once


def test_a_new_key_warms_alone_again(tmp_path):
    _run(tmp_path, 1)
    times = _run(tmp_path, 2, key={**KEY, "batch": 8})
    assert not _overlapping(times)


def test_a_failed_warm_up_marks_nothing(tmp_path):
    """The first process fails: the next warms alone, as a first one does, and the last waits for it."""
    times = _run(tmp_path, 3, fail_first=True)
    assert not _overlapping(times)


def test_the_mark_lives_in_the_inductor_cache(tmp_path):
    """Clearing the cache (where the compiled graphs were) clears the mark."""
    _run(tmp_path, 1, seconds=0.0)
    assert [p.suffix for p in (tmp_path / "cache").glob("amodal-inpaint-*")] == [".warmed"]
