"""``amodal status``: progress of a dataset, the live workers, and a dataset's results page."""
from __future__ import annotations

import collections
import itertools
import sys
import time
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from amodal.errors import ServiceError
from amodal.state import OUTCOMES, WORK_STAGES
from producer.client import FLAGGED, NOT_SENT, PENDING, STALLED, Client
from producer.dispatch import stall_after
from producer.progress import Progress, stages_line

PING_TIMEOUT = 2.0  # seconds workers have to answer a ping
DISPATCH_SILENT = 60.0  # seconds without a dispatcher round after which status names it missing


def live_workers(timeout: float = PING_TIMEOUT) -> dict[str, list[str]]:
    """Stage -> node names of the workers that answer Celery's ping now."""
    from tasks.app import app, broker
    from tasks.nodes import stage_of

    found: dict[str, list[str]] = {stage: [] for stage in WORK_STAGES}
    with broker() as connection:
        replies = app.control.ping(timeout=timeout, connection=connection) or []
    for reply in replies:
        for node in reply:
            found.setdefault(stage_of(node), []).append(node)
    return found


def workers_line(found: dict[str, list[str]]) -> str:
    return ", ".join(f"{stage} {len(nodes)}" + ("" if nodes else " (none: start one)") for stage, nodes in found.items())


def print_workers() -> None:
    """``status --workers``: one line per live worker, then the count per stage."""
    found = live_workers()
    for stage, nodes in found.items():
        for node in sorted(nodes):
            print(f"{stage:>10}  {node}")
    print(f"live workers: {workers_line(found)}", file=sys.stderr)


def _summary(counts: dict[str, int]) -> str:
    return ", ".join(f"{state} {counts[state]}" for state in (*OUTCOMES, PENDING, STALLED, NOT_SENT, FLAGGED) if counts[state])


def missing_services(progress: Progress, workers: dict[str, list[str]] | None) -> list[str]:
    """What keeps the dataset's jobs from moving: no dispatcher at work while rows wait to start, or a
    stage with the dataset's jobs queued and no live worker (``workers``: :func:`live_workers`)."""
    problems = []
    beat = progress.last_round
    if progress.waiting and (beat is None or time.time() - beat > DISPATCH_SILENT):
        since = "has never run" if beat is None else f"last ran {time.time() - beat:.0f} s ago"
        problems.append(f"no dispatcher at work ({since}): start the stage workers (each runs one) or `amodal dispatch`")
    for stage, nodes in (workers or {}).items():
        if not nodes and progress.stages[stage].queued:
            problems.append(f"{progress.stages[stage].queued} jobs queued for {stage} and no live {stage} worker: "
                            f"start `amodal worker --stage {stage}`")
    return problems


def _stuck_line(progress: Progress, quiet_for: float) -> tuple[str, bool]:
    """(the line that says nothing moved, and why; whether a missing process was named)."""
    workers = live_workers()
    problems = missing_services(progress, workers)
    why = "; ".join(problems) if problems else f"live workers: {workers_line(workers)}"
    return f"no progress for {quiet_for:.0f} s: {why}", bool(problems)


def show_status(client: Client, dataset: str, wait: bool, interval: float = 2.0, stall: float = 60.0,
                timeout: float | None = None) -> dict:
    """Print the dataset's progress at once (rows per outcome; per stage queued, in work and done); with
    ``wait``, refresh until no row is in flight. Any change, inside the pipeline too, is progress; after
    ``stall`` seconds without one it names what is missing (the dispatcher, a stage's workers) or the
    live workers; after ``timeout`` seconds without one it raises :class:`ServiceError`."""
    # 1. the first reading, shown at once; a dispatcher missing from the start is named at once too
    progress = client.progress(dataset)
    counts = progress.counts
    bar = tqdm(total=counts["total"], desc=dataset, unit="row", file=sys.stderr, mininterval=0, dynamic_ncols=True)
    where = tqdm(bar_format="{desc}", file=sys.stderr, position=1, leave=True) if wait else None
    if wait:
        for problem in missing_services(progress, None):
            bar.write(problem, file=sys.stderr)
    moved = said = time.monotonic()
    try:
        while True:
            # 2. show it
            counts = progress.counts
            bar.n = counts["total"] - counts[PENDING] - counts[NOT_SENT]
            bar.set_postfix_str(_summary(counts), refresh=True)
            if where is not None:
                where.set_description_str(stages_line(progress), refresh=True)
            if not wait or counts[PENDING] == 0:
                break
            # 3. read again; say what is missing when nothing moved for `stall`, give up after `timeout`
            time.sleep(interval)
            before, progress = progress, client.progress(dataset)
            now = time.monotonic()
            if progress.snapshot() != before.snapshot():
                moved = said = now
            elif timeout is not None and now - moved >= timeout:
                line, _ = _stuck_line(progress, now - moved)
                raise ServiceError(f"{dataset}: {line} (gave up after --timeout {timeout:g} s)")
            elif now - said >= stall:
                bar.write(_stuck_line(progress, now - moved)[0], file=sys.stderr)
                said = now
    finally:
        if where is not None:
            where.close()
        bar.close()
    _explain_counts(client, dataset, progress)
    return progress.to_dict()


