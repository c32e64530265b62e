"""The storage layout, spelled once: every key a job, a dataset or the dispatcher writes, the parsers of
listed keys, and the file names of a job's result folder (docs/design.md, "Storage layout"). A job's
working artifacts are named in ``amodal.artifacts``, relative to :func:`job_prefix`."""
from __future__ import annotations

# File names in a job's result folder (``results/<dataset>/<job>/``) and in the local and exported copies.
JOB_RECORD = "job.json"  # the job's record: outcome, reason, timings, window, flags
COMPLETION = "amodal_completion.png"  # the completed object, RGBA
AMODAL_MASK = "amodal_mask.png"
VISIBLE_MASK = "visible_mask.png"
OFFSETS = "offsets.json"  # where the result images sit in the input image
PROMPT = "prompt.txt"  # the class the completion was asked for
RESULT_IMAGES = {"completion": COMPLETION, "amodal_mask": AMODAL_MASK, "visible_mask": VISIBLE_MASK}
# The result as the paper's code writes it, in a ``paper/`` folder: COMPLETION, this mask, OFFSETS, PROMPT.
PAPER_FOLDER = "paper"
PAPER_SEGMENTATION = "amodal_segmentation.png"


# ---- jobs ----------------------------------------------------------------------------------------
def job_prefix(job: str) -> str:
    """Everything a job writes while it runs: its states, attempts and artifacts."""
    return f"jobs/{job}"


def states_prefix(job: str) -> str:
    return f"{job_prefix(job)}/state/"


def state_key(job: str, version: int) -> str:
    return f"{states_prefix(job)}{version:05d}.json"


def state_version(key: str) -> int:
    """The version a :func:`state_key` names."""
    return int(key.rsplit("/", 1)[1].split(".")[0])


def attempt_key(job: str, version: int, n: int) -> str:
    """The ``n``-th delivery of a job's step at ``version`` (an empty create-only marker)."""
    return f"{job_prefix(job)}/attempts/{version:05d}/{n:03d}"


def input_key(digest: str, suffix: str) -> str:
    """A submitted input image or mask, by the SHA-256 of its bytes (the same file is stored once)."""
    return f"inputs/{digest}{suffix}"


# ---- results and outcomes ------------------------------------------------------------------------
def result_prefix(dataset: str, job: str) -> str:
    return f"results/{dataset}/{job}"


def record_key(dataset: str, job: str) -> str:
    return f"{result_prefix(dataset, job)}/{JOB_RECORD}"


def outcomes_prefix(dataset: str) -> str:
    return f"outcomes/{dataset}/"


def outcome_key(dataset: str, status: str, job: str) -> str:
    """A job's outcome marker: empty, found by listing :func:`outcomes_prefix`."""
    return f"{outcomes_prefix(dataset)}{status}/{job}"


def parse_outcome_key(key: str) -> tuple[str, str]:
    """(status, job id) of an :func:`outcome_key`."""
    _, _, status, job = key.split("/", 3)
    return status, job


def flagged_key(dataset: str, job: str) -> str:
    """A marker for a job whose result raised doubts (amodal.quality)."""
    return f"flagged/{dataset}/{job}"


# ---- datasets ------------------------------------------------------------------------------------
DATASETS = "datasets/"


def submission_key(dataset: str) -> str:
    return f"{DATASETS}{dataset}/submission.json"


def dataset_of_submission(key: str) -> str | None:
    """The dataset a listed key is the :func:`submission_key` of; None for any other key."""
    head, sep, tail = key.removeprefix(DATASETS).rpartition("/")
    return head if key.startswith(DATASETS) and sep and tail == "submission.json" and head else None


def rows_prefix(dataset: str) -> str:
    return f"{DATASETS}{dataset}/rows/"


def rows_chunk_key(dataset: str, generation: int, index: int) -> str:
    """One object of a dataset's rows: a submission writes its rows ``ROWS_PER_CHUNK`` at a time, in row
    order; a submission of a changed annotation file starts a new ``generation``."""
    return f"{rows_prefix(dataset)}{generation:04d}-{index:06d}.jsonl"


def records_prefix(dataset: str) -> str:
    """Where the dispatcher gathers the records of the dataset's finished jobs, in pages."""
    return f"{DATASETS}{dataset}/records/"


def record_pages_prefix(dataset: str, generation: int, index: int) -> str:
    """Where the records of one rows chunk's finished jobs are gathered, a page at a time."""
    return f"{records_prefix(dataset)}{generation:04d}-{index:06d}/"


def counts_key(dataset: str) -> str:
    return f"{DATASETS}{dataset}/counts.json"


# ---- the dispatcher ------------------------------------------------------------------------------
DISPATCH_STATE = "dispatch/state.json"
DISPATCH_OPEN = "dispatch/open/"  # one marker per dataset with recorded rows not all started
DISPATCH_ADOPT = "dispatch/adopt/"  # dispatch/adopt/<dataset>/<job>: a job sent by Client.submit, to watch
