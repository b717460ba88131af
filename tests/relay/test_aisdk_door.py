"""/ai-sdk held to the /ws standard at the door, against the real relay on a real socket: the
time an unauthenticated connection may stay (and the pending slot it holds), the
per-principal connection cap across both endpoints, a wrong credential's close, v1's size and
shape limits before validation, and a defined answer for every malformed frame (a
Hypothesis fuzz of frame shapes against a live /ai-sdk)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect as sync_connect

from llm_relay_protocol.aisdk import AiSdkFrameError, decode_request, safe_error_text
from relay.core.auth import AuthError, Authenticator, api_key_label, mint_token
from tests.fakes.upstream import stream

from .helpers import RECV_TIMEOUT, Client, eventually
from .test_aisdk import ai_client, chunks, relay, send_frame, text_of, ui_user
from .test_fuzz_live import FUZZ_SETTINGS, ErrorLogs, ThreadedRelay, json_values, text
from .test_providers import KEY as PROVIDER_KEY

DOOR_KEY = "sk-door-test-key-0123456789abcdef"
PRINCIPAL = api_key_label(hashlib.sha256(DOOR_KEY.encode()).hexdigest())
BEARER = {"Authorization": f"Bearer {DOOR_KEY}"}
AUTH = dict(auth=True, api_keys=[DOOR_KEY])


@pytest.fixture(autouse=True)
def provider_key(monkeypatch):
    monkeypatch.setenv("FAKE_PROVIDER_KEY", PROVIDER_KEY)


@pytest.fixture
def error_logs():
    handler = ErrorLogs()
    logger = logging.getLogger("relay")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


async def closed_with(ws) -> tuple[int, str]:
    """The close code and reason the relay closes ``ws`` with (frames before it are read and
    dropped); fails if it stays open for RECV_TIMEOUT."""
    with pytest.raises(ConnectionClosed) as info:
        async with asyncio.timeout(RECV_TIMEOUT):
            while True:
                await ws.recv()
    assert info.value.rcvd is not None, "closed without a close frame"
    return info.value.rcvd.code, info.value.rcvd.reason


def resume_frame(rid: str, chat: str = "none", **headers: str) -> dict:
    return {"type": "resume", "requestId": rid, "id": chat, "headers": headers, "body": {}}


# ---------------------------------------------------------------- the pending slot, the timer


async def test_without_credentials_an_aisdk_socket_is_closed_like_a_ws_socket_without_hello():
    """With --auth, a silent /ai-sdk socket and one that only sends requests without
    credentials hold a pending slot for hello_timeout, then close 4408, exactly as a /ws
    socket without hello; the slots come back. Connections authenticated by the upgrade's
    header or by a request give their slot back at once and outlive the timer."""
    async with relay(**AUTH, hello_timeout=0.5, max_pending_per_address=3) as (up, server):
        async with ai_client(server, additional_headers=BEARER) as by_header, \
                ai_client(server) as by_request:
            await by_request.send(resume_frame("q1", authorization=f"Bearer {DOOR_KEY}"))
            assert await by_request.until_done("q1") == [{"type": "no-active",
                                                          "requestId": "q1"}]
            await eventually(lambda: server.pending.total == 0)
            async with ai_client(server) as silent, ai_client(server) as asking, \
                    Client.connect(server.url, hello=False) as no_hello:
                await asking.send(send_frame("r1", "chat", [ui_user("x")]))
                assert await asking.until_done("r1") == [{
                    "type": "error", "requestId": "r1",
                    "errorText": "Not authenticated: missing credentials."}]
                await eventually(lambda: server.pending.total == 3)
                async with ai_client(server) as one_too_many:   # the address's 3 are taken
                    assert await closed_with(one_too_many.ws) == (
                        4429, "too many connections awaiting hello from this address")
                assert await closed_with(silent.ws) == (4408, "no credentials within 0.5 s")
                assert await closed_with(asking.ws) == (4408, "no credentials within 0.5 s")
                assert await closed_with(no_hello.ws) == (4408, "no hello within 0.5 s")
            await eventually(lambda: server.pending.total == 0)
            # The authenticated ones, opened before, are past their timer and still served.
            up.enqueue(stream("openai", ["served"]))
            await by_header.send(send_frame("r2", "chat", [ui_user("x")], model="oai"))
            assert text_of(chunks(await by_header.until_done("r2"))) == "served"
            await by_request.send(resume_frame("q3"))
            assert await by_request.until_done("q3") == [{"type": "no-active",
                                                          "requestId": "q3"}]
            assert server.principals.get(PRINCIPAL).connections == 2


# ---------------------------------------------------------------- per-principal cap


async def test_the_per_principal_connection_cap_holds_across_ws_and_aisdk():
    """--max-connections-per-principal 2: one /ws and one /ai-sdk connection of the same
    key fill it; a third is closed 4429 on either endpoint, whether its credentials come
    in the upgrade's header or in its first request."""
    full = (4429, "too many connections for this principal")
    async with relay(**AUTH, max_connections_per_principal=2) as (up, server):
        async with Client.connect(server.url, additional_headers=BEARER), \
                ai_client(server) as first:
            await first.send(resume_frame("q1", authorization=f"Bearer {DOOR_KEY}"))
            assert await first.until_done("q1") == [{"type": "no-active", "requestId": "q1"}]
            assert server.principals.get(PRINCIPAL).connections == 2
            async with ai_client(server, additional_headers=BEARER) as by_header:
                assert await closed_with(by_header.ws) == full
            async with ai_client(server) as by_request:
                await by_request.send(send_frame("r1", "chat", [ui_user("x")], model="oai",
                                                 ) | {"headers": {"Authorization":
                                                                  f"Bearer {DOOR_KEY}"}})
                assert await closed_with(by_request.ws) == full
            with pytest.raises(ConnectionClosed) as info:
                async with Client.connect(server.url, additional_headers=BEARER):
                    pass
            assert (info.value.rcvd.code, info.value.rcvd.reason) == full
            assert up.requests == []
            assert server.principals.get(PRINCIPAL).connections == 2
        await eventually(lambda: server.principals.get(PRINCIPAL).connections == 0)
        up.enqueue(stream("openai", ["room again"]))
        async with ai_client(server, additional_headers=BEARER) as again:
            await again.send(send_frame("r2", "chat", [ui_user("x")], model="oai"))
            assert text_of(chunks(await again.until_done("r2"))) == "room again"


