"""Property, against a LIVE relay over a real socket: whatever a client sends (arbitrary JSON
values, plausible frames with wrong types / unknown types / huge or negative numbers /
unicode, arbitrary text, binary frames), every frame gets a defined answer, no exception
escapes (no ``internal_error``, no ERROR log from ``relay.*``), every ``started`` stream gets
exactly one ``finish``, and a well-behaved client on another connection keeps being served.

One relay serves the whole test: it runs on its own event loop in a thread (the same
``start_relay`` harness, so its leak checks run at the end), and Hypothesis drives it with
websockets' real synchronous client, so examples need no per-example event loop.

Each sent frame is followed by a marker ``ping``; frames are answered in order, so the
answer to the frame is whatever non-stream frame arrives before the marker's ``pong``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from llm_relay_protocol import (
    ALLOWED_PARAMS, Cancel, ErrorCode, FrameError, Hello, Ping, Start,
    decode_client_frame,
)

from .helpers import SUBPROTOCOL, start_relay

FUZZ_SETTINGS: dict = dict(
    demo_tps=150,  # streams live long enough for a later cancel in the batch to hit them
    # paced by awaiting each answer, but starts and frames must not hit the rate limits
    start_rate_per_minute=1e9, start_burst=1_000_000,
    frames_per_second=1e6, frame_burst=1_000_000,
    max_streams_per_principal=1_000,
)
TIMEOUT = 10.0

# ---------------------------------------------------------------- strategies

text = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)  # sendable as UTF-8
numbers = (st.integers() | st.integers(min_value=2**63 - 2, max_value=2**70)
           | st.integers(min_value=-(2**70), max_value=-1)
           | st.floats(allow_nan=False, allow_infinity=False))
scalars = st.none() | st.booleans() | numbers | text
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(text, children, max_size=4),
    max_leaves=12,
)
frame_types = st.sampled_from(["start", "cancel", "ping", "hello", "pong", "welcome",
                               "finish", "error", "launch", "", "START", "stärt"]) | json_values
messages = st.lists(
    st.fixed_dictionaries({}, optional={
        "role": st.sampled_from(["user", "assistant", "system", "tool", "robot"]) | json_values,
        "content": text | json_values}),
    max_size=3) | json_values
params = st.dictionaries(
    st.sampled_from([*ALLOWED_PARAMS, "api_key", "api_base", "stream"]) | text,
    json_values | st.integers(-5, 5000), max_size=3) | json_values
frame_like = st.fixed_dictionaries({"type": frame_types}, optional={
    "id": st.sampled_from(["a", "b", "c", ""]) | text | json_values,
    "model": st.sampled_from(["demo", "gpt-17", ""]) | json_values,
    "messages": messages,
    "params": params,
    "tools": json_values,
    "tool_choice": json_values,
    "data": json_values,
    "client": json_values,
    "token": json_values,
})
valid_start = st.builds(
    lambda sid, n: {"type": "start", "id": sid, "model": "demo",
                    "messages": [{"role": "user", "content": "fuzz"}],
                    "params": {"max_tokens": n}},
    st.sampled_from(["a", "b", "c"]), st.integers(1, 4))
valid_cancel = st.builds(lambda sid: {"type": "cancel", "id": sid},
                         st.sampled_from(["a", "b", "c", "zz"]))
valid_ping = st.just({"type": "ping"}) | st.builds(lambda d: {"type": "ping", "data": d},
                                                   json_values)
valid_hello = st.builds(lambda c: {"type": "hello", "client": c},
                        st.fixed_dictionaries({"name": text, "version": text}))

def as_json(values: st.SearchStrategy) -> st.SearchStrategy:
    return st.builds(lambda v: json.dumps(v, ensure_ascii=False), values)


raw_text = text | st.sampled_from(["", " ", "{", "[]", "NaN", '{"type":"ping"} x', "\x00"])
# Noise and valid frames in equal shares, so starts meet cancels of running streams.
inbound = st.one_of(as_json(json_values), as_json(frame_like), raw_text, st.binary(max_size=64),
                    as_json(valid_start), as_json(valid_cancel), as_json(valid_ping),
                    as_json(valid_hello))
# ... and a start directly followed by its cancel (cancel of a running stream)
start_cancel = st.builds(lambda start: [json.dumps(start),
                                        json.dumps({"type": "cancel", "id": start["id"]})],
                         valid_start)
batches = st.lists(inbound.map(lambda raw: [raw]) | start_cancel, min_size=1, max_size=5).map(
    lambda groups: [raw for group in groups for raw in group])

START_REFUSALS = {ErrorCode.BAD_REQUEST, ErrorCode.UNKNOWN_MODEL, ErrorCode.DUPLICATE_ID,
                  ErrorCode.TOO_MANY_STREAMS, ErrorCode.RATE_LIMITED}
DOCUMENTED_CODES = {str(c) for c in ErrorCode} - {ErrorCode.INTERNAL_ERROR}
STREAM_FRAMES = {"token", "reasoning", "tool_call_chunk", "tool_call_complete", "finish"}

# ---------------------------------------------------------------- harness


class ThreadedRelay:
    """``start_relay(**settings)`` on its own loop in a thread; ``url`` once entered."""

    def __init__(self, **settings: Any) -> None:
        self.settings = settings
        self.url = ""
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="relay-under-fuzz")

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # re-raised in the test thread by __exit__
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with start_relay(**self.settings) as server:  # its leak checks run on exit
            self.url = server.url
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> ThreadedRelay:
        self._thread.start()
        assert self._ready.wait(120), "relay thread did not start"
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        assert not self._thread.is_alive(), "relay thread did not stop"
        if self._error is not None:
            raise self._error


class ErrorLogs(logging.Handler):
    """Collects ERROR records of ``relay.*`` (from any thread)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def recv(ws: ClientConnection) -> dict:
    return json.loads(ws.recv(timeout=TIMEOUT))


