"""Reading datasets that come as shards: WebDataset tar files (local or on S3), Parquet files or folders,
and Hugging Face datasets saved to disk (``datasets.save_to_disk``).

Each source yields :class:`Sample` objects (one per tar sample or table row) a shard, a row group or a
batch at a time, so memory stays bounded whatever the dataset's size; :func:`shard_rows` turns them into
numbered :class:`ShardRow` objects, one per (sample, query). A query comes from the sample itself (a key
of its ``.json`` file, or a column; a string or a list of strings), from one fixed ``query`` for every
sample, or from an annotation file's rows whose ``image`` names a sample's key (:class:`AnnotationIndex`).

A shard that cannot be read, or that breaks part way, becomes one row with ``error`` set at the point
where it broke; a sample without an image, a query or a readable mask becomes a row with ``error`` too.
Nothing here stops a submission. The order of the rows is fixed by the sources (shards in name order,
samples in file order), so a stopped submission resumes by skipping the rows it recorded.
"""
from __future__ import annotations

import itertools
import json
import os
import sqlite3
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from amodal.annotations import Row, iter_annotations, resolve_input
from amodal.errors import UsageError
from amodal.images import InvalidInput

FORMATS = ("webdataset", "parquet", "hf")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # a WebDataset sample's image: the first of these it holds
PARQUET_BATCH = 256  # rows decoded at a time from a Parquet row group or a Hugging Face dataset


@dataclass(frozen=True)
class ShardOptions:
    """How to read a sharded dataset; the defaults follow img2dataset's and Hugging Face's conventions."""

    format: str | None = None  # one of FORMATS; None: told from the --images value (detect_format)
    query: str | None = None  # one query for every sample
    query_field: str = "query"  # WebDataset: a key of the sample's .json; Parquet/HF: a column
    image_field: str | None = None  # WebDataset: a file extension (default: IMAGE_EXTENSIONS); else a column ("image")
    mask_field: str | None = None  # a visible mask: WebDataset extension ("mask.png") or column; used where present
    key_field: str = "key"  # Parquet/HF: the column naming a row (annotation files name rows by it); default its index

    def describe(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Sample:
    """One sample of a source: its identity, its bytes, its own queries (None: it has no query field)."""

    key: str  # identity within the source: "<shard>/<__key__>", "<file>/<row>" or the key column's value
    image: bytes | None = None
    mask: bytes | None = None
    queries: tuple[str, ...] | None = None
    error: str | None = None


@dataclass(frozen=True)
class ShardRow:
    """One (sample, query) row, numbered in source order; ``error`` is set for a row that cannot be a job."""

    line: int
    image: str  # the sample's identity (Sample.key)
    query: str
    image_bytes: bytes | None = None
    mask_bytes: bytes | None = None
    error: str | None = None


# -- telling the format ------------------------------------------------------------------------
def detect_format(images: str) -> str | None:
    """The shard format ``images`` names, or None for a folder of image files (the annotation-file path)."""
    if "{" in images or images.endswith(".tar"):
        return "webdataset"
    if images.endswith(".parquet"):
        return "parquet"
    if images.startswith("s3://"):  # the first listing page tells (a prefix of images may hold millions)
        first = itertools.islice(_s3_listing(images), 1000)
        return "webdataset" if any(key.endswith(".tar") for key in first) else None
    folder = Path(images)
    if not folder.is_dir():
        return None
    if (folder / "dataset_info.json").is_file() and (folder / "state.json").is_file():
        return "hf"
    with os.scandir(folder) as entries:  # one pass over the top level; Parquet may sit one folder down
        names = [(entry.name, entry.is_dir()) for entry in entries]
    if any(name.endswith(".parquet") for name, _ in names) or any(
            next(Path(folder, name).glob("*.parquet"), None) for name, is_dir in names[:100] if is_dir):
        return "parquet"
    if any(name.endswith(".tar") for name, _ in names):
        return "webdataset"
    return None


def samples(images: str, options: ShardOptions, fmt: str) -> Iterator[Sample]:
    """The samples of the dataset at ``images`` in ``fmt``, in source order."""
    if fmt == "webdataset":
        return webdataset_samples(images, options)
    if fmt == "parquet":
        return parquet_samples(images, options)
    if fmt == "hf":
        return hf_samples(images, options)
    raise UsageError(f"unknown input format {fmt!r} (one of {', '.join(FORMATS)})")


# -- WebDataset --------------------------------------------------------------------------------
def import_webdataset():
    """The ``webdataset`` package, imported without torch where torch is not loaded yet: the package imports
    it, where installed, for its DataLoader classes (unused here), which would take some 600 MB in a process
    that only reads or writes tar files; it falls back to its own stand-ins."""
    if "webdataset" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ModuleNotFoundError
        try:
            import webdataset  # noqa: F401
        finally:
            del sys.modules["torch"]
    import webdataset

    return webdataset


def _split_s3(url: str) -> tuple[str, str]:
    bucket, _, key = url[len("s3://"):].partition("/")
    return bucket, key


def _s3_listing(prefix_url: str) -> Iterator[str]:
    """``s3://`` URLs of the objects under a prefix, in key order."""
    from amodal.storage import make_s3_client

    bucket, prefix = _split_s3(prefix_url.rstrip("/") + "/")
    pages = make_s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.lstrip("/"))
    for page in pages:
        for item in page.get("Contents", []):
            yield f"s3://{bucket}/{item['Key']}"


