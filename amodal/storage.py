"""Artifact and result storage: one interface over a local folder and an S3-compatible bucket.

Keys are '/'-separated relative paths. Every key is validated (see ``check_key``) so that no key
can reach outside the storage's root folder or bucket prefix. Listings are in key order, as S3
returns them, except on servers that walk folders (SeaweedFS lists "a/b" before "a-c"): callers
that need an order sort the keys. ``check_storage`` tells, before work starts, whether a storage
can be reached and keeps the create-only promise of ``put_if_absent``.
"""
from __future__ import annotations

import logging
import os
import random
import re
import secrets
import threading
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar
from urllib.parse import unquote, urlsplit

import boto3
import botocore.session
from botocore.config import Config
from botocore.exceptions import (BotoCoreError, ClientError, HTTPClientError, NoCredentialsError,
                                 PartialCredentialsError)
from botocore.exceptions import ConnectionError as BotoConnectionError

from amodal.config import environment
from amodal.errors import ServiceError, UsageError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Local writes go through temporary files named like this; no key may contain such a segment.
PARTIAL_MARK = ".amodal-partial-"


class ObjectNotFound(KeyError):
    """No object under the key."""


def check_key(key: str) -> str:
    """``key`` if it is a valid storage key, else ValueError."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"storage key must be a non-empty string, got {key!r}")
    if "\\" in key or any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise ValueError(f"storage key {key!r} holds a backslash or a control character")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise ValueError(f"storage key {key!r} has an empty, '.' or '..' segment (or a leading '/')")
        if segment.startswith(PARTIAL_MARK):
            raise ValueError(f"storage key {key!r} uses the reserved name prefix {PARTIAL_MARK!r}")
    return key


def check_prefix(prefix: str) -> str:
    """``prefix`` if it is a valid listing prefix: empty, or a key, optionally ending with '/'."""
    if prefix:
        check_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


class Storage(ABC):
    """Objects under validated keys. Implementations provide the ``_``-prefixed methods."""

    def get(self, key: str) -> bytes:
        """The object's bytes; ObjectNotFound if there is none."""
        return self._get(check_key(key))

    def put(self, key: str, data: bytes) -> None:
        """Write (or overwrite) the object atomically: readers see the old or the new bytes."""
        self._put(check_key(key), bytes(data))

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create the object only if absent; True if this call created it."""
        return self._put_if_absent(check_key(key), bytes(data))

    def exists(self, key: str) -> bool:
        return self._exists(check_key(key))

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys that start with ``prefix`` (a plain string prefix, as on S3), in key order (but see
        the module's note on servers that walk folders)."""
        return self._list(check_prefix(prefix))

    def delete(self, key: str) -> None:
        """Remove the object; nothing happens if there is none."""
        self._delete(check_key(key))

    def delete_prefix(self, prefix: str) -> None:
        """Remove every object whose key starts with ``prefix`` (which must not be empty)."""
        if not prefix:
            raise ValueError("delete_prefix needs a non-empty prefix")
        self._delete_prefix(check_prefix(prefix))

    def url(self, key: str) -> str:
        """Where the object lives, as a file:// or s3:// URL."""
        return self._url(check_key(key))

    @abstractmethod
    def _get(self, key: str) -> bytes: ...

    @abstractmethod
    def _put(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def _put_if_absent(self, key: str, data: bytes) -> bool: ...

    @abstractmethod
    def _exists(self, key: str) -> bool: ...

    @abstractmethod
    def _list(self, prefix: str) -> Iterator[str]: ...

    @abstractmethod
    def _delete(self, key: str) -> None: ...

    @abstractmethod
    def _delete_prefix(self, prefix: str) -> None: ...

    @abstractmethod
    def _url(self, key: str) -> str: ...


class LocalStorage(Storage):
    """Objects as files under ``root`` (created on first write).

    As in any file system, a key cannot be both an object and the folder of other keys
    ("a" and "a/b"); folders left empty by deletes are removed.
    """

    def __init__(self, root: Path | str):
        self.root = Path(root).absolute()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    def _get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key) from None

    def _put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        partial = self._write_partial(path, data)
        try:
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise

    def _put_if_absent(self, key: str, data: bytes) -> bool:
        # A hard link appears whole and fails if the name exists: one racer, even across
        # processes, creates the object.
        path = self._path(key)
        partial = self._write_partial(path, data)
        try:
            os.link(partial, path)
            return True
        except FileExistsError:
            return False
        finally:
            partial.unlink(missing_ok=True)

    def _write_partial(self, path: Path, data: bytes) -> Path:
        """A complete, synced temporary file beside ``path``."""
        for _ in range(10):  # a concurrent delete may prune the folder between mkdir and open
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.parent / f"{PARTIAL_MARK}{secrets.token_hex(8)}"
            try:
                fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                break
            except FileNotFoundError:
                continue
        else:
            raise OSError(f"could not create a file in {path.parent}")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return partial

    def _exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def _list(self, prefix: str) -> Iterator[str]:
        head, _, tail = prefix.rpartition("/")
        folder = self._path(head) if head else self.root
        yield from self._walk(folder, f"{head}/" if head else "", tail)

    def _walk(self, folder: Path, start: str, name_prefix: str = "") -> Iterator[str]:
        """Keys under ``folder`` (whose key prefix is ``start``) in key order."""
        try:
            with os.scandir(folder) as it:
                entries = [e for e in it if e.name.startswith(name_prefix)
                           and not e.name.startswith(PARTIAL_MARK)]
        except (FileNotFoundError, NotADirectoryError):
            return
        # Sorting a folder as "name/" puts its keys where S3's byte order puts them.
        named = sorted((e.name + "/" if e.is_dir() else e.name, e) for e in entries)
        for name, entry in named:
            if name.endswith("/"):
                yield from self._walk(Path(entry.path), start + name)
            elif entry.is_file():
                yield start + name

    def _delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        self._prune(path.parent)

    def _delete_prefix(self, prefix: str) -> None:
        for key in list(self._list(prefix)):
            self._delete(key)

    def _prune(self, folder: Path) -> None:
        """Remove empty folders from ``folder`` up to, not including, the root."""
        while folder != self.root and folder.is_relative_to(self.root):
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent

    def _url(self, key: str) -> str:
        return self._path(key).as_uri()


