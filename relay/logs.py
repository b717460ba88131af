"""Logging setup: plain text or JSON lines, with the relay's structured fields.

Fields that loggers pass in ``extra`` (session_id, stream_id, model, status, usage,
durations) are appended. Message content, tokens and keys are never passed to a logger.
"""

from __future__ import annotations

import json
import logging
import sys

__all__ = ["configure_logging"]

_STANDARD = set(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {"message",
                                                                            "asctime"}


def _extras(record: logging.LogRecord) -> dict:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": self.formatTime(record), "level": record.levelname.lower(),
               "logger": record.name, "msg": record.getMessage(), **_extras(record)}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return line


def configure_logging(level: str = "info", json_lines: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else
                         TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # LiteLLM logs request details at INFO; keep it quiet unless debugging.
    for noisy in ("LiteLLM", "litellm", "httpx", "websockets"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