def shard_urls(images: str) -> list[str]:
    """The shards ``images`` names: a brace pattern (``shards/{00000..00099}.tar``), one ``.tar``, or a
    folder or ``s3://`` prefix holding ``.tar`` files (in name order)."""
    from braceexpand import braceexpand

    if "{" in images or images.endswith(".tar"):
        return list(braceexpand(images))
    if images.startswith("s3://"):
        return sorted(url for url in _s3_listing(images) if url.endswith(".tar"))
    return sorted(str(path) for path in Path(images).glob("*.tar"))


def _open_shard(url: str):
    """A readable stream of one shard's bytes (local file, or an S3 object read as it streams)."""
    if url.startswith("s3://"):
        from amodal.storage import make_s3_client

        bucket, key = _split_s3(url)
        return make_s3_client().get_object(Bucket=bucket, Key=key)["Body"]
    return open(url, "rb")


def webdataset_samples(images: str, options: ShardOptions) -> Iterator[Sample]:
    """Each shard's samples in order; a shard that is missing or breaks gives one error sample."""
    tariterators = import_webdataset().tariterators
    urls = shard_urls(images)
    if not urls:
        raise UsageError(f"--images: no .tar shards in {images}")
    for url in urls:
        name = url.rsplit("/", 1)[-1]
        try:
            with _open_shard(url) as stream:
                files = ({**f, "__url__": url} for f in tariterators.tar_file_iterator(stream))
                for sample in tariterators.group_by_keys(files):
                    yield _webdataset_sample(f"{name}/{sample['__key__']}", sample, options)
        except Exception as exc:  # noqa: BLE001 - any unreadable shard becomes an invalid row, never a stop
            yield Sample(key=name, error=f"shard {url} cannot be read: {type(exc).__name__}: {exc}")


def _webdataset_sample(key: str, sample: dict[str, Any], options: ShardOptions) -> Sample:
    fields = (options.image_field,) if options.image_field else IMAGE_EXTENSIONS
    image = next((sample[f] for f in fields if f in sample), None)
    if image is None:
        return Sample(key=key, error=f"sample {key} has no image ({', '.join('.' + f for f in fields)})")
    mask = sample.get(options.mask_field or "mask.png")
    queries = None
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError as exc:
            return Sample(key=key, error=f"sample {key}: its .json is not valid JSON ({exc})")
        if isinstance(meta, dict) and options.query_field in meta:
            queries = _queries(meta[options.query_field])
            if queries is None:
                return Sample(key=key, error=f"sample {key}: '{options.query_field}' must be a string or a list "
                                            "of strings")
    return Sample(key=key, image=image, mask=mask, queries=queries)


