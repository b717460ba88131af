"""The client policy of llm-relay.v1, sans I/O: when to reconnect, how long to wait, what to
resume, which frames to drop as replays, and what a cancel does. One place for both clients.

``llm_relay_client.RelayClient`` (Python) uses this module directly. ``relay-client.js`` (the
browser client) cannot import Python, so its tables come from here: ``python -m
llm_relay_protocol.client_policy --write`` writes ``clients/js/client-policy.js`` (an ES module
exporting :func:`policy_tables`; checked in, a test fails when it is stale), and the JSON
test vectors in ``tests/vectors/client_policy.json`` run against :class:`ClientStreamTracker`
(pytest) and against relay-client.js in Chromium, so the two clients behave the same.

The rules (each one a row of a table below or a method of :class:`ClientStreamTracker`):

1. **Close code -> retry or final** (:func:`close_decision`): the rule stated once, in
   PROTOCOL.md "Close codes" (its table's "Reconnect?" column is ``CloseCode.retryable``;
   its "Client policy" paragraph adds 1005/1006 and the one 4401 ``token expired``
   exception). This function is its one implementation; relay-client.js gets it as the
   generated ``close_codes`` table; the other documents point here or to PROTOCOL.md.
2. **Backoff** (:data:`BACKOFF`): attempt ``n`` (0-based) waits
   ``min(cap, base * factor**n) * uniform(0.5, 1.0)``: base 0.5 s, factor 2, cap 15 s, at
   most :data:`MAX_RECONNECT_ATTEMPTS` = 8 attempts after one loss (0.25-0.5 s up to
   ~30-60 s of trying in all, longer than a relay restart, shorter than a user's patience);
   the count starts again after each ``welcome``. Both clients default to it.
3. **What survives a loss** (:meth:`ClientStreamTracker.connection_lost`,
   :meth:`ClientStreamTracker.welcomed`): a stream that had ``started`` (it has a
   ``stream_key``) and no ``finish`` is resumed with ``after_seq`` = the last seq delivered,
   when the close is a retry and both the old and the new ``welcome.limits.detach_grace``
   are > 0. A stream whose ``start`` was sent but not answered is *never* sent again (the
   relay may be running it: the prompt would run twice) and fails ``connection_lost``. The
   single exception is rule 1's token refresh: PROTOCOL.md guarantees that a connection
   closed 4401 ``token expired`` left its unanswered starts unrun, so they are sent again
   on the refreshed connection. A ``start`` not yet handed to any connection waits for the
   next one. Everything else fails with ``connection_lost`` and the close code.
4. **Seq dedupe**: per stream only the last seq seen (an int, never a growing set); a frame
   with a ``seq`` not above it is a replay and is dropped. Seq only grows on a stream, and
   the relay may merge replayed tokens (gaps are normal), so this is exact and O(1).
5. **Errors**: an ``error`` with the stream's id ends it: ``stream_taken_over`` (another
   connection resumed it), a refused ``resume`` (its ``code``; the close code of the loss
   that made the resume necessary is kept), or else a refused ``start``. ``ref: "cancel"``
   errors are ignored (the cancel raced the finish). An ``error`` without id and with
   ``ref: "resume"`` (an older relay that does not know ``resume``) fails every stream
   waiting for ``resumed``. Frames for ids the client does not track are ignored.
6. **Watch** (:meth:`ClientStreamTracker.watch`): a stream known only by its
   ``stream_key`` (started elsewhere: another tab, device or process) joins as a viewer
   with a ``resume`` after ``after_seq`` (default 0: from its first frame), sent at once on
   an open connection or first on the next one; from then on it is a stream like the
   others (rules 3-5, 7): ``resumed``, its frames, its one ``finish``; a refused resume
   fails it with ``resume_refused``; after a loss it is resumed again as a viewer.
7. **Cancel** (:meth:`ClientStreamTracker.cancel`): a stream whose ``start`` never left
   the client ends locally with :func:`local_cancel_finish`: a ``finish`` that satisfies
   the schema (``status: cancelled``, ``reason: client_cancel``, usage all zero and
   ``estimated: true``: nothing reached a provider). Any other stream gets ``cancel`` sent
   and ends with the relay's real ``finish``; a stream waiting for ``resumed`` gets its
   ``cancel`` right after ``resumed``. The client never fabricates a finish for a stream
   the relay knows.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeAlias

from pydantic import BaseModel

from . import frames
from .codes import CloseCode, ErrorCode, FinishReason, FinishStatus
from .messages import (
    CLIENT_FRAME_TYPES, SERVER_FRAME_TYPES, STREAM_FRAME_TYPES, ClientMessage, model_tag,
    union_members,
)

#: A server frame as a client holds it: the decoded JSON object, or its model
#: (``llm_relay_protocol.codec.decode_server_frame``); read field by field, any type tolerated.
ServerFrame: TypeAlias = "Mapping[str, object] | BaseModel"

__all__ = [
    "ABNORMAL_CLOSURE",
    "BACKOFF",
    "Backoff",
    "CLOSE_CODES",
    "CancelAction",
    "ClientStreamTracker",
    "CloseDecision",
    "CONNECTION_LOST",
    "FrameAction",
    "FrameDecision",
    "LossOutcome",
    "MAX_RECONNECT_ATTEMPTS",
    "ReconnectSchedule",
    "NO_STATUS",
    "NORMAL_CLOSURE",
    "RECENT_SEQS_KEPT",
    "RETRYABLE_UPGRADE_STATUSES",
    "StreamFailure",
    "StreamPhase",
    "TOKEN_EXPIRED_REASON",
    "WelcomeOutcome",
    "close_decision",
    "close_meaning",
    "is_retryable_close",
    "local_cancel_finish",
    "policy_tables",
]

NORMAL_CLOSURE = 1000
#: A close frame without a status code (RFC 6455 reserves 1005 for "none was received").
NO_STATUS = 1005
#: No close frame at all: the connection dropped (RFC 6455 1006).
ABNORMAL_CLOSURE = 1006
#: The reason of the relay's 4401 close when a token runs out on an open connection.
TOKEN_EXPIRED_REASON = "token expired"
#: The error code a client surfaces for a stream lost with its connection.
CONNECTION_LOST = "connection_lost"
#: HTTP statuses at the WebSocket upgrade worth retrying (a draining relay, an overloaded
#: proxy). Only the Python client sees them; a browser reports every refused upgrade as 1006.
RETRYABLE_UPGRADE_STATUSES = frozenset({429, 500, 502, 503, 504})
#: How many recent seqs relay-client.js keeps in ``stream.seqs`` (a debugging window).
RECENT_SEQS_KEPT = 64

# Close codes no relay sends but a client sees: (retryable, meaning).
_CLIENT_SIDE_CODES: dict[int, tuple[str, bool, str]] = {
    NORMAL_CLOSURE: ("NORMAL", False, "closed normally"),
    NO_STATUS: ("NO_STATUS", True,
                "closed without a status code (by a proxy in between); reconnect"),
    ABNORMAL_CLOSURE: ("ABNORMAL", True, "connection lost (network drop, server "
                       "unreachable, or handshake refused)"),
}


def _close_table() -> dict[int, tuple[str, bool, str]]:
    table = dict(_CLIENT_SIDE_CODES)
    for code in CloseCode:
        table[int(code)] = (code.name, code.retryable, code.meaning)
    return dict(sorted(table.items()))


#: code -> (name, retryable, meaning), the relay's ``CloseCode`` plus 1000/1005/1006.
CLOSE_CODES: dict[int, tuple[str, bool, str]] = _close_table()


def is_retryable_close(code: int | None) -> bool:
    """True when a connection that ended with ``code`` is worth reconnecting (rule 1 without
    the token-refresh exception). Unknown codes and ``None`` are not."""
    entry = CLOSE_CODES.get(code) if code is not None else None
    return entry[1] if entry else False


def close_meaning(code: int | None) -> str:
    """One line a UI can show for ``code``."""
    entry = CLOSE_CODES.get(code) if code is not None else None
    return entry[2] if entry else f"closed with code {code}"


@dataclass(frozen=True)
class CloseDecision:
    """What a client does after its connection ended with ``code``/``reason``.

    ``retry``: reconnect (with :data:`BACKOFF`). ``refresh_token``: the retry is the token
    refresh of rule 1 (the token function is called anyway before every connect; this says
    why the close was not final). ``resend_unanswered_starts``: starts that got neither
    ``started`` nor ``error`` are sent again on the next connection (only on that refresh).
    ``error_code`` is what a stream that cannot survive surfaces."""

    code: int
    reason: str
    retry: bool
    meaning: str
    refresh_token: bool = False
    resend_unanswered_starts: bool = False
    error_code: str = CONNECTION_LOST


def close_decision(code: int | None, reason: str = "", *, welcomed: bool,
                   token_refreshable: bool) -> CloseDecision:
    """Rule 1. ``welcomed``: the connection that ended had received ``welcome``.
    ``token_refreshable``: the client's token is a function (a fresh one can be had).
    ``None`` (the client could not tell) counts as 1006."""
    if code is None:
        code = ABNORMAL_CLOSURE
    reason = reason or ""
    if (code == CloseCode.NOT_AUTHENTICATED and reason == TOKEN_EXPIRED_REASON
            and welcomed and token_refreshable):
        return CloseDecision(code, reason, True, close_meaning(code), refresh_token=True,
                             resend_unanswered_starts=True)
    return CloseDecision(code, reason, is_retryable_close(code), close_meaning(code))


@dataclass(frozen=True)
class Backoff:
    """Rule 2: ``delay(n) = min(cap, base * factor**n) * (jitter_min + (jitter_max -
    jitter_min) * r)`` for attempt ``n`` (0-based) and ``r`` uniform in [0, 1)."""

    base: float = 0.5
    factor: float = 2.0
    cap: float = 15.0
    jitter_min: float = 0.5
    jitter_max: float = 1.0
    max_attempts: int = 8

    def delay_bounds(self, attempt: int) -> tuple[float, float]:
        """The smallest and largest delay of attempt ``attempt`` (0-based)."""
        if attempt < 0:
            raise ValueError("attempt must be >= 0")
        # Overflow-free for any attempt: past the cap the exponent no longer matters.
        exp = self.cap if attempt > 64 else min(self.cap, self.base * self.factor ** attempt)
        return exp * self.jitter_min, exp * self.jitter_max

    def delay(self, attempt: int, r: float) -> float:
        """The delay of attempt ``attempt`` for the random number ``r`` in [0, 1)."""
        low, high = self.delay_bounds(attempt)
        return low + (high - low) * r


BACKOFF = Backoff()
MAX_RECONNECT_ATTEMPTS = BACKOFF.max_attempts


@dataclass
class ReconnectSchedule:
    """Rule 2 over time: after a loss the policy retries, :meth:`next_delay` gives each
    attempt's delay until ``max_attempts`` attempts were made (then ``None``: give up);
    :meth:`welcomed` (a connection was welcomed) starts the count again. ``max_attempts``
    ``None`` is unlimited."""

    backoff: Backoff = BACKOFF
    max_attempts: int | None = MAX_RECONNECT_ATTEMPTS
    attempt: int = 0

    def next_delay(self, r: float) -> float | None:
        """The delay before the next attempt (``r`` uniform in [0, 1)), or ``None``."""
        if self.max_attempts is not None and self.attempt >= self.max_attempts:
            return None
        delay = self.backoff.delay(self.attempt, r)
        self.attempt += 1
        return delay

    def welcomed(self) -> None:
        self.attempt = 0


def local_cancel_finish(stream_id: str) -> frames.Frame:
    """Rule 7: the ``finish`` of a stream cancelled before its ``start`` left the client.
    Valid against the schema (``llm_relay_protocol.Finish``): seq 0, zero usage flagged estimated."""
    return frames.finish(stream_id, 0, str(FinishStatus.CANCELLED),
                         str(FinishReason.CLIENT_CANCEL), frames.usage(0, 0, True))


# ---------------------------------------------------------------------------- streams


class StreamPhase(StrEnum):
    """Where a stream stands, from the client's side.

    ``queued`` (start not handed to a connection) -> ``sent`` (start sent, no answer) ->
    ``streaming`` (``started`` received) -> ``resuming`` (connection lost, resume due or
    sent, no ``resumed`` yet) -> ``streaming`` ... A stream leaves the tracker when it ends
    (``finish``, failure, local cancel)."""

    QUEUED = "queued"
    SENT = "sent"
    STREAMING = "streaming"
    RESUMING = "resuming"


class FrameAction(StrEnum):
    """What to do with a server frame (:meth:`ClientStreamTracker.frame`)."""

    DELIVER = "deliver"          # hand it to the stream's reader
    END = "end"                  # deliver it, then the stream is over (its ``finish``)
    DUPLICATE = "duplicate"      # a replayed seq: drop it
    RESUMED = "resumed"          # the resume succeeded; send ``cancel`` if ``send_cancel``
    FAIL = "fail"                # ``failures`` end their streams
    CONNECTION_ERROR = "connection_error"  # an ``error`` without id: keep/log it
    IGNORE = "ignore"            # not for a tracked stream (unknown id, cancel race, ...)


class CancelAction(StrEnum):
    """What :meth:`ClientStreamTracker.cancel` asks the client to do."""

    LOCAL_FINISH = "local_finish"  # deliver local_cancel_finish(id); nothing is sent
    SEND = "send"                  # send {"type": "cancel", "id": id} now
    AFTER_RESUME = "after_resume"  # sent when ``resumed`` arrives (FrameDecision.send_cancel)
    NONE = "none"                  # unknown, already ended, or already requested


@dataclass(frozen=True)
class StreamFailure:
    """A stream ends without ``finish``. ``kind``: ``rejected`` (start refused),
    ``resume_refused``, ``taken_over`` or ``connection_lost``; ``code`` is the relay's error
    code or ``connection_lost``; ``close_code`` the close that ended its connection."""

    id: str
    kind: str
    code: str
    message: str
    close_code: int | None = None
    frame: ServerFrame | None = None


@dataclass(frozen=True)
class FrameDecision:
    action: FrameAction
    id: str | None = None
    failures: tuple[StreamFailure, ...] = ()
    send_cancel: bool = False


@dataclass(frozen=True)
class LossOutcome:
    """After a connection loss: streams waiting for a resume, starts to send again (rule 3's
    exception), and streams that failed."""

    resuming: tuple[str, ...]
    resend: tuple[str, ...]
    failed: tuple[StreamFailure, ...]


@dataclass(frozen=True)
class WelcomeOutcome:
    """After a ``welcome``: the ``resume`` frames to send first, then the starts to send
    (queued streams, in order), and streams that cannot be resumed on this relay."""

    resumes: tuple[frames.Frame, ...]
    starts: tuple[str, ...]
    failed: tuple[StreamFailure, ...]


@dataclass
class _Stream:
    id: str
    phase: StreamPhase = StreamPhase.QUEUED
    stream_key: str | None = None
    last_seq: int = -1
    cancel_requested: bool = False
    resumes: int = 0


def _get(frame: ServerFrame, name: str) -> object:
    if isinstance(frame, Mapping):
        return frame.get(name)
    return getattr(frame, name, None)


_STREAM_FRAMES = frozenset(STREAM_FRAME_TYPES)


@dataclass
class ClientStreamTracker:
    """The streams of one client across its connections (rules 3-7), h11-style: methods
    take what happened and return what to do; nothing here sends, sleeps or raises for a
    peer's behaviour. Frames may be dicts or ``llm_relay_protocol`` models.

    Call order: :meth:`add` when the application creates a stream, :meth:`start_sent` when
    its ``start`` goes out, :meth:`frame` for every server frame, :meth:`cancel` on a local
    cancel, :meth:`connection_lost` when the connection ends (with :func:`close_decision`'s
    answer and the *old* ``detach_grace``), :meth:`welcomed` on each new ``welcome``, and
    :meth:`fail_all` when the client closes for good."""

    streams: dict[str, _Stream] = field(default_factory=dict)
    last_close_code: int | None = None

    # ---------------------------------------------------------------- application side

    def add(self, stream_id: str) -> None:
        """A new stream, its ``start`` not sent yet. ValueError if the id is live."""
        if stream_id in self.streams:
            raise ValueError(f"stream id {stream_id!r} is already in use")
        self.streams[stream_id] = _Stream(stream_id)

    def watch(self, stream_id: str, stream_key: str, after_seq: int = 0, *,
              takeover: bool = False) -> dict[str, Any]:
        """Rule 6: a stream started elsewhere, watched under ``stream_id``: it waits for
        ``resumed`` (phase ``resuming``). Returns the ``resume`` frame to send now if the
        connection is open (else :meth:`welcomed` sends it, without ``takeover``: a
        reconnect never ends other viewers). ValueError if the id is live."""
        if stream_id in self.streams:
            raise ValueError(f"stream id {stream_id!r} is already in use")
        if not stream_key:
            raise ValueError("stream_key must not be empty")
        self.streams[stream_id] = _Stream(stream_id, StreamPhase.RESUMING, stream_key,
                                          max(after_seq, 0))
        return frames.resume(stream_key, max(after_seq, 0), stream_id, takeover=takeover)

    def start_sent(self, stream_id: str) -> None:
        """Its ``start`` was handed to a connection: from now on never sent again (rule 3)."""
        self.streams[stream_id].phase = StreamPhase.SENT

    def phase(self, stream_id: str) -> StreamPhase | None:
        s = self.streams.get(stream_id)
        return s.phase if s else None

    def stream_key(self, stream_id: str) -> str | None:
        s = self.streams.get(stream_id)
        return s.stream_key if s else None

    def last_seq(self, stream_id: str) -> int:
        s = self.streams.get(stream_id)
        return s.last_seq if s else -1

    def resumes(self, stream_id: str) -> int:
        s = self.streams.get(stream_id)
        return s.resumes if s else 0

    def forget(self, stream_id: str) -> None:
        """The application dropped the stream (e.g. its start could not be sent)."""
        self.streams.pop(stream_id, None)

    def cancel(self, stream_id: str) -> CancelAction:
        """Rule 7. A queued stream leaves the tracker (deliver :func:`local_cancel_finish`)."""
        s = self.streams.get(stream_id)
        if s is None or s.cancel_requested:
            return CancelAction.NONE
        s.cancel_requested = True
        if s.phase is StreamPhase.QUEUED:
            del self.streams[stream_id]
            return CancelAction.LOCAL_FINISH
        if s.phase is StreamPhase.RESUMING:
            return CancelAction.AFTER_RESUME
        return CancelAction.SEND

    # ---------------------------------------------------------------- relay side

    def frame(self, frame: ServerFrame) -> FrameDecision:
        """Rules 4 and 5 for one server frame (any type; welcome/pong are IGNORE here)."""
        kind = _get(frame, "type")
        sid = _get(frame, "id")
        if kind == "error":
            return self._error(frame, sid if isinstance(sid, str) else None)
        s = self.streams.get(sid) if isinstance(sid, str) else None
        if s is None:
            return FrameDecision(FrameAction.IGNORE, sid if isinstance(sid, str) else None)
        if kind == "resumed":
            if s.phase is not StreamPhase.RESUMING:
                return FrameDecision(FrameAction.IGNORE, s.id)
            s.phase = StreamPhase.STREAMING
            s.resumes += 1
            return FrameDecision(FrameAction.RESUMED, s.id, send_cancel=s.cancel_requested)
        if kind not in _STREAM_FRAMES:
            return FrameDecision(FrameAction.IGNORE, s.id)  # a frame type from the future
        seq = _get(frame, "seq")
        if isinstance(seq, int) and not isinstance(seq, bool):
            if seq <= s.last_seq:
                return FrameDecision(FrameAction.DUPLICATE, s.id)
            s.last_seq = seq
        if kind == "started":
            key = _get(frame, "stream_key")
            if isinstance(key, str) and key:
                s.stream_key = key
        if s.phase is not StreamPhase.RESUMING:
            s.phase = StreamPhase.STREAMING
        # A live frame while still "resuming" is possible only if resumed was lost; the
        # stream stays resuming until resumed, so a deferred cancel still follows it.
        if kind == "finish":
            del self.streams[s.id]
            return FrameDecision(FrameAction.END, s.id)
        return FrameDecision(FrameAction.DELIVER, s.id)

    def _error(self, frame: ServerFrame, sid: str | None) -> FrameDecision:
        raw_code, raw_message = _get(frame, "code"), _get(frame, "message")
        code = raw_code if isinstance(raw_code, str) else "error"
        message = raw_message if isinstance(raw_message, str) else code
        ref = _get(frame, "ref")
        if sid is None:
            if ref != "resume":
                return FrameDecision(FrameAction.CONNECTION_ERROR)
            failures = tuple(
                self._fail(s, "resume_refused", code, f"resume refused: {code}: {message}",
                           self.last_close_code, frame)
                for s in list(self.streams.values()) if s.phase is StreamPhase.RESUMING)
            return FrameDecision(FrameAction.FAIL, None, failures)
        if ref == "cancel":
            return FrameDecision(FrameAction.IGNORE, sid)  # the cancel raced the finish
        s = self.streams.get(sid)
        if s is None:
            return FrameDecision(FrameAction.IGNORE, sid)
        if code == ErrorCode.STREAM_TAKEN_OVER:
            failure = self._fail(s, "taken_over", code, f"stream {sid!r} was taken over by "
                                 f"another connection: {message}", None, frame)
        elif ref == "resume" or s.phase is StreamPhase.RESUMING:
            failure = self._fail(s, "resume_refused", code, f"resume of stream {sid!r} "
                                 f"refused: {code}: {message}", self.last_close_code, frame)
        else:
            failure = self._fail(s, "rejected", code, message, None, frame)
        return FrameDecision(FrameAction.FAIL, sid, (failure,))

    def _fail(self, s: _Stream, kind: str, code: str, message: str,
              close_code: int | None, frame: ServerFrame | None = None) -> StreamFailure:
        self.streams.pop(s.id, None)
        return StreamFailure(s.id, kind, code, message, close_code, frame)

    # ---------------------------------------------------------------- connection side

    def connection_lost(self, decision: CloseDecision, detach_grace: float) -> LossOutcome:
        """Rule 3 at the loss. ``detach_grace``: the ended connection's welcome's (0 if it
        had none). On a final close every stream fails (queued ones too)."""
        self.last_close_code = decision.code
        text = f"{decision.code} ({decision.meaning})"
        if decision.reason:
            text += f": {decision.reason}"
        resuming: list[str] = []
        resend: list[str] = []
        failed: list[StreamFailure] = []
        for s in list(self.streams.values()):
            why = None
            if not decision.retry:
                why = "the close is final"
            elif s.phase is StreamPhase.QUEUED:
                continue  # its start goes out on the next connection
            elif s.phase is StreamPhase.SENT:
                if decision.resend_unanswered_starts:
                    s.phase = StreamPhase.QUEUED
                    resend.append(s.id)
                    continue
                why = "its start was not answered yet (it is never sent twice)"
            elif detach_grace <= 0:
                why = "the relay does not keep streams for resume (detach_grace 0)"
            elif not s.stream_key:
                why = "the stream had no stream_key"
            else:
                s.phase = StreamPhase.RESUMING
                resuming.append(s.id)
                continue
            failed.append(self._fail(s, CONNECTION_LOST, CONNECTION_LOST,
                                     f"connection lost during stream {s.id!r} ({text}); "
                                     f"cannot resume: {why}", decision.code))
        return LossOutcome(tuple(resuming), tuple(resend), tuple(failed))

    def welcomed(self, detach_grace: float) -> WelcomeOutcome:
        """Rule 3 on a new connection's ``welcome`` (its ``limits.detach_grace``)."""
        resumes: list[frames.Frame] = []
        failed: list[StreamFailure] = []
        starts: list[str] = []
        for s in list(self.streams.values()):
            if s.phase is StreamPhase.RESUMING:
                if detach_grace > 0 and s.stream_key:
                    resumes.append(frames.resume(s.stream_key, max(s.last_seq, 0), s.id))
                else:
                    failed.append(self._fail(
                        s, CONNECTION_LOST, CONNECTION_LOST,
                        f"connection lost during stream {s.id!r}; cannot resume: the relay "
                        "no longer offers resume (detach_grace 0)", self.last_close_code))
            elif s.phase is StreamPhase.QUEUED:
                starts.append(s.id)
        return WelcomeOutcome(tuple(resumes), tuple(starts), tuple(failed))

    def fail_all(self, code: str, message: str,
                 close_code: int | None) -> tuple[StreamFailure, ...]:
        """The client is closed for good: every stream fails with ``code``."""
        return tuple(self._fail(s, code, code, f"{message} (stream {s.id!r})", close_code)
                     for s in list(self.streams.values()))


