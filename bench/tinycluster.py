"""The real distributed path on this machine, for CPU benchmarks: tiny models, an S3 server
(moto, the one available here), a Redis database and the five stage workers."""
from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tests.cluster import cluster_env, start_workers
from tests.s3server import start_s3_server
from workers.launch import WorkerGroup


@dataclass
class TinyCluster:
    work: Path
    models: Path
    env: dict
    group: WorkerGroup | None = None


@contextlib.contextmanager
def tiny_cluster(redis_url: str, settings: dict, prefix: str) -> Iterator[TinyCluster]:
    """Tiny models written, S3 and Redis ready and this process pointed at them; the workers start
    with :func:`with_workers` and stop on exit."""
    import boto3
    import redis

    from amodal.models.tiny import write_tiny_models

    work = Path(tempfile.mkdtemp(prefix=f"amodal-{prefix}-"))
    models = work / "models"
    write_tiny_models(models, progress=False)
    endpoint, stop_s3 = start_s3_server()
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID=prefix, AWS_SECRET_ACCESS_KEY=prefix,
                      AWS_DEFAULT_REGION="us-east-1")
    bucket = f"{prefix}-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    redis.Redis.from_url(redis_url).flushdb()
    env = cluster_env(redis_url, f"s3://{bucket}/data", models, settings)
    os.environ.update(AMODAL_BROKER_URL=redis_url, AMODAL_STORAGE_URL=env["AMODAL_STORAGE_URL"])
    cluster = TinyCluster(work, models, env)
    try:
        yield cluster
    finally:
        if cluster.group is not None:
            cluster.group.stop()
        stop_s3()


def with_workers(cluster: TinyCluster) -> WorkerGroup:
    cluster.group = start_workers(cluster.env, cluster.work / "logs")
    return cluster.group
