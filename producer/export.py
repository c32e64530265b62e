"""``amodal export``: a dataset's finished rows as WebDataset tar shards or Parquet files, in a folder or
under an ``s3://`` prefix.

Shard ``k`` covers the manifest's rows ``k * shard_rows`` to ``(k + 1) * shard_rows - 1`` (row order), so
its content is fixed once those rows have their outcomes: a shard is written when every row of its range
has one (a range with pending rows waits for a later run), holds the rows that pass the filters (status,
flags), and is never written twice: a rerun writes only the shards missing from the output. The options
an output was started with are recorded in it (``<dataset>.export.json``); a rerun with others is refused.
Each shard is written to a temporary file, then moved (or uploaded) whole.

A row carries the RGBA completion, the amodal and visible masks (PNG, as in the result folder) and one JSON
record: the source row's identity (``line``, ``image``, ``query``), ``job_id``, ``status``, ``message``,
``prompt``, ``offsets``, ``quality`` and ``flags``. WebDataset samples are keyed by job id
(``<job>.completion.png``, ``<job>.amodal_mask.png``, ``<job>.visible_mask.png``, ``<job>.json``);
Parquet rows have one column per field (``quality`` as JSON text, the images as bytes).
"""
from __future__ import annotations

import collections
import json
import os
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

from tqdm import tqdm

from amodal.errors import UsageError
from amodal.jobstore import DatasetNotFound, read_submission
from amodal.keys import RESULT_IMAGES, result_prefix
from amodal.state import OUTCOMES
from amodal.storage import ObjectNotFound
from producer.client import PENDING, Client
from producer.shards import import_webdataset

T = TypeVar("T")
R = TypeVar("R")

FORMATS = {"webdataset": ".tar", "parquet": ".parquet"}
IMAGES = RESULT_IMAGES
FETCH_THREADS = 32  # concurrent reads of result files
PARQUET_GROUP = 128  # rows per Parquet row group


@dataclass(frozen=True)
class ExportFilter:
    """Which finished rows go into the shards."""

    statuses: tuple[str, ...] = ("completed", "unoccluded")
    flags: str = "any"  # any, none (rows without flags), flagged (rows with flags)
    drop_flags: tuple[str, ...] = ()  # rows carrying any of these flags are left out

    def __post_init__(self) -> None:
        unknown = set(self.statuses) - set(OUTCOMES)
        if unknown:
            raise UsageError(f"--status: unknown outcome {', '.join(sorted(unknown))} (one of {', '.join(OUTCOMES)})")
        if self.flags not in ("any", "none", "flagged"):
            raise UsageError(f"--flags: {self.flags!r} is not one of any, none, flagged")

    def keeps(self, line: dict) -> bool:
        flags = line.get("flags") or []
        return (line["status"] in self.statuses and not (self.flags == "none" and flags)
                and not (self.flags == "flagged" and not flags) and not set(flags) & set(self.drop_flags))


@dataclass
class ExportReport:
    shards_written: int = 0
    shards_present: int = 0  # written by an earlier run
    shards_waiting: int = 0  # ranges with rows that have no outcome yet: a later run writes them
    rows_written: int = 0
    bytes_written: int = 0
    shard_bytes: list[int] = field(default_factory=list)  # sizes of the shards this run wrote


