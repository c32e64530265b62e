"""The Python client: submit jobs, follow a dataset, read its outcomes and results.

Images from a local folder are uploaded once, under their content hash; images under an ``s3://``
prefix are read in place by the workers. Job ids are content hashes, so submitting a dataset again
enqueues only the rows that have no outcome yet: an interrupted submission or run resumes.
"""
from __future__ import annotations

import hashlib
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator

from tqdm import tqdm

from amodal.annotations import Row, read_annotations, resolve_input, validate_query
from amodal.images import InvalidInput
from amodal.config import environment, resolve_settings
from amodal.errors import UsageError
from amodal.jobstore import (commit_state, latest_state, outcome_counts, read_record, read_rows, read_submission,
                             record_outcome, result_prefix, write_rows, write_submission)
from amodal.settings import Settings
from amodal.state import OUTCOMES, JobState, job_id
from amodal.storage import Storage, open_storage

PENDING = "pending"  # sent to the workers, no outcome yet
NOT_SENT = "not_sent"  # recorded by a submission that stopped before sending its job
SENT_EVERY = 500  # jobs sent between two records of a submission's progress


@dataclass
class SubmitReport:
    rows: int = 0
    enqueued: int = 0  # new jobs, or unfinished ones sent on again
    finished: int = 0  # rows whose job already has an outcome
    invalid: list[dict] = field(default_factory=list)  # rows refused at submission, with the reason


