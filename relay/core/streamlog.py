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

Memory: what a log is charged (``bytes``, summed by the hub against ``max_log_bytes``) is
what it really holds. Frames are stored compactly: their encodings back to back in one
``bytearray`` and, per frame, its seq, end offset, receive time and kind in ``array``
columns (``INDEX_BYTES_PER_FRAME`` bytes). No per-frame Python object is kept: a small
``bytes`` from orjson occupies ~4 KiB (its allocation is not shrunk to the JSON's length),
so holding those, or a dict per frame, cost ~80x the charged bytes. ``LogEntry`` values
are built on demand by ``after`` (a copy of a few frames for one writer pass), and a
frame's dict is decoded only where it is needed (merging token runs, re-addressing).
Each column grows by at most ~12.5% over-allocation, so real memory stays within a small
factor (measured ~1.2x) of ``bytes``.
"""

from __future__ import annotations

import time
from array import array
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from llm_relay_protocol import encode_frame, frames
from llm_relay_protocol.frames import Frame

__all__ = ["FrameLog", "INDEX_BYTES_PER_FRAME", "LogEntry", "MAX_MERGED_BYTES", "coalesce"]

#: A merged token frame carries at most about this much text, far below any client's frame
#: limit (websockets' default is 1 MiB), so merging never makes a frame a client refuses.
MAX_MERGED_BYTES = 64 * 1024

#: Bytes held per frame besides its encoding: seq (8), end offset (8), receive time (8)
#: and kind (1). Charged with the encoding, so budgets count what a frame really costs.
INDEX_BYTES_PER_FRAME = 25

_OTHER, _TOKEN, _FINISH = 0, 1, 2
_KINDS = {"token": _TOKEN, "finish": _FINISH}

# Dropped index rows are compacted away once they are this many and an eighth of the
# columns: front trimming stays O(1) amortised instead of moving every column on every
# append, and dead rows never cost more than ~12.5% of the live ones.
_COMPACT_MIN_ROWS = 1024


@dataclass(slots=True, eq=False)
class LogEntry:
    """One logged frame, as read by ``FrameLog.after`` (a copy; the log keeps no entry)."""

    seq: int
    #: The frame's encoding, exactly as logged.
    data: bytes
    #: Total bytes appended to the log through this entry (offsets measure a reader's lag).
    end: int
    #: When the producer received the event (for the relay-added latency metric).
    received: float
    kind: int = _OTHER
    _frame: Frame | None = None

    @property
    def frame(self) -> Frame:
        """The frame as a dict (decoded from ``data`` on first use)."""
        if self._frame is None:
            self._frame = orjson.loads(self.data)
        return self._frame

    @property
    def is_token(self) -> bool:
        return self.kind == _TOKEN

    @property
    def is_finish(self) -> bool:
        return self.kind == _FINISH


class FrameLog:
    """Append-only (with front trimming) log of a stream's frames, ordered by ``seq``.

    Rows ``_head`` .. ``len(_seqs) - 1`` of the columns are the held frames; the encoding of
    the first held frame starts at absolute offset ``_buf_start``, which is ``_buf[0]``.
    """

    def __init__(self, *, max_bytes: int, keep: bool, after: int = 0) -> None:
        """``after``: the log starts after that seq (a follower of a stream read from there
        on): seqs through it count as trimmed, never to be held."""
        self.max_bytes = max_bytes
        self.keep = keep
        self._reset_storage()
        self.end_offset = 0      # encoded bytes ever appended
        self.bytes = 0           # bytes held now (encodings + INDEX_BYTES_PER_FRAME each)
        self.last_seq = 0
        self.trimmed_through = after  # every seq <= this is gone
        self.finished = False
        #: Called after every append (readers wake their writer).
        self.listeners: set[Callable[[], None]] = set()

    def _reset_storage(self) -> None:
        self._buf = bytearray()
        self._buf_start = 0           # absolute offset of _buf[0]
        self._seqs = array("q")
        self._ends = array("q")       # absolute end offset of each frame's encoding
        self._received = array("d")
        self._kinds = array("b")
        self._head = 0                # first held row

    def __len__(self) -> int:
        return len(self._seqs) - self._head

    def append(self, frame: Frame, received: float | None = None,
               data: bytes | None = None) -> int:
        """Add ``frame`` (its ``seq`` larger than any before; ``data``: its encoding, when
        the caller has it already); returns the change in held bytes (may be negative when
        the cap trims older entries)."""
        if data is None:
            data = encode_frame(frame)
        seq = frame["seq"]
        kind = _KINDS.get(frame["type"], _OTHER)
        if not self._buf and self._head == len(self._seqs):
            self._buf_start = self.end_offset      # empty: the buffer starts here
        self._buf += data                          # a copy: ``data`` itself is not kept
        self.end_offset += len(data)
        self._seqs.append(seq)
        self._ends.append(self.end_offset)
        self._received.append(time.perf_counter() if received is None else received)
        self._kinds.append(kind)
        self.last_seq = seq
        self.finished = self.finished or kind == _FINISH
        before = self.bytes
        self.bytes += len(data) + INDEX_BYTES_PER_FRAME
        if self.bytes > self.max_bytes:
            self._trim_bytes()
        if self.listeners:
            for wake in tuple(self.listeners):
                wake()
        return self.bytes - before

    def after(self, seq: int, limit: int = 1024) -> list[LogEntry]:
        """Entries with ``seq`` greater than ``seq``, oldest first, at most ``limit``."""
        first = bisect_right(self._seqs, seq, self._head)
        stop = min(len(self._seqs), first + limit)
        if first >= stop:
            return []
        base = self._buf_start
        start = self._start_of(first)
        out: list[LogEntry] = []
        seqs, ends, received, kinds = self._seqs, self._ends, self._received, self._kinds
        with memoryview(self._buf) as view:
            for i in range(first, stop):
                end = ends[i]
                out.append(LogEntry(seqs[i], bytes(view[start - base:end - base]), end,
                                    received[i], kinds[i]))
                start = end
        return out

    def offset_at(self, seq: int) -> int:
        """Bytes appended through ``seq`` (a reader's offset once it has sent ``seq``)."""
        i = bisect_right(self._seqs, seq, self._head)
        if i < len(self._seqs):
            return self._start_of(i)
        return self.end_offset

    def trim_through(self, seq: int) -> int:
        """Drop entries with ``seq <= seq``; returns the bytes freed."""
        i = bisect_right(self._seqs, seq, self._head)
        if i == self._head:
            return 0
        cut = self._ends[i - 1]
        freed = cut - self._buf_start + INDEX_BYTES_PER_FRAME * (i - self._head)
        self.trimmed_through = max(self.trimmed_through, self._seqs[i - 1])
        self.bytes -= freed
        if i == len(self._seqs):
            self._reset_storage()                  # all gone: give the memory back
            self._buf_start = cut
        else:
            del self._buf[:cut - self._buf_start]  # O(1): bytearray moves its start
            self._buf_start = cut
            self._head = i
            if i >= _COMPACT_MIN_ROWS and 8 * i >= len(self._seqs):
                for column in (self._seqs, self._ends, self._received, self._kinds):
                    del column[:i]
                self._head = 0
        return freed

    def clear(self) -> int:
        """Drop every entry (the log was evicted); returns the bytes freed."""
        return self.trim_through(self.last_seq)

    def _start_of(self, i: int) -> int:
        """Absolute offset where held row ``i``'s encoding starts."""
        return self._ends[i - 1] if i > self._head else self._buf_start

    def _trim_bytes(self) -> None:
        # Keep at least the newest entry so a reader can always make progress.
        last = len(self._seqs) - 1
        drop = self._head
        excess = self.bytes - self.max_bytes
        start = self._buf_start
        while drop < last and excess > 0:
            end = self._ends[drop]
            excess -= end - start + INDEX_BYTES_PER_FRAME
            start = end
            drop += 1
        if drop > self._head:
            self.trim_through(self._seqs[drop - 1])


def coalesce(entries: list[LogEntry], id: str, producer_id: str | None = None) -> list[bytes]:
    """Encoded frames for ``entries`` as sent to a reader that calls the stream ``id``:
    runs of consecutive ``token`` entries become one token frame (text joined, last seq),
    and frames are re-addressed when the reader uses another id than the producer.
    ``producer_id`` (the id every frame of the stream carries, when the caller knows it)
    spares decoding a frame just to compare its id."""

    def addressed(entry: LogEntry) -> bool:
        return producer_id == id if producer_id is not None else entry.frame["id"] == id

    if len(entries) == 1 and addressed(entries[0]):
        return [entries[0].data]     # the usual case: a reader that keeps up, one frame
    out: list[bytes] = []
    run: list[LogEntry] = []
    run_bytes = 0

    def flush_run() -> None:
        nonlocal run_bytes
        run_bytes = 0
        if len(run) == 1 and addressed(run[0]):
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
        if addressed(entry):
            out.append(entry.data)
        else:
            out.append(encode_frame(frames.readdressed(entry.frame, id)))
    flush_run()
    return out
