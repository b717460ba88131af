"""The connection machine (relay.core.connection), driven without sockets or an event loop.

Every close decision and every error frame of a connection, the handshake, and the order of
a ``start``'s admission (PROTOCOL.md "start" and "Limits and refusals at the door"), for
llm-relay.v1 and, through its codec (``llm_relay_protocol.aisdk.AiSdkCodec``), the AI SDK's dialect.
The machine is pure: authentication returns ``AdoptCredentials`` and changes nothing of the
relay's accounting (the tests carry it out, as the session does). The last tests read the
sources of relay/ (``ast``, like tests/test_import_cycles.py) and fail when a close code is
chosen anywhere but relay/core/connection.py.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest
from pydantic import SecretStr

from llm_relay_protocol import PROTOCOL_VERSION, FrameError, Start
from llm_relay_protocol.aisdk import AiSdkCodec
from llm_relay_protocol.dialect import Begin
from llm_relay_protocol.v1 import V1Codec
from relay.core.auth import Authenticator, hash_api_key
from relay.core.connection import (
    ActionFailed, AdoptCredentials, CancelStream, ChargeStart, Close, CloseWhenStreamsEnd,
    Connection,
    ConnectionLimits, Door, FrameReceived, HelloAccepted, HelloTimedOut, IllegalEvent,
    InternalFailure, Opened, Phase, ResumeStream, SendFrame, ServerRestart,
    SlowConsumer, Slowness, SocketClosed, StartStream, StreamFailed,
    StreamTakenOver, TokenExpiredStreamsDone, TooManyFrames, close_reason,
    internal_error_close, legal_pairs, not_a_websocket_endpoint, refuse_at_door,
    server_shutdown_close, unanswerable_frame,
)
from relay.core.errors import RateLimited, UnknownModel, UnknownStream
from relay.core.limits import CompletionBudget, Principals, TokenBucket

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-relay-test-key-0123456789"
SECRET = "connection-test-secret-" + "0123456789abcdef" * 4
LIMITS = ConnectionLimits(hello_timeout=10.0, max_streams=3, max_streams_per_principal=5,
                          max_frame_bytes=65536, detach_grace=0.0, slow_consumer_bytes=1000,
                          slow_consumer_grace=2.5, max_connections_per_principal=2)
HELLO = json.dumps({"type": "hello", "client": {"name": "t", "version": "0"}})


@dataclass
class _AuthSettings:
    """Exactly what ``relay.core.auth.AuthSettings`` asks for: the per-principal connection
    cap is the machine's (``ConnectionLimits``), not the authenticator's."""

    auth: bool = True
    api_keys: tuple = (hash_api_key(KEY),)
    token_secret: SecretStr | None = SecretStr(SECRET)


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def token(sub="alice", ttl=3600, now=None, **claims) -> str:
    now = int(time.time()) if now is None else now
    return jwt.encode({"sub": sub, "iat": now, "exp": now + ttl, **claims}, SECRET,
                      algorithm="HS256")


def frame(**fields) -> str:
    return json.dumps(fields)


def start(id="q1", model="demo", **extra) -> str:
    return frame(type="start", id=id, model=model,
                 messages=[{"role": "user", "content": "hi"}], **extra)


def only(actions, kind):
    assert len(actions) == 1 and isinstance(actions[0], kind), actions
    return actions[0]


def error_of(actions) -> dict:
    sent = only(actions, SendFrame).frame
    assert sent["type"] == "error", sent
    return sent


def carry_out(actions, principals: Principals) -> None:
    """What the session does with ``AdoptCredentials`` (the machine changes nothing)."""
    for action in actions:
        if isinstance(action, AdoptCredentials):
            principals.move(action.previous, action.credentials.principal)


def ai_request(rid="r1", authorization=None, *, kind="resume", chat="c1") -> str:
    """An AI SDK ``resume`` (or ``send``) frame, with ``authorization`` in its headers."""
    headers = {} if authorization is None else {"Authorization": authorization}
    fields = dict(type=kind, requestId=rid, id=chat, headers=headers, body={})
    if kind == "send":
        fields.update(trigger="submit-message", messages=[
            {"id": "m1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}])
    return frame(**fields)


def opened(conn: Connection, headers=None) -> Connection:
    assert conn.handle(Opened(PROTOCOL_VERSION, headers)) == []
    return conn


def welcomed(**kwargs) -> Connection:
    conn = opened(Connection(LIMITS, session_id="s_1", models=["demo", "gpt"], **kwargs))
    actions = conn.handle(FrameReceived(HELLO))
    assert [type(a) for a in actions] == [HelloAccepted, SendFrame]
    return conn


def authed(hello_token: str | None, *, clock=None, principals=None, headers=None):
    principals = principals or Principals(None, None)
    principals.connect("ip:10.0.0.1")
    auth = Authenticator(_AuthSettings(), principals, clock=clock or time.time)
    conn = opened(Connection(LIMITS, session_id="s_1", models=["demo", "gpt"],
                             principal="ip:10.0.0.1",
                             principal_state=principals.get("ip:10.0.0.1"),
                             auth=auth, principals=principals), headers)
    hello = {"type": "hello", "client": {"name": "t", "version": "0"}}
    if hello_token is not None:
        hello["token"] = hello_token
    actions = conn.handle(FrameReceived(json.dumps(hello)))
    carry_out(actions, principals)
    return conn, actions, principals


def aisdk(*, auth: bool = False, headers=None, principals=None, clock=None):
    """An /ai-sdk connection (``AiSdkCodec``) just opened, and the actions of its ``Opened``
    (carried out)."""
    principals = principals or Principals(None, None)
    principals.connect("ip:10.0.0.1")
    authenticator = Authenticator(_AuthSettings(), principals, clock=clock or time.time) \
        if auth else None
    conn = Connection(LIMITS, session_id="s_1", models=["demo", "gpt"],
                      principal="ip:10.0.0.1", principal_state=principals.get("ip:10.0.0.1"),
                      auth=authenticator, principals=principals, codec=AiSdkCodec())
    actions = conn.handle(Opened(None, headers))
    carry_out(actions, principals)
    return conn, actions, principals


# ---------------------------------------------------------------------- handshake


def test_an_unsupported_subprotocol_closes_4406_naming_the_supported_one():
    conn = Connection(LIMITS, session_id="s", models=[])
    close = only(conn.handle(Opened("llm-relay.v0")), Close)
    assert (close.code, close.reason) == (4406, "unsupported protocol version; supported: "
                                                f"{PROTOCOL_VERSION}")
    assert conn.phase is Phase.CLOSING
    assert only(Connection(LIMITS, session_id="s", models=[]).handle(Opened(None)),
                Close).code == 4406


def test_no_hello_in_time_closes_4408():
    conn = opened(Connection(LIMITS, session_id="s", models=[]))
    close = only(conn.handle(HelloTimedOut()), Close)
    assert (close.code, close.reason) == (4408, "no hello within 10 s")


@pytest.mark.parametrize(("raw", "problem"), [
    (frame(type="ping"), "expected hello, got ping"),
    ("{not json", "not valid JSON"),
    (b"\x00binary", "binary frames are not accepted"),
    ("[1, 2]", ""),
    (frame(type="hello", client={"name": 5, "version": "0"}), ""),
    (frame(type="hello", client={"name": "t", "version": "0"}, token=7), ""),
])
def test_a_first_frame_that_is_not_a_valid_hello_closes_4401(raw, problem):
    conn = opened(Connection(LIMITS, session_id="s", models=[]))
    close = only(conn.handle(FrameReceived(raw)), Close)
    assert close.code == 4401 and close.reason.startswith("first frame must be hello: ")
    assert problem in close.reason
    assert len(close.reason.encode()) <= 123


def test_a_valid_hello_is_welcomed_with_the_limits():
    conn = opened(Connection(LIMITS, session_id="s_1", models=["demo", "gpt"]))
    accepted, welcome = conn.handle(FrameReceived(HELLO))
    assert isinstance(accepted, HelloAccepted)
    sent = welcome.frame
    assert (sent["type"], sent["session_id"], sent["models"]) == ("welcome", "s_1",
                                                                  ["demo", "gpt"])
    assert sent["limits"] == {"max_streams": 3, "max_frame_bytes": 65536,
                              "max_messages_bytes": 512 * 1024, "detach_grace": 0.0}
    assert conn.phase is Phase.WELCOMED


@pytest.mark.parametrize(("hello_token", "reason"), [
    (None, "missing token"),
    ("not-a-credential", "invalid token"),
    ("a.b.c", "invalid token"),
    (token(ttl=-10, now=int(time.time()) - 100), "token expired"),
    (token(nbf=int(time.time()) + 3600), "token not yet valid"),
])
def test_auth_failures_at_hello_close_4401_with_the_reason(hello_token, reason):
    conn, actions, principals = authed(hello_token)
    close = only(actions, Close)
    assert (close.code, close.reason) == (4401, reason)
    assert close.note == "authentication failed"
    assert principals.get("ip:10.0.0.1").connections == 1   # nothing moved
    assert conn.phase is Phase.CLOSING


def test_the_header_wins_over_the_hello_token():
    conn, actions, _ = authed("garbage", headers={"Authorization": f"Bearer {KEY}"})
    assert isinstance(actions[0], AdoptCredentials)
    assert actions[0].credentials.method == "api_key"


def test_an_authenticated_hello_asks_to_move_the_accounting_and_applies_the_claims():
    principals = Principals(None, None)
    principals.connect("ip:10.0.0.1")
    auth = Authenticator(_AuthSettings(), principals)
    conn = opened(Connection(LIMITS, session_id="s_1", models=["demo", "gpt"],
                             principal="ip:10.0.0.1",
                             principal_state=principals.get("ip:10.0.0.1"),
                             auth=auth, principals=principals))
    actions = conn.handle(FrameReceived(json.dumps(
        {"type": "hello", "token": token(models=["gpt"], max_streams=2)})))
    adopt, accepted, welcome = actions
    assert isinstance(adopt, AdoptCredentials) and isinstance(accepted, HelloAccepted)
    assert (adopt.previous, adopt.credentials.principal) == ("ip:10.0.0.1", "jwt:alice")
    assert conn.principal == "jwt:alice" and adopt.state is conn.principal_state
    # The machine decided; the relay's accounting is the glue's to change.
    assert principals.connections_of("jwt:alice") == 0
    assert principals.connections_of("ip:10.0.0.1") == 1
    carry_out(actions, principals)
    assert principals.get("jwt:alice").connections == 1
    assert principals.total_connections == 1                 # the address gave its slot back
    assert welcome.frame["models"] == ["gpt"]
    assert welcome.frame["limits"]["max_streams"] == 2


def test_a_principal_at_its_connection_limit_closes_4429():
    principals = Principals(None, None)
    principals.connect("jwt:alice")
    principals.connect("jwt:alice")
    conn, actions, _ = authed(token(), principals=principals)
    close = only(actions, Close)
    assert (close.code, close.reason) == (4429, "too many connections for this principal")
    assert principals.get("jwt:alice").connections == 2


EVENTS = [Opened(PROTOCOL_VERSION), HelloTimedOut(), FrameReceived(frame(type="ping")),
          ActionFailed(None, TypeError()),
          StreamFailed("a", "stream_lost", "gone"), StreamTakenOver("a"), TooManyFrames(),
          SlowConsumer(Slowness.BACKLOG), TokenExpiredStreamsDone(), InternalFailure(),
          ServerRestart()]
READING = {FrameReceived, TooManyFrames, SlowConsumer, InternalFailure, ServerRestart}
LEGAL = {
    Phase.OPENING: {Opened, InternalFailure, ServerRestart},
    Phase.AWAITING_HELLO: {HelloTimedOut, *READING},
    Phase.AWAITING_CREDENTIALS: {HelloTimedOut, ActionFailed, *READING},
    Phase.WELCOMED: {ActionFailed, StreamFailed, StreamTakenOver, TokenExpiredStreamsDone,
                     *READING},
}
CODECS = {"v1": V1Codec(), "ai-sdk": AiSdkCodec()}


def _in_phase(phase: Phase, codec: str = "v1") -> Connection:
    if phase is Phase.AWAITING_CREDENTIALS or (codec == "ai-sdk"
                                               and phase is not Phase.OPENING):
        conn = aisdk(auth=phase is Phase.AWAITING_CREDENTIALS)[0]
    else:
        conn = Connection(LIMITS, session_id="s", models=["demo"], codec=CODECS[codec])
        if phase is not Phase.OPENING:
            conn.handle(Opened(PROTOCOL_VERSION))
        if phase is Phase.WELCOMED:
            conn.handle(FrameReceived(HELLO))
    assert conn.phase is phase
    return conn


def test_the_legal_pairs_are_the_documented_ones():
    assert legal_pairs() == {(p, k) for p, kinds in LEGAL.items() for k in kinds}
    with pytest.raises(IllegalEvent):
        welcomed().handle(object())


@pytest.mark.parametrize("phase", list(LEGAL), ids=lambda p: p.value)
@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("codec", list(CODECS))
def test_events_out_of_order_are_a_bug_of_the_glue(phase, event, codec):
    if (phase is Phase.AWAITING_HELLO and codec == "ai-sdk") or \
            (phase is Phase.AWAITING_CREDENTIALS and codec == "v1"):
        return                              # (no such phase in that dialect)
    conn = _in_phase(phase, codec)
    if type(event) in LEGAL[phase]:
        conn.handle(event)
    else:
        with pytest.raises(IllegalEvent):
            conn.handle(event)


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_once_closing_every_event_is_accepted_and_answered_with_nothing(event):
    conn = welcomed()
    conn.handle(InternalFailure())
    assert conn.handle(event) == []
    conn.handle(SocketClosed())
    assert conn.handle(event) == [] and conn.phase is Phase.CLOSED


# ---------------------------------------------------------------------- after welcome


def test_every_frame_after_welcome_gets_its_answer():
    conn = welcomed()
    assert error_of(conn.handle(FrameReceived("{oops")))["code"] == "bad_request"
    again = error_of(conn.handle(FrameReceived(HELLO)))
    assert (again["code"], again["ref"]) == ("bad_request", "hello")
    pong = only(conn.handle(FrameReceived(frame(type="ping", data={"n": 1}))), SendFrame)
    assert pong.frame == {"type": "pong", "data": {"n": 1}}
    unknown = error_of(conn.handle(FrameReceived(frame(type="cancel", id="zz"))))
    assert (unknown["code"], unknown["ref"], unknown["id"]) == ("unknown_stream", "cancel", "zz")
    cancel = only(conn.handle(FrameReceived(frame(type="cancel", id="q1"), {"q1"})),
                  CancelStream)
    assert cancel.id == "q1"
    resume = only(conn.handle(FrameReceived(frame(type="resume", stream_key="k" * 20,
                                                  after_seq=0))), ResumeStream)
    assert resume.request.resume.stream_key == "k" * 20
    assert only(conn.handle(FrameReceived(start())), StartStream).msg.id == "q1"
    assert conn.phase is Phase.WELCOMED


def test_a_bad_start_names_its_id_and_ref():
    err = error_of(welcomed().handle(FrameReceived(frame(type="start", id="q9", model="demo",
                                                         messages=[]))))
    assert (err["code"], err["ref"], err["id"]) == ("bad_request", "start", "q9")


def test_the_machine_reads_the_start_rate_and_the_glue_takes_the_start():
    """The machine never changes the principal's accounting: a start that passes the
    start-rate check comes with ``ChargeStart`` (the glue takes the start), and the bucket
    is as it was. A start refused by a later check (here a running id) still costs its
    start, as a refused start always did."""
    conn = welcomed()
    conn.principal_state.starts = TokenBucket(0.001, 2)
    actions = conn.handle(FrameReceived(start(id="q1")))
    assert [type(a) for a in actions] == [ChargeStart, StartStream]
    assert actions[0].state is conn.principal_state
    assert conn.principal_state.starts.can_take(2)          # untouched by the machine
    refused = conn.handle(FrameReceived(start(id="q1"), {"q1"}, False))
    assert [type(a) for a in refused] == [ChargeStart, SendFrame]
    assert refused[1].frame["code"] == "duplicate_id"
    conn.principal_state.starts.take(2)                     # the glue took both
    err = error_of(conn.handle(FrameReceived(start(id="q2"))))
    assert err["code"] == "rate_limited"                    # no ChargeStart for a refusal


def _everything_fails() -> tuple[Connection, dict]:
    """A connection on which every admission check of a ``start`` fails at once."""
    clock = _Clock(1_000_000.0)
    principals = Principals(None, None)
    conn, actions, _ = authed(token(models=["gpt"], max_streams=2, now=int(clock.now)),
                              clock=clock, principals=principals)
    assert isinstance(actions[0], AdoptCredentials)
    state = conn.principal_state
    state.budget = CompletionBudget(100)
    state.budget.charge(100)
    state.starts = TokenBucket(0.001, 1)
    assert state.starts.take()                     # empty now
    state.streams = 5
    world = {"clock": clock, "open_ids": {"q1", "q2", "q3"}, "draining": True,
             "model": "demo", "id": "q1"}
    return conn, world


def _answer(conn: Connection, world: dict):
    return conn.handle(FrameReceived(start(id=world["id"], model=world["model"]),
                                     world["open_ids"], world["draining"]))


def test_admission_of_a_start_follows_the_documented_order():
    """Each check answers while it fails; fixing it lets the next one answer, in the order
    of the module docstring (PROTOCOL.md "start"): expired token, models claim, token's
    stream cap, completion budget, draining, start rate, duplicate id, connection's stream
    cap, principal's stream cap; then the start passes."""
    conn, world = _everything_fails()
    state = conn.principal_state
    world["clock"].now += 7200                            # 1. the token has expired
    assert only(_answer(conn, world), CloseWhenStreamsEnd)
    world["clock"].now -= 7200
    err = error_of(_answer(conn, world))                  # 2. the token's models claim
    assert (err["code"], err["id"], err["ref"]) == ("unknown_model", "q1", "start")
    assert err["message"] == "unknown model 'demo'; this relay serves: gpt"
    world["model"] = "gpt"
    err = error_of(_answer(conn, world))                  # 3. the token's max_streams
    assert (err["code"], err["message"]) == ("too_many_streams",
                                             "at most 2 concurrent streams for this token")
    conn.credentials = dataclasses.replace(conn.credentials, max_streams=None)
    err = error_of(_answer(conn, world))                  # 4. the completion budget
    assert err["code"] == "rate_limited" and err["retry_after"] > 0
    assert "completion token budget of 100 per hour" in err["message"]
    state.budget = None
    err = error_of(_answer(conn, world))                  # 5. draining
    assert err["code"] == "draining"
    world["draining"] = False
    err = error_of(_answer(conn, world))                  # 6. the start rate
    assert (err["code"], err["message"]) == ("rate_limited", "too many starts; slow down")
    assert err["retry_after"] > 0
    state.starts = None
    err = error_of(_answer(conn, world))                  # 7. a running id
    assert (err["code"], err["id"]) == ("duplicate_id", "q1")
    world["id"] = "q4"
    err = error_of(_answer(conn, world))                  # 8. the connection's cap
    assert (err["code"], err["message"]) == ("too_many_streams",
                                             "at most 3 concurrent streams per connection")
    world["open_ids"] = {"q1"}
    err = error_of(_answer(conn, world))                  # 9. the principal's cap
    assert (err["code"], err["message"]) == ("too_many_streams",
                                             "at most 5 concurrent streams per principal")
    state.streams = 0
    assert only(_answer(conn, world), StartStream).msg.id == "q4"


