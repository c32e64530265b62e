"""The Python client: submit datasets, follow them, read their outcomes and results.

Submitting records a dataset's rows in storage, ``ROWS_PER_CHUNK`` at a time in row order, and sends
nothing: ``amodal dispatch`` (producer.dispatch) starts the jobs as the queues drain. The annotation
file is read as a stream (JSONL; the paper's one-document format is read whole), each distinct input
file is hashed and uploaded once, and storage calls run in a pool of ``AMODAL_SUBMIT_CONCURRENCY``.
Job ids are content hashes, so a job submitted twice runs once; submitting the same file again resumes
a submission that stopped, from its last recorded chunk.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import shlex
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

from tqdm import tqdm

from amodal.annotations import Row, iter_annotations, resolve_input, validate_query
from amodal.images import InvalidInput
from amodal.config import environment, resolve_settings
from amodal.errors import UsageError
from amodal.jobstore import (ROWS_PER_CHUNK, DatasetNotFound, commit_state, flagged_count, outcome_of, outcomes,
                             read_record, read_record_pages, read_row_chunks, read_rows, read_submission,
                             result_prefix, rows_prefix, write_rows_chunk, write_submission)
from amodal.provenance import folder_digest, inputs_digest, weight_fingerprints, weights_digest
from amodal.settings import Settings
from amodal.state import OUTCOMES, JobState, job_id
from amodal.storage import Storage, open_storage
from producer.dispatch import adopt, open_dataset, stalled

PENDING = "pending"  # recorded, no outcome yet (waiting for the dispatcher, or in flight)
FLAGGED = "flagged"  # results whose quality record raised doubts (their flags); counted among the outcomes too
NOT_SENT = "not_sent"  # in the annotation file, not recorded: the submission stopped before them
STALLED = "stalled"  # pending jobs that have not advanced for producer.dispatch.stall_after() (being sent again)


@dataclass
class SubmitReport:
    rows: int = 0
    enqueued: int = 0  # rows recorded by this submission whose job has no outcome (the dispatcher starts them)
    finished: int = 0  # rows whose job already has an outcome
    invalid: list[dict] = field(default_factory=list)  # rows refused at submission, with the reason


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class JobIndex:
    """The jobs a submission has seen (with the first line naming each) and those with an outcome, in a
    private temporary SQLite file: memory stays flat whatever the row count (a dict of a million job
    ids takes about 150 MB)."""

    def __init__(self) -> None:
        self._db = sqlite3.connect("")  # "": a temporary on-disk database, removed when closed
        self._db.execute("CREATE TABLE seen (job TEXT PRIMARY KEY, line INTEGER) WITHOUT ROWID")
        self._db.execute("CREATE TABLE finished (job TEXT PRIMARY KEY) WITHOUT ROWID")

    def first_line(self, job: str, line: int) -> int:
        """The line that named ``job`` first (``line`` if none did)."""
        self._db.execute("INSERT OR IGNORE INTO seen VALUES (?, ?)", (job, line))
        return self._db.execute("SELECT line FROM seen WHERE job = ?", (job,)).fetchone()[0]

    def add_finished(self, jobs: Iterable[str]) -> None:
        self._db.executemany("INSERT OR IGNORE INTO finished VALUES (?)", ((job,) for job in jobs))

    def is_finished(self, job: str) -> bool:
        return self._db.execute("SELECT 1 FROM finished WHERE job = ?", (job,)).fetchone() is not None

    def finished(self) -> int:
        """Jobs seen that have an outcome."""
        return self._db.execute("SELECT COUNT(*) FROM seen JOIN finished USING (job)").fetchone()[0]

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM seen").fetchone()[0]


class Client:
    """Talks to the broker (``AMODAL_BROKER_URL``) and the storage (``AMODAL_STORAGE_URL``)."""

    def __init__(self, broker_url: str | None = None, storage_url: str | None = None,
                 settings: Settings | None = None, model_dir: Path | None = None) -> None:
        env = environment()
        self.storage_url = storage_url or env.storage_url
        if not self.storage_url:
            raise UsageError("no storage: pass storage_url or set AMODAL_STORAGE_URL (file:///path or s3://bucket/prefix)")
        self.store: Storage = open_storage(self.storage_url)
        self.settings = settings or resolve_settings()
        self.pool = ThreadPoolExecutor(env.submit_concurrency)
        self._inputs: dict[tuple[str, str], tuple[str, str, str] | str] = {}  # (root, relative) -> (url, key, sha256) or error
        self._sources: dict[str, Storage] = {}
        self.broker_url = broker_url or env.broker_url
        # The weights the workers load (AMODAL_MODEL_DIR, shared with them); none named: ids cover no weights.
        model_dir = model_dir or env.model_dir
        self.weights = weight_fingerprints(Path(model_dir), self.settings) if model_dir else {}

    # -- submitting ------------------------------------------------------------------------
    def _upload(self, path: Path) -> tuple[str, str]:
        """Upload a file under its content hash: one create-only write, refused if it is there already.
        Returns its key and SHA-256."""
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        key = f"inputs/{digest}{path.suffix.lower()}"
        self.store.put_if_absent(key, data)
        return key, digest

    def _source(self, url: str) -> Storage:
        if url not in self._sources:
            self._sources[url] = open_storage(url)
        return self._sources[url]

    def _find_input(self, images: str, relative: str, what: str) -> tuple[str, str, str]:
        """(storage URL, key, SHA-256 of its bytes) of one input file; local files are uploaded first (one hash
        and upload per file), stored ones are read to hash them."""
        if images.startswith("s3://"):
            source = self._source(images)
            key = str(PurePosixPath(relative))
            if not source.exists(key):
                fallback = PurePosixPath(relative).name
                if not source.exists(fallback):
                    raise InvalidInput(f"{what} not found: {relative}")
                key = fallback
            return images, key, hashlib.sha256(source.get(key)).hexdigest()
        return "", *self._upload(resolve_input(Path(images).resolve(), relative, what))

    def _input_key(self, images: str, relative: str, what: str = "image") -> tuple[str, str, str]:
        """:meth:`_find_input`, remembered per file (an InvalidInput is remembered too)."""
        if (images, relative) not in self._inputs:
            self._resolve([(images, relative, what)])
        found = self._inputs[(images, relative)]
        if isinstance(found, str):
            raise InvalidInput(found)
        return found

    def _resolve(self, files: Iterable[tuple[str, str, str]]) -> None:
        """Look up (and upload) the files not seen yet, concurrently."""
        def one(item: tuple[str, str, str]) -> tuple[str, str, str] | str:
            try:
                return self._find_input(*item)
            except InvalidInput as exc:
                return str(exc)

        todo = list({(images, rel): (images, rel, what) for images, rel, what in files
                     if (images, rel) not in self._inputs}.values())
        for (images, rel, _), found in zip(todo, self.pool.map(one, todo)):
            self._inputs[(images, rel)] = found

    def _job_for(self, row: Row, images: str, dataset: str) -> JobState:
        if row.error:
            raise InvalidInput(row.error)
        query = validate_query(row.query, self.settings.max_query_chars)
        inputs, image_key, image_sha = self._input_key(images, row.image)
        mask = self._input_key(images, row.visible_mask, "visible mask") if row.visible_mask else None
        mask_key = mask[1] if mask else None
        jid = job_id(dataset, image_key, query, mask_key, self.settings, inputs_digest(image_sha, mask and mask[2]),
                     weights_digest(self.weights))
        return JobState(job_id=jid, dataset=dataset, image_key=image_key, query=query, mask_key=mask_key,
                        inputs=inputs, settings=self.settings.to_dict(), result_prefix=result_prefix(dataset, jid))

    def submit(self, image: str | Path, query: str, dataset: str, visible_mask: str | Path | None = None) -> str:
        """Submit one (image, query) at once (no dispatcher needed to start it; it watches it for stalls);
        ``image`` is a local file or an ``s3://`` URL. Returns the job id."""
        from tasks.app import publisher, send_stage

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
        if commit_state(self.store, state):
            with publisher(self.broker_url) as producer:
                send_stage(state.stage, state.job_id, state.version, producer=producer)
        adopt(self.store, dataset, state.job_id)
        return state.job_id

    def submit_dataset(self, images: str | Path, annotations: str | Path, dataset: str,
                       progress: bool = True) -> SubmitReport:
        """Record every row of an annotation file for the dispatcher, chunk by chunk; resume a stopped
        submission of the same file."""
        # 1. the rows, and where a submission of the same file stopped
        images = str(images) if str(images).startswith("s3://") else str(Path(images).resolve())
        total, rows = iter_annotations(Path(annotations))
        submission = self._begin(images, Path(annotations), dataset, total)
        report = SubmitReport(rows=total)
        # 2. the jobs recorded before (duplicates are told against them) and those with an outcome
        seen = JobIndex()
        for record in read_rows(self.store, dataset):
            if record.get("status") == "invalid":
                report.invalid.append(record)
            else:
                seen.first_line(record["job_id"], record["line"])
        seen.add_finished(job for _, job in outcomes(self.store, dataset))
        report.finished = seen.finished()
        # 3. record the rest, a chunk at a time
        rest = itertools.islice(rows, submission["sent"], None)
        bar = tqdm(total=total, initial=submission["sent"], desc="recording rows", unit="row", disable=not progress)
        with bar:
            for index in itertools.count(submission["sent"] // ROWS_PER_CHUNK):
                chunk = list(itertools.islice(rest, ROWS_PER_CHUNK))
                if not chunk:
                    break
                records = self._records(chunk, images, dataset, seen)
                write_rows_chunk(self.store, dataset, submission["generation"], index, records)
                for record in records:
                    if record.get("status") == "invalid":
                        report.invalid.append(record)
                    elif seen.is_finished(record["job_id"]):
                        report.finished += 1
                    else:
                        report.enqueued += 1
                submission.update(sent=submission["sent"] + len(records), jobs=len(seen),
                                  invalid=len(report.invalid))
                write_submission(self.store, dataset, submission)
                open_dataset(self.store, dataset)
                bar.update(len(records))
        # 4. complete
        submission["complete"] = True
        write_submission(self.store, dataset, submission)
        open_dataset(self.store, dataset)
        return report

    def _begin(self, images: str, annotations: Path, dataset: str, total: int) -> dict:
        """The dataset's submission record: the stored one if it is of the same file, images and settings
        (a resumption), else a new generation of rows (the previous rows are dropped)."""
        # a changed image under the same name (a local folder's file sizes and times) or changed weights
        # make it new rows
        fingerprint = hashlib.sha256(json.dumps([images, file_digest(annotations), self.settings.result_fingerprint(),
                                                 weights_digest(self.weights), folder_digest(images)])
                                     .encode()).hexdigest()
        old = read_submission(self.store, dataset)
        if old is not None and old.get("fingerprint") == fingerprint:
            return old
        if old is not None:
            self.store.delete_prefix(rows_prefix(dataset))
        changed = {k: v for k, v in self.settings.to_dict().items()
                   if v != getattr(Settings(), k) and k not in Settings.RUNTIME_FIELDS}
        submission = {"dataset": dataset, "images": images, "annotations": str(annotations.resolve()),
                      "settings": changed, "job_settings": self.settings.to_dict(),
                      "inputs": images if images.startswith("s3://") else "", "fingerprint": fingerprint,
                      "generation": old.get("generation", -1) + 1 if old else 0, "rows": total, "sent": 0, "jobs": 0,
                      "invalid": 0, "complete": False}
        write_submission(self.store, dataset, submission)
        return submission

    def _records(self, chunk: list[Row], images: str, dataset: str, seen: JobIndex) -> list[dict]:
        """The chunk's rows as recorded: a job's id and input keys, or ``invalid`` with the reason (a row
        whose job an earlier row has, by ``seen``, is a duplicate)."""
        self._resolve(item for row in chunk if not row.error for item in
                      ((images, row.image, "image"), *(((images, row.visible_mask, "visible mask"),)
                                                       if row.visible_mask else ())))
        records = []
        for row in chunk:
            record = {"line": row.line, "image": row.image, "query": row.query, "job_id": None}
            try:
                state = self._job_for(row, images, dataset)
            except InvalidInput as exc:
                record.update(status="invalid", message=str(exc))
            else:
                record.update(job_id=state.job_id, image_key=state.image_key)
                if state.mask_key:
                    record["mask_key"] = state.mask_key
                earlier = seen.first_line(state.job_id, row.line)
                if earlier != row.line:
                    record.update(status="invalid", message=f"duplicate of line {earlier} (same image, query and mask)")
            records.append(record)
        return records

    # -- following -------------------------------------------------------------------------
    def status(self, dataset: str) -> dict[str, int]:
        """Rows per state: the outcomes of docs/design.md, ``pending`` (recorded, no outcome yet) and
        ``not_sent``; ``total`` is the row count; ``stalled`` counts the pending jobs that have not advanced
        for ``producer.dispatch.stall_after()`` (the dispatcher sends their step again). From the
        submission record, the outcome marker listing and the dispatcher's progress: no read per row."""
        submission = read_submission(self.store, dataset)
        if submission is None:
            raise DatasetNotFound(dataset)
        counts = {s: 0 for s in (*OUTCOMES, PENDING, NOT_SENT)}
        for status, _ in outcomes(self.store, dataset):
            counts[status] += 1
        counts[PENDING] = max(submission["jobs"] - sum(counts.values()), 0)
        counts["invalid"] += submission["invalid"]  # refused at submission: no job, no marker
        counts[NOT_SENT] = submission["rows"] - submission["sent"]
        counts["total"] = submission["rows"]
        counts[STALLED] = stalled(self.store).get(dataset, 0)
        counts[FLAGGED] = flagged_count(self.store, dataset)
        return counts

    def progress(self, dataset: str):
        """:meth:`status` and where the dataset's jobs are: rows not started yet, and per stage the jobs
        queued, in work and done (a :class:`producer.progress.Progress`; ``to_dict()`` is what
        ``amodal status`` prints)."""
        from producer.progress import dataset_progress

        return dataset_progress(self.store, self.broker_url, dataset, self.status(dataset))

    def resume_command(self, dataset: str) -> str:
        """The command that records the rows a stopped submission left."""
        submission = read_submission(self.store, dataset) or {}
        words = ["amodal", "submit", "--images", submission.get("images", "IMAGES"), "--annotations",
                 submission.get("annotations", "ANNOTATIONS"), "--dataset", dataset]
        for name, value in sorted(submission.get("settings", {}).items()):
            words += ["--set", f"{name}={value}"]
        return shlex.join(words)

    def manifest(self, dataset: str) -> Iterator[dict]:
        """One line per recorded row, in row order: line, image, query, job_id, status, message, result,
        quality, flags. Streams the rows a chunk at a time; a chunk's finished rows take their records
        from the chunk's record pages, or else read their ``job.json`` concurrently."""
        done = outcome_of(self.store, dataset)
        for generation, index, chunk in read_row_chunks(self.store, dataset):
            lines, finished = [], []
            for row in chunk:
                status = row.get("status") or done.get(row["job_id"], PENDING)
                lines.append({"line": row["line"], "image": row["image"], "query": row["query"],
                              "job_id": row["job_id"], "status": status, "message": row.get("message", ""),
                              "result": None})
                if not row.get("status") and status in OUTCOMES:  # a job's outcome, not a row refused at submission
                    finished.append(lines[-1])
            paged = read_record_pages(self.store, dataset, generation, index) if finished else {}
            jobs = [line["job_id"] for line in finished]
            records = self.pool.map(lambda job: paged.get(job) or read_record(self.store, dataset, job), jobs)
            for line, record in zip(finished, records):
                record = record or {}
                line.update(message=record.get("message", ""), quality=record.get("quality"),
                            flags=record.get("flags", []))
                if record.get("offsets") is not None:  # a row with result images
                    line["result"] = self.store.url(result_prefix(dataset, line["job_id"]))
            yield from lines

    def results(self, dataset: str) -> Iterator[tuple[dict, dict[str, bytes]]]:
        """(manifest line, {file name: bytes}) for every row that has a result folder."""
        for line in self.manifest(dataset):
            if line["result"]:
                prefix = result_prefix(dataset, line["job_id"])
                files = {key.rpartition("/")[2]: self.store.get(key) for key in self.store.list(prefix + "/")}
                yield line, files