def _explain_counts(client: Client, dataset: str, progress: Progress) -> None:
    """After the progress: rows never sent, stalled jobs, a dispatcher that does not run, failed rows."""
    counts = progress.counts
    if counts[NOT_SENT]:
        print(f"{counts[NOT_SENT]} rows were recorded but never sent (the submission stopped); send them with:\n"
              f"  {client.resume_command(dataset)}", file=sys.stderr)
    if counts[STALLED]:
        print(f"{counts[STALLED]} jobs have not advanced for {stall_after():.0f} s; the dispatcher sends their "
              "step again", file=sys.stderr)
    for problem in missing_services(progress, None):
        print(problem, file=sys.stderr)
    if counts["failed"]:
        print("failed:", file=sys.stderr)
        for line in client.manifest(dataset):
            if line["status"] == "failed":
                print(f"  line {line['line']}: {line['image']} {line['query']!r}: {line['message']}", file=sys.stderr)


def report_lines(client: Client, dataset: str, limit: int, flagged: bool = False,
                 statuses: list[str] | None = None) -> Iterator[dict]:
    """The first ``limit`` manifest lines that match (flagged ones only, or those with ``statuses``), read
    lazily: the rows past them are never read."""
    matching = (line for line in client.manifest(dataset)
                if (not flagged or line.get("flags")) and (not statuses or line["status"] in statuses))
    return itertools.islice(matching, limit)


def write_dataset_report(client: Client, dataset: str, folder: Path, limit: int, flagged: bool = False,
                         statuses: list[str] | None = None) -> list[Path]:
    """Download the result files, record and input of the first ``limit`` matching rows into ``folder``
    and write its pages (``folder/index.html`` first)."""
    from amodal.jobstore import latest_state
    from amodal.keys import result_prefix
    from amodal.keys import JOB_RECORD, OFFSETS
    from amodal.report import ReportRow, write_report
    from amodal.storage import open_storage

    (folder / "jobs").mkdir(parents=True, exist_ok=True)
    inputs = collections.defaultdict(lambda: client.store)

    def rows() -> Iterator[ReportRow]:
        for line in tqdm(report_lines(client, dataset, limit, flagged, statuses), desc="report", unit="row",
                         file=sys.stderr):
            files: dict[str, bytes] = {}
            link = None
            if line["job_id"] and line["status"] != "invalid":
                prefix = result_prefix(dataset, line["job_id"])
                for key in client.store.list(prefix + "/"):
                    name = key.rpartition("/")[2]
                    if name.endswith(".png") or name in (OFFSETS, JOB_RECORD):
                        files[name] = client.store.get(key)
                if JOB_RECORD in files:
                    link = f"jobs/{line['job_id']}.json"
                    (folder / link).write_bytes(files.pop(JOB_RECORD))
                state = latest_state(client.store, line["job_id"])
                if state is not None:
                    if state.inputs and state.inputs not in inputs:
                        inputs[state.inputs] = open_storage(state.inputs)
                    files["input"] = inputs[state.inputs].get(state.image_key)
            yield ReportRow.from_files(line, files, link)

    which = " and ".join(filter(None, ["flagged" if flagged else "", "/".join(statuses or [])])) or "all"
    note = f"This report: the first {limit} rows ({which}) in row order (--limit, --flagged, --status choose)."
    return write_report(folder, f"amodal: {dataset}", rows(), client.status(dataset), note)