def test_an_expired_token_gets_no_answer_and_one_close_after_the_streams():
    clock = _Clock(1_000_000.0)
    conn, _, _ = authed(token(ttl=60, now=int(clock.now)), clock=clock)
    clock.now += 61
    assert only(conn.handle(FrameReceived(start(), {"a"})), CloseWhenStreamsEnd)
    assert conn.handle(FrameReceived(start(id="q2"), {"a"})) == []     # once
    # Until the close, cancel and ping are still answered.
    assert only(conn.handle(FrameReceived(frame(type="cancel", id="a"), {"a"})), CancelStream)
    assert only(conn.handle(FrameReceived(frame(type="ping"))), SendFrame)
    close = only(conn.handle(TokenExpiredStreamsDone()), Close)
    assert (close.code, close.reason) == (4401, "token expired")


def test_another_dialects_start_gets_the_same_admission_in_its_words():
    """An AI SDK ``send`` is a ``Begin`` like a v1 ``start``: the same admission, its
    refusal an ``error`` reply the codec says as the request's ``error`` frame."""
    conn, _, _ = aisdk()
    refusal = error_of(conn.handle(FrameReceived(ai_request("q1", kind="send"), {"q1"})))
    assert (refusal["code"], refusal["id"], refusal["ref"]) == ("duplicate_id", "q1", "send")
    assert AiSdkCodec().encode_reply(refusal) == {
        "type": "error", "requestId": "q1", "errorText": refusal["message"]}
    started = only(conn.handle(FrameReceived(ai_request("q2", kind="send"))), StartStream)
    assert (started.msg.id, started.msg.model) == ("q2", "demo")   # the first alias
    draining = error_of(conn.handle(FrameReceived(ai_request("q3", kind="send"), (), True)))
    assert draining["code"] == "draining"
    # The dialect's own rule is asked before the admission (and only about a Begin).
    busy = error_of(conn.handle(FrameReceived(
        ai_request("q4", kind="send"), (), True,
        lambda begin: RateLimited(f"busy chat {begin.context.id}"))))
    assert (busy["code"], busy["message"], busy["id"]) == ("rate_limited", "busy chat c1", "q4")
    assert only(conn.handle(FrameReceived(ai_request("q5"), (), True, lambda begin: 1 / 0)),
                ResumeStream)


