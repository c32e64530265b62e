"""Storage behaviour, the same suite over a local folder and two S3 servers (moto and a real
SeaweedFS), and the start-up check (``check_storage``)."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError, EndpointConnectionError

from amodal.errors import ServiceError, UsageError
from amodal.storage import (PARTIAL_MARK, PROBE_PREFIX, ConditionalWritesIgnored, LocalStorage, ObjectNotFound,
                            S3Storage, Storage, StorageMisconfigured, StorageUnavailable, check_storage,
                            make_s3_client, open_storage)
from tests.s3server import start_s3_server
from tests.seaweed import free_ports, seaweedfs


@pytest.fixture(params=["local", "moto", "seaweedfs"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    bucket = request.getfixturevalue("s3_bucket" if request.param == "moto" else "seaweed_bucket")
    # A small page size so that listings span several pages.
    return S3Storage(bucket, prefix="root/", page_size=3)


def record_requests(client, operation: str) -> list:
    """The requests ``client`` sends for ``operation``, as botocore prepared them."""
    sent: list = []
    client.meta.events.register(f"before-send.s3.{operation}", lambda request, **_: sent.append(request))
    return sent


class _Body:
    def __init__(self, data: bytes):
        self.data = data

    def stream(self, **_) -> Iterator[bytes]:
        yield self.data


def fake_response(request, status: int, code: str) -> AWSResponse:
    """An S3 error answer, as if the server had sent it."""
    body = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
    return AWSResponse(request.url, status, {}, _Body(body))


# The behaviour suite, over both storages.
def test_round_trip(store: Storage):
    payload = bytes(range(256)) * 10
    store.put("jobs/j1/image.png", payload)
    store.put("outcomes/d/completed/j1", b"")
    assert store.get("jobs/j1/image.png") == payload
    assert store.get("outcomes/d/completed/j1") == b""
    assert store.exists("jobs/j1/image.png")
    assert not store.exists("jobs/j1")  # a folder of keys is not an object
    assert not store.exists("jobs/j1/other.png")


def test_missing_key(store: Storage):
    with pytest.raises(ObjectNotFound):
        store.get("nothing/here")
    with pytest.raises(KeyError):
        store.get("nothing/here")
    store.delete("nothing/here")  # deleting what is absent is fine
    assert list(store.list("nothing")) == []


def test_overwrite_and_delete(store: Storage):
    store.put("a/b", b"first")
    store.put("a/b", b"second")
    assert store.get("a/b") == b"second"
    store.delete("a/b")
    assert not store.exists("a/b")
    with pytest.raises(ObjectNotFound):
        store.get("a/b")


def test_list_prefix_order_and_pages(store: Storage, request: pytest.FixtureRequest):
    keys = ["a-c", "a/b", "a/c/d", "a/c/e", "ab", "b", "b/x", "c.txt"]
    if isinstance(store, LocalStorage):
        keys.remove("b")  # in a folder, "b" cannot be both a file and the folder of "b/x"
    for key in reversed(keys):
        store.put(key, key.encode())
    pages = record_requests(store.client, "ListObjectsV2") if isinstance(store, S3Storage) else []
    # SeaweedFS walks folders: "a/..." comes before "a-c", where the folder name "a" sorts.
    in_key_order = request.node.callspec.params["store"] != "seaweedfs"

    def listed(prefix: str) -> list[str]:
        keys_listed = list(store.list(prefix))
        return keys_listed if in_key_order else sorted(keys_listed)

    assert listed("") == sorted(keys)  # S3's key order
    assert list(store.list()) == list(store.list(""))
    assert listed("a/") == ["a/b", "a/c/d", "a/c/e"]
    assert listed("a") == ["a-c", "a/b", "a/c/d", "a/c/e", "ab"]
    assert listed("a/c/") == ["a/c/d", "a/c/e"]
    assert listed("a/c/d") == ["a/c/d"]
    assert list(store.list("zz")) == []
    if isinstance(store, S3Storage):
        assert len(pages) >= 3  # 8 keys at 3 per page, for the first listing alone


def test_delete_prefix(store: Storage):
    for key in ["jobs/j1/a", "jobs/j1/s/b", "jobs/j10/a", "jobs/j2/a"]:
        store.put(key, b"x")
    store.delete_prefix("jobs/j1/")
    assert list(store.list()) == ["jobs/j10/a", "jobs/j2/a"]
    store.delete_prefix("jobs/j")
    assert list(store.list()) == []
    with pytest.raises(ValueError):
        store.delete_prefix("")


BAD_KEYS = ["", "/abs", "a//b", "a/", "./a", "a/./b", "..", "../x", "a/../../x", "a\\b", "..\\x",
            "a\nb", "a\x00b", "a\x7fb", f"a/{PARTIAL_MARK}1"]
BAD_PREFIXES = ["/", "/abs", "a//", "a//b", "./", "..", "../", "a/../../x", "a\\b", "a\tb", PARTIAL_MARK]


def test_key_validation(store: Storage):
    calls = (store.get, store.exists, store.delete, store.url,
             lambda k: store.put(k, b"x"), lambda k: store.put_if_absent(k, b"x"))
    for key in BAD_KEYS:
        for call in calls:
            with pytest.raises(ValueError):
                call(key)
    assert list(store.list()) == []


def test_prefix_validation(store: Storage):
    store.put("a/b", b"x")
    for prefix in BAD_PREFIXES:
        with pytest.raises(ValueError):
            list(store.list(prefix))
        with pytest.raises(ValueError):
            store.delete_prefix(prefix)
    assert list(store.list()) == ["a/b"]


def test_objects_stay_under_root(store: Storage, tmp_path: Path):
    store.put("x/y.txt", b"1")
    if isinstance(store, LocalStorage):
        assert (tmp_path / "store" / "x" / "y.txt").read_bytes() == b"1"
        assert store.url("x/y.txt") == (tmp_path / "store" / "x" / "y.txt").as_uri()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    else:
        raw = store.client.list_objects_v2(Bucket=store.bucket)
        assert [o["Key"] for o in raw["Contents"]] == ["root/x/y.txt"]
        assert store.url("x/y.txt") == f"s3://{store.bucket}/root/x/y.txt"


def test_put_if_absent_once(store: Storage):
    assert store.put_if_absent("state/0001.json", b"mine") is True
    assert store.put_if_absent("state/0001.json", b"theirs") is False
    assert store.get("state/0001.json") == b"mine"
    store.put("state/0002.json", b"plain")
    assert store.put_if_absent("state/0002.json", b"other") is False


def test_put_if_absent_race(store: Storage):
    threads_per_key = 8
    for round_ in range(3):
        key = f"race/{round_}"
        won: list[bytes] = []
        barrier = threading.Barrier(threads_per_key)

        def attempt(data: bytes) -> None:
            barrier.wait()
            if store.put_if_absent(key, data):
                won.append(data)

        threads = [threading.Thread(target=attempt, args=(f"writer {i}".encode(),))
                   for i in range(threads_per_key)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1
        assert store.get(key) == won[0]


# Local folder specifics.
def test_local_put_is_atomic(tmp_path: Path):
    store = LocalStorage(tmp_path)
    versions = [b"a" * 1_000_000, b"b" * 1_500_000]
    store.put("big", versions[0])
    seen: set[bytes] = set()
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            seen.add(store.get("big"))

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(30):
        store.put("big", versions[i % 2])
    done.set()
    reader.join()
    assert seen <= set(versions) and seen
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(PARTIAL_MARK)]


def test_local_ignores_partial_files_and_prunes_folders(tmp_path: Path):
    store = LocalStorage(tmp_path / "out")
    store.put("jobs/j1/a.png", b"x")
    (tmp_path / "out" / "jobs" / "j1" / f"{PARTIAL_MARK}dead").write_bytes(b"half")  # a crashed writer
    assert list(store.list()) == ["jobs/j1/a.png"]
    (tmp_path / "out" / "jobs" / "j1" / f"{PARTIAL_MARK}dead").unlink()
    store.delete_prefix("jobs/")
    assert list((tmp_path / "out").iterdir()) == []
    assert LocalStorage(tmp_path / "absent").exists("a") is False
    assert not (tmp_path / "absent").exists()  # reading creates nothing


# S3 specifics.
def test_no_checksum_headers(s3_bucket: str, s3_endpoint: str):
    store = S3Storage(s3_bucket)
    sent = record_requests(store.client, "PutObject")
    store.put("a", b"data")
    store.put_if_absent("b", b"data")
    default = boto3.session.Session().client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    sent_by_default = record_requests(default, "PutObject")
    default.put_object(Bucket=s3_bucket, Key="c", Body=b"data")

    def checksum_headers(request) -> list[str]:
        return [h for h in request.headers if h.lower().startswith(("x-amz-checksum", "x-amz-sdk-checksum",
                                                                    "x-amz-trailer"))]

    assert len(sent) == 2 and all(checksum_headers(r) == [] for r in sent)
    assert sent[1].headers["If-None-Match"] in ("*", b"*")
    assert checksum_headers(sent_by_default[0])  # what boto3 sends unless told otherwise
    assert store.client.meta.config.response_checksum_validation == "when_required"


def test_open_storage(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    local = open_storage(f"file://{tmp_path}/out%20dir")
    assert isinstance(local, LocalStorage) and local.root == tmp_path / "out dir"
    assert open_storage(f"file://localhost{tmp_path}").root == tmp_path
    monkeypatch.chdir(tmp_path)
    assert open_storage("results/run1").root == tmp_path / "results" / "run1"
    s3 = open_storage("s3://my-bucket/data/set1/")
    assert isinstance(s3, S3Storage) and (s3.bucket, s3.prefix) == ("my-bucket", "data/set1")
    assert open_storage("s3://my-bucket").prefix == ""
    for bad in ["", "http://host/x", "s3://", "s3:///prefix", "s3://Bad_Bucket/x", "s3://bucket/../x",
                "s3://bucket/a//b", "file://otherhost/x", "file:relative", "gs://bucket/x"]:
        with pytest.raises(ValueError):
            open_storage(bad)


def test_transient_errors_retried_others_not(s3_bucket: str, caplog: pytest.LogCaptureFixture):
    store = S3Storage(s3_bucket, client=make_s3_client(max_attempts=1), retry_seconds=10)
    failures = [(503, "SlowDown"), (500, "InternalError")]

    def inject(request, **_):
        return fake_response(request, *failures.pop(0)) if failures else None

    store.client.meta.events.register("before-send.s3.PutObject", inject)
    store.put("a", b"1")
    assert store.get("a") == b"1"
    assert "SlowDown" in caplog.text and "InternalError" in caplog.text
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in caplog.text
    failures[:] = [(403, "AccessDenied"), (503, "SlowDown")]
    with pytest.raises(ClientError, match="AccessDenied"):
        store.put("a", b"2")
    assert store.get("a") == b"1"


def test_put_if_absent_falls_back_without_conditional_writes(s3_bucket: str):
    store = S3Storage(s3_bucket, client=make_s3_client(max_attempts=1), retry_seconds=5)
    sent = record_requests(store.client, "PutObject")

    def refuse_conditional(request, **_):
        return fake_response(request, 501, "NotImplemented") if "If-None-Match" in request.headers else None

    store.client.meta.events.register("before-send.s3.PutObject", refuse_conditional)
    assert store.put_if_absent("k", b"1") is True
    assert store.put_if_absent("k", b"2") is False
    assert store.get("k") == b"1"
    assert ["If-None-Match" in r.headers for r in sent] == [True, False]  # asked once, then not again


def test_put_if_absent_answer_lost(s3_bucket: str, s3_admin):
    """A create that reached the server but whose answer was lost still counts as this call's."""
    from botocore.exceptions import ConnectionClosedError

    store = S3Storage(s3_bucket, client=make_s3_client(max_attempts=1), retry_seconds=5)
    lose = [True]

    def apply_then_drop(request, **_):
        if lose and lose.pop():
            s3_admin.put_object(Bucket=s3_bucket, Key="k", Body=b"mine")
            raise ConnectionClosedError(endpoint_url=request.url)

    store.client.meta.events.register("before-send.s3.PutObject", apply_then_drop)
    assert store.put_if_absent("k", b"mine") is True
    assert store.put_if_absent("k", b"mine") is False  # not retried: someone else's
    s3_admin.put_object(Bucket=s3_bucket, Key="j", Body=b"theirs")
    lose.append(True)
    assert store.put_if_absent("j", b"mine") is False  # retried, but the bytes differ


