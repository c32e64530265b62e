"""A local S3 server for tests and CI: moto's S3 server in its own process on 127.0.0.1.

A separate process (not a thread of the test process) so that worker processes can reach it
and a test can stop it and start it again on the same port. Buckets given at start are created
before the server takes its first request, so a restarted server never answers NoSuchBucket.

Run by hand: ``python tests/s3server.py --port 9000 --bucket amodal``.
"""
from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterable

HOST = "127.0.0.1"


def start_s3_server(port: int | None = None, buckets: Iterable[str] = ()) -> tuple[str, Callable[[], None]]:
    """Start the server (on a free port if ``port`` is None); return its URL and a stop function."""
    log = tempfile.TemporaryFile()
    command = [sys.executable, str(Path(__file__).resolve()), "--port", str(port or 0)]
    command += [f"--bucket={b}" for b in buckets]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
    line = proc.stdout.readline()  # "ready <port>" once listening, or EOF if it failed
    if not line.startswith("ready "):
        proc.wait()
        log.seek(0)
        log_text = log.read().decode(errors="replace")[-2000:]
        log.close()
        raise RuntimeError(f"S3 server did not start (exit {proc.returncode}):\n{log_text}")

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()
        log.close()

    return f"http://{HOST}:{int(line.split()[1])}", stop


class AtomicCreateOnly:
    """WSGI middleware: one create-only PUT (``If-None-Match: *``) at a time. moto checks the condition and
    then stores the object, so in a threaded server two racing writers could both pass; S3 makes the pair
    atomic, and workers refuse storage that does not (``amodal.storage.probe_create_only``)."""

    def __init__(self, app) -> None:
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        if environ.get("REQUEST_METHOD") == "PUT" and environ.get("HTTP_IF_NONE_MATCH"):
            with self.lock:
                return list(self.app(environ, start_response))  # the whole response inside the lock
        return self.app(environ, start_response)


def main(argv: list[str] | None = None) -> None:
    from moto.moto_server.werkzeug_app import (DomainDispatcherApplication, MotoRequestHandler,
                                               create_backend_app)
    from werkzeug.serving import make_server
    from werkzeug.test import Client

    parser = argparse.ArgumentParser(description="moto's S3 server for tests")
    parser.add_argument("--host", default=HOST)
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--bucket", action="append", default=[], help="create this bucket first")
    args = parser.parse_args(argv)

    app = DomainDispatcherApplication(create_backend_app)
    for bucket in args.bucket:  # through the app itself, before any client can connect
        response = Client(app).put(f"/{bucket}")
        if response.status_code != 200:
            raise SystemExit(f"could not create bucket {bucket!r}: {response.status_code}")
    server = make_server(args.host, args.port, AtomicCreateOnly(app), threaded=True,
                         request_handler=MotoRequestHandler)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    # Listening from here on: connections wait in the backlog until serve_forever takes them.
    print(f"ready {server.server_port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