# ---------------------------------------------------------------------------- export


def policy_tables() -> dict[str, Any]:   # Any: JSON tables, each key its own shape
    """Everything relay-client.js needs from this module, as plain JSON values."""
    return {
        "close_codes": {str(code): {"name": name, "retryable": retryable, "meaning": meaning}
                        for code, (name, retryable, meaning) in CLOSE_CODES.items()},
        "token_refresh": {"close_code": int(CloseCode.NOT_AUTHENTICATED),
                          "reason": TOKEN_EXPIRED_REASON, "requires_welcome": True,
                          "requires_token_function": True,
                          "resend_unanswered_starts": True},
        "backoff": {"base_ms": round(BACKOFF.base * 1000), "factor": BACKOFF.factor,
                    "cap_ms": round(BACKOFF.cap * 1000), "jitter_min": BACKOFF.jitter_min,
                    "jitter_max": BACKOFF.jitter_max, "max_attempts": BACKOFF.max_attempts},
        "connection_lost_code": CONNECTION_LOST,
        "taken_over_code": str(ErrorCode.STREAM_TAKEN_OVER),
        "local_cancel_finish": local_cancel_finish("<id>"),
        "recent_seqs_kept": RECENT_SEQS_KEPT,
        "frames": frame_tables(),
    }