def _queries(value: Any) -> tuple[str, ...] | None:
    """A query field's value as queries (a string, or a list of strings); None if it is neither."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return None


# -- tables: Parquet and Hugging Face datasets ----------------------------------------------------
def _cell_bytes(value: Any, root: Path, what: str) -> bytes | None:
    """An image cell as bytes: raw bytes, a Hugging Face image record (``bytes`` or ``path``), or a path
    relative to ``root``; None for an empty cell. Raises InvalidInput for a path that cannot be read."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str) and value:
        return resolve_input(root, value, what).read_bytes()
    return None


def _table_sample(row: dict[str, Any], key: str, root: Path, options: ShardOptions) -> Sample:
    image_column = options.image_field or "image"
    if options.key_field in row and row[options.key_field] is not None:
        key = str(row[options.key_field])
    queries = None
    if options.query_field in row:
        queries = _queries(row[options.query_field])
        if queries is None:
            return Sample(key=key, error=f"row {key}: '{options.query_field}' must be a string or a list of strings")
    try:
        image = _cell_bytes(row.get(image_column), root, "image")
        mask = _cell_bytes(row.get(options.mask_field), root, "visible mask") if options.mask_field else None
    except InvalidInput as exc:
        return Sample(key=key, queries=queries, error=str(exc))
    if image is None:
        return Sample(key=key, queries=queries, error=f"row {key} has no image in column '{image_column}'")
    return Sample(key=key, image=image, mask=mask, queries=queries)


def _columns(names: Iterable[str], options: ShardOptions) -> list[str]:
    wanted = {options.image_field or "image", options.query_field, options.key_field, options.mask_field}
    return [name for name in names if name in wanted]


def parquet_samples(images: str, options: ShardOptions) -> Iterator[Sample]:
    """The rows of a Parquet file, or of every ``.parquet`` file under a folder (in path order), a row group
    at a time. Paths in the image column are relative to the folder given (or the file's folder)."""
    import pyarrow.parquet as pq

    given = Path(images)
    if not given.exists():
        raise UsageError(f"--images: no such file or folder: {images}")
    root = given if given.is_dir() else given.parent
    files = sorted(given.rglob("*.parquet")) if given.is_dir() else [given]
    for path in files:
        name = path.relative_to(root).as_posix()
        index = 0
        try:
            table = pq.ParquetFile(path)
            columns = _columns(table.schema_arrow.names, options)
            for group in range(table.num_row_groups):
                for batch in table.iter_batches(batch_size=PARQUET_BATCH, row_groups=[group], columns=columns):
                    for row in batch.to_pylist():
                        yield _table_sample(row, f"{name}/{index}", root, options)
                        index += 1
        except Exception as exc:  # noqa: BLE001 - an unreadable file becomes an invalid row, never a stop
            yield Sample(key=f"{name}/{index}", error=f"{path} cannot be read: {type(exc).__name__}: {exc}")


def hf_samples(images: str, options: ShardOptions) -> Iterator[Sample]:
    """The rows of a Hugging Face dataset saved with ``save_to_disk`` (memory-mapped Arrow files), a batch
    at a time; image columns are read as stored bytes, undecoded."""
    try:
        import datasets
    except ImportError:
        raise UsageError("reading a Hugging Face dataset needs the datasets package: pip install 'amodal[hf]'") \
            from None
    loaded = datasets.load_from_disk(images)
    if isinstance(loaded, datasets.DatasetDict):
        raise UsageError(f"--images: {images} holds several splits ({', '.join(loaded)}): give one split's folder")
    for column in {options.image_field or "image", options.mask_field} - {None}:
        if isinstance(loaded.features.get(column), datasets.Image):
            loaded = loaded.cast_column(column, datasets.Image(decode=False))
    loaded = loaded.select_columns(_columns(loaded.column_names, options))
    index = 0
    for batch in loaded.iter(batch_size=PARQUET_BATCH):
        for values in zip(*batch.values()):
            yield _table_sample(dict(zip(batch, values)), str(index), Path(images), options)
            index += 1