# Errors worth retrying after botocore's own attempts: the server is down, overloaded or slow.
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                    "RequestTimeout", "ConditionalRequestConflict"}
_TRANSIENT_STATUS = {500, 502, 503, 504}
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def _error_code(exc: Exception) -> str:
    return getattr(exc, "response", {}).get("Error", {}).get("Code", "")


def _is_transient(exc: Exception) -> bool:
    if isinstance(exc, (BotoConnectionError, HTTPClientError)):  # refused, reset, timed out
        return True
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status in _TRANSIENT_STATUS or _error_code(exc) in _TRANSIENT_CODES
    return False


def make_s3_client(max_attempts: int = 5, connect_timeout: float = 10, read_timeout: float = 60):
    """An S3 client from the usual environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_REGION or AWS_DEFAULT_REGION, or the shared config files).

    botocore makes up to ``max_attempts`` attempts (the first included) on throttling, 5xx and
    connection errors, with backoff.
    Checksums are only computed where an operation requires one: boto3 1.36+ otherwise adds
    CRC32 checksum headers (and chunked trailers) to every upload, which many S3-compatible
    servers reject.
    """
    config = Config(
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    core = botocore.session.get_session()
    # Timestamps stay as the server's text: parsing each key's LastModified with dateutil was 70% of a
    # listing's time (status counts outcome markers by listing), and nothing here reads a timestamp.
    core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=str)
    return boto3.session.Session(botocore_session=core).client("s3", region_name=region, config=config)


