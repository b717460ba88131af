"""SSEParser (relay/upstream/sse.py): the SSE standard's line ends, byte-order mark and
dispatch rules, across any split of the bytes, in linear time under max_event_bytes."""

from __future__ import annotations

import pytest

from relay.upstream.sse import EventTooLarge, SSEParser, encode_event

STREAM = (b"event: a\ndata: one\n\n"
          b": comment\n\n"
          b"retry: 3000\n\n"
          b"id: 7\n\n"
          b"data: two\ndata: lines\n\n"
          b"data:nospace\n\n"
          b"data: trailing event without its blank line")
EVENTS = [(b"a", b"one"), (None, b"two\nlines"), (None, b"nospace")]


def feed_all(parser: SSEParser, pieces) -> list:
    out = []
    for piece in pieces:
        out += parser.feed(piece)
    return out


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_every_line_end_in_every_split(newline):
    stream = STREAM.replace(b"\n", newline)
    assert feed_all(SSEParser(), [stream]) == EVENTS
    for cut in range(1, len(stream)):
        assert feed_all(SSEParser(), [stream[:cut], stream[cut:]]) == EVENTS, cut
    assert feed_all(SSEParser(), [bytes([b]) for b in stream]) == EVENTS


def test_crlf_split_across_reads_is_one_line_end():
    # "\r" | "\n\r" | "\n": two line ends, so one event, not an extra blank line in between
    # that would cut "data: a" from "data: b".
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\ndata: b\r") == []
    assert parser.feed(b"\n\r") == [(None, b"a\nb")]
    assert parser.feed(b"\n") == []
    assert parser.feed(b"data: c\n\n") == [(None, b"c")]


@pytest.mark.parametrize("cut", [0, 1, 2, 3, 5])
def test_byte_order_mark_before_the_first_event_is_dropped(cut):
    stream = b"\xef\xbb\xbfdata: first\n\ndata: \xef\xbb\xbfkept\n\n"
    events = feed_all(SSEParser(), [stream[:cut], stream[cut:]])
    assert events == [(None, b"first"), (None, b"\xef\xbb\xbfkept")]


def test_no_event_without_data():
    stream = b"retry: 10\n\nid: 1\n\n: ping\n\nevent: ping\n\nid: 2\nretry: 5\n: x\n\n"
    assert SSEParser().feed(stream) == []
    # a named block without data names nothing that follows it
    assert SSEParser().feed(b"event: x\n\ndata: y\n\n") == [(None, b"y")]


def test_a_line_over_the_cap_fails_whatever_the_reads():
    parser = SSEParser(max_event_bytes=1024)
    assert parser.feed(b"data: " + b"a" * 1000 + b"\n\n") == [(None, b"a" * 1000)]
    with pytest.raises(EventTooLarge) as caught:
        parser.feed(b"data: " + b"a" * 2000 + b"\n\n")             # one read
    assert "max_event_bytes 1024" in caught.value.wire_message
    parser = SSEParser(max_event_bytes=1024)
    parser.feed(b"data: ")
    with pytest.raises(EventTooLarge):
        for _ in range(100):
            parser.feed(b"a" * 100)                                   # a line that never ends


def test_many_data_lines_over_the_cap_fail():
    parser = SSEParser(max_event_bytes=1024)
    with pytest.raises(EventTooLarge):
        for _ in range(1000):
            parser.feed(b"data: 0123456789\n")                       # one event, never ended


def test_an_endless_line_fails_at_the_cap_in_one_buffer():
    """10 MB fed in 4 KiB pieces fails at max_event_bytes (1 MiB) after copying each byte
    O(1) times: the bytes the parser keeps never exceed what it was fed (the old parser
    re-joined its whole buffer with every read: ~128 MiB copied for the first MiB)."""
    import tracemalloc

    parser = SSEParser()           # default cap: 1 MiB
    piece = b"a" * 4096
    parser.feed(b"data: ")
    fed = 0
    tracemalloc.start()
    try:
        with pytest.raises(EventTooLarge):
            for _ in range((10 << 20) // 4096):
                parser.feed(piece)
                fed += len(piece)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert fed <= (1 << 20) + 4096          # it failed at the cap, not at the end
    assert peak < 3 << 20                    # one growing buffer, not a copy per read


def test_work_per_read_is_the_new_bytes():
    """Count bytes copied into the parser's buffer: each byte of a long line once."""
    copied = 0
    real = bytearray.__iadd__

    class Counting(bytearray):
        def __iadd__(self, other):
            nonlocal copied
            copied += len(other)
            return real(self, other)

    parser = SSEParser(max_event_bytes=8 << 20)
    parser.feed(b"data: x")
    parser._tail = Counting(parser._tail)
    for _ in range(1000):
        parser.feed(b"a" * 4096)
    assert copied == 1000 * 4096
    assert parser.feed(b"\n\n") == [(None, b"x" + b"a" * 4096000)]


def test_encode_event_is_read_back_identically():
    for event, data in [(None, b"x"), (b"ping", b"{}"), (None, b"two\nlines"), (None, b"")]:
        assert SSEParser().feed(encode_event(event, data)) == [(event, data)]
