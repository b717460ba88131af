"""Server-Sent Events read as the standard says, in linear time, under a size cap.

``SSEParser`` is the one SSE reader of the relay: the fast path feeds it the provider's
bytes (``relay/upstream/fast/reader.py``), and on LiteLLM's path ``relay/upstream/caps.py``
feeds it the bytes LiteLLM is about to read and hands LiteLLM the events re-written in the
plainest form (``encode_event``), so both paths see the same events whatever line ends,
byte-order mark or data-less fields the provider sent.

The rules (https://html.spec.whatwg.org/multipage/server-sent-events.html, "Parsing an event
stream"):

* a line ends with CRLF, LF or CR; a CRLF split across two reads is one line end;
* a UTF-8 byte-order mark before the first byte of the stream is dropped;
* ``data`` lines of one event are joined with LF; ``event`` names it; comments (``:``) and
  other fields (``id``, ``retry``, unknown ones) are ignored;
* an event is dispatched at a blank line, and only when it has data: a block of comments,
  ``retry:`` or ``id:`` lines alone dispatches nothing;
* an event without its blank line at the end of the stream is discarded.

Upstream bytes are untrusted: each ``feed`` costs time linear in the bytes it is given (a
line that never ends is kept in one growing buffer, searched only in its new bytes), and one
line or one event's data longer than ``max_event_bytes`` raises ``EventTooLarge``, a
provider failure that ends the stream ``upstream_error``.
"""

from __future__ import annotations

from relay.upstream.errors import ProviderStreamError

__all__ = ["DEFAULT_MAX_EVENT_BYTES", "EventTooLarge", "SSEParser", "encode_event"]

#: Default cap of one SSE line or one event's data (``max_event_bytes``).
DEFAULT_MAX_EVENT_BYTES = 1 << 20

_BOM = b"\xef\xbb\xbf"


class EventTooLarge(ProviderStreamError):
    """One SSE line, or one event's data, exceeded ``max_event_bytes``."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"an SSE event above max_event_bytes ({limit})")
        self.wire_message = (f"the provider sent an event larger than the relay's limit "
                             f"(max_event_bytes {limit})")


class SSEParser:
    """Incremental Server-Sent Events parser: ``feed(bytes)`` -> completed ``(event, data)``
    (see the module docstring for the rules). Bytes stay bytes (orjson parses them
    directly). Raises ``EventTooLarge`` above ``max_event_bytes``."""

    __slots__ = ("_tail", "_event", "_data", "_size", "_max", "_cr", "_head", "_special")

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        #: An unfinished line (a bytearray: appending to it costs only the new bytes).
        self._tail: bytearray | None = None
        self._event: bytes | None = None
        #: The current event's data: None, one line (bytes), or its lines (list).
        self._data: bytes | list[bytes] | None = None
        self._size = 0                  # bytes of the current event's data
        self._max = max_event_bytes
        self._cr = False                # the last read ended with CR (a CRLF may be split)
        #: The first bytes, until it is known whether they begin with a byte-order mark.
        self._head: bytes | None = b""
        #: ``_head`` or ``_cr`` is set: the next read starts on the slow path.
        self._special = True

    def feed(self, chunk: bytes) -> list[tuple[bytes | None, bytes]]:
        if self._special:
            chunk = self._start_of_read(chunk)
        if b"\r" in chunk:
            if chunk[-1:] == b"\r":
                self._cr = self._special = True
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        tail = self._tail
        if tail is not None:
            end = chunk.find(b"\n")
            if end < 0:
                tail += chunk
                if len(tail) > self._max:
                    raise EventTooLarge(self._max)
                return []
            tail += chunk[:end]
            self._tail = None
            if len(tail) > self._max:
                raise EventTooLarge(self._max)
            lines = chunk[end + 1:].split(b"\n")
            lines[0:0] = (bytes(tail),)
        else:
            lines = chunk.split(b"\n")
        last = lines.pop()
        if last:
            if len(last) > self._max:
                raise EventTooLarge(self._max)
            self._tail = bytearray(last)
        if len(chunk) > self._max:
            for line in lines:
                if len(line) > self._max:
                    raise EventTooLarge(self._max)
        out: list[tuple[bytes | None, bytes]] = []
        for line in lines:
            if not line:
                data = self._data
                if data is not None:
                    out.append((self._event, data if type(data) is bytes else b"\n".join(data)))
                    self._data = None
                self._event = None
            elif line[:5] == b"data:":
                value = line[6:] if line[5:6] == b" " else line[5:]
                data = self._data
                if data is None:
                    self._data = value
                elif type(data) is bytes:
                    self._data = [data, value]
                    self._size = len(data) + len(value) + 1
                    if self._size > self._max:
                        raise EventTooLarge(self._max)
                else:
                    data.append(value)
                    self._size += len(value) + 1
                    if self._size > self._max:
                        raise EventTooLarge(self._max)
            elif line[:6] == b"event:":
                self._event = line[7:] if line[6:7] == b" " else line[6:]
        return out

    def _start_of_read(self, chunk: bytes) -> bytes:
        """``chunk`` without what the previous reads decided: a byte-order mark at the start
        of the stream (also one split over several reads), the LF of a CRLF whose CR ended
        the last read."""
        if self._head is not None:
            head = self._head + chunk
            if len(head) < len(_BOM) and _BOM.startswith(head):
                self._head = head
                return b""
            self._head = None
            chunk = head[len(_BOM):] if head.startswith(_BOM) else head
        if self._cr and chunk:
            self._cr = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        self._special = self._head is not None or self._cr
        return chunk


def encode_event(event: bytes | None, data: bytes) -> bytes:
    """One event in the plainest SSE form (``event:`` when named, one ``data:`` line per
    data line, LF line ends, a blank line after), for a reader that expects nothing else."""
    body = b"data: " + data.replace(b"\n", b"\ndata: ") + b"\n\n"
    return b"event: " + event + b"\n" + body if event is not None else body