@pytest.mark.slow
def test_put_survives_outage(s3_env: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    bucket = "outage-bucket"
    endpoint, stop = start_s3_server(buckets=[bucket])
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    store = S3Storage(bucket, client=make_s3_client(max_attempts=1), retry_seconds=30)
    store.put("before", b"1")
    stop()
    started = time.monotonic()
    with pytest.raises(EndpointConnectionError):  # a short window runs out
        S3Storage(bucket, client=make_s3_client(max_attempts=1), retry_seconds=1).put("x", b"1")
    assert 1 <= time.monotonic() - started < 5
    restarted: list = []

    def restart() -> None:
        time.sleep(3)
        restarted.append(start_s3_server(port=urlsplit(endpoint).port, buckets=[bucket])[1])

    thread = threading.Thread(target=restart)
    thread.start()
    started = time.monotonic()
    try:
        store.put("during", b"2")
        assert time.monotonic() - started >= 2.5
        assert store.get("during") == b"2"
        assert "EndpointConnectionError" in caplog.text and os.environ["AWS_SECRET_ACCESS_KEY"] not in caplog.text
    finally:
        thread.join()
        for stop_again in restarted:
            stop_again()


# The start-up check.
def test_check_storage_passes_and_leaves_nothing(store: Storage):
    store.put("jobs/j1/a", b"x")
    check_storage(store)
    assert list(store.list()) == ["jobs/j1/a"]  # the probe's objects are gone
    assert store.get("jobs/j1/a") == b"x"


def strip_condition(store: S3Storage, only: str = "") -> list[str]:
    """Make ``store``'s conditional writes (to keys containing ``only``) plain ones, as a server that
    ignores If-None-Match would treat them; returns the keys whose condition was dropped."""
    stripped: list[str] = []

    def drop(request, **_):
        if only in request.url and "If-None-Match" in request.headers:
            del request.headers["If-None-Match"]
            stripped.append(request.url)

    store.client.meta.events.register("before-sign.s3.PutObject", drop)  # before signing: still valid
    return stripped


def test_probe_refuses_a_server_that_overwrites(any_s3_bucket: str):
    store = S3Storage(any_s3_bucket, prefix="data")
    stripped = strip_condition(store)
    with pytest.raises(ConditionalWritesIgnored) as caught:
        check_storage(store)
    message = str(caught.value)
    assert "\n" not in message and isinstance(caught.value, UsageError) and caught.value.exit_code == 2
    assert message.startswith(f"storage s3://{any_s3_bucket}/data on http://127.0.0.1:")
    assert "does not honour conditional writes (If-None-Match: *)" in message and "upgrade" in message
    assert "it accepted a second create-only write of one key" in message
    assert stripped and all(PROBE_PREFIX in url for url in stripped)
    assert list(store.list()) == []  # the probe cleaned up after itself


def test_probe_refuses_a_server_that_lets_racing_writers_through(any_s3_bucket: str):
    store = S3Storage(any_s3_bucket)
    strip_condition(store, only="/raced")
    with pytest.raises(ConditionalWritesIgnored, match=r"under concurrency: 8 of 8 racing create-only writes"):
        check_storage(store)
    assert list(store.list()) == []


def test_probe_refuses_a_server_without_conditional_writes(s3_bucket: str):
    store = S3Storage(s3_bucket, client=make_s3_client(max_attempts=1), retry_seconds=5)

    def refuse_conditional(request, **_):
        return fake_response(request, 501, "NotImplemented") if "If-None-Match" in request.headers else None

    store.client.meta.events.register("before-send.s3.PutObject", refuse_conditional)
    with pytest.raises(ConditionalWritesIgnored, match=r"does not support conditional writes .*NotImplemented"):
        check_storage(store)
    check_storage(store, probe_writes=False)  # reachable all the same


def test_probe_refuses_a_local_folder_that_overwrites(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    store = LocalStorage(tmp_path / "store")
    check_storage(store)
    monkeypatch.setattr(LocalStorage, "_put_if_absent", lambda self, key, data: self._put(key, data) or True)
    with pytest.raises(ConditionalWritesIgnored, match=f"storage {tmp_path / 'store'} does not honour"):
        check_storage(store)


def test_check_storage_local_folder_not_writable(tmp_path: Path):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StorageMisconfigured, match=r"^cannot write to the storage folder .*/file/store \("):
        check_storage(LocalStorage(tmp_path / "file" / "store"))


def test_check_storage_missing_bucket(any_s3_bucket: str):
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    with pytest.raises(StorageMisconfigured) as caught:
        check_storage(S3Storage(f"{any_s3_bucket}-absent", prefix="data"))
    assert str(caught.value) == (f"bucket {any_s3_bucket}-absent does not exist on {endpoint}: create it or fix "
                                 "AMODAL_STORAGE_URL")
    assert caught.value.exit_code == 2 and not isinstance(caught.value, ConditionalWritesIgnored)


@pytest.mark.parametrize("variable, value, code", [("AWS_SECRET_ACCESS_KEY", "wrong-secret", "SignatureDoesNotMatch"),
                                                   ("AWS_ACCESS_KEY_ID", "nobody", "InvalidAccessKeyId")])
def test_check_storage_wrong_credentials(seaweed_bucket: str, monkeypatch: pytest.MonkeyPatch, variable, value, code):
    check_storage(S3Storage(seaweed_bucket), probe_writes=False)
    monkeypatch.setenv(variable, value)
    with pytest.raises(StorageMisconfigured) as caught:
        check_storage(S3Storage(seaweed_bucket))
    assert str(caught.value).startswith(f"S3 credentials refused by {os.environ['AWS_ENDPOINT_URL']} for bucket "
                                        f"{seaweed_bucket} ({code}): check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
    assert caught.value.exit_code == 2


def test_check_storage_no_credentials(s3_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "absent"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "absent"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageMisconfigured) as caught:
        check_storage(S3Storage("some-bucket"))
    assert str(caught.value) == "no S3 credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"


def test_check_storage_unreachable(s3_env: str, monkeypatch: pytest.MonkeyPatch):
    endpoint = f"http://127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    with pytest.raises(StorageUnavailable) as caught:
        check_storage(S3Storage("some-bucket", client=make_s3_client(max_attempts=1)))
    message = str(caught.value)
    assert message.startswith(f"cannot reach {endpoint} (") and message.endswith(
        "check AWS_ENDPOINT_URL and that the S3 server runs") and "\n" not in message
    assert isinstance(caught.value, ServiceError) and caught.value.exit_code == 1


@pytest.mark.slow
def test_seaweedfs_restart_keeps_objects(tmp_path: Path):
    with seaweedfs(tmp_path / "s3", buckets=["kept"]) as server:
        client = server.client()
        client.put_object(Bucket="kept", Key="before", Body=b"1")
        server.stop()
        with pytest.raises(EndpointConnectionError):
            server.client(retries={"total_max_attempts": 1}).get_object(Bucket="kept", Key="before")
        server.start()
        client.put_object(Bucket="kept", Key="after", Body=b"2")
        assert [client.get_object(Bucket="kept", Key=k)["Body"].read() for k in ("before", "after")] == [b"1", b"2"]
