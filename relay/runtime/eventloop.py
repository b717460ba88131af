"""Which asyncio event loop a relay process runs on (``relay serve --loop``).

``auto`` (the default) takes uvloop when it is installed (a dependency of the package on
Linux and macOS) and asyncio's own loop otherwise; ``uvloop`` insists on it (a clear error
when it is missing); ``asyncio`` forces the standard loop. uvloop is libuv's loop in Cython:
per I/O callback and per ``call_soon`` it costs a fraction of asyncio's pure-Python
selector loop, and at 10 tokens/s per stream every token is its own wake-up
(bench/capacity.py measures both side by side with ``--loop``). The relay's code is
loop-agnostic; the test suite runs the server on both (tests/relay/test_event_loop.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = ["LOOP_CHOICES", "LoopChoice", "LoopUnavailable", "choose_loop", "run",
           "running_loop_name"]

LOOP_CHOICES = ("auto", "asyncio", "uvloop")
T = TypeVar("T")


@dataclass(frozen=True)
class LoopChoice:
    """The loop a process will run on: ``name`` for the log, ``factory`` for
    ``asyncio.Runner`` (None: asyncio's default loop)."""

    name: str
    factory: Callable[[], asyncio.AbstractEventLoop] | None


class LoopUnavailable(RuntimeError):
    """``--loop uvloop`` on a machine without uvloop."""


def choose_loop(choice: str) -> LoopChoice:
    """The loop for ``choice`` (one of ``LOOP_CHOICES``); raises ``LoopUnavailable`` when
    ``uvloop`` is asked for and cannot be imported, ``ValueError`` for an unknown name."""
    if choice not in LOOP_CHOICES:
        raise ValueError(f"unknown event loop {choice!r} (one of {', '.join(LOOP_CHOICES)})")
    if choice == "asyncio":
        return LoopChoice("asyncio", None)
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise LoopUnavailable("--loop uvloop: uvloop is not installed "
                                  "(pip install uvloop, or use --loop asyncio)") from None
        return LoopChoice("asyncio", None)
    return LoopChoice(f"uvloop {uvloop.__version__}", uvloop.new_event_loop)


def run(main: Coroutine[Any, Any, T], loop: LoopChoice) -> T:
    """``asyncio.run(main)`` on ``loop``."""
    with asyncio.Runner(loop_factory=loop.factory) as runner:
        return runner.run(main)


def running_loop_name() -> str:
    """The running loop, as the startup log names it ("uvloop 0.23.0" or "asyncio")."""
    module = type(asyncio.get_running_loop()).__module__
    if module.startswith("uvloop"):
        import uvloop

        return f"uvloop {uvloop.__version__}"
    return "asyncio"