class Client:
    """Talks to the broker (``AMODAL_BROKER_URL``) and the storage (``AMODAL_STORAGE_URL``)."""

    def __init__(self, broker_url: str | None = None, storage_url: str | None = None,
                 settings: Settings | None = None) -> None:
        self.storage_url = storage_url or environment().storage_url
        if not self.storage_url:
            raise UsageError("no storage: pass storage_url or set AMODAL_STORAGE_URL (file:///path or s3://bucket/prefix)")
        self.store: Storage = open_storage(self.storage_url)
        self.settings = settings or resolve_settings()
        from tasks.app import app

        if broker_url:
            app.conf.broker_url = broker_url
        self.app = app

    # -- submitting ------------------------------------------------------------------------
    def _upload(self, data: bytes, suffix: str) -> str:
        key = f"inputs/{hashlib.sha256(data).hexdigest()}{suffix.lower()}"
        if not self.store.exists(key):
            self.store.put(key, data)
        return key

    def _input_key(self, images: str | Path, relative: str, what: str = "image") -> tuple[str, str]:
        """(storage URL, key) of one input file; local files are uploaded first."""
        if str(images).startswith("s3://"):
            source = open_storage(str(images))
            key = str(PurePosixPath(relative))
            if not source.exists(key):
                fallback = PurePosixPath(relative).name
                if not source.exists(fallback):
                    raise InvalidInput(f"{what} not found: {relative}")
                key = fallback
            return str(images), key
        path = resolve_input(Path(images).resolve(), relative, what)
        return "", self._upload(path.read_bytes(), path.suffix)

    def _job_for(self, row: Row, images: str | Path, dataset: str) -> JobState:
        if row.error:
            raise InvalidInput(row.error)
        query = validate_query(row.query, self.settings.max_query_chars)
        inputs, image_key = self._input_key(images, row.image)
        mask_key = self._input_key(images, row.visible_mask, "visible mask")[1] if row.visible_mask else None
        jid = job_id(dataset, image_key, query, mask_key, self.settings)
        return JobState(job_id=jid, dataset=dataset, image_key=image_key, query=query, mask_key=mask_key,
                        inputs=inputs, settings=self.settings.to_dict(), result_prefix=result_prefix(dataset, jid))

    def _enqueue(self, state: JobState) -> bool:
        """Send the job on unless it has an outcome; True if a message was sent."""
        from tasks.app import send_stage

        if read_record(self.store, state.dataset, state.job_id) is not None:
            return False
        if not commit_state(self.store, state):
            state = latest_state(self.store, state.job_id)
            if state.stage == "done":
                record_outcome(self.store, state)
                return False
        send_stage(state.stage, state.job_id, state.version)
        return True

    def submit(self, image: str | Path, query: str, dataset: str, visible_mask: str | Path | None = None) -> str:
        """Submit one (image, query); ``image`` is a local file or an ``s3://`` URL. Returns the job id."""
        image = str(image)
        if image.startswith("s3://"):
            root, _, name = image.rpartition("/")
            images, relative = root, name
        else:
            images, relative = str(Path(image).resolve().parent), Path(image).name
        mask = None
        if visible_mask is not None:
            mask = os.path.relpath(Path(visible_mask).resolve(), images) if not images.startswith("s3://") \
                else str(visible_mask).rpartition("/")[2]
        state = self._job_for(Row(line=1, image=relative, query=query, visible_mask=mask, error=None), images, dataset)
        self._enqueue(state)
        return state.job_id

    def submit_dataset(self, images: str | Path, annotations: str | Path, dataset: str,
                       progress: bool = True) -> SubmitReport:
        """Submit every row of an annotation file; record the rows for ``status``/``manifest``."""
        rows = read_annotations(Path(annotations))
        report = SubmitReport(rows=len(rows))
        records, jobs, seen = [], [], {}
        for row in tqdm(rows, desc="checking rows", unit="row", disable=not progress):
            record = {"line": row.line, "image": row.image, "query": row.query, "job_id": None}
            try:
                state = self._job_for(row, images, dataset)
            except InvalidInput as exc:
                record.update(status="invalid", message=str(exc))
                report.invalid.append(record)
            else:
                record["job_id"] = state.job_id
                if state.job_id in seen:
                    record.update(status="invalid", message=f"duplicate of line {seen[state.job_id]} "
                                                            "(same image, query and mask)")
                    report.invalid.append(record)
                else:
                    seen[state.job_id] = row.line
                    jobs.append(state)
            records.append(record)
        write_rows(self.store, dataset, records)
        self._send_all(jobs, report, self._submission(images, annotations, dataset, len(jobs)), progress)
        return report

    def _submission(self, images: str | Path, annotations: str | Path, dataset: str, jobs: int) -> dict:
        changed = {k: v for k, v in self.settings.to_dict().items()
                   if v != getattr(Settings(), k) and k not in Settings.RUNTIME_FIELDS}
        local = not str(images).startswith("s3://")
        return {"dataset": dataset, "images": str(Path(images).resolve()) if local else str(images),
                "annotations": str(Path(annotations).resolve()), "settings": changed, "jobs": jobs, "sent": 0}

    def _send_all(self, jobs: list[JobState], report: SubmitReport, submission: dict, progress: bool) -> None:
        """Send the jobs in row order, recording how far it got: a job counts as submitted once its
        message is in the queue, so ``status`` can tell rows never sent from rows in flight."""
        write_submission(self.store, submission["dataset"], submission)
        try:
            for state in tqdm(jobs, desc="enqueueing", unit="job", disable=not progress):
                if self._enqueue(state):
                    report.enqueued += 1
                else:
                    report.finished += 1
                submission["sent"] += 1
                if submission["sent"] % SENT_EVERY == 0:
                    write_submission(self.store, submission["dataset"], submission)
        finally:
            write_submission(self.store, submission["dataset"], submission)

    # -- following -------------------------------------------------------------------------
    def status(self, dataset: str) -> dict[str, int]:
        """Rows per state: the outcomes of docs/design.md, ``pending`` (in flight) and ``not_sent``;
        ``total`` is the row count."""
        counts = {s: 0 for s in (*OUTCOMES, PENDING, NOT_SENT)}
        for line in self._statuses(dataset):
            counts[line["status"]] += 1
        counts["total"] = sum(counts.values())
        return counts

    def resume_command(self, dataset: str) -> str:
        """The command that sends the rows a stopped submission left unsent."""
        submission = read_submission(self.store, dataset) or {}
        words = ["amodal", "submit", "--images", submission.get("images", "IMAGES"), "--annotations",
                 submission.get("annotations", "ANNOTATIONS"), "--dataset", dataset]
        for name, value in sorted(submission.get("settings", {}).items()):
            words += ["--set", f"{name}={value}"]
        return shlex.join(words)

    def _statuses(self, dataset: str) -> Iterator[dict]:
        """Each row with its ``status``: an outcome, ``pending`` or ``not_sent``."""
        done = outcome_counts(self.store, dataset)
        submission = read_submission(self.store, dataset)
        unsent_from = submission["sent"] if submission else None  # jobs are sent in row order
        index = 0
        for row in read_rows(self.store, dataset):
            status = row.get("status")
            if not status:
                status = next((s for s in OUTCOMES if row["job_id"] in done[s]), None)
                if status is None:
                    status = NOT_SENT if unsent_from is not None and index >= unsent_from else PENDING
                index += 1
            yield {**row, "status": status}

    def manifest(self, dataset: str) -> Iterator[dict]:
        """One line per input row: line, image, query, job_id, status, message, result, quality, flags."""
        for row in self._statuses(dataset):
            line = {**row, "message": row.get("message", ""), "result": None}
            if row["status"] in OUTCOMES and row["status"] != "invalid":
                record = read_record(self.store, dataset, row["job_id"]) or {}
                line.update(message=record.get("message", ""), quality=record.get("quality"),
                            flags=record.get("flags", []))
                if row["status"] in ("completed", "unoccluded"):
                    line["result"] = self.store.url(result_prefix(dataset, row["job_id"]))
            yield line

    def results(self, dataset: str) -> Iterator[tuple[dict, dict[str, bytes]]]:
        """(manifest line, {file name: bytes}) for every row that has a result folder."""
        for line in self.manifest(dataset):
            if line["result"]:
                prefix = result_prefix(dataset, line["job_id"])
                files = {key.rpartition("/")[2]: self.store.get(key) for key in self.store.list(prefix + "/")}
                yield line, files
