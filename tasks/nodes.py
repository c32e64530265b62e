"""The Celery node names of the stage workers: written by the workers, read by ``amodal status`` and placement.

Importing it configures nothing (a worker imports it before it sets its environment).
"""
from __future__ import annotations

import socket


def node_name(stage: str, gpu: int | None) -> str:
    """The node name of a stage's worker (``segment-gpu0@host``; ``finalize@host`` without a GPU)."""
    return f"{stage}-gpu{gpu}@{socket.gethostname()}" if gpu is not None else f"{stage}@{socket.gethostname()}"


def stage_of(node: str) -> str:
    """The stage a worker serves, from its node name (``segment-gpu0@host`` -> ``segment``)."""
    return node.partition("@")[0].partition("-")[0]
