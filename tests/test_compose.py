"""docker-compose.yml and the worker image, checked by parsing (no Docker engine runs here)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
GPU_STAGES = ("ground", "segment", "occlusion", "inpaint")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def gpu_ids(service: dict) -> list[str]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    return [i for d in devices if "gpu" in d.get("capabilities", []) for i in d.get("device_ids", [])]


def test_one_service_per_stage_with_gpu_reservations(compose):
    services = compose["services"]
    for stage in GPU_STAGES:
        s = services[stage]
        assert s["command"][:3] == ["worker", "--stage", stage]
        assert gpu_ids(s) == ["0"]
        assert s["environment"]["AMODAL_NODE"] == f"{stage}-gpu0"
        assert "ping" in " ".join(s["healthcheck"]["test"])
    finalize = services["finalize"]
    assert finalize["command"] == ["worker", "--stage", "finalize"] and gpu_ids(finalize) == []


def test_workers_reach_broker_storage_and_models(compose):
    for name in (*GPU_STAGES, "finalize", "flower"):
        env = compose["services"][name]["environment"]
        assert env["AMODAL_BROKER_URL"].startswith("redis://redis:")
        assert env["AMODAL_STORAGE_URL"].startswith("s3://")
        assert env["AWS_ENDPOINT_URL"] == "http://s3:8333"
    for stage in GPU_STAGES:
        s = compose["services"][stage]
        assert "./models:/models:ro" in s["volumes"] and s["environment"]["AMODAL_MODEL_DIR"] == "/models"
        assert s["depends_on"]["redis"]["condition"] == "service_healthy"
        assert s["depends_on"]["s3-init"]["condition"] == "service_completed_successfully"


def test_redis_persists_and_never_evicts(compose):
    cmd = " ".join(compose["services"]["redis"]["command"])
    assert "--appendonly yes" in cmd and "--maxmemory-policy noeviction" in cmd
    assert compose["services"]["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_s3_server_and_bucket_creation(compose):
    s3 = compose["services"]["s3"]
    assert "seaweedfs" in s3["image"] and "-s3" in " ".join(s3["command"])
    init = compose["services"]["s3-init"]
    assert "s3 mb s3://amodal" in " ".join(init["command"])
    assert init["depends_on"]["s3"]["condition"] == "service_healthy"


def test_no_credentials_in_the_file():
    text = (ROOT / "docker-compose.yml").read_text()
    assert "${FLOWER_BASIC_AUTH:?" in text and "${AMODAL_S3_SECRET_KEY:?" in text
    compose = yaml.safe_load(text)
    flower = compose["services"]["flower"]
    assert flower["command"] == ["flower", "--port", "5555"]
    for service in compose["services"].values():
        for key, value in (service.get("environment") or {}).items():
            if "SECRET" in key or key == "FLOWER_BASIC_AUTH":
                assert str(value).startswith("${"), key


def test_four_gpu_override_places_every_stage_on_every_gpu():
    override = yaml.safe_load((ROOT / "docker-compose.4gpu.yml").read_text())["services"]
    placed = {(s["extends"]["service"], gpu_ids(s)[0]) for s in override.values()}
    assert placed == {(stage, str(g)) for stage in GPU_STAGES for g in (1, 2, 3)}
    assert all(s["command"][-2:] == ["--gpu", "0"] for s in override.values())  # one visible GPU each


def test_worker_image_keeps_the_base_torch():
    text = (ROOT / "infra" / "Dockerfile").read_text()
    assert "--constraint /tmp/torch-pins.txt" in text
    assert "pip install torch" not in text and "USER amodal" in text
    assert 'ENTRYPOINT ["amodal"]' in text and "HF_HUB_OFFLINE=1" in text