class S3Storage(Storage):
    """Objects in ``bucket`` under ``prefix``, on AWS S3 or any S3-compatible server.

    Every request goes through ``_retry``: transient failures (connection refused during an
    outage, timeouts, 5xx, throttling) are retried with exponential backoff for
    ``retry_seconds`` in total (default ``AMODAL_STORAGE_RETRY_SECONDS``, 300) before raising.
    """

    def __init__(self, bucket: str, prefix: str = "", client=None, *, page_size: int = 1000,
                 retry_seconds: float | None = None):
        if not _BUCKET_NAME.fullmatch(bucket):
            raise ValueError(f"invalid S3 bucket name {bucket!r}")
        prefix = prefix.strip("/")
        self.bucket = bucket
        self.prefix = check_key(prefix) if prefix else ""
        self.client = client if client is not None else make_s3_client()
        self.page_size = page_size
        self.retry_seconds = environment().storage_retry_seconds if retry_seconds is None else retry_seconds
        self.conditional_writes = True  # until the server answers NotImplemented
        self._root = f"{self.prefix}/" if self.prefix else ""

    def _full(self, key: str) -> str:
        return self._root + key

    def _retry(self, what: str, call: Callable[[], T]) -> T:
        """``call()``, retried on transient failures until ``retry_seconds`` have passed."""
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.5
        while True:
            try:
                return call()
            except (BotoCoreError, ClientError) as exc:
                left = deadline - time.monotonic()
                if not _is_transient(exc) or left <= 0:
                    raise
                pause = min(delay * random.uniform(0.5, 1.0), left)
                log.warning("storage %s on s3://%s failed (%s: %s); retrying in %.1f s",
                            what, self.bucket, type(exc).__name__, exc, pause)
                time.sleep(pause)
                delay = min(delay * 1.5, 20.0)

    def _get(self, key: str) -> bytes:
        def read() -> bytes:
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=self._full(key))
            except ClientError as exc:
                if _error_code(exc) in ("NoSuchKey", "404"):
                    raise ObjectNotFound(key) from None
                raise
            return response["Body"].read()  # inside the retry: a dropped body is read again

        return self._retry(f"get {key}", read)

    def _put(self, key: str, data: bytes) -> None:
        # A single PutObject is atomic on S3: the object appears whole, or not at all.
        self._retry(f"put {key}", lambda: self.client.put_object(
            Bucket=self.bucket, Key=self._full(key), Body=data))

    def _put_if_absent(self, key: str, data: bytes) -> bool:
        """A conditional PutObject (``If-None-Match: *``): the server creates the object once.

        Servers without conditional writes answer NotImplemented; then this falls back to a
        check then a put, which two racing writers can both pass (best effort only).
        If a retried request finds the object holding exactly ``data``, the earlier attempt may
        have written it before its answer was lost, so it counts as created by this call.
        """
        if not self.conditional_writes:
            return self._check_then_put(key, data)
        attempts = 0

        def create() -> bool:
            nonlocal attempts
            attempts += 1
            try:
                self.client.put_object(Bucket=self.bucket, Key=self._full(key), Body=data,
                                       IfNoneMatch="*")
                return True
            except ClientError as exc:
                if _error_code(exc) != "PreconditionFailed":
                    raise
                retried = attempts > 1 or exc.response["ResponseMetadata"].get("RetryAttempts", 0) > 0
                return retried and self._get(key) == data

        try:
            return self._retry(f"put_if_absent {key}", create)
        except ClientError as exc:
            if _error_code(exc) != "NotImplemented":
                raise
        log.warning("s3://%s does not support conditional writes; put_if_absent is best effort",
                    self.bucket)
        self.conditional_writes = False
        return self._check_then_put(key, data)

    def _check_then_put(self, key: str, data: bytes) -> bool:
        if self._exists(key):
            return False
        self._put(key, data)
        return True

    def _exists(self, key: str) -> bool:
        def head() -> bool:
            try:
                self.client.head_object(Bucket=self.bucket, Key=self._full(key))
                return True
            except ClientError as exc:
                if _error_code(exc) in ("404", "NoSuchKey"):
                    return False
                raise

        return self._retry(f"exists {key}", head)

    def _list(self, prefix: str) -> Iterator[str]:
        request = {"Bucket": self.bucket, "Prefix": self._full(prefix), "MaxKeys": self.page_size}
        while True:
            page = self._retry(f"list {prefix}", lambda: self.client.list_objects_v2(**request))
            for item in page.get("Contents", ()):
                yield item["Key"][len(self._root):]
            if not page.get("IsTruncated"):
                return
            request["ContinuationToken"] = page["NextContinuationToken"]

    def _delete(self, key: str) -> None:
        self._retry(f"delete {key}", lambda: self.client.delete_object(
            Bucket=self.bucket, Key=self._full(key)))

    def _delete_prefix(self, prefix: str) -> None:
        batch: list[str] = []
        for key in self._list(prefix):
            batch.append(key)
            if len(batch) == 1000:  # DeleteObjects takes at most 1000 keys
                self._delete_batch(batch)
                batch = []
        if batch:
            self._delete_batch(batch)

    def _delete_batch(self, keys: list[str]) -> None:
        request = {"Objects": [{"Key": self._full(k)} for k in keys], "Quiet": True}
        response = self._retry(f"delete {len(keys)} objects", lambda: self.client.delete_objects(
            Bucket=self.bucket, Delete=request))
        errors = response.get("Errors", [])
        if errors:
            first = errors[0]
            raise OSError(f"could not delete {len(errors)} objects from s3://{self.bucket}, "
                          f"e.g. {first.get('Key')}: {first.get('Code')} {first.get('Message')}")

    def _url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full(key)}"


