"""Where configuration reaches the code: every ``AMODAL_*`` variable and every ``--set`` is read here.

Two kinds of configuration:
- the deployment (:class:`Environment`): broker, storage, model folder, batch sizes, time limits,
  read from ``AMODAL_*`` variables by pydantic-settings (typed, validated, one clear error);
- the method's :class:`~amodal.settings.Settings`: defaults, then ``AMODAL_SETTINGS`` (a JSON
  object), then each ``--set NAME=VALUE`` of the command line, last one wins.

Every verb (``run``, ``submit``, ``worker``, ``launch``, ``eval``) builds its settings with
:func:`resolve_settings`; a worker or launcher hands the result to its child processes through
:func:`child_environment`, so a pool process sees what its command line said.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Iterable, Literal

from pydantic import Field, TypeAdapter, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from amodal.errors import UsageError
from amodal.settings import PRESETS, Settings
from amodal.stages import BY_NAME

SETTINGS_VARIABLE = "AMODAL_SETTINGS"


class Environment(BaseSettings):
    """The deployment, from ``AMODAL_<NAME>`` variables (``broker_url`` is ``AMODAL_BROKER_URL``)."""

    model_config = SettingsConfigDict(env_prefix="AMODAL_", extra="ignore", frozen=True)

    broker_url: str = "redis://127.0.0.1:6379/0"
    storage_url: str = ""  # file:///path or s3://bucket/prefix
    model_dir: Path | None = None
    settings: dict = Field(default_factory=dict)  # AMODAL_SETTINGS: JSON overrides of the method's settings
    # Jobs per model call of the batched stages (per pool process), and how long a partial batch waits:
    # defaults and their measurements in amodal.stages.
    ground_batch: int = Field(BY_NAME["ground"].batch, ge=1)
    segment_batch: int = Field(BY_NAME["segment"].batch, ge=1)
    occlusion_batch: int = Field(BY_NAME["occlusion"].batch, ge=1)
    inpaint_batch: int = Field(BY_NAME["inpaint"].batch, ge=1)
    ground_flush: float = Field(BY_NAME["ground"].flush, gt=0)
    segment_flush: float = Field(BY_NAME["segment"].flush, gt=0)
    occlusion_flush: float = Field(BY_NAME["occlusion"].flush, gt=0)
    inpaint_flush: float = Field(BY_NAME["inpaint"].flush, gt=0)
    task_time_limit: int = Field(300, ge=31)  # seconds; the hard limit that kills a hung step
    # Redis hands an unacknowledged message back after this; it should outlast the longest step (default: limit + 60).
    visibility_timeout: int | None = Field(None, ge=1)
    max_attempts: int = Field(4, ge=1)  # deliveries of one step before its job ends `failed`
    storage_retry_seconds: float = Field(300.0, ge=0)  # how long storage calls retry transient errors
    warmup_timeout: float = Field(900.0, gt=0)  # seconds a pool process may take to load and warm its models
    broker_folder: str = "/tmp/amodal-broker"  # the filesystem:// broker's shared folder
    instaorder_url: str = ""  # where `amodal models download` fetches InstaOrder's checkpoint (no official mirror)
    worker_stage: str = ""  # set by `amodal worker` for its pool processes
    # `amodal dispatch`: jobs in flight (sent to the stages, no outcome yet) at most; each has at most one
    # message queued, so this bounds the broker's memory (about 1 KB a message) whatever a dataset's size.
    dispatch_high_water: int = Field(2000, ge=1)
    dispatch_interval: float = Field(2.0, gt=0)  # seconds between two rounds of feeding
    dispatch_scan_interval: float = Field(30.0, gt=0)  # seconds between two checks of the jobs in flight
    # A job in flight whose state has not advanced for task_time_limit + visibility_timeout + this margin,
    # with no message of its in the broker, is stalled: its current step is sent again.
    stall_margin: int = Field(60, ge=0)
    # The dispatch lock's lease: a dispatcher (every worker runs one) that dies holding it is replaced
    # by another within this many seconds plus one round.
    dispatch_lock_seconds: int = Field(60, ge=5)
    log_format: Literal["text", "json"] = "text"  # `amodal --log-format`: one JSON object per log line for collectors
    # Storage calls a submission (or the dispatcher) makes at once: boto3's connection pool holds 10.
    submit_concurrency: int = Field(10, ge=1)

    @model_validator(mode="after")
    def _default_visibility_timeout(self) -> "Environment":
        if self.visibility_timeout is None:
            object.__setattr__(self, "visibility_timeout", self.task_time_limit + 60)
        return self

    def require_storage_url(self) -> str:
        """``AMODAL_STORAGE_URL``, or the one-line error that says how to set it."""
        if not self.storage_url:
            raise UsageError("no storage: set AMODAL_STORAGE_URL (file:///path or s3://bucket/prefix)")
        return self.storage_url

    def require_model_dir(self, given: str | Path | None = None) -> Path:
        """``given`` (``--models``), else ``AMODAL_MODEL_DIR``, or the one-line error that says how to give one."""
        value = given or self.model_dir
        if not value:
            raise UsageError("no model folder: pass --models DIR or set AMODAL_MODEL_DIR")
        return Path(value)

    def batch_size(self, stage: str) -> int:
        """Jobs per model call of ``stage`` (1 for the stages that are not batched)."""
        return getattr(self, f"{stage}_batch", BY_NAME[stage].batch)

    def flush_interval(self, stage: str) -> float:
        return getattr(self, f"{stage}_flush", BY_NAME[stage].flush)


def environment() -> Environment:
    """The deployment as the environment says now; a malformed variable is a :class:`UsageError`."""
    try:
        return Environment()
    except ValidationError as exc:
        raise UsageError(_one_line(exc, "AMODAL_")) from None
    except SettingsError:  # pydantic-settings could not parse a JSON-valued variable: AMODAL_SETTINGS is the one
        raise UsageError("AMODAL_SETTINGS is not a JSON object; write it as '{\"max_passes\": 2}'") from None


def debug_enabled() -> bool:
    """``AMODAL_DEBUG``: tracebacks instead of one-line errors (read alone: it must work when others are malformed)."""
    return os.environ.get("AMODAL_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


_SETTINGS_ADAPTER = TypeAdapter(Settings)


def resolve_settings(overrides: Iterable[str] = (), env: Environment | None = None) -> Settings:
    """Defaults, then ``AMODAL_SETTINGS``, then ``NAME=VALUE`` overrides (``--set``), typed and checked."""
    values = dict((env or environment()).settings)
    for item in overrides:
        name, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--set {item!r}: expected NAME=VALUE")
        values[name.strip()] = value
    preset = values.pop("preset", "paper")
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r} (one of {', '.join(PRESETS)})")
    values = {**PRESETS[preset], **values}
    unknown = sorted(set(values) - set(Settings.__dataclass_fields__))
    if unknown:
        raise UsageError(f"unknown setting {unknown[0]!r} (`amodal settings` lists them)")
    try:
        return _SETTINGS_ADAPTER.validate_python(values)
    except ValidationError as exc:
        raise UsageError(_one_line(exc, "setting ")) from None


@functools.cache
def worker_runtime() -> dict:
    """The runtime settings (device, dtype, compilation) of this worker's configuration: they apply to
    every job it runs, whatever the producer's were, and do not change results."""
    settings = resolve_settings()
    return {name: getattr(settings, name) for name in Settings.RUNTIME_FIELDS}


def child_environment(settings: Settings, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with ``settings`` as ``AMODAL_SETTINGS``: what a
    worker's pool processes or a launcher's workers read."""
    env = dict(os.environ if base is None else base)
    changed = {k: v for k, v in settings.to_dict().items() if v != getattr(Settings(), k)}
    env[SETTINGS_VARIABLE] = json.dumps(changed, sort_keys=True)
    return env


def _one_line(exc: ValidationError, prefix: str) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"]) or "value"
    given = f" (got {error['input']!r})" if not isinstance(error.get("input"), dict) else ""
    return f"{prefix}{where.upper() if prefix == 'AMODAL_' else where}: {error['msg']}{given}"