# ---------------------------------------------------------------- wrong credentials


@pytest.mark.parametrize("authenticated", [False, True], ids=["unauthenticated",
                                                              "authenticated-by-header"])
async def test_a_wrong_credential_in_a_request_closes_4401_like_a_wrong_hello(authenticated):
    """A guess costs a connection: the first wrong key closes 4401, with /ws's reason;
    nothing after it is answered. (Another principal's valid credentials on an
    authenticated connection are refused and the connection stays: they are no guess.)"""
    secret = "t" * 32
    async with relay(**AUTH, token_secret=secret) as (up, server):
        with pytest.raises(ConnectionClosed) as ws_info:
            async with Client.connect(server.url, hello=False) as v1:
                await v1.send({"type": "hello", "token": "sk-wrong-guess"})
                await v1.recv()
        expected = (ws_info.value.rcvd.code, ws_info.value.rcvd.reason)
        assert expected == (4401, "invalid token")
        headers = BEARER if authenticated else {}
        async with ai_client(server, additional_headers=headers) as guesser:
            if authenticated:
                bob = mint_token(secret, "bob", 600)
                await guesser.send(resume_frame("q1", authorization=f"Bearer {bob}"))
                (refused,) = await guesser.until_done("q1")
                assert refused["errorText"].startswith(
                    "Not authenticated: these credentials are for another principal")
                guesser.by_request.clear()
            for i in range(3):
                await guesser.send(send_frame(f"r{i}", "chat", [ui_user("x")]) | {
                    "headers": {"authorization": f"Bearer sk-wrong-guess-{i}"}})
            assert await closed_with(guesser.ws) == expected
            assert guesser.by_request == {}
        assert up.requests == []


# ---------------------------------------------------------------- size and shape