def open_storage(url: str) -> Storage:
    """``file:///abs/path`` or a plain path -> LocalStorage; ``s3://bucket/prefix`` -> S3Storage."""
    parts = urlsplit(url)
    if parts.scheme == "s3":
        if not parts.netloc or parts.query or parts.fragment:
            raise ValueError(f"storage URL {url!r}: expected s3://bucket/prefix")
        return S3Storage(parts.netloc, parts.path)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/") \
                or parts.query or parts.fragment:
            raise ValueError(f"storage URL {url!r}: expected file:///absolute/path")
        return LocalStorage(Path(unquote(parts.path)))
    if url and not parts.scheme:
        return LocalStorage(Path(url))
    raise ValueError(f"unsupported storage URL {url!r}: use file:///absolute/path, a folder path "
                     "or s3://bucket/prefix")


# Start-up check: the storage answers, and keeps put_if_absent's promise.
PROBE_PREFIX = ".amodal-probe/"  # each probe writes under PROBE_PREFIX<random>/ and removes it
PROBE_WRITERS = 8
_REFUSED_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                        "AccessDenied", "403"}


class StorageMisconfigured(UsageError):
    """The storage cannot work as configured (missing bucket, credentials, server): the user's to fix."""


class StorageUnavailable(ServiceError):
    """The storage cannot be reached or keeps failing."""


class ConditionalWritesIgnored(StorageMisconfigured):
    """The server does not refuse a create-only write of an existing object, so job-state commits
    (``put_if_absent``) could silently overwrite one another."""


def check_storage(store: Storage, *, probe_writes: bool = True) -> None:
    """Raise a :class:`StorageMisconfigured` (a :class:`ConditionalWritesIgnored` among them) or a
    :class:`StorageUnavailable`, each with a one-line message, unless ``store`` is usable:

    1. (S3) it answers a listing of its root with the configured credentials;
    2. (``probe_writes``) it refuses a create-only write of an existing object, and lets exactly
       one of several racing create-only writes of a new object through (:func:`probe_create_only`).
    """
    with _explained_errors(store):
        if isinstance(store, S3Storage):
            _check_bucket(store)
        if probe_writes:
            probe_create_only(store)


