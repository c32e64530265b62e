"""The Python client: submit datasets, follow them, read their outcomes and results.

Submitting records a dataset's rows in storage, ``ROWS_PER_CHUNK`` at a time in row order, and sends
nothing: ``amodal dispatch`` (producer.dispatch) starts the jobs as the queues drain. The annotation
file is read as a stream (JSONL; the paper's one-document format is read whole), each distinct input
file is hashed and uploaded once, and storage calls run in a pool of ``AMODAL_SUBMIT_CONCURRENCY``.
Job ids are content hashes, so a job submitted twice runs once; submitting the same file again resumes
a submission that stopped, from its last recorded chunk.
"""
from __future__ import annotations

import collections
import hashlib
import io
import itertools
import json
import os
import shlex
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator

from PIL import Image
from tqdm import tqdm

from amodal.annotations import Row, iter_annotations, resolve_input, validate_query
from amodal.images import InvalidInput
from amodal.config import environment, resolve_settings
from amodal.errors import UsageError
from amodal.jobstore import (ROWS_PER_CHUNK, DatasetNotFound, commit_state, outcomes, read_record, read_record_pages,
                             read_rows, read_rows_chunk, read_submission, write_rows_chunk,
                             write_submission)
from amodal.keys import input_key, result_prefix, rows_prefix
from amodal.provenance import folder_digest, inputs_digest, weight_fingerprints, weights_digest
from amodal.settings import Settings
from amodal.state import OUTCOMES, JobState, job_id
from amodal.storage import Storage, open_storage
from producer.dispatch import adopt, open_dataset, read_progress, stalled
from producer.shards import ShardOptions, ShardRow, detect_format, samples, shard_rows
from producer.tally import ended_counts

PENDING = "pending"  # recorded, no outcome yet (waiting for the dispatcher, or in flight)
FLAGGED = "flagged"  # results whose quality record raised doubts (their flags); counted among the outcomes too
NOT_SENT = "not_sent"  # in the annotation file, not recorded: the submission stopped before them
STORE_BATCH_BYTES = 32 << 20  # sample bytes read ahead and stored together, at most (and at most STORE_BATCH_SAMPLES)
STORE_BATCH_SAMPLES = 2000
IMAGE_SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "TIFF": ".tif"}  # stored inputs' names by format
STALLED = "stalled"  # pending jobs that have not advanced for producer.dispatch.stall_after() (being sent again)


@dataclass
class SubmitReport:
    rows: int = 0
    enqueued: int = 0  # rows recorded by this submission whose job has no outcome (the dispatcher starts them)
    finished: int = 0  # rows whose job already has an outcome
    invalid: list[dict] = field(default_factory=list)  # rows refused at submission, with the reason


