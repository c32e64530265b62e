"""The producer side: the Python client and the queue verbs of the `amodal` command."""
from producer.client import Client, SubmitReport

__all__ = ["Client", "SubmitReport"]
