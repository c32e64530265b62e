"""How every ``amodal`` process logs: one line per record, as text or as one JSON object per line
(``amodal --log-format json``, ``AMODAL_LOG_FORMAT``) for log collectors; the model libraries' loading
chatter (progress bars, per-weight notices) is silenced."""
from __future__ import annotations

import json
import logging
import os

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Libraries that report each checkpoint they load at INFO or WARNING, or draw progress bars.
CHATTY = ("transformers", "diffusers", "huggingface_hub", "accelerate", "timm", "torch.distributed")
QUIET_VARIABLES = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
                   "DIFFUSERS_VERBOSITY": "error"}


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message"}`` (and ``exception``) as one JSON line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"), "level": record.levelname,
                 "logger": record.name, "message": record.getMessage(), "process": record.process}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: int | str, json_format: bool = False) -> None:
    """Send the root logger's records at ``level`` and above to stderr in the chosen format, replacing
    any handler set before."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_format else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if isinstance(level, str) else level)


def silence_model_loading() -> None:
    """Before the model libraries load (a worker's pool processes inherit it; nothing is imported): no
    Hugging Face progress bars, and their loggers report errors only."""
    for name, value in QUIET_VARIABLES.items():
        os.environ.setdefault(name, value)
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.ERROR)


def silence_loaded_libraries() -> None:
    """Where torch may load (a pool process, ``amodal run``): also diffusers' pipeline-loading bar,
    which no variable turns off."""
    silence_model_loading()
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