def heavy_send(rid: str) -> dict:
    """A heavy send: ~790 KB, 2,000 messages, 10,000 parts (accepted and fully validated
    before the v1 limits applied to /ai-sdk: ~3x the CPU of the same v1 start)."""
    text_part = {"type": "text", "text": "lorem ipsum dolor sit amet, consectetur ad"}
    messages = [{"id": f"m{i}", "role": "user", "parts": [text_part] * 5} for i in range(2000)]
    return send_frame(rid, "chat", messages, model="oai")


async def test_a_heavy_send_is_refused_by_v1s_limits_with_an_error_for_it():
    async with relay() as (up, server), ai_client(server) as c:
        await c.send(heavy_send("r1"))
        (refusal,) = await c.until_done("r1")
        assert refusal["type"] == "error"
        assert refusal["errorText"].startswith("Invalid request: messages and tools are ")
        assert refusal["errorText"].endswith("(max_messages_bytes)")
        up.enqueue(stream("openai", ["still served"]))
        await c.send(send_frame("r2", "chat", [ui_user("x")], model="oai"))
        assert text_of(chunks(await c.until_done("r2"))) == "still served"
        assert len(up.requests) == 1


@pytest.mark.parametrize(("limit", "frame", "text"), [
    ({"max_content_parts": 4},
     send_frame("r1", "chat", [{"id": "u", "role": "user",
                                "parts": [{"type": "text", "text": "x"}] * 5}], model="oai"),
     "Invalid request: 5 content parts; the limit is 4 (max_content_parts)"),
    ({"max_messages": 3}, send_frame("r1", "chat", [ui_user("x", f"u{i}") for i in range(4)]),
     "Invalid request: 4 messages; the limit is 3 (max_messages)"),
    ({"max_start_keys": 50}, send_frame("r1", "chat", [ui_user("x")]) | {
        "headers": {f"x-h{i}": "v" for i in range(60)}},
     "Invalid request: 65 keys in messages, content parts and tools; the limit is 50 "
     "(max_start_keys)"),
])
async def test_each_shape_limit_of_a_v1_start_refuses_an_aisdk_request(limit, frame, text):
    async with relay(**limit) as (up, server), ai_client(server) as c:
        await c.send(frame)
        assert await c.until_done("r1") == [{"type": "error", "requestId": "r1",
                                             "errorText": text}]
        assert up.requests == []


# ---------------------------------------------------------------- malformed shapes


@pytest.mark.parametrize("frame", [
    {"type": ["send"], "requestId": "r1"},
    {"type": {"send": 1}, "requestId": "r1"},
])
async def test_a_type_that_is_not_a_string_is_an_error_for_its_request(frame, error_logs):
    async with relay() as (up, server), ai_client(server) as c:
        await c.send(frame)
        assert await c.until_done("r1") == [{
            "type": "error", "requestId": "r1",
            "errorText": "unknown frame type (expected send, resume or abort)"}]
        up.enqueue(stream("openai", ["fine"]))
        await c.send(send_frame("r2", "chat", [ui_user("x")], model="oai"))
        assert text_of(chunks(await c.until_done("r2"))) == "fine"
    assert not error_logs.records, [r.getMessage() for r in error_logs.records]


# Random shapes: plausible AI SDK frames with wrong types, unknown types, odd ids, random
# messages, parts, headers and bodies, plus arbitrary JSON, text and binary frames.
def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """Draws from each strategy in proportion to its weight (``one_of`` does not weigh)."""
    return st.sampled_from([s for weight, s in choices for _ in range(weight)]).flatmap(
        lambda s: s)


request_ids = weighted((6, st.sampled_from(["r1", "r2", "r3"])),
                       (1, st.sampled_from(["", "a\nb"])), (1, text), (1, json_values))
part = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["text", "file", "reasoning", "step-start", "tool-x",
                             "dynamic-tool", "data-x"]) | json_values,
    "text": text | json_values, "url": text | json_values, "mediaType": json_values
    | st.sampled_from(["image/png", "application/pdf"]),
    "state": st.sampled_from(["output-available", "output-error"]) | json_values,
    "toolCallId": text | json_values, "toolName": json_values, "input": json_values,
    "output": json_values, "errorText": json_values})
