"""What several verbs of the command line share: settings, the model folder, checked paths, the cluster client."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from amodal.config import environment, resolve_settings
from amodal.errors import UsageError
from amodal.settings import Settings


def settings(args: argparse.Namespace) -> Settings:
    """The method's settings: defaults, ``AMODAL_SETTINGS``, then the verb's ``--set`` options."""
    return resolve_settings(args.set or ())


def model_dir(args: argparse.Namespace) -> Path:
    """The verb's ``--models`` folder, else ``AMODAL_MODEL_DIR``."""
    return environment().require_model_dir(getattr(args, "models", None))


def existing(path: str, option: str, folder: bool) -> Path:
    """``path`` if it is a readable folder (or file); else the one-line error that says which option is wrong."""
    found, kind = Path(path), "folder" if folder else "file"
    if not found.exists():
        raise UsageError(f"{option}: no such {kind}: {found}")
    if folder != found.is_dir():
        raise UsageError(f"{option}: not a {kind}: {found}")
    if not os.access(found, os.R_OK | (os.X_OK if folder else 0)):
        raise UsageError(f"{option}: {kind} not readable: {found}")
    return found


def client(settings: Settings | None = None, writes: bool = False):
    """A producer client on ``AMODAL_STORAGE_URL`` once the broker and the storage answer."""
    from producer import Client
    from producer.checks import check_services

    found = Client(storage_url=environment().require_storage_url(), settings=settings)
    check_services(found, writes)
    return found