class Destination:
    """A folder or an ``s3://bucket/prefix`` that shards are moved or uploaded into, whole."""

    def __init__(self, out: str) -> None:
        self.out = out.rstrip("/")
        if self.out.startswith("s3://"):
            from amodal.storage import make_s3_client

            self.bucket, _, prefix = self.out[len("s3://"):].partition("/")
            self.prefix = f"{prefix}/" if prefix else ""
            self.client = make_s3_client()
            self._check_bucket()
        else:
            Path(self.out).mkdir(parents=True, exist_ok=True)

    def _check_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            raise UsageError(f"--out: bucket {self.bucket} cannot be used ({exc.response['Error'].get('Code')}): "
                             "create it, or check the S3 credentials") from None

    def names(self) -> set[str]:
        """Names of the shards already there."""
        if not self.out.startswith("s3://"):
            return {path.name for path in Path(self.out).iterdir() if path.is_file()}
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
        return {item["Key"][len(self.prefix):] for page in pages for item in page.get("Contents", [])}

    def read(self, name: str) -> bytes | None:
        """A small object's bytes, or None if there is none."""
        if not self.out.startswith("s3://"):
            path = Path(self.out) / name
            return path.read_bytes() if path.is_file() else None
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.prefix + name)["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def put(self, name: str, path: Path) -> None:
        if self.out.startswith("s3://"):
            self.client.upload_file(str(path), self.bucket, self.prefix + name)
        else:
            os.replace(path, Path(self.out) / name)


def ordered(pool: ThreadPoolExecutor, work: Callable[[T], R], items: Iterable[T], window: int) -> Iterator[R]:
    """``work(item)`` for each item, in order, run concurrently at most ``window`` ahead (bounded memory)."""
    pending: collections.deque[Future] = collections.deque()
    for item in items:
        pending.append(pool.submit(work, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def export_dataset(client: Client, dataset: str, fmt: str, out: str, shard_rows: int = 1000,
                   keep: ExportFilter | None = None, progress: bool = True) -> ExportReport:
    """Write the dataset's finished rows as shards of ``fmt`` into ``out`` (module docstring)."""
    # 1. what is asked, and what is there already
    if fmt not in FORMATS:
        raise UsageError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if shard_rows < 1:
        raise UsageError("--shard-rows must be at least 1")
    submission = read_submission(client.store, dataset)
    if submission is None:
        raise DatasetNotFound(dataset)
    keep = keep or ExportFilter()
    destination = Destination(out)
    present = destination.names()
    report = ExportReport()
    pool = ThreadPoolExecutor(FETCH_THREADS)
    bar = tqdm(total=submission["rows"], desc=f"export {dataset}", unit="row", disable=not progress)
    with bar, tempfile.TemporaryDirectory(prefix="amodal-export-") as tmp:
        _claim(destination, dataset, {"format": fmt, "shard_rows": shard_rows, "generation": submission["generation"],
                                      **asdict(keep)}, Path(tmp))
        # 2. the manifest, a shard's range at a time
        for index, lines in _ranges(client.manifest_records(dataset), shard_rows):
            name = f"{dataset}-{index:06d}{FORMATS[fmt]}"
            last = len(lines) < shard_rows
            if name in present:
                report.shards_present += 1
            elif any(line["status"] == PENDING for line, _ in lines) or (last and not submission["complete"]):
                report.shards_waiting += 1
            else:
                # 3. the kept rows' result files, written into a temporary shard, then moved whole
                kept = [(line, record) for line, record in lines if keep.keeps(line)]
                if kept:
                    rows = ordered(pool, lambda item: _row(client, dataset, *item), kept, 4 * FETCH_THREADS)
                    path = Path(tmp) / name
                    (_write_tar if fmt == "webdataset" else _write_parquet)(path, rows)
                    size = path.stat().st_size
                    destination.put(name, path)
                    report.shards_written += 1
                    report.rows_written += len(kept)
                    report.bytes_written += size
                    report.shard_bytes.append(size)
            bar.update(len(lines))
            bar.set_postfix(written=report.shards_written, waiting=report.shards_waiting, refresh=False)
    pool.shutdown()
    return report


def _claim(destination: Destination, dataset: str, export: dict, tmp: Path) -> None:
    """Record how the dataset is exported into the destination (``<dataset>.export.json``), or refuse an export
    that differs from the one recorded there: its shards would cover other rows under the same names."""
    name = f"{dataset}.export.json"
    found = destination.read(name)
    if found is not None and json.loads(found) != json.loads(json.dumps(export)):
        raise UsageError(f"--out holds another export of {dataset} ({found.decode()}): give the same options to "
                         "resume it, or another --out")
    if found is None:
        (tmp / name).write_text(json.dumps(export))
        destination.put(name, tmp / name)


def _ranges(lines: Iterable[tuple[dict, dict]], size: int) -> Iterator[tuple[int, list[tuple[dict, dict]]]]:
    batch: list[tuple[dict, dict]] = []
    index = 0
    for item in lines:
        batch.append(item)
        if len(batch) == size:
            yield index, batch
            batch, index = [], index + 1
    if batch:
        yield index, batch


def _row(client: Client, dataset: str, line: dict, record: dict) -> dict:
    """One exported row: the manifest line's identity and record, the result's images (None if absent)."""
    if "offsets" not in record:  # a record paged before pages carried offsets and prompt
        record = {**record, **(client.job_record(dataset, line["job_id"]) or {})}
    prefix = result_prefix(dataset, line["job_id"])
    row = {"line": line["line"], "image": line["image"], "query": line["query"], "job_id": line["job_id"],
           "status": line["status"], "message": line.get("message", ""), "prompt": record.get("prompt", ""),
           "offsets": record.get("offsets"), "quality": line.get("quality"), "flags": line.get("flags") or []}
    for column, file in IMAGES.items():
        try:
            row[column] = client.store.get(f"{prefix}/{file}") if line["result"] else None
        except ObjectNotFound:
            row[column] = None
    return row


def _write_tar(path: Path, rows: Iterable[dict]) -> None:
    with open(path, "wb") as f, import_webdataset().TarWriter(f, mtime=0) as sink:
        for row in rows:
            sample = {"__key__": row["job_id"],
                      "json": json.dumps({k: v for k, v in row.items() if k not in IMAGES}).encode()}
            sample.update({f"{column}.png": row[column] for column in IMAGES if row[column] is not None})
            sink.write(sample)


def _parquet_schema():
    import pyarrow as pa

    offsets = pa.struct([(name, pa.int64()) for name in ("x", "y", "width", "height")])
    return pa.schema([("job_id", pa.string()), ("line", pa.int64()), ("image", pa.string()), ("query", pa.string()),
                      ("status", pa.string()), ("message", pa.string()), ("prompt", pa.string()),
                      ("offsets", offsets), ("quality", pa.string()), ("flags", pa.list_(pa.string())),
                      *((column, pa.binary()) for column in IMAGES)])


def _write_parquet(path: Path, rows: Iterable[dict]) -> None:
    import itertools

    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _parquet_schema()
    iterator = iter(rows)
    with pq.ParquetWriter(path, schema) as writer:
        while group := list(itertools.islice(iterator, PARQUET_GROUP)):
            columns = {name: [row[name] for row in group] for name in schema.names}
            columns["quality"] = [json.dumps(q) if q is not None else None for q in columns["quality"]]
            columns["offsets"] = [{k: o.get(k) for k in ("x", "y", "width", "height")} if o else None
                                  for o in columns["offsets"]]
            writer.write_table(pa.table(columns, schema=schema))