# -- rows --------------------------------------------------------------------------------------
class AnnotationIndex:
    """An annotation file's rows by the sample key their ``image`` names, in a temporary SQLite file (flat
    memory whatever its size); remembers which keys a source had."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect("")
        self._db.execute("CREATE TABLE rows (key TEXT, line INTEGER, query TEXT, error TEXT, used INTEGER DEFAULT 0)")
        _, rows = iter_annotations(path)
        self._db.executemany("INSERT INTO rows (key, line, query, error) VALUES (?, ?, ?, ?)",
                             ((row.image, row.line, row.query, row.error) for row in rows))
        self._db.execute("CREATE INDEX by_key ON rows (key)")

    def take(self, key: str) -> list[Row]:
        """The rows naming ``key`` (also as its last part, the tar sample key), in line order."""
        found = self._db.execute("SELECT line, key, query, error FROM rows WHERE key IN (?, ?) ORDER BY line",
                                 (key, key.rsplit("/", 1)[-1])).fetchall()
        self._db.execute("UPDATE rows SET used = 1 WHERE key IN (?, ?)", (key, key.rsplit("/", 1)[-1]))
        return [Row(line, image, query or "", error=error) for line, image, query, error in found]

    def unused(self) -> Iterator[Row]:
        for line, key, query, error in self._db.execute(
                "SELECT line, key, query, error FROM rows WHERE used = 0 ORDER BY line"):
            yield Row(line, key, query or "", error=error or f"no sample named {key!r} in the shards")


def shard_rows(source: Iterable[Sample], options: ShardOptions, annotations: Path | None = None) -> Iterator[ShardRow]:
    """One row per (sample, query), numbered from 1 in source order; with an annotation file, then one row
    per annotation row that named no sample."""
    index = AnnotationIndex(annotations) if annotations is not None else None
    line = 0
    for sample in source:
        if sample.error:  # one row per query it names (or one row)
            for query in sample.queries or ("",):
                line += 1
                yield ShardRow(line, sample.key, query, error=sample.error)
            continue
        if options.query is not None:
            queries: list[tuple[str, str | None]] = [(options.query, None)]
        elif index is not None:
            queries = [(row.query, row.error) for row in index.take(sample.key)]
        elif sample.queries is not None:
            queries = [(query, None) for query in sample.queries] or [("", f"sample {sample.key} has an empty query "
                                                                           "list")]
        else:
            queries = [("", f"sample {sample.key} has no '{options.query_field}' field (or pass --query or "
                            "--annotations)")]
        for query, error in queries:
            line += 1
            yield ShardRow(line, sample.key, query, sample.image, sample.mask, error)
    if index is not None and options.query is None:
        for row in index.unused():
            line += 1
            yield ShardRow(line, row.image, row.query, error=row.error)


def local_rows(rows: Iterable[ShardRow], folder: Path) -> Iterator[Row]:
    """Rows for ``amodal run``: each sample's image (and mask) written once into ``folder``, named after the
    sample's identity ("/" as "__"), which the row's ``image`` names; rows that cannot be jobs keep their error."""
    folder.mkdir(parents=True, exist_ok=True)
    for row in rows:
        if row.error or row.image_bytes is None:
            yield Row(row.line, row.image, row.query, error=row.error or f"sample {row.image} has no image")
            continue
        name = row.image.replace("/", "__")
        name = name if name not in (".", "..") else f"_{name}"
        if not (folder / name).exists():
            (folder / name).write_bytes(row.image_bytes)
            if row.mask_bytes:
                (folder / f"{name}.mask").write_bytes(row.mask_bytes)
        yield Row(row.line, name, row.query, f"{name}.mask" if row.mask_bytes else None)
