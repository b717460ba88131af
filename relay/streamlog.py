"""The frame log of one stream: the only buffer between its producer and its readers.

A stream's task appends every frame (already encoded) to its ``FrameLog``; each connection
the stream is attached to reads it through a cursor (the last ``seq`` it sent). So:

* a reader that falls behind costs no extra memory: its backlog *is* the log;
* resume is a read from an older cursor;
* consecutive ``token`` frames a lagging reader has not sent yet can be merged into one
  (``coalesce``), which is lossless: the text is concatenated and the last ``seq`` kept.

Bounds: a log holds at most ``max_bytes``; beyond it the oldest entries are trimmed and
``trimmed_through`` remembers the last seq dropped, so a reader or a resume that needs one
of them can tell (``stream_lost``) instead of silently skipping frames. A log that nobody
can resume (``keep=False``) drops each entry once its reader has sent it.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from protocol import encode_frame, frames

__all__ = ["FrameLog", "LogEntry", "MAX_MERGED_BYTES", "coalesce"]

#: A merged token frame carries at most about this much text, far below any client's frame
#: limit (websockets' default is 1 MiB), so merging never makes a frame a client refuses.
MAX_MERGED_BYTES = 64 * 1024


@dataclass(slots=True)
class LogEntry:
    seq: int
    frame: dict
    data: bytes
    #: Total bytes appended to the log through this entry (offsets measure a reader's lag).
    end: int
    #: When the producer received the event (for the relay-added latency metric).
    received: float

    @property
    def is_token(self) -> bool:
        return self.frame["type"] == "token"

    @property
    def is_finish(self) -> bool:
        return self.frame["type"] == "finish"


class FrameLog:
    """Append-only (with front trimming) list of a stream's frames, ordered by ``seq``."""

    def __init__(self, *, max_bytes: int, keep: bool) -> None:
        self.max_bytes = max_bytes
        self.keep = keep
        self._entries: list[LogEntry] = []
        self._seqs: list[int] = []
        self.end_offset = 0      # bytes ever appended
        self.bytes = 0           # bytes held now
        self.last_seq = 0
        self.trimmed_through = 0  # every seq <= this is gone
        self.finished = False
        #: Called after every append (readers wake their writer).
        self.listeners: set[Callable[[], None]] = set()

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, frame: dict, received: float | None = None,
               data: bytes | None = None) -> int:
        """Add ``frame`` (its ``seq`` larger than any before; ``data``: its encoding, when
        the caller has it already); returns the change in held bytes (may be negative when
        the cap trims older entries)."""
        if data is None:
            data = orjson.dumps(frame)       # encode_frame's dict case, once per frame
        self.end_offset += len(data)
        entry = LogEntry(frame["seq"], frame, data, self.end_offset,
                         time.perf_counter() if received is None else received)
        self._entries.append(entry)
        self._seqs.append(entry.seq)
        self.last_seq = entry.seq
        self.finished = self.finished or entry.is_finish
        before = self.bytes
        self.bytes += len(data)
        if self.bytes > self.max_bytes:
            self._trim_bytes()
        for wake in list(self.listeners):
            wake()
        return self.bytes - before

    def after(self, seq: int, limit: int = 1024) -> list[LogEntry]:
        """Entries with ``seq`` greater than ``seq``, oldest first, at most ``limit``."""
        i = bisect.bisect_right(self._seqs, seq)
        return self._entries[i:i + limit]

    def offset_at(self, seq: int) -> int:
        """Bytes appended through ``seq`` (a reader's offset once it has sent ``seq``)."""
        i = bisect.bisect_right(self._seqs, seq)
        if i < len(self._entries):
            first = self._entries[i]
            return first.end - len(first.data)
        return self.end_offset

    def trim_through(self, seq: int) -> int:
        """Drop entries with ``seq <= seq``; returns the bytes freed."""
        i = bisect.bisect_right(self._seqs, seq)
        if i == 0:
            return 0
        freed = sum(len(e.data) for e in self._entries[:i])
        self.trimmed_through = max(self.trimmed_through, self._seqs[i - 1])
        del self._entries[:i]
        del self._seqs[:i]
        self.bytes -= freed
        return freed

    def clear(self) -> int:
        """Drop every entry (the log was evicted); returns the bytes freed."""
        return self.trim_through(self.last_seq)

    def _trim_bytes(self) -> None:
        # Keep at least the newest entry so a reader can always make progress.
        drop = 0
        excess = self.bytes - self.max_bytes
        while drop < len(self._entries) - 1 and excess > 0:
            excess -= len(self._entries[drop].data)
            drop += 1
        if drop:
            self.trim_through(self._seqs[drop - 1])


def coalesce(entries: list[LogEntry], id: str) -> list[bytes]:
    """Encoded frames for ``entries`` as sent to a reader that calls the stream ``id``:
    runs of consecutive ``token`` entries become one token frame (text joined, last seq),
    and frames are re-addressed when the reader uses another id than the producer."""
    if len(entries) == 1 and entries[0].frame["id"] == id:
        return [entries[0].data]     # the usual case: a reader that keeps up, one frame
    out: list[bytes] = []
    run: list[LogEntry] = []
    run_bytes = 0

    def flush_run() -> None:
        nonlocal run_bytes
        run_bytes = 0
        if len(run) == 1 and run[0].frame["id"] == id:
            out.append(run[0].data)
        elif run:
            text = "".join(e.frame["text"] for e in run)
            out.append(encode_frame(frames.token(id, run[-1].seq, text)))
        run.clear()

    for entry in entries:
        if entry.is_token:
            if run and run_bytes + len(entry.data) > MAX_MERGED_BYTES:
                flush_run()
            run.append(entry)
            run_bytes += len(entry.data)
            continue
        flush_run()
        if entry.frame["id"] == id:
            out.append(entry.data)
        else:
            out.append(orjson.dumps({**entry.frame, "id": id}))
    flush_run()
    return out
