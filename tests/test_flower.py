"""Flower for real: basic auth on every page and API call, Prometheus metrics open to scrapers."""
from __future__ import annotations

import subprocess
import sys

import pytest
import requests

from tests import flowerproc

AUTH = ("watcher", "s3cret-pw")
FLOWER_REDIS_DB = 13

# tests/test_distributed.py takes these from here; they are tests/flowerproc.py's.
free_port = flowerproc.free_port
start_flower = flowerproc.launch_flower


def flower_env(redis_url: str) -> dict[str, str]:
    return flowerproc.flower_env(redis_url, AUTH)


@pytest.fixture
def own_redis_url():
    """A Redis database of this module's own (workers of other tests run on the shared one), emptied."""
    import redis

    url = f"redis://127.0.0.1:6379/{FLOWER_REDIS_DB}"
    redis.Redis.from_url(url).flushdb()
    yield url
    redis.Redis.from_url(url).flushdb()


def test_flower_asks_for_credentials_and_serves_metrics(own_redis_url):
    base, stop = flowerproc.start_flower(own_redis_url, free_port(), AUTH)
    try:
        for path in ("/", "/workers", "/tasks"):  # pages: the browser is asked for credentials
            denied = requests.get(base + path, timeout=10)
            assert denied.status_code == 401 and denied.headers["WWW-Authenticate"].startswith("Basic"), path
        for path in ("/api/workers", "/api/tasks", "/api/queues/length"):
            assert requests.get(base + path, timeout=10).status_code == 401, path
        assert requests.get(f"{base}/api/workers", auth=("watcher", "wrong"), timeout=10).status_code == 401
        assert requests.get(f"{base}/api/workers", auth=("other", AUTH[1]), timeout=10).status_code == 401
        ok = requests.get(f"{base}/api/workers", auth=AUTH, timeout=10)
        assert ok.status_code == 200 and ok.headers["Content-Type"].startswith("application/json")
        assert flowerproc.flower_workers(base, AUTH) == {}  # no worker runs on this database
        metrics = requests.get(f"{base}/metrics", timeout=10)  # no credentials: what a scraper sends
        assert metrics.status_code == 200 and metrics.headers["Content-Type"].startswith("text/plain")
        assert "# TYPE flower_events_total counter" in metrics.text
        assert "# TYPE flower_worker_online gauge" in metrics.text
        assert requests.get(f"{base}/healthcheck", timeout=10).text == "OK"
    finally:
        output = stop()
    assert AUTH[1] not in output  # the password is never printed


def test_flower_refuses_to_start_without_basic_auth(own_redis_url):
    res = subprocess.run([sys.executable, "-m", "amodal.cli", "flower", "--port", str(free_port())],
                         env=flowerproc.flower_env(own_redis_url, None), cwd=flowerproc.ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "set FLOWER_BASIC_AUTH to user:password" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("value", ["", "nopassword", "user:", ":pw", "a b:c", "admin:pa,ss", "a:b,", "a:b c"])
def test_malformed_auth_is_refused(monkeypatch, value):
    from producer.flower import basic_auth_from_env

    monkeypatch.setenv("FLOWER_BASIC_AUTH", value)
    with pytest.raises(SystemExit, match="FLOWER_BASIC_AUTH"):
        basic_auth_from_env()


@pytest.mark.parametrize("value", ["admin:pw", "admin:p:w", "ops:x1,viewer:y2"])
def test_wellformed_auth_is_passed_on(monkeypatch, value):
    from producer.flower import basic_auth_from_env

    monkeypatch.setenv("FLOWER_BASIC_AUTH", value)
    assert basic_auth_from_env() == value