def _finished(line: dict, record: dict, results: str) -> None:
    """Fill a manifest line from its job's record (page or ``job.json``); ``results``: the result folders' root."""
    line.update(status=record["status"], message=record.get("message") or "", quality=record.get("quality"),
                flags=record.get("flags") or [])
    if record.get("offsets") is not None:  # a row with result images
        line["result"] = f"{results}/{line['job_id']}"


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
        key = input_key(digest, path.suffix.lower())
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

    def submit_dataset(self, images: str | Path, annotations: str | Path | None, dataset: str,
                       progress: bool = True, shards: ShardOptions | None = None) -> SubmitReport:
        """Record every row of a dataset for the dispatcher, chunk by chunk; resume a stopped submission of
        the same input. ``images`` is a folder (or ``s3://`` prefix) of files named by the annotation file,
        or a sharded dataset (``producer.shards``: WebDataset tar shards, Parquet, a Hugging Face dataset
        saved to disk) read with ``shards``' options, its queries from the samples, ``shards.query`` or the
        annotation file."""
        # 1. the rows, and where a submission of the same input stopped
        fmt = (shards.format if shards else None) or detect_format(str(images))
        if fmt is not None:
            return self._submit_shards(str(images), annotations, dataset, progress, shards or ShardOptions(), fmt)
        if annotations is None:
            raise UsageError("--annotations is needed with a folder of images (or give shards: a .tar pattern, "
                             "a Parquet file or folder, a saved Hugging Face dataset)")
        images = str(images) if str(images).startswith("s3://") else str(Path(images).resolve())
        total, rows = iter_annotations(Path(annotations), self.settings.all_labels)
        submission = self._begin(images, Path(annotations), dataset, total)
        return self._record_rows(dataset, submission, rows, total, lambda rest: rest,
                                 lambda chunk, seen: self._records(chunk, images, dataset, seen), progress)

    def _record_rows(self, dataset: str, submission: dict, rows: Iterable, total: int | None,
                     prepare: Callable[[Iterator], Iterator], records: Callable[[list, JobIndex], list[dict]],
                     progress: bool) -> SubmitReport:
        """Steps 2-4 of a submission: ``rows`` past those recorded before, through ``prepare``, recorded
        ``ROWS_PER_CHUNK`` at a time as ``records`` makes them (``total`` None: not known in advance)."""
        report = SubmitReport(rows=total or 0)
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
        rest = prepare(itertools.islice(rows, submission["sent"], None))
        bar = tqdm(total=total, initial=submission["sent"], desc="recording rows", unit="row", disable=not progress)
        with bar:
            for index in itertools.count(submission["sent"] // ROWS_PER_CHUNK):
                chunk = list(itertools.islice(rest, ROWS_PER_CHUNK))
                if not chunk:
                    break
                recorded = records(chunk, seen)
                write_rows_chunk(self.store, dataset, submission["generation"], index, recorded)
                for record in recorded:
                    if record.get("status") == "invalid":
                        report.invalid.append(record)
                    elif seen.is_finished(record["job_id"]):
                        report.finished += 1
                    else:
                        report.enqueued += 1
                submission.update(sent=submission["sent"] + len(recorded), jobs=len(seen),
                                  invalid=len(report.invalid))
                if total is None:  # a stream of unknown length: the rows known so far
                    submission["rows"] = submission["sent"]
                write_submission(self.store, dataset, submission)
                open_dataset(self.store, dataset)
                bar.update(len(recorded))
        # 4. complete
        submission["complete"] = True
        report.rows = submission["rows"]
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
        return self._submission(dataset, fingerprint, {
            "images": images, "annotations": str(annotations.resolve()), "rows": total,
            "inputs": images if images.startswith("s3://") else ""})

    def _submission(self, dataset: str, fingerprint: str, fields: dict) -> dict:
        """The stored submission record if its ``fingerprint`` matches (a resumption), else a new one with
        ``fields``, in a new generation of rows (the previous rows are dropped)."""
        old = read_submission(self.store, dataset)
        if old is not None and old.get("fingerprint") == fingerprint:
            return old
        if old is not None:
            self.store.delete_prefix(rows_prefix(dataset))
        changed = {k: v for k, v in self.settings.to_dict().items()
                   if v != getattr(Settings(), k) and k not in Settings.RUNTIME_FIELDS}
        submission = {"dataset": dataset, "settings": changed, "job_settings": self.settings.to_dict(),
                      "fingerprint": fingerprint, "generation": old.get("generation", -1) + 1 if old else 0, "sent": 0,
                      "jobs": 0, "invalid": 0, "complete": False, **fields}
        write_submission(self.store, dataset, submission)
        return submission

    # -- submitting shards -----------------------------------------------------------------
    def _submit_shards(self, images: str, annotations: str | Path | None, dataset: str, progress: bool,
                       options: ShardOptions, fmt: str) -> SubmitReport:
        """:meth:`submit_dataset` of a sharded dataset: each sample's image (and mask) stored once under its
        content hash, a bounded batch of samples ahead of the rows recorded."""
        if fmt != "webdataset" and images.startswith("s3://"):
            raise UsageError(f"--images: {fmt} input is read from a local path (WebDataset shards may be on S3)")
        if not images.startswith("s3://") and "{" not in images:
            images = str(Path(images).resolve())
        annotation_file = Path(annotations).resolve() if annotations is not None else None
        fingerprint = hashlib.sha256(json.dumps([
            images, fmt, options.describe(), file_digest(annotation_file) if annotation_file else "",
            self.settings.result_fingerprint()]).encode()).hexdigest()
        submission = self._submission(dataset, fingerprint, {
            "images": images, "annotations": str(annotation_file or ""), "rows": 0, "inputs": "", "format": fmt,
            "shards": options.describe()})
        rows = shard_rows(samples(images, options, fmt), options, annotation_file)
        return self._record_rows(dataset, submission, rows, None, self._stored,
                                 lambda chunk, seen: self._shard_records(chunk, dataset, seen), progress)

    def _store_bytes(self, data: bytes, what: str) -> str:
        """Store an input given as bytes under its content hash (one create-only write, refused if it is
        there already); InvalidInput if Pillow cannot read it."""
        try:
            with Image.open(io.BytesIO(data)) as image:
                kind = image.format or ""
                image.verify()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise InvalidInput(f"{what} bytes cannot be decoded ({exc})") from None
        key = input_key(hashlib.sha256(data).hexdigest(), IMAGE_SUFFIXES.get(kind, '.' + kind.lower()))
        self.store.put_if_absent(key, data)
        return key

    def _stored(self, rows: Iterator[ShardRow]) -> Iterator[tuple[ShardRow, str | None, str | None, str | None]]:
        """(row, image key, mask key, error) in row order, each sample stored once (the rows of one sample
        share it), a batch of at most ``STORE_BATCH_BYTES`` of samples at a time, concurrently."""
        rows = iter(rows)
        while True:
            batch, size, samples = [], 0, {}
            for row in rows:
                batch.append(row)
                if not row.error and row.image_bytes is not None and id(row.image_bytes) not in samples:
                    samples[id(row.image_bytes)] = (row.image_bytes, row.mask_bytes)
                    size += len(row.image_bytes) + len(row.mask_bytes or b"")
                    if size >= STORE_BATCH_BYTES or len(samples) >= STORE_BATCH_SAMPLES:
                        break
            if not batch:
                return
            stored = dict(zip(samples, self.pool.map(self._store_sample_or_error, *zip(*samples.values())))) \
                if samples else {}
            for row in batch:
                found = stored.get(id(row.image_bytes)) if not row.error else None
                if found is None:
                    yield row, None, None, row.error
                elif isinstance(found, str):
                    yield row, None, None, found
                else:
                    yield row, *found, None

    def _store_sample_or_error(self, image: bytes, mask: bytes | None) -> tuple[str, str | None] | str:
        try:
            return self._store_bytes(image, "image"), self._store_bytes(mask, "visible mask") if mask else None
        except InvalidInput as exc:
            return str(exc)

    def _shard_records(self, chunk: list[tuple[ShardRow, str | None, str | None, str | None]], dataset: str,
                       seen: JobIndex) -> list[dict]:
        """The chunk's shard rows as recorded (as :meth:`_records`); ``image`` is the sample's identity."""
        records = []
        for row, image_key, mask_key, error in chunk:
            record = {"line": row.line, "image": row.image, "query": row.query, "job_id": None}
            try:
                if error:
                    raise InvalidInput(error)
                query = validate_query(row.query, self.settings.max_query_chars)
            except InvalidInput as exc:
                record.update(status="invalid", message=str(exc))
            else:
                # a sample's keys are its content hashes (inputs/<sha256><ext>): they digest its bytes
                jid = job_id(dataset, image_key, query, mask_key, self.settings, inputs_digest(image_key, mask_key),
                             weights_digest(self.weights))
                record.update(query=query, job_id=jid, image_key=image_key, **({"mask_key": mask_key} if mask_key else {}))
                earlier = seen.first_line(jid, row.line)
                if earlier != row.line:
                    record.update(status="invalid", message=f"duplicate of line {earlier} (same image, query and mask)")
            records.append(record)
        return records

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
        submission record, the counts the dispatcher keeps and its progress: a few reads at any size."""
        submission = read_submission(self.store, dataset)
        if submission is None:
            raise DatasetNotFound(dataset)
        counts = {s: 0 for s in (*OUTCOMES, PENDING, NOT_SENT)}
        ended = ended_counts(self.store, dataset, submission["generation"])
        counts.update({s: ended.get(s, 0) for s in OUTCOMES})
        counts[PENDING] = max(submission["jobs"] - sum(counts.values()), 0)
        counts["invalid"] += submission["invalid"]  # refused at submission: no job, no marker
        counts[NOT_SENT] = submission["rows"] - submission["sent"]
        counts["total"] = submission["rows"]
        counts[STALLED] = stalled(self.store).get(dataset, 0)
        counts[FLAGGED] = ended.get(FLAGGED, 0)
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
        words = ["amodal", "submit", "--images", submission.get("images", "IMAGES")]
        if submission.get("annotations", "ANNOTATIONS"):
            words += ["--annotations", submission.get("annotations", "ANNOTATIONS")]
        words += ["--dataset", dataset]
        if "format" in submission:
            words += ["--input-format", submission["format"]]
            for name, value in sorted(submission["shards"].items()):
                if value is not None and name != "format" and value != getattr(ShardOptions(), name):
                    words += [f"--{name.replace('_', '-')}", str(value)]
        for name, value in sorted(submission.get("settings", {}).items()):
            words += ["--set", f"{name}={value}"]
        return shlex.join(words)

    def manifest(self, dataset: str) -> Iterator[dict]:
        """One line per recorded row, in row order: line, image, query, job_id, status, message, result,
        quality, flags."""
        for line, _ in self.manifest_records(dataset):
            yield line

    def manifest_records(self, dataset: str) -> Iterator[tuple[dict, dict]]:
        """(manifest line, the job's record: :data:`amodal.jobstore.RECORD_FIELDS`) per recorded row, in row
        order. Streams the rows a chunk at a time, with no map of every job: a finished row takes its record
        from the chunk's record pages; a row the dispatcher started and did not page (in flight, or ended
        since its last scan) reads its ``job.json``; a row it has not reached is pending."""
        submission = read_submission(self.store, dataset)
        if submission is None:
            raise DatasetNotFound(dataset)
        generation, started = read_progress(self.store).cursors.get(dataset, [submission["generation"], 0])
        started = started if generation == submission["generation"] else 0
        results = self.store.url(result_prefix(dataset, "")[:-1])  # + "/<job>": a result folder's location
        generation = submission["generation"]

        def load(index: int) -> tuple[list[dict], dict[str, dict]]:
            return (read_rows_chunk(self.store, dataset, generation, index),
                    read_record_pages(self.store, dataset, generation, index))

        chunks = range(-(-submission["sent"] // ROWS_PER_CHUNK))
        ahead = collections.deque(self.pool.submit(load, index) for index in chunks[:2])  # the next chunk loads
        for index in chunks:  # while this one is read
            chunk, paged = ahead.popleft().result()
            if index + 2 < len(chunks):
                ahead.append(self.pool.submit(load, index + 2))
            lines, unpaged = [], []
            for position, row in enumerate(chunk, index * ROWS_PER_CHUNK):
                job = row["job_id"]
                line = {"line": row["line"], "image": row["image"], "query": row["query"], "job_id": job,
                        "status": row.get("status") or PENDING, "message": row.get("message", ""), "result": None}
                record = paged.get(job) if line["status"] == PENDING else None  # not for rows refused at submission
                if record is not None and record.get("status"):
                    _finished(line, record, results)
                elif line["status"] == PENDING and position < started:
                    unpaged.append(line)
                lines.append((line, record or {}))
            for line, found in zip(unpaged, self.pool.map(lambda line: self.job_record(dataset, line["job_id"]),
                                                          unpaged)):
                if found and found.get("status"):
                    _finished(line, found, results)
            yield from lines

    def job_record(self, dataset: str, job: str) -> dict | None:
        """The job's ``job.json``, or None while it has none."""
        return read_record(self.store, dataset, job)

    def results(self, dataset: str) -> Iterator[tuple[dict, dict[str, bytes]]]:
        """(manifest line, {file name: bytes}) for every row that has a result folder; names are relative to
        the folder (``paper/offsets.json`` beside ``offsets.json``)."""
        for line in self.manifest(dataset):
            if line["result"]:
                prefix = result_prefix(dataset, line["job_id"]) + "/"
                files = {key.removeprefix(prefix): self.store.get(key) for key in self.store.list(prefix)}
                yield line, files
