"""The embedded default: the whole method in one process over an annotation file (``amodal run``;
docs/design.md, "Results and the manifest")."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from amodal.annotations import Row, read_annotations, resolve_input, validate_query
from amodal.canvas import neutral_background
from amodal.images import InvalidInput, load_image
from amodal.keys import JOB_RECORD
from amodal.models.base import MissingCheckpointError
from amodal.provenance import inputs_digest, weight_fingerprints, weights_digest
from amodal.settings import Settings
from amodal.state import JobState, job_id
from amodal.steps import Context, run_step
from amodal.storage import LocalStorage

log = logging.getLogger(__name__)
LOCAL_DATASET = "local"


@dataclass(frozen=True)
class Outcome:
    """One manifest line: what became of one input row."""

    line: int
    image: str
    query: str
    job_id: str | None
    status: str
    message: str
    result: str | None
    quality: dict | None = None  # job.json's quality record (amodal.quality), for rows with a result
    flags: list[str] = field(default_factory=list)  # job.json's named conditions to look at

    def to_json(self) -> str:
        return json.dumps(self.__dict__)


def load_background(settings: Settings) -> np.ndarray:
    if not settings.background:
        return neutral_background()
    path = Path(settings.background)
    return load_image(path.read_bytes(), max_pixels=settings.max_pixels, min_side=1)


def prepare_job(row: Row, images: Path, dataset: str, settings: Settings, result_root: str, weights: str) -> JobState:
    """Validate a row and make its job (its id covers the input files' bytes and ``weights``, the stack's
    weights digest); bad rows raise :class:`InvalidInput`."""
    if row.error:
        raise InvalidInput(row.error)
    query = validate_query(row.query, settings.max_query_chars)
    image_key = resolve_input(images, row.image).relative_to(images).as_posix()
    mask_key = None
    if row.visible_mask:
        mask_key = resolve_input(images, row.visible_mask, "visible mask").relative_to(images).as_posix()
    try:
        inputs = inputs_digest(_sha256(images / image_key), _sha256(images / mask_key) if mask_key else None)
    except OSError as exc:
        raise InvalidInput(f"cannot read {exc.filename}: {exc.strerror}") from None
    jid = job_id(dataset, image_key, query, mask_key, settings, inputs, weights)
    prefix = f"{result_root}/{jid}" if result_root else jid
    return JobState(job_id=jid, dataset=dataset, image_key=image_key, query=query, mask_key=mask_key,
                    settings=settings.to_dict(), result_prefix=prefix)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_job(state: JobState, ctx: Context) -> JobState:
    """Drive one job through every step in this process."""
    while state.stage != "done":
        run_step(state, ctx)
    return state


class LocalRunner:
    """Runs rows one after another with one resident set of models; results in a local folder."""

    def __init__(self, images: Path, out: Path, models, settings: Settings) -> None:
        self.images = images.resolve()
        self.out = out
        self.settings = settings
        self.store = LocalStorage(out)
        self.ctx = Context(store=self.store, inputs=LocalStorage(self.images), models=models,
                           background=load_background(settings))
        # A model set loads from its folder; stand-in model sets have none, and no weights to tell apart.
        folder = getattr(models, "model_dir", None)
        self.weights = weight_fingerprints(Path(folder), settings) if folder is not None else {}

    def run_row(self, row: Row, seen: dict[str, int]) -> Outcome:
        try:
            state = prepare_job(row, self.images, LOCAL_DATASET, self.settings, "", weights_digest(self.weights))
        except InvalidInput as exc:
            return Outcome(row.line, row.image, row.query, None, "invalid", str(exc), None)
        if state.job_id in seen:
            return Outcome(row.line, row.image, row.query, state.job_id, "invalid",
                           f"duplicate of line {seen[state.job_id]} (same image, query and mask)", None)
        seen[state.job_id] = row.line
        record_key = f"{state.result_prefix}/{JOB_RECORD}"
        if not self.store.exists(record_key):  # else finished by an earlier run over the same folder
            try:
                run_job(state, self.ctx)
            except MissingCheckpointError:
                raise  # no row can succeed: stop with the one clear message
            except Exception as exc:  # noqa: BLE001 - one row's failure must not stop the others
                log.exception("job %s (line %d) failed", state.job_id, row.line)
                return Outcome(row.line, row.image, row.query, state.job_id, "failed",
                               f"{type(exc).__name__}: {exc}", None)
        return self._outcome(row, state.job_id, json.loads(self.store.get(record_key)), state.result_prefix)

    def _outcome(self, row: Row, jid: str, record: dict, prefix: str) -> Outcome:
        """The manifest line of a finished job, from its ``job.json``."""
        has_images = record.get("offsets") is not None  # completed rows, and unoccluded ones given their cut-out
        return Outcome(row.line, row.image, row.query, jid, record["status"], record["message"],
                       str(self.out / prefix) if has_images else None, record.get("quality"), record.get("flags", []))

    def run(self, rows: list[Row], progress: bool = True) -> Iterator[Outcome]:
        seen: dict[str, int] = {}
        for row in tqdm(rows, desc="amodal run", unit="row", disable=not progress):
            yield self.run_row(row, seen)


def run_local(images: Path, annotations: Path | None, out: Path, models, settings: Settings,
              progress: bool = True, rows: list[Row] | None = None) -> list[Outcome]:
    """Run every row of ``annotations`` (or ``rows``, paths relative to ``images``); write ``manifest.jsonl``
    (one line per row) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    rows = read_annotations(annotations, all_labels=settings.all_labels) if rows is None else rows
    runner = LocalRunner(images, out, models, settings)
    outcomes = []
    with open(out / "manifest.jsonl", "w") as manifest:
        for outcome in runner.run(rows, progress):
            manifest.write(outcome.to_json() + "\n")
            manifest.flush()
            outcomes.append(outcome)
    return outcomes
