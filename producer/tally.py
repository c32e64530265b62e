"""Outcome counts kept as the dispatcher sees jobs end, so that ``status`` reads one small object whatever the
dataset's size, and record pages merged once a rows chunk has no job left in flight.

The dispatcher writes, for each rows chunk, pages of the records of the jobs it saw end
(``amodal.jobstore.write_record_page``, each with the job's ``status``). A chunk's counts are those of the
union of its pages, keyed by job id: a job seen ending twice (a resubmission, or a dispatcher restarted
before it saved its progress) is counted once, and counts rebuilt after a restart are the same. They are
stored per chunk in ``datasets/<dataset>/counts.json`` (``amodal.jobstore.write_counts``).
"""
from __future__ import annotations

import collections
from concurrent.futures import ThreadPoolExecutor

from amodal.jobstore import (ROWS_PER_CHUNK, flagged_count, merge_record_pages, outcomes, read_counts, read_record,
                             read_record_pages, read_submission, write_counts, write_record_page)
from amodal.state import JobState
from amodal.storage import Storage

Chunk = tuple[str, int, int]  # (dataset, generation, index)


class Tally:
    """The dispatcher's record pages and counts: the records of the chunks with jobs in flight are kept in
    memory (loaded from their pages on first use), each dataset's counts too."""

    def __init__(self, store: Storage, pool: ThreadPoolExecutor) -> None:
        self.store, self.pool = store, pool
        self._records: dict[Chunk, dict[str, tuple[str, bool]]] = {}  # chunk -> job -> (status, flagged)
        self._counts: dict[str, dict] = {}  # dataset -> its stored counts

    def ended(self, chunk: Chunk, states: list[JobState]) -> None:
        """Page the records of a chunk's jobs that ended (from their ``job.json``, else their last state)
        and count them."""
        dataset, generation, index = chunk
        found = self.pool.map(lambda state: read_record(self.store, dataset, state.job_id), states)
        page = {state.job_id: record or {"status": state.status, "message": state.message, "flags": state.flags}
                for state, record in zip(states, found)}
        write_record_page(self.store, dataset, generation, index, page)
        records = self._chunk(chunk)
        records.update({job: (record.get("status") or "", bool(record.get("flags"))) for job, record in page.items()})
        self._save(chunk, records)

    def finished(self, chunk: Chunk, in_flight: set[Chunk], cursor: list[int]) -> None:
        """Merge the chunk's pages into one if none of its jobs is in flight and the dispatcher has started
        all of its rows (``cursor``: its [generation, rows started] of the dataset)."""
        dataset, generation, index = chunk
        if chunk in in_flight or cursor[0] != generation:
            return
        submission = read_submission(self.store, dataset) or {}
        end = min((index + 1) * ROWS_PER_CHUNK, submission.get("sent", 0))
        if cursor[1] >= end and (end == (index + 1) * ROWS_PER_CHUNK or submission.get("complete")):
            merge_record_pages(self.store, dataset, generation, index)
            self._records.pop(chunk, None)

    def _chunk(self, chunk: Chunk) -> dict[str, tuple[str, bool]]:
        if chunk not in self._records:
            pages = read_record_pages(self.store, *chunk)
            self._records[chunk] = {job: (r.get("status") or "", bool(r.get("flags"))) for job, r in pages.items()}
        return self._records[chunk]

    def _save(self, chunk: Chunk, records: dict[str, tuple[str, bool]]) -> None:
        dataset, generation, index = chunk
        counts = self._counts.get(dataset) or read_counts(self.store, dataset) or {}
        if counts.get("generation") != generation:
            counts = {"generation": generation, "chunks": {}}
        tally = collections.Counter(status for status, _ in records.values())
        tally["flagged"] = sum(flagged for _, flagged in records.values())
        counts["chunks"][str(index)] = dict(tally)
        self._counts[dataset] = counts
        write_counts(self.store, dataset, counts)


def ended_counts(store: Storage, dataset: str, generation: int) -> dict[str, int]:
    """Jobs of the dataset's rows (of ``generation``) seen ending, per outcome, and ``flagged``: one read. A
    dataset the dispatcher has kept no counts for yet (none of its jobs seen ending, or submitted before counts
    were kept) is counted from its outcome and flagged markers, a listing."""
    counts = read_counts(store, dataset)
    total: collections.Counter = collections.Counter()
    if counts is None:
        total.update(status for status, _ in outcomes(store, dataset))
        total["flagged"] = flagged_count(store, dataset)
    elif counts.get("generation") == generation:
        for chunk in counts["chunks"].values():
            total.update(chunk)
    return dict(total)
