"""Jobs kept in storage: versioned state records, outcomes, dataset rows. No broker needed.

Every state version is written once, create-only: the writer that creates version ``n + 1`` owns
the step from ``n``, so two workers racing on one job (a duplicated or redelivered message) leave
one history and one outcome. Outcomes are indexed as empty marker objects
``outcomes/<dataset>/<status>/<job_id>`` so counting a dataset is a listing, not a read per job; the
records of finished jobs are gathered in pages per rows chunk, so a manifest reads a page, not a
``job.json``, per finished row.
"""
from __future__ import annotations

import json
import time
from typing import Iterator

from amodal.errors import UsageError
from amodal.keys import (counts_key, flagged_key, outcome_key, outcomes_prefix, parse_outcome_key, record_key,
                         record_pages_prefix, rows_chunk_key, state_key, states_prefix, submission_key)
from amodal.state import OUTCOMES, JobState
from amodal.storage import ObjectNotFound, Storage


def load_state(store: Storage, job: str, version: int) -> JobState | None:
    try:
        return JobState.from_json(store.get(state_key(job, version)))
    except ObjectNotFound:
        return None


def latest_state(store: Storage, job: str) -> JobState | None:
    keys = sorted(store.list(states_prefix(job)))
    return JobState.from_json(store.get(keys[-1])) if keys else None


def commit_state(store: Storage, state: JobState) -> bool:
    """Write ``state`` at its version; False if that version exists already (someone else won)."""
    return store.put_if_absent(state.state_key, state.to_json())


def record_outcome(store: Storage, state: JobState) -> None:
    """The job's outcome marker, and a ``flagged/`` marker if its result raised doubts (amodal.quality)."""
    if state.flags:
        store.put(flagged_key(state.dataset, state.job_id), b"")
    store.put(outcome_key(state.dataset, state.status, state.job_id), b"")


def flagged_count(store: Storage, dataset: str) -> int:
    """Jobs of the dataset whose result carries flags, from the marker listing."""
    return sum(1 for _ in store.list(f"flagged/{dataset}/"))


def outcomes(store: Storage, dataset: str) -> Iterator[tuple[str, str]]:
    """(status, job id) of every job of the dataset that has an outcome, from the marker listing."""
    for key in store.list(outcomes_prefix(dataset)):
        status, job = parse_outcome_key(key)
        if status in OUTCOMES:
            yield status, job


def outcome_counts(store: Storage, dataset: str) -> dict[str, set[str]]:
    """Job ids per outcome status, from the marker listing."""
    found: dict[str, set[str]] = {s: set() for s in OUTCOMES}
    for status, job in outcomes(store, dataset):
        found[status].add(job)
    return found


def read_record(store: Storage, dataset: str, job: str) -> dict | None:
    """The job's ``job.json`` (its outcome), or None while it has none."""
    return _json_or_none(store, record_key(dataset, job))


class DatasetNotFound(UsageError):
    """No dataset of that name was submitted to this storage."""

    def __init__(self, dataset: str) -> None:
        super().__init__(f"no dataset named {dataset!r} was submitted to this storage (check --dataset and "
                         "AMODAL_STORAGE_URL)")


ROWS_PER_CHUNK = 10_000  # rows per object of a dataset's row record


def write_submission(store: Storage, dataset: str, submission: dict) -> None:
    """How the dataset was submitted (its arguments, the job settings) and how many of its rows are
    recorded (``sent``: accepted for sending, in row order) of how many (``rows``)."""
    store.put(submission_key(dataset), json.dumps(submission, sort_keys=True).encode())


def read_submission(store: Storage, dataset: str) -> dict | None:
    return _json_or_none(store, submission_key(dataset))


def write_rows_chunk(store: Storage, dataset: str, generation: int, index: int, rows: list[dict]) -> None:
    store.put(rows_chunk_key(dataset, generation, index), "".join(json.dumps(r) + "\n" for r in rows).encode())


def read_rows_chunk(store: Storage, dataset: str, generation: int, index: int) -> list[dict]:
    """The rows of one chunk; [] if it is not written (yet)."""
    try:
        data = store.get(rows_chunk_key(dataset, generation, index))
    except ObjectNotFound:
        return []
    return json.loads("[" + ",".join(data.decode().splitlines()) + "]")  # one parse: each line is one JSON value


def read_row_chunks(store: Storage, dataset: str) -> Iterator[tuple[int, int, list[dict]]]:
    """(generation, chunk index, rows) of the dataset's recorded rows in row order, one chunk in memory
    at a time."""
    submission = read_submission(store, dataset)
    if submission is None:
        raise DatasetNotFound(dataset)
    for index in range(-(-submission["sent"] // ROWS_PER_CHUNK)):
        yield submission["generation"], index, read_rows_chunk(store, dataset, submission["generation"], index)


def read_rows(store: Storage, dataset: str) -> Iterator[dict]:
    """The recorded rows of the dataset in row order, one chunk in memory at a time."""
    for _, _, rows in read_row_chunks(store, dataset):
        yield from rows


RECORD_FIELDS = ("status", "message", "quality", "flags", "prompt", "offsets")  # what manifests and exports take
# from a job's job.json


def write_record_page(store: Storage, dataset: str, generation: int, index: int, records: dict[str, dict]) -> None:
    """One page: job id -> the :data:`RECORD_FIELDS` of its ``job.json``, for jobs of one rows chunk."""
    page = {job: {name: record.get(name) for name in RECORD_FIELDS} for job, record in records.items()}
    store.put(f"{record_pages_prefix(dataset, generation, index)}{time.time_ns():020d}.json", json.dumps(page).encode())


def read_record_pages(store: Storage, dataset: str, generation: int, index: int) -> dict[str, dict]:
    """Job id -> record fields, from every page of the rows chunk."""
    found: dict[str, dict] = {}
    for key in sorted(store.list(record_pages_prefix(dataset, generation, index))):
        try:
            found.update(json.loads(store.get(key)))
        except ObjectNotFound:  # merged meanwhile (merge_record_pages): the merged page holds its records
            continue
    return found


def merge_record_pages(store: Storage, dataset: str, generation: int, index: int) -> dict[str, dict]:
    """Merge the pages of a rows chunk into one (written first, then the others deleted: a reader sees every
    record in the pages it lists); returns the records."""
    keys = sorted(store.list(record_pages_prefix(dataset, generation, index)))
    records = read_record_pages(store, dataset, generation, index)
    if len(keys) > 1:
        write_record_page(store, dataset, generation, index, records)
        for key in keys:
            store.delete(key)
    return records


def write_counts(store: Storage, dataset: str, counts: dict) -> None:
    """The dataset's outcome counts per rows chunk, ``{"generation": g, "chunks": {index: {status: n,
    "flagged": n}}}``, as the dispatcher keeps them (producer.tally)."""
    store.put(counts_key(dataset), json.dumps(counts, sort_keys=True).encode())


def read_counts(store: Storage, dataset: str) -> dict | None:
    return _json_or_none(store, counts_key(dataset))


def _json_or_none(store: Storage, key: str) -> dict | None:
    """The JSON object stored under ``key``, or None if there is none."""
    try:
        return json.loads(store.get(key))
    except ObjectNotFound:
        return None
