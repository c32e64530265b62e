"""Shared fixtures: tiny models, the paper's examples, an S3 server, a Redis database of our own."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "paper-examples"
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
def s3_server():
    """An S3 protocol server on loopback; yields the environment that reaches it."""
    from tests.s3server import start_s3_server

    endpoint, stop = start_s3_server()
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    yield env
    stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    return s3_server


@pytest.fixture
def redis_url():
    """A Redis database index of the tests' own, emptied before and after."""
    import redis

    url = f"redis://127.0.0.1:6379/{REDIS_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