def test_room_for_a_resume():
    conn = welcomed()
    assert conn.room_for("a", {"b"}) is None
    assert conn.room_for("a", {"a"}).code == "duplicate_id"
    assert conn.room_for("d", {"a", "b", "c"}).code == "too_many_streams"


# ---------------------------------------------------------------------- exceptions -> frames


def test_exceptions_become_error_frames_here_only():
    conn = welcomed()
    msg = Begin("q7", Start.model_validate_json(start(id="q7")))
    err = error_of(conn.handle(ActionFailed(msg, RateLimited("later", retry_after=1.5))))
    assert err == {"type": "error", "code": "rate_limited", "message": "later",
                   "ref": "start", "id": "q7", "retry_after": 1.5}
    err = error_of(conn.handle(ActionFailed(msg, UnknownModel("unknown model 'zz'"))))
    assert (err["code"], err["id"]) == ("unknown_model", "q7")
    err = error_of(conn.handle(ActionFailed(msg, UnknownStream("gone", id="other"))))
    assert err["id"] == "other"
    err = error_of(conn.handle(ActionFailed(None, FrameError("bad", ref="resume"))))
    assert (err["code"], err["ref"]) == ("bad_request", "resume")
    err = error_of(conn.handle(ActionFailed(msg, TypeError("a bug"))))
    assert (err["code"], err["message"], err["id"]) == ("internal_error", "internal error",
                                                        "q7")
    assert "a bug" not in json.dumps(err)


