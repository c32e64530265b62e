"""The Redis databases the tests take on the machine's Redis (127.0.0.1:6379, or the server at
``AMODAL_TEST_REDIS``), one per owner, so that one test module's flush never empties another's (the
benchmarks in ``bench/`` take 9 and 12)."""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import redis

SERVER = os.environ.get("AMODAL_TEST_REDIS", "redis://127.0.0.1:6379").rstrip("/")
SHARED = int(os.environ.get("AMODAL_TEST_REDIS_DB", "11"))  # the ``redis_url`` fixture of conftest.py
DISPATCH = 13  # tests/test_dispatch.py
FLOWER = 14  # tests/test_flower.py
METRICS = 8  # tests/test_metrics.py


@contextmanager
def emptied(db: int) -> Iterator[str]:
    """The URL of database ``db``, emptied before and after."""
    url = f"{SERVER}/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