def frame_tables() -> dict[str, Any]:    # Any: JSON tables, each key its own shape
    """What relay-client.js needs to build and route frames, derived from the models of
    ``llm_relay_protocol.messages``: each client frame type with its ``required`` and ``optional``
    fields in the models' order (relay-client.js builds ``hello``/``start``/``cancel``/
    ``ping``/``resume`` from it and refuses a field the model does not have), every server
    frame type, and the server frames of a stream's sequence (those carrying ``seq``)."""
    client: dict[str, dict[str, list[str]]] = {}
    for model in union_members(ClientMessage):
        fields = {name: info for name, info in model.model_fields.items() if name != "type"}
        client[model_tag(model)] = {
            "required": [name for name, info in fields.items() if info.is_required()],
            "optional": [name for name, info in fields.items() if not info.is_required()],
        }
    return {"client": client, "client_types": list(CLIENT_FRAME_TYPES),
            "server_types": list(SERVER_FRAME_TYPES),
            "stream_types": list(STREAM_FRAME_TYPES)}


def render_js_module() -> str:
    """The text of ``clients/js/client-policy.js``."""
    body = json.dumps(policy_tables(), indent=2, sort_keys=True)
    return ("// Generated by `python -m llm_relay_protocol.client_policy --write` from "
            "clients/python/llm_relay_protocol/client_policy.py.\n// Do not edit: change the Python policy and "
            "regenerate (a test checks this file is fresh).\n"
            f"export default Object.freeze({body});\n")


JS_MODULE_PATH = "clients/js/client-policy.js"


def main(argv: list[str]) -> int:
    """``--json``: print the tables; ``--write [ROOT]``: write the JS module under ROOT
    (default: the repository holding this package)."""
    if argv[:1] == ["--json"]:
        print(json.dumps(policy_tables(), indent=2, sort_keys=True))
        return 0
    if argv[:1] == ["--write"]:
        from pathlib import Path

        # Default: the checkout holding this package (the nearest folder above it that has
        # the JS client's folder), wherever the package sits inside it.
        here = Path(__file__).resolve()
        root = (Path(argv[1]) if len(argv) > 1 else
                next(p for p in here.parents if (p / JS_MODULE_PATH).parent.is_dir()))
        (root / JS_MODULE_PATH).write_text(render_js_module(), encoding="utf-8")
        return 0
    print("usage: python -m llm_relay_protocol.client_policy --json | --write [ROOT]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