def test_unprompted_errors_of_attached_streams():
    conn = welcomed()
    err = error_of(conn.handle(StreamFailed("r1", "store_unavailable", "Redis is gone")))
    assert err == {"type": "error", "code": "store_unavailable", "message": "Redis is gone",
                   "ref": "resume", "id": "r1"}
    err = error_of(conn.handle(StreamTakenOver("r2")))
    assert (err["code"], err["ref"], err["id"]) == ("stream_taken_over", "resume", "r2")


# ---------------------------------------------------------------------- closes


@pytest.mark.parametrize(("event", "code", "reason"), [
    (TooManyFrames(), 4429, "too many frames; slow down and reconnect"),
    (SlowConsumer(Slowness.BACKLOG), 4008,
     "slow consumer: more than 1000 bytes unread for 2.5 s"),
    (SlowConsumer(Slowness.CONTROL_QUEUE), 4008,
     "slow consumer: more than 2000 bytes of replies unread"),
    (SlowConsumer(Slowness.LOG_TRIMMED), 4008,
     "the stream's log dropped frames this client had not read; reconnect and resume"),
    (TokenExpiredStreamsDone(), 4401, "token expired"),
    (InternalFailure(), 1011, "internal error"),
    (ServerRestart(), 1012, "relay restarting; reconnect and resume"),
])
def test_every_close_after_welcome(event, code, reason):
    conn = welcomed()
    close = only(conn.handle(event), Close)
    assert (close.code, close.reason) == (code, reason)
    assert conn.phase is Phase.CLOSING