parts = st.lists(part, max_size=3) | json_values
ui_messages = st.lists(st.fixed_dictionaries({}, optional={
    "id": text | json_values,
    "role": st.sampled_from(["user", "assistant", "system", "tool"]) | json_values,
    "parts": parts, "metadata": json_values}), max_size=3) | json_values
bodies = st.fixed_dictionaries({}, optional={
    "model": st.sampled_from(["demo", "nope"]) | json_values,
    "tools": json_values, "toolChoice": json_values,
    "params": st.dictionaries(st.sampled_from(["max_tokens", "temperature"]) | text,
                              json_values | st.integers(-5, 5000), max_size=2) | json_values,
}) | json_values
aisdk_frames = st.fixed_dictionaries({
    "type": weighted((6, st.sampled_from(["send", "resume", "abort"])),
                     (1, st.sampled_from(["bogus", ""])), (1, json_values)),
    "requestId": request_ids}, optional={
    "id": st.sampled_from(["c1", "c2"]) | text | json_values,
    "trigger": st.sampled_from(["submit-message", "regenerate-message"]) | json_values,
    "messageId": json_values, "messages": ui_messages,
    "headers": st.dictionaries(text, text, max_size=2) | json_values,
    "body": bodies, "metadata": json_values,
    "lastSequence": st.integers(-3, 10) | json_values,
})
# Well-formed sends whose messages' parts and body are random: past the decoder, into the
# conversion of UIMessages and the v1 checks of the start they become.
odd_sends = st.builds(
    lambda rid, chat, msgs, body: json.dumps(send_frame(rid, chat, [{"id": "m", **m}
                                                                    for m in msgs]) | {
        "body": body}, ensure_ascii=False),
    st.sampled_from(["r1", "r2", "r3"]), st.sampled_from(["c1", "c2"]),
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]),
                                    "parts": st.lists(part, max_size=4)}),
             min_size=1, max_size=3),
    bodies.filter(lambda b: isinstance(b, dict)))
valid_sends = st.builds(
    lambda rid, chat: json.dumps(send_frame(rid, chat, [ui_user("fuzz")],
                                            params={"max_tokens": 3})),
    st.sampled_from(["r1", "r2", "r3"]), st.sampled_from(["c1", "c2"]))
as_json = st.builds(lambda v: json.dumps(v, ensure_ascii=False), aisdk_frames)
# Mostly frames shaped like the AI SDK's (half of the draws), so the fuzz gets past the
# decoder into the conversion and the admission, not only to its 1008s.
inbound = weighted(
    (8, as_json),
    (1, st.builds(lambda v: json.dumps(v, ensure_ascii=False), json_values)),
    (1, text | st.sampled_from(["", "{", "[]", "NaN"])), (1, st.binary(max_size=32)),
    (4, valid_sends), (6, odd_sends),
    (2, st.builds(lambda rid: json.dumps({"type": "abort", "requestId": rid}),
                  st.sampled_from(["r1", "r2", "r3"]))))


