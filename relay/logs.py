"""Logging setup: plain text or JSON lines, with the relay's structured fields.

Fields that loggers pass in ``extra`` (session_id, stream_id, model, status, usage,
durations) are appended. Message content, tokens and keys are never passed to a logger.
"""

from __future__ import annotations

import json
import logging
import sys

__all__ = ["TextFormatter", "configure_logging", "escape_control"]

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


#: Control characters (C0, DEL, C1) and the Unicode line separators, each written as its
#: Python escape (``\n``, ``\x1b``, ``\u2028``).
_ESCAPES = {c: repr(chr(c))[1:-1] for c in [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]}


def escape_control(text: str) -> str:
    """``text`` with control characters escaped, so a string a client chose (a stream id, a
    model alias, a client name) can never start a forged line in a text log."""
    return text.translate(_ESCAPES)


class TextFormatter(logging.Formatter):
    """One line per record: the message and the extras, control characters escaped; only a
    traceback (``exc_info``), which the relay writes itself, spans lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_control(super().formatMessage(record))

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _extras(record)
        if extras:
            tail = " ".join(f"{k}={escape_control(str(v))}" for k, v in extras.items())
            if record.exc_info or record.exc_text or record.stack_info:
                head, sep, rest = line.partition("\n")     # extras stay on the first line
                return f"{head} {tail}{sep}{rest}"
            line += " " + tail
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