def test_the_first_close_decision_wins_and_nothing_more_is_answered():
    conn = welcomed()
    assert only(conn.handle(ServerRestart()), Close).code == 1012
    for event in (TooManyFrames(), SlowConsumer(Slowness.BACKLOG), InternalFailure(),
                  FrameReceived(frame(type="ping")), StreamTakenOver("a")):
        assert conn.handle(event) == []
    conn.handle(SocketClosed())
    assert conn.phase is Phase.CLOSED


def test_decisions_outside_a_connection():
    assert refuse_at_door(Door.RELAY_FULL) == Close(4429, "too many connections to this relay")
    assert refuse_at_door(Door.PRINCIPAL_FULL) == Close(
        4429, "too many connections for this principal")
    pending = "too many connections awaiting hello from this address"
    assert refuse_at_door(Door.TOO_MANY_PENDING, pending) == Close(4429, pending)
    assert internal_error_close() == Close(1011, "internal error")
    assert server_shutdown_close() == Close(1001, "")
    assert not_a_websocket_endpoint() == Close(1008, "no WebSocket here")
    long = unanswerable_frame("é" * 200)
    assert long.code == 1008 and len(long.reason.encode()) <= 123
    assert close_reason("short") == "short"


# ---------------------------------------------------------------------- one place


