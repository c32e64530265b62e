"""The job record: a small JSON-serialisable state machine kept with the job's artifacts
(docs/design.md, "The job state machine")."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from amodal.keys import job_prefix, state_key
from amodal.settings import Settings
from amodal.stages import NAMES

# Stages in the order a job moves through them (amodal.stages); the completion loop returns from
# ``occlusion`` to ``inpaint`` and from ``inpaint`` to ``segment``.
WORK_STAGES = NAMES  # one queue and one worker kind each
STAGES = (*WORK_STAGES, "done")
OUTCOMES = ("completed", "unoccluded", "skipped", "no_target", "invalid", "failed")


def job_id(dataset: str, image_key: str, query: str, mask_key: str | None, settings: Settings, inputs: str,
           weights: str) -> str:
    """Content hash of what defines a job: the same input submitted twice is one job. ``inputs`` digests the
    image's and visible mask's bytes, ``weights`` the checkpoints the stack loads (amodal.provenance), so a
    changed file under the same name is new work."""
    blob = json.dumps([dataset, image_key, query, mask_key, settings.result_fingerprint(), inputs, weights])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@dataclass
class JobState:
    job_id: str
    dataset: str
    image_key: str  # in the input storage
    query: str
    settings: dict
    mask_key: str | None = None  # a given visible mask, in the input storage
    inputs: str = ""  # storage URL the image and mask keys are in; "" = the artifact storage
    result_prefix: str = ""  # where the result folder goes in the artifact storage
    stage: str = "ground"
    version: int = 0  # bumped by every step; a task for an older version is a stale redelivery
    passes: int = 0  # inpainting passes done
    status: str | None = None  # one of OUTCOMES once known
    message: str = ""
    image_size: tuple[int, int] | None = None  # (height, width)
    tags: list[str] = field(default_factory=list)
    prompt: str = ""
    target_class: str = ""  # the class chosen for the target (the prompt is "a {target_class}")
    detections: int = 0  # instances detected on the input image (the paper's code numbers the target after them)
    target_index: int | None = None  # the target's instance in the last window's scene (None: not re-detected)
    truncated: list[str] = field(default_factory=list)
    window: dict | None = None
    passes_log: list[dict] = field(default_factory=list)  # one record per inpainting pass (amodal.quality)
    stop: str = ""  # why the completion loop ended: one of amodal.loop.STOPS
    backends: dict[str, str] = field(default_factory=dict)
    grounder_text: str = ""
    attempts: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # busy seconds per stage, all passes
    flags: list[str] = field(default_factory=list)  # the result's named doubts (amodal.quality), set by finalize

    def add_time(self, stage: str, seconds: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds

    @property
    def key_prefix(self) -> str:
        return job_prefix(self.job_id)

    def key(self, name: str) -> str:
        """Deterministic artifact key of this job."""
        return f"{self.key_prefix}/{name}"

    @property
    def state_key(self) -> str:
        """Where this version of the state is kept (each version is written once)."""
        return state_key(self.job_id, self.version)

    def job_settings(self) -> Settings:
        return Settings.from_dict(self.settings)

    def finish(self, status: str, message: str = "") -> None:
        """Record the outcome; the job goes to ``finalize`` to write it."""
        assert status in OUTCOMES, status
        self.status, self.message, self.stage = status, message, "finalize"

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "JobState":
        raw = json.loads(data)
        if raw.get("image_size") is not None:
            raw["image_size"] = tuple(raw["image_size"])
        return cls(**raw)
