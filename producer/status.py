"""``amodal status``: progress of a dataset, the live workers, and a dataset's results page."""
from __future__ import annotations

import collections
import sys
import time
from pathlib import Path

from tqdm import tqdm

from amodal.state import OUTCOMES, WORK_STAGES
from producer.client import FLAGGED, NOT_SENT, PENDING, STALLED, Client
from producer.dispatch import heartbeat, stall_after

PING_TIMEOUT = 2.0  # seconds workers have to answer a ping
DISPATCH_SILENT = 60.0  # seconds without a dispatcher round after which status says to start one


def live_workers(timeout: float = PING_TIMEOUT) -> dict[str, list[str]]:
    """Stage -> node names of the workers that answer Celery's ping now."""
    from tasks.app import app, broker
    from workers.main import stage_of

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


def show_status(client: Client, dataset: str, wait: bool, interval: float = 2.0, stall: float = 60.0) -> dict[str, int]:
    """Print the dataset's progress at once; with ``wait``, refresh until no row is in flight, and say
    so (with the live workers per stage) whenever nothing has moved for ``stall`` seconds."""
    counts = client.status(dataset)
    bar = tqdm(total=counts["total"], desc=dataset, unit="row", file=sys.stderr, mininterval=0, dynamic_ncols=True)
    moved = time.monotonic()
    try:
        while True:
            done = counts["total"] - counts[PENDING] - counts[NOT_SENT]
            bar.n = done
            bar.set_postfix_str(_summary(counts), refresh=True)
            if not wait or counts[PENDING] == 0:
                break
            time.sleep(interval)
            before, counts = counts, client.status(dataset)
            if counts != before:
                moved = time.monotonic()
            elif time.monotonic() - moved >= stall:
                bar.write(f"no progress for {time.monotonic() - moved:.0f} s; live workers: "
                          f"{workers_line(live_workers())}", file=sys.stderr)
                moved = time.monotonic()
    finally:
        bar.close()
    if counts[NOT_SENT]:
        print(f"{counts[NOT_SENT]} rows were recorded but never sent (the submission stopped); send them with:\n"
              f"  {client.resume_command(dataset)}", file=sys.stderr)
    if counts[STALLED]:
        print(f"{counts[STALLED]} jobs have not advanced for {stall_after():.0f} s; `amodal dispatch` sends their "
              "step again", file=sys.stderr)
    beat = heartbeat(client.store)
    if counts[PENDING] and (beat is None or time.time() - beat > DISPATCH_SILENT):
        print(f"{counts[PENDING]} rows wait for `amodal dispatch`, which has not run "
              f"{'yet' if beat is None else f'for {time.time() - beat:.0f} s'}: start it (one per deployment)",
              file=sys.stderr)
    if counts["failed"]:
        print("failed:", file=sys.stderr)
        for line in client.manifest(dataset):
            if line["status"] == "failed":
                print(f"  line {line['line']}: {line['image']} {line['query']!r}: {line['message']}", file=sys.stderr)
    return counts


def write_dataset_report(client: Client, dataset: str, folder: Path, flagged: bool = False) -> Path:
    """Download each row's result files and input into ``folder`` and write ``folder/index.html``."""
    from amodal.jobstore import latest_state, result_prefix
    from amodal.report import ReportRow, write_report
    from amodal.storage import open_storage

    folder.mkdir(parents=True, exist_ok=True)
    rows, inputs = [], collections.defaultdict(lambda: client.store)
    for line in tqdm(list(client.manifest(dataset)), desc="report", unit="row", file=sys.stderr):
        if flagged and not line.get("flags"):
            continue
        files: dict[str, bytes] = {}
        if line["job_id"] and line["status"] != "invalid":
            prefix = result_prefix(dataset, line["job_id"])
            files = {key.rpartition("/")[2]: client.store.get(key) for key in client.store.list(prefix + "/")
                     if key.endswith(".png")}
            state = latest_state(client.store, line["job_id"])
            if state is not None:
                if state.inputs and state.inputs not in inputs:
                    inputs[state.inputs] = open_storage(state.inputs)
                files["input"] = inputs[state.inputs].get(state.image_key)
        rows.append(ReportRow.from_files(line, files))
    return write_report(folder, f"amodal: {dataset}", rows)