class AiSdkFuzzClient:
    """Sends one frame, then a marker ``resume`` (no credentials) of a chat that does not
    exist; requests are answered in order, so what belongs to the frame has arrived once the
    marker is answered. With ``auth`` (the relay's own ``Authenticator``, to tell a wrong
    credential from a valid one) it also expects the door's answers (AISDK.md "Auth")."""

    def __init__(self, url: str, auth: Authenticator | None = None) -> None:
        self.url = url
        self.auth = auth
        self.ws: ClientConnection | None = None
        self.authenticated = False
        self._sockets = contextlib.ExitStack()
        self.marker = 0
        self.stats: dict[str, int] = {}

    def note(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1

    def _connect(self) -> ClientConnection:
        if self.ws is None:
            self.ws = self._sockets.enter_context(sync_connect(self.url,
                                                               open_timeout=RECV_TIMEOUT))
            self.authenticated = self.auth is None
        return self.ws

    def close(self) -> None:
        self._sockets.close()

    def _expected_close(self, request) -> int | None:
        """4401 for a request with wrong credentials; updates ``authenticated``."""
        if self.auth is None or request is None or request.type == "abort":
            return None
        value = next((v for k, v in request.headers.items()
                      if k.lower() == "authorization"), None)
        if value is None:
            return None
        try:
            self.auth.check_header({"Authorization": value})
        except AuthError:
            return 4401
        self.authenticated = True
        return None

    def check(self, raw: str | bytes) -> None:
        request = None
        try:
            request = decode_request(raw)
            unanswerable, refusal = False, None
        except AiSdkFrameError as exc:
            unanswerable, refusal = exc.request_id is None, exc
        ws = self._connect()
        was_authenticated = self.authenticated
        expected_close = 1008 if unanswerable else self._expected_close(request)
        self.marker += 1
        marker = f"marker-{self.marker}"
        answers: list[dict] = []
        try:
            ws.send(raw)
            ws.send(json.dumps(resume_frame(marker, f"no-such-chat-{self.marker}")))
            while True:
                frame = json.loads(ws.recv(timeout=RECV_TIMEOUT))
                if frame.get("requestId") == marker:
                    assert frame == ({"type": "no-active", "requestId": marker}
                                     if self.authenticated else
                                     {"type": "error", "requestId": marker, "errorText":
                                      "Not authenticated: missing credentials."}), frame
                    break
                answers.append(frame)
        except ConnectionClosed as exc:
            self.ws = None
            code = exc.rcvd.code if exc.rcvd else None
            assert code == expected_close, (raw, code, exc.rcvd and exc.rcvd.reason)
            assert exc.rcvd.reason, "a close names the problem"
            self.note(f"closed {code}")
            return
        assert expected_close is None, (f"not closed {expected_close}", raw, answers)
        for frame in answers:
            assert frame.get("type") in ("chunk", "end", "error", "start", "no-active"), frame
            if frame["type"] == "error":
                assert frame["errorText"] != safe_error_text(None), (raw, frame)
        if refusal is not None:
            assert {"type": "error", "requestId": refusal.request_id,
                    "errorText": refusal.message} in answers, (raw, answers)
            self.note("error for its request")
        elif request is not None and request.type != "abort" and not self.authenticated:
            assert not was_authenticated
            assert {"type": "error", "requestId": request.requestId,
                    "errorText": "Not authenticated: missing credentials."} in answers, \
                (raw, answers)
            self.note("missing credentials")
        else:
            self.note("accepted" if was_authenticated or self.auth is None
                      else "authenticated by it")


def test_random_frame_shapes_on_a_live_aisdk_get_defined_answers_never_1011(error_logs):
    """Whatever shape a frame has, /ai-sdk answers it as documented (AISDK.md "Bad frames"):
    an ``error`` for its request, or close 1008 when it names no usable request; never a
    1011, an internal error text or an ERROR log; and a well-behaved client on another
    connection keeps being served."""
    with ThreadedRelay(**FUZZ_SETTINGS) as live:
        url = live.url.rsplit("/", 1)[0] + "/ai-sdk"
        fuzz = AiSdkFuzzClient(url)
        rounds = 0
        with sync_connect(url, open_timeout=RECV_TIMEOUT) as good:

            @settings(max_examples=150, deadline=None, derandomize=True, database=None,
                      suppress_health_check=[HealthCheck.too_slow,
                                             HealthCheck.data_too_large])
            @given(batch=st.lists(inbound, min_size=1, max_size=4))
            def prop(batch: list[str | bytes]) -> None:
                nonlocal rounds
                for raw in batch:
                    fuzz.check(raw)
                assert not error_logs.records, [r.getMessage() for r in error_logs.records]
                rounds += 1
                rid = f"good-{rounds}"
                good.send(json.dumps(send_frame(rid, f"good-chat-{rounds}", [ui_user("hi")],
                                                params={"max_tokens": 2})))
                while True:
                    frame = json.loads(good.recv(timeout=RECV_TIMEOUT))
                    assert frame["requestId"] == rid, frame
                    if frame["type"] in ("end", "error"):
                        assert frame["type"] == "end", frame
                        break

            try:
                prop()
            finally:
                fuzz.close()
    print("ai-sdk fuzz answers:", dict(sorted(fuzz.stats.items())))
    for kind in ("closed 1008", "error for its request", "accepted"):
        assert fuzz.stats.get(kind), (kind, fuzz.stats)
    assert rounds >= 100, rounds
    assert not error_logs.records, [r.getMessage() for r in error_logs.records]


# (Every dialect held to the same door and limits: tests/relay/test_dialect_doors.py.)


async def test_a_relay_bug_answers_its_request_through_the_machine_with_a_safe_text(
        error_logs):
    """A bug while carrying a request out (here: the streamer cannot be built) goes to the
    connection machine as on /ws: the request gets the generic text (never the exception's),
    the traceback is logged, the connection keeps serving. (A refactoring guard: the same
    answer as before the machine decided it.)"""
    from .helpers import start_relay

    def broken_streamer(spec):
        raise RuntimeError("secret internals")

    async with start_relay(streamer_factory=broken_streamer) as server, \
            ai_client(server) as c:
        await c.send(send_frame("r1", "chat", [ui_user("x")]))
        assert await c.until_done("r1") == [{"type": "error", "requestId": "r1",
                                             "errorText": safe_error_text(None)}]
        await c.send(resume_frame("q1"))
        assert await c.until_done("q1") == [{"type": "no-active", "requestId": "q1"}]
    (record,) = error_logs.records
    assert record.getMessage().endswith("internal error handling an ai-sdk send frame")
    assert "secret internals" in str(record.exc_info[1])


authorizations = weighted(
    (3, st.sampled_from([f"Bearer {DOOR_KEY}", f"bearer  {DOOR_KEY} "])),
    (3, st.sampled_from(["Bearer wrong", "Basic abc", "", "Bearer ", "Bearer a.b.c",
                         f"Bearer {DOOR_KEY}x", DOOR_KEY])),
    (1, text))
auth_headers = weighted(
    (1, st.just({})),
    (3, st.builds(lambda k, v: {k: v},
                  st.sampled_from(["authorization", "Authorization", "AUTHORIZATION"]),
                  authorizations)))


def with_headers(raw: str | bytes, headers: dict) -> str | bytes:
    """``raw`` with its ``headers`` replaced when it is a JSON object, else as it is."""
    try:
        obj = json.loads(raw)
    except ValueError:
        return raw
    if not isinstance(obj, dict):
        return raw
    return json.dumps({**obj, "headers": headers}, ensure_ascii=False)


def test_random_frames_with_random_credentials_on_a_live_aisdk_get_the_doors_answers(
        error_logs):
    """With --auth, random frames carrying random credentials: a wrong one closes 4401, an
    unanswerable frame 1008, a request without any on an unauthenticated connection gets
    ``Not authenticated: missing credentials.``, a valid one authenticates the connection;
    never 1011 or an ERROR log."""
    from relay.config import RelaySettings

    settings_ = dict(FUZZ_SETTINGS, auth=True, api_keys=[DOOR_KEY], hello_timeout=120)
    with ThreadedRelay(**settings_) as live:
        url = live.url.rsplit("/", 1)[0] + "/ai-sdk"
        fuzz = AiSdkFuzzClient(url, Authenticator(RelaySettings(**settings_, port=0)))

        @settings(max_examples=120, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(batch=st.lists(st.builds(with_headers, inbound, auth_headers), min_size=1,
                              max_size=4))
        def prop(batch: list[str | bytes]) -> None:
            for raw in batch:
                fuzz.check(raw)
            assert not error_logs.records, [r.getMessage() for r in error_logs.records]

        try:
            prop()
        finally:
            fuzz.close()
    print("ai-sdk fuzz with auth:", dict(sorted(fuzz.stats.items())))
    for kind in ("closed 1008", "closed 4401", "error for its request", "missing credentials",
                 "authenticated by it", "accepted"):
        assert fuzz.stats.get(kind), (kind, fuzz.stats)
    assert not error_logs.records, [r.getMessage() for r in error_logs.records]
