"""Shared fixtures: tiny models, the paper's examples, S3 servers (moto, SeaweedFS), a Redis database of our own."""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import Iterator

import boto3
import pytest

from tests import databases
from tests.paths import EXAMPLES
from tests.s3server import start_s3_server
from tests.seaweed import ACCESS_KEY, REGION, SECRET_KEY, SeaweedServer, seaweedfs


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


@pytest.fixture(scope="session")
def seaweed_server(tmp_path_factory) -> Iterator[SeaweedServer]:
    """A real SeaweedFS (``weed server -s3``) shared by the session; it checks credentials."""
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture(scope="session")
def seaweed_endpoint(seaweed_server: SeaweedServer) -> str:
    return seaweed_server.endpoint


def _point_env_at(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    return endpoint


def _admin_client(endpoint: str):
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=REGION,
                                          aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)


def _new_bucket(admin) -> str:
    name = f"test-{uuid.uuid4().hex[:16]}"
    admin.create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The usual AWS environment, pointing at the moto server; returns its URL."""
    return _point_env_at(s3_endpoint, monkeypatch)


@pytest.fixture(scope="session")
def s3_admin(s3_endpoint: str):
    """A plain client of the moto server, for setting up and inspecting buckets."""
    return _admin_client(s3_endpoint)


@pytest.fixture
def s3_bucket(s3_env: str, s3_admin) -> str:
    """A fresh, empty bucket on the moto server."""
    return _new_bucket(s3_admin)


@pytest.fixture
def seaweed_env(seaweed_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The usual AWS environment, pointing at the SeaweedFS server; returns its URL."""
    return _point_env_at(seaweed_endpoint, monkeypatch)


@pytest.fixture(scope="session")
def seaweed_admin(seaweed_endpoint: str):
    """A plain client of the SeaweedFS server."""
    return _admin_client(seaweed_endpoint)


@pytest.fixture
def seaweed_bucket(seaweed_env: str, seaweed_admin) -> Iterator[str]:
    """A fresh, empty bucket on the SeaweedFS server, deleted afterwards with its objects (each bucket
    holds a volume of its own)."""
    name = _new_bucket(seaweed_admin)
    yield name
    seaweed_admin.delete_bucket(Bucket=name)


@pytest.fixture(params=["moto", "seaweedfs"])
def any_s3_bucket(request: pytest.FixtureRequest) -> str:
    """A fresh bucket on each S3 server in turn (moto, then SeaweedFS), the environment pointing at it."""
    return request.getfixturevalue("s3_bucket" if request.param == "moto" else "seaweed_bucket")


@pytest.fixture
def redis_url():
    """A Redis database of the tests' own, emptied before and after."""
    with databases.emptied(databases.SHARED) as url:
        yield url


@pytest.fixture(scope="session")
def eval_models(tiny_models, tmp_path_factory) -> Path:
    """The tiny model folder with a tiny CLIP standing in for ``amodal eval``'s metric CLIP (ViT-L/14's folder)."""
    import shutil

    from amodal.evaluation.options import MetricOptions

    folder = tmp_path_factory.mktemp("eval-models")
    for entry in tiny_models.iterdir():
        (folder / entry.name).symlink_to(entry)
    shutil.copytree(tiny_models / "clip-vit-base-patch32", folder / MetricOptions().clip_model)
    return folder


@pytest.fixture(scope="session")
def scorer(eval_models):
    """``amodal eval``'s metric networks from :func:`eval_models`, on the CPU, with the default choices."""
    import torch

    from amodal.evaluation.metrics import Scorer

    return Scorer.from_model_dir(eval_models, torch.device("cpu"))