def probe_create_only(store: Storage, writers: int = PROBE_WRITERS) -> None:
    """Raise :class:`ConditionalWritesIgnored` unless ``put_if_absent`` keeps its promise on ``store``:
    a second write of one key is refused and ``writers`` racing writes of another let one through.
    Writes under a fresh key below :data:`PROBE_PREFIX` and deletes it afterwards."""
    root = f"{PROBE_PREFIX}{secrets.token_hex(8)}/"
    try:
        created = store.put_if_absent(root + "once", b"first")
        overwrote = store.put_if_absent(root + "once", b"second")
        kept = store.get(root + "once")
        winners = _race_put_if_absent(store, root + "raced", writers)
        raced = store.get(root + "raced")
    finally:
        store.delete_prefix(root)
    where = describe(store)
    if isinstance(store, S3Storage) and not store.conditional_writes:
        raise ConditionalWritesIgnored(
            f"storage {where} does not support conditional writes (If-None-Match: *, answered "
            "NotImplemented): use an S3 server that does (AWS S3, SeaweedFS 3.97 or later, MinIO)")
    if not created:
        raise ConditionalWritesIgnored(f"storage {where} refused a create-only write of a new object")
    if overwrote or kept != b"first":
        raise ConditionalWritesIgnored(
            f"storage {where} does not honour conditional writes (If-None-Match: *): it accepted a second "
            "create-only write of one key (SeaweedFS before 3.97 ignores the header); upgrade the S3 server")
    if len(winners) != 1 or raced != winners[0]:
        raise ConditionalWritesIgnored(
            f"storage {where} does not honour conditional writes (If-None-Match: *) under concurrency: "
            f"{len(winners)} of {writers} racing create-only writes succeeded (older SeaweedFS releases "
            "check the condition before writing, not atomically); upgrade the S3 server")


def describe(store: Storage) -> str:
    """Where ``store`` keeps its objects, for messages: ``s3://bucket/prefix on ENDPOINT`` or a folder."""
    if isinstance(store, S3Storage):
        return f"s3://{store.bucket}/{store.prefix} on {store.client.meta.endpoint_url}"
    return str(store.root)


def _check_bucket(store: S3Storage) -> None:
    """One listing request: the endpoint answers, the bucket exists, the credentials are accepted."""
    store.client.list_objects_v2(Bucket=store.bucket, Prefix=store._root, MaxKeys=1)


def _race_put_if_absent(store: Storage, key: str, writers: int) -> list[bytes]:
    """The data of the ``writers`` racing ``put_if_absent`` calls on ``key`` that report success."""
    barrier = threading.Barrier(writers)
    won: list[bytes] = []
    failed: list[BaseException] = []

    def attempt(data: bytes) -> None:
        try:
            barrier.wait()
            if store.put_if_absent(key, data):
                won.append(data)
        except BaseException as exc:  # noqa: BLE001  (re-raised in the caller's thread, below)
            failed.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=attempt, args=(f"writer {i}".encode(),)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failed:
        raise next((e for e in failed if not isinstance(e, threading.BrokenBarrierError)), failed[0])
    return won


@contextmanager
def _explained_errors(store: Storage) -> Iterator[None]:
    """Re-raise the errors of ``store``'s calls as StorageMisconfigured or StorageUnavailable."""
    try:
        yield
    except (StorageMisconfigured, StorageUnavailable):
        raise
    except (BotoCoreError, ClientError, OSError) as exc:
        raise _explain(store, exc) from exc


def _explain(store: Storage, exc: Exception) -> StorageMisconfigured | StorageUnavailable:
    """The one-line error a user reads for ``exc``, met while using ``store``."""
    if isinstance(store, LocalStorage):
        return StorageMisconfigured(f"cannot write to the storage folder {store.root} ({_reason(exc)})")
    assert isinstance(store, S3Storage)
    endpoint = store.client.meta.endpoint_url
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return StorageMisconfigured("no S3 credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
    if isinstance(exc, (BotoConnectionError, HTTPClientError)):
        return StorageUnavailable(f"cannot reach {endpoint} ({_reason(exc)}): check AWS_ENDPOINT_URL "
                                  "and that the S3 server runs")
    if isinstance(exc, ClientError):
        code = _error_code(exc)
        if code == "NoSuchBucket":
            return StorageMisconfigured(f"bucket {store.bucket} does not exist on {endpoint}: create it or "
                                        "fix AMODAL_STORAGE_URL")
        if code in _REFUSED_CREDENTIALS:
            return StorageMisconfigured(f"S3 credentials refused by {endpoint} for bucket {store.bucket} "
                                        f"({code}): check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY and the "
                                        "key's permissions")
        if _is_transient(exc):
            return StorageUnavailable(f"{endpoint} fails ({_reason(exc)})")
        return StorageMisconfigured(f"{endpoint} refused a request on s3://{store.bucket} ({_reason(exc)})")
    return StorageUnavailable(f"storage {describe(store)} failed ({_reason(exc)})")


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