def _relay_sources() -> dict[str, ast.Module]:
    return {str(p.relative_to(ROOT)): ast.parse(p.read_text(encoding="utf-8"), str(p))
            for p in sorted((ROOT / "relay").rglob("*.py"))}


def test_close_codes_are_chosen_only_in_relay_connection():
    """No module of relay/ but connection.py names a ``CloseCode`` or passes a literal code
    to a ``close(...)`` call: every close of a connection is decided there."""
    offenders = []
    for path, tree in _relay_sources().items():
        if path == "relay/core/connection.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id == "CloseCode":
                offenders.append(f"{path}:{node.lineno}: CloseCode")
            if isinstance(node, ast.alias) and node.name == "CloseCode":
                offenders.append(f"{path}: imports CloseCode")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("close", "close_soon", "_close_soon")
                    and node.args and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, int)):
                offenders.append(f"{path}:{node.lineno}: close({node.args[0].value}, ...)")
    assert offenders == []


def test_the_machine_imports_nothing_of_the_event_loop():
    tree = _relay_sources()["relay/core/connection.py"]
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"asyncio", "websockets", "litellm", "redis", "httpx"}


def test_error_frames_are_built_only_in_relay_connection():
    """v1 ``error`` frames (``llm_relay_protocol.frames.error``, ``FrameError.frame()``) are built by
    the machine only; relay.runtime.aisdk speaks another protocol with its own error builder."""
    offenders = []
    for path, tree in _relay_sources().items():
        if path == "relay/core/connection.py":
            continue
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            func = node.func
            if func.attr == "error" and isinstance(func.value, ast.Name) and \
                    func.value.id == "frames":
                offenders.append(f"{path}:{node.lineno}: frames.error(...)")
            if func.attr == "frame" and not node.args:
                offenders.append(f"{path}:{node.lineno}: .frame()")
    assert offenders == []


