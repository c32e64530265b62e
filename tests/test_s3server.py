"""The tests' moto server keeps S3's promise that racing create-only writes let exactly one through."""
from __future__ import annotations

import threading
import time

from tests.s3server import AtomicCreateOnly


class CheckThenStore:
    """A WSGI app that, like moto, checks ``If-None-Match`` and then stores, with a gap between the two."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def __call__(self, environ, start_response):
        key = environ["PATH_INFO"]
        if environ.get("HTTP_IF_NONE_MATCH") == "*" and key in self.objects:
            start_response("412 Precondition Failed", [])
            return [b""]
        time.sleep(0.05)
        self.objects[key] = environ["wsgi.input"]
        start_response("200 OK", [])
        return [b""]


def race(app, writers: int = 8) -> list[str]:
    """The status lines of ``writers`` simultaneous create-only PUTs of one key."""
    statuses: list[str] = []
    barrier = threading.Barrier(writers)

    def put(i: int) -> None:
        environ = {"REQUEST_METHOD": "PUT", "PATH_INFO": "/bucket/key", "HTTP_IF_NONE_MATCH": "*",
                   "wsgi.input": f"writer {i}".encode()}
        barrier.wait()
        list(app(environ, lambda status, headers: statuses.append(status)))

    threads = [threading.Thread(target=put, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


def test_racing_create_only_puts_let_exactly_one_through():
    assert sum(s.startswith("200") for s in race(CheckThenStore())) > 1  # the race the middleware closes
    statuses = race(AtomicCreateOnly(CheckThenStore()))
    assert sum(s.startswith("200") for s in statuses) == 1 and len(statuses) == 8
