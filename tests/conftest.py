"""Shared fixtures: tiny models, the paper's examples, an S3 server, a Redis database of our own."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Iterator

import boto3
import pytest

from tests.paths import EXAMPLES
from tests.s3server import start_s3_server

REDIS_DB = int(os.environ.get("AMODAL_TEST_REDIS_DB", "11"))


@pytest.fixture(scope="session")
def paper_examples() -> Path:
    if not EXAMPLES.exists():
        pytest.fail(f"the paper's examples are expected at {EXAMPLES}")
    return EXAMPLES


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    from amodal.models.tiny import write_tiny_models

    folder = tmp_path_factory.mktemp("models")
    write_tiny_models(folder, progress=False)
    return folder


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """URL of a moto S3 server (its own process) shared by the session."""
    endpoint, stop = start_s3_server()
    yield endpoint
    stop()


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The usual AWS environment, pointing at the test server; returns its URL."""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return s3_endpoint


@pytest.fixture(scope="session")
def s3_admin(s3_endpoint: str):
    """A plain client of the test server, for setting up and inspecting buckets."""
    return boto3.session.Session().client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                                          aws_access_key_id="testing", aws_secret_access_key="testing-secret")


@pytest.fixture
def s3_bucket(s3_env: str, s3_admin) -> str:
    """A fresh, empty bucket on the test server."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    s3_admin.create_bucket(Bucket=name)
    return name


@pytest.fixture
def redis_url():
    """A Redis database index of the tests' own, emptied before and after."""
    import redis

    url = f"redis://127.0.0.1:6379/{REDIS_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