# ---------------------------------------------------------------------- /ai-sdk's door


def request(conn: Connection, rid="r1", authorization=None, *, kind="resume",
            open_ids=()):
    """The actions answering an AI SDK request on ``conn`` (carried out: ``AdoptCredentials``
    moves the accounting as the session would)."""
    actions = conn.handle(FrameReceived(ai_request(rid, authorization, kind=kind), open_ids))
    if conn.principals is not None:
        carry_out(actions, conn.principals)
    return actions


def test_aisdk_without_auth_is_welcomed_at_once_and_leaves_the_pending_count():
    conn, actions, _ = aisdk()
    assert only(actions, HelloAccepted) and conn.phase is Phase.WELCOMED
    resume = only(request(conn, "r1", "Bearer whatever"), ResumeStream)   # nothing to check
    assert resume.request.id == "r1" and resume.request.resume is None


def test_aisdk_without_credentials_awaits_them_for_the_hello_timeout_then_closes_4408():
    conn, actions, principals = aisdk(auth=True)
    assert actions == [] and conn.phase is Phase.AWAITING_CREDENTIALS
    refusal = error_of(request(conn, "r1"))
    assert (refusal["code"], refusal["message"], refusal["id"]) == (
        "bad_request", "Not authenticated: missing credentials.", "r1")
    assert AiSdkCodec().encode_reply(refusal) == {
        "type": "error", "requestId": "r1",
        "errorText": "Not authenticated: missing credentials."}
    close = only(conn.handle(HelloTimedOut()), Close)
    assert (close.code, close.reason) == (4408, "no credentials within 10 s")
    assert principals.get("ip:10.0.0.1").connections == 1


@pytest.mark.parametrize("presented", ["Bearer not-a-key", "Bearer a.b.c", "Basic x", "Bearer",
                                       f"Bearer {token(ttl=-10, now=int(time.time()) - 100)}"])
@pytest.mark.parametrize("authenticated", [False, True])
def test_aisdk_wrong_credentials_in_a_request_close_4401_like_a_wrong_hello(presented,
                                                                           authenticated):
    headers = {"Authorization": f"Bearer {KEY}"} if authenticated else None
    conn, _, _ = aisdk(auth=True, headers=headers)
    close = only(request(conn, "r1", presented), Close)
    assert close.code == 4401 and close.note == "authentication failed"
    assert conn.phase is Phase.CLOSING
    assert request(conn, "r2", f"Bearer {KEY}") == []     # nothing more


def test_aisdk_credentials_in_the_upgrade_or_a_request_pass_the_principal_cap():
    principals = Principals(None, None)
    for _ in range(2):                                 # LIMITS: 2 per principal
        conn, actions, _ = aisdk(auth=True, headers={"Authorization": f"Bearer {KEY}"},
                                 principals=principals)
        assert [type(a) for a in actions] == [AdoptCredentials, HelloAccepted]
        assert conn.phase is Phase.WELCOMED
    conn, actions, _ = aisdk(auth=True, headers={"Authorization": f"Bearer {KEY}"},
                             principals=principals)
    assert only(actions, Close) == Close(4429, "too many connections for this principal",
                                         "refused connection: too many connections for this "
                                         "principal")
    conn, actions, _ = aisdk(auth=True, principals=principals)
    assert actions == []
    close = only(request(conn, "r1", f"Bearer {KEY}", kind="send"), Close)
    assert (close.code, close.reason) == (4429, "too many connections for this principal")


def test_aisdk_a_request_authenticates_once_and_acts_for_one_principal():
    clock = _Clock(time.time())
    conn, _, principals = aisdk(auth=True, clock=clock)
    adopt, accepted, started = request(conn, "r1", f"bearer {token(ttl=60)}", kind="send")
    assert isinstance(adopt, AdoptCredentials) and isinstance(accepted, HelloAccepted)
    assert isinstance(started, StartStream)            # the request that brought them goes on
    assert conn.principal == "jwt:alice" and principals.total_connections == 1
    assert only(request(conn, "r2"), ResumeStream)                 # the connection's own
    assert only(request(conn, "r3", f"Bearer {token(ttl=600)}"), ResumeStream)  # refreshed
    assert conn.credentials.expires_at == pytest.approx(time.time() + 600, abs=5)
    other = error_of(request(conn, "r4", f"Bearer {token('bob')}"))
    assert other["message"].startswith("Not authenticated: these credentials are for another")
    clock.now += 3600
    actions = request(conn, "r5")
    assert [type(a) for a in actions] == [CloseWhenStreamsEnd, SendFrame]
    assert actions[1].frame["message"] == "Not authenticated: token expired."