def hello(stack: contextlib.ExitStack, url: str) -> ClientConnection:
    ws = stack.enter_context(connect(url, subprotocols=[SUBPROTOCOL], open_timeout=TIMEOUT))
    ws.send('{"type":"hello"}')
    assert recv(ws)["type"] == "welcome"
    return ws


class FuzzConnection:
    """The fuzzing client; tracks running streams so each ``started`` gets one ``finish``."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.running: set[str] = set()
        self.marker = 0
        self.stats: dict[str, int] = {}

    def note(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1

    def stream_frame(self, frame: dict) -> None:
        sid = frame.get("id")
        assert sid in self.running, f"{frame['type']} for a stream not running: {frame}"
        if frame["type"] == "finish":
            self.running.discard(sid)
            self.note("finish:" + frame["status"])
            if frame["status"] == "failed":
                raise AssertionError(f"demo stream failed: {frame}")

    def exchange(self, raw: str | bytes) -> list[dict]:
        """Send ``raw`` then a marker ping; the non-stream frames answered before its pong."""
        self.marker += 1
        marker = f"marker-{self.marker}"
        self.ws.send(raw)
        self.ws.send(json.dumps({"type": "ping", "data": marker}))
        answers = []
        while True:
            frame = recv(self.ws)
            kind = frame.get("type")
            if kind in STREAM_FRAMES:
                self.stream_frame(frame)
            elif kind == "started":  # its tokens may follow before the marker's pong
                assert frame["id"] not in self.running, frame
                self.running.add(frame["id"])
                answers.append(frame)
            elif kind == "pong" and frame.get("data") == marker:
                return answers
            else:
                answers.append(frame)

    def check(self, raw: str | bytes) -> None:
        try:
            expected: Any = decode_client_frame(raw)
        except FrameError as exc:
            expected = exc
        was_running = isinstance(expected, Cancel) and expected.id in self.running
        try:
            answers = self.exchange(raw)
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else None
            raise AssertionError(f"connection closed ({code}) after {raw!r}") from None
        for frame in answers:
            if frame["type"] == "error":
                assert frame["code"] in DOCUMENTED_CODES, (raw, frame)
                assert isinstance(frame.get("message"), str) and frame["message"], frame
        kinds = [(f["type"], f.get("code")) for f in answers]
        if isinstance(expected, FrameError):
            assert kinds == [("error", "bad_request")], (raw, answers)
            assert answers[0]["message"] == expected.message
            self.note("bad_request")
        elif isinstance(expected, Ping):
            assert answers == [{"type": "pong", **({"data": expected.data}
                                                    if expected.data is not None else {})}], \
                (raw, answers)
            self.note("pong")
        elif isinstance(expected, Hello):
            assert kinds == [("error", "bad_request")], (raw, answers)
            self.note("hello_again")
        elif isinstance(expected, Cancel):
            # running: no direct answer (its finish follows); otherwise unknown_stream
            assert kinds in ([], [("error", "unknown_stream")]), (raw, answers)
            self.note("cancel:running" if was_running else "cancel:idle")
        elif isinstance(expected, Start):
            assert len(answers) == 1, (raw, answers)
            frame = answers[0]
            if frame["type"] == "started":
                assert frame["id"] == expected.id, (raw, frame)
                self.note("started")
            else:
                assert frame["type"] == "error" and frame["code"] in START_REFUSALS, frame
                assert frame.get("id") == expected.id
                self.note("refused:" + frame["code"])
        else:  # pragma: no cover - decode_client_frame returns only these
            raise AssertionError(f"unexpected decode result {expected!r}")

    def drain(self) -> None:
        """Read until every started stream has its finish."""
        while self.running:
            frame = recv(self.ws)
            assert frame["type"] in STREAM_FRAMES, frame
            self.stream_frame(frame)


def well_behaved_round(ws: ClientConnection, n: int) -> None:
    ws.send(json.dumps({"type": "ping", "data": n}))
    assert recv(ws) == {"type": "pong", "data": n}
    sid = f"good-{n}"
    ws.send(json.dumps({"type": "start", "id": sid, "model": "demo",
                        "messages": [{"role": "user", "content": "still there?"}],
                        "params": {"max_tokens": 2}}))
    frames = []
    while not frames or frames[-1]["type"] not in ("finish", "error"):
        frames.append(recv(ws))
    assert frames[0]["type"] == "started", frames
    assert (frames[-1]["type"], frames[-1]["status"]) == ("finish", "completed"), frames


def test_live_relay_answers_arbitrary_input_and_keeps_serving():
    errors = ErrorLogs()
    relay_logger = logging.getLogger("relay")
    relay_logger.addHandler(errors)
    try:
        with ThreadedRelay(**FUZZ_SETTINGS) as relay:
            stack = contextlib.ExitStack()
            fuzz = FuzzConnection(hello(stack, relay.url))
            good = hello(stack, relay.url)
            rounds = 0

            @settings(max_examples=200, deadline=None, derandomize=True, database=None,
                      suppress_health_check=[HealthCheck.too_slow,
                                             HealthCheck.data_too_large])
            @given(batch=batches)
            def prop(batch: list[str | bytes]) -> None:
                nonlocal rounds
                for raw in batch:
                    fuzz.check(raw)
                assert not errors.records, [r.getMessage() for r in errors.records]
                rounds += 1
                well_behaved_round(good, rounds)

            with stack:  # closes both connections
                prop()
                fuzz.drain()
                fuzz.ws.send('{"type":"ping","data":"end"}')
                assert recv(fuzz.ws) == {"type": "pong", "data": "end"}
        # the fuzz saw every kind of answer, so the property was not vacuous
        stats = fuzz.stats
        print("fuzz answers:", dict(sorted(stats.items())))
        for kind in ("bad_request", "pong", "started", "cancel:idle", "finish:completed",
                     "finish:cancelled", "hello_again"):
            assert stats.get(kind), (kind, stats)
        assert rounds >= 100, rounds
        assert fuzz.ws.close_code == 1000 and good.close_code == 1000
    finally:
        relay_logger.removeHandler(errors)
    assert not errors.records, [r.getMessage() for r in errors.records]

