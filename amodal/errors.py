"""The two kinds of error a command reports in one line (``amodal`` exits 2 or 1 for them).

Raise :class:`UsageError` for what the user can fix in the command or its input (a missing file, an
unknown dataset, a bucket that does not exist, wrong credentials) and :class:`ServiceError` for a
service that cannot be reached or fails (the broker, the storage endpoint, a download).
"""
from __future__ import annotations


class UsageError(Exception):
    """Bad usage or input: exit code 2."""

    exit_code = 2


class ServiceError(Exception):
    """A service that cannot be reached or fails: exit code 1."""

    exit_code = 1