def test_aisdk_an_unanswerable_frame_closes_1008_and_floods_close_before_auth_too():
    conn, _, _ = aisdk(auth=True)
    assert only(conn.handle(FrameReceived("[1]")), Close) == \
        Close(1008, "frame must be a JSON object")
    conn, _, _ = aisdk(auth=True)
    assert only(conn.handle(TooManyFrames()), Close).code == 4429
    conn, _, _ = aisdk(auth=True)
    assert only(conn.handle(SlowConsumer(Slowness.CONTROL_QUEUE)), Close).code == 4008


def test_aisdk_answers_a_malformed_request_and_an_abort_before_authentication():
    conn, _, _ = aisdk(auth=True)
    bad = error_of(conn.handle(FrameReceived(frame(type="nope", requestId="r1"))))
    assert (bad["code"], bad["id"]) == ("bad_request", "r1")
    assert conn.handle(FrameReceived(frame(type="abort", requestId="r2"))) == []
    assert conn.phase is Phase.AWAITING_CREDENTIALS


def test_a_dialect_without_hello_or_per_request_credentials_needs_the_upgrade_header():
    """A dialect whose requests carry no credentials (as the OpenAI Responses WebSocket
    mode) is authenticated by the upgrade's header only: without one, 4401 at once."""
    codec = dataclasses.replace(_Plain(), per_request_credentials=False)
    principals = Principals(None, None)
    auth = Authenticator(_AuthSettings(), principals)
    conn = Connection(LIMITS, session_id="s", models=["demo"], codec=codec, auth=auth,
                      principals=principals)
    close = only(conn.handle(Opened(None)), Close)
    assert (close.code, close.reason) == (4401, "missing token")
    conn = Connection(LIMITS, session_id="s", models=["demo"], codec=codec, auth=auth,
                      principals=principals)
    assert [type(a) for a in conn.handle(Opened(None, {"Authorization": f"Bearer {KEY}"}))] \
        == [AdoptCredentials, HelloAccepted]


@dataclass
class _Plain(AiSdkCodec):
    """The AI SDK's codec with other door properties (a dataclass, to replace them)."""

    per_request_credentials: bool = True


def test_connection_limits_take_every_default_from_the_settings():
    """One place for the limits' defaults (issue 22, item 3): ConnectionLimits has no numbers
    of its own (it once said detach_grace 0 and 32 connections per principal where the
    settings say 15 and 100); every limit is a settings field, carried over unchanged."""
    from relay.config import RelaySettings

    limit_fields = [f for f in dataclasses.fields(ConnectionLimits) if f.name != "decode_limits"]
    with_defaults = [f.name for f in limit_fields if f.default is not dataclasses.MISSING
                     or f.default_factory is not dataclasses.MISSING]
    assert not with_defaults, f"defaults belong to RelaySettings: {with_defaults}"
    settings = RelaySettings()
    limits = ConnectionLimits.from_settings(settings)
    for f in limit_fields:
        assert f.name in RelaySettings.model_fields, f.name
        assert getattr(limits, f.name) == RelaySettings.model_fields[f.name].default, f.name
    assert limits.decode_limits == settings.decode_limits()


def test_a_session_closes_its_socket_in_one_place_with_a_deadline():
    """Every close a session makes (handshake, flood, slow consumer, token expiry, restart,
    bug) is the machine's ``Close`` carried out by ``Session._close``, whose task
    (``_close_or_abort``) is the only caller of the socket's ``close`` and bounds it with a
    deadline; and the machine's actions are dispatched by one executor."""
    tree = _relay_sources()["relay/runtime/session.py"]
    closes, close_tasks, dispatch = [], [], []
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(func):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr == "close" and ast.unparse(node.func.value) == "self.ws":
                    closes.append(func.name)
                if node.func.attr == "_close_or_abort":
                    close_tasks.append(func.name)
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "isinstance" and ast.unparse(node.args[1]) in (
                        "SendFrame", "Close", "AdoptCredentials", "HelloAccepted",
                        "CloseWhenStreamsEnd")):
                dispatch.append(func.name)
    assert closes == ["_close_or_abort"]
    assert close_tasks == ["_close"]
    assert set(dispatch) == {"_execute_now"}
    source = ast.unparse(tree)
    assert "asyncio.timeout(_CLOSE_TIMEOUT)" in source
