"""One connection's protocol decisions, sans-I/O: handshake, admission, every close and error.

``Connection`` is a relay connection as a state machine, whatever its wire dialect. A
dialect is a sans-I/O codec (``llm_relay_protocol.dialect.Codec``: llm-relay.v1 on /ws, the AI SDK's
chat transport on /ai-sdk) that turns the dialect's frames into the core's requests and the
core's replies into its frames; this machine is the same for all of them. It imports
nothing of the event loop or the socket: ``handle(event)`` takes what happened (an inbound
frame, the hello timer expired, a flood, a slow consumer, a bug, a restart...) and returns
the *actions* the glue (``relay.runtime.session.Session``, which keeps only the socket, the
writer and the timers) carries out in order: send a reply, close with a code and reason,
start/cancel/resume a stream, adopt credentials. It changes nothing outside itself: moving
a connection's accounting to its principal (``AdoptCredentials``) and taking a start from
the principal's start rate (``ChargeStart``) are actions the glue carries out; the machine
reads the relay's counts through a read-only view
(``PrincipalsView``). Nothing else in relay/ chooses a close code for a connection: the
server's refusals at the door (``refuse_at_door``), its shutdown (``server_shutdown_close``)
and its last resort for a crashed session (``internal_error_close``) and the HTTP-only
endpoints' refusal are the small pure functions at the end of this module
(tests/relay/test_connection.py checks the sources of relay/ for it).

Phases (``Phase``): ``OPENING`` -> ``AWAITING_HELLO`` (a dialect with ``Handshake.HELLO``)
or ``AWAITING_CREDENTIALS`` (``Handshake.NONE`` with auth on and no credentials on the
upgrade) -> ``WELCOMED`` -> ``CLOSING`` (``CLOSED`` once the socket is gone). The rules:

* ``Opened``: a dialect with a ``subprotocol`` and a connection that negotiated another one
  closes **4406** naming it. ``Handshake.HELLO``: ``AWAITING_HELLO``. ``Handshake.NONE``:
  auth off -> ``HelloAccepted``, ``WELCOMED``; with auth, an ``Authorization`` header on the
  upgrade is authenticated as a hello's would be (below); without one a dialect with
  ``per_request_credentials`` waits in ``AWAITING_CREDENTIALS`` (holding its pending slot
  until a request authenticates it), any other closes **4401** ``missing token``.
* ``HelloTimedOut`` while awaiting hello or credentials: close **4408** ``no hello within
  N s`` (``no credentials within N s``).
* Every ``FrameReceived`` is decoded by the dialect's codec into one request
  (``llm_relay_protocol.dialect``). While awaiting hello, anything but a ``Greet`` closes **4401**
  ``first frame must be hello: <problem>``. A greeting with auth on is authenticated
  (``Authorization`` header first, else its token): a failure closes **4401** with the
  ``AuthError`` reason; a principal already at ``max_connections_per_principal`` closes
  **4429**; otherwise ``AdoptCredentials`` (the glue moves the accounting from the address
  to the principal). Then ``HelloAccepted`` and ``SendFrame(welcome)``: ``WELCOMED``.
* Per-request credentials (``Begin``/``Reattach`` of such a dialect): checked like the
  upgrade header (``Authenticator.check_header``); wrong, expired or malformed ones close
  **4401** with the reason (a guess costs a connection, as with a hello). Valid ones
  authenticate a connection still awaiting them (the cap **4429**, as above); a connection
  acts for one principal, so another principal's are refused (``error``, the connection
  stays). None while awaiting credentials -> ``error`` ``Not authenticated: missing
  credentials.``; None on an authenticated connection whose token has expired ->
  ``CloseWhenStreamsEnd`` (once) and ``error`` ``Not authenticated: token expired.``.
* After that every request gets a defined answer, and exceptions become ``error`` replies
  only here (``ActionFailed``: ``RelayError`` -> its code; ``FrameError`` -> its frame;
  anything else -> ``internal_error``, the glue having logged the traceback):
  ``Malformed`` -> its ``error`` (``bad_request``), or close **1008** when the dialect
  cannot answer it (no request id to correlate); a second ``Greet`` -> ``bad_request``;
  ``Probe`` -> ``pong``; ``Stop`` of an id not running here -> ``unknown_stream`` (strict)
  or nothing, else ``CancelStream``; ``Reattach`` -> ``ResumeStream`` (the hub decides,
  refusals come back as ``ActionFailed``); ``Begin`` -> the dialect's own refusal, if any
  (``FrameReceived.dialect_refusal``), then ``invalid`` -> ``bad_request``, else
  admission, below.
* Admission of a ``Begin``, in this order (PROTOCOL.md "start", "Limits and refusals at the
  door"; the frame's decode limits and validation come first, in the codec): the token has
  expired -> no answer, and ``CloseWhenStreamsEnd`` **4401** ``token expired`` (once); the
  token's ``models`` claim -> ``unknown_model`` (worded as for an alias that does not
  exist); the token's ``max_streams`` claim -> ``too_many_streams``; the principal's
  completion token budget -> ``rate_limited``; draining -> ``draining``; the principal's
  start rate -> ``rate_limited``; a running id -> ``duplicate_id``; the connection's stream
  cap -> ``too_many_streams``; the principal's stream cap -> ``too_many_streams``. Passed:
  ``StartStream``; what the glue checks then (the alias and its ``max_tokens`` ceiling, the
  group's limits on Redis) comes back as ``ActionFailed``.
* Closes once reading: ``TooManyFrames`` **4429**; ``SlowConsumer`` **4008** (three kinds,
  PROTOCOL.md "Backpressure"); ``TokenExpiredStreamsDone`` **4401** ``token expired``;
  ``InternalFailure`` **1011**; ``ServerRestart`` **1012**. The first close decision wins:
  once ``CLOSING``, later ones return no action. Frames that arrive while closing are not
  answered.
* Unprompted errors of attached streams: ``StreamFailed`` (a followed stream cannot go on)
  and ``StreamTakenOver`` (a resume took the stream elsewhere) -> one ``error`` naming the
  id the stream has on this connection, ``ref: "resume"``.

Replies (``SendFrame``) are v1 server frames, the core's vocabulary; the glue has the
dialect's codec encode them when it sends them (``Codec.encode_reply``).

Call order: construct once per accepted socket, feed ``Opened`` first; ``handle`` never
blocks and never raises for client input (a caller bug, such as a frame fed before
``Opened``, raises ``IllegalEvent``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from llm_relay_protocol import CloseCode, ErrorCode, FrameError, PROTOCOL_VERSION, Start, frames
from llm_relay_protocol.codec import DecodeLimits
from llm_relay_protocol.dialect import (Begin, Codec, Greet, Handshake, Ignore, Malformed, Probe,
                              Reattach, Request, Stop)
from llm_relay_protocol.frames import Frame
from llm_relay_protocol.v1 import V1Codec

from relay.core.auth import AuthError
from relay.core.errors import (Draining, DuplicateId, NotAuthenticated, RateLimited, RelayError,
                               TooManyStreams, UnknownModel)
from relay.core.limits import PrincipalState

if TYPE_CHECKING:
    from relay.config import RelaySettings
    from relay.core.auth import Authenticator, Credentials

__all__ = [
    "ActionFailed", "AdoptCredentials", "CancelStream", "ChargeStart", "Close",
    "CloseWhenStreamsEnd",
    "Connection", "ConnectionLimits", "Door", "FrameReceived", "HelloAccepted",
    "HelloTimedOut", "IllegalEvent", "InternalFailure", "Opened", "Phase", "PrincipalsView",
    "ResumeStream", "SendFrame", "ServerRestart", "SlowConsumer", "Slowness", "SocketClosed",
    "StartStream", "StreamFailed", "StreamTakenOver", "TokenExpiredStreamsDone",
    "TooManyFrames", "close_reason", "internal_error_close", "legal_pairs",
    "not_a_websocket_endpoint", "refuse_at_door", "server_shutdown_close",
    "unanswerable_frame",
]


class Phase(enum.Enum):
    OPENING = "opening"
    AWAITING_HELLO = "awaiting-hello"
    #: A dialect without hello, with auth on, until a request authenticates it.
    AWAITING_CREDENTIALS = "awaiting-credentials"
    WELCOMED = "welcomed"
    CLOSING = "closing"
    CLOSED = "closed"


class IllegalEvent(RuntimeError):
    """An event the glue must not feed in the current phase (a bug in the glue)."""


class PrincipalsView(Protocol):
    """What the machine reads of the relay-wide accounting (``relay.core.limits.Principals``):
    it never changes it (``AdoptCredentials`` is the glue's)."""

    def connections_of(self, principal: str) -> int:
        """Open connections of ``principal`` now."""
        ...

    def state_of(self, principal: str) -> PrincipalState:
        """The principal's limits state (its start rate, budget, stream count), the one its
        connections share (entered in the registry if new; no count changes)."""
        ...


# ---------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Opened:
    """The upgrade was accepted. ``subprotocol``: the one negotiated; ``headers``: the
    upgrade request's (``Authorization``)."""

    subprotocol: str | None
    headers: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class HelloTimedOut:
    """``hello_timeout`` passed since ``Opened`` (the glue's timer)."""


@dataclass(frozen=True, slots=True)
class FrameReceived:
    """One inbound WebSocket message. ``open_ids``: the ids of the streams attached to this
    connection now; ``draining``: the relay refuses new starts; ``dialect_refusal``: the
    dialect's own rule for a ``Begin``, a read-only question asked after its credentials
    and before its admission (the AI SDK's one active response per chat), answering the
    refusal or None."""

    raw: str | bytes
    open_ids: Collection[str] = ()
    draining: bool = False
    dialect_refusal: Callable[[Begin], RelayError | None] | None = None


@dataclass(frozen=True, slots=True)
class ActionFailed:
    """Carrying out an action for ``msg`` (a request, or None) raised ``exc``. Anything but
    ``RelayError``/``FrameError`` is a relay bug, already logged by the glue."""

    msg: Request | None
    exc: Exception


@dataclass(frozen=True, slots=True)
class StreamFailed:
    id: str
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class StreamTakenOver:
    id: str


@dataclass(frozen=True, slots=True)
class TooManyFrames:
    """The connection's inbound frame budget is spent (every frame, and an AI SDK resume's
    replay, is paid from it)."""


class Slowness(enum.Enum):
    """Why a client counts as a slow consumer (PROTOCOL.md "Backpressure")."""

    #: Its backlog stayed above ``slow_consumer_bytes`` for ``slow_consumer_grace``.
    BACKLOG = "backlog"
    #: Its queued control frames alone exceeded twice ``slow_consumer_bytes``.
    CONTROL_QUEUE = "control-queue"
    #: A stream's log had to drop frames it had not been sent.
    LOG_TRIMMED = "log-trimmed"


@dataclass(frozen=True, slots=True)
class SlowConsumer:
    kind: Slowness


@dataclass(frozen=True, slots=True)
class TokenExpiredStreamsDone:
    """The streams that ran when the token's expiry was noticed have ended."""


@dataclass(frozen=True, slots=True)
class InternalFailure:
    """A task of the connection failed with a bug (logged by the glue)."""


@dataclass(frozen=True, slots=True)
class ServerRestart:
    """Relays share streams through Redis and this one restarts."""


@dataclass(frozen=True, slots=True)
class SocketClosed:
    pass


Event = (Opened | HelloTimedOut | FrameReceived | ActionFailed | StreamFailed
         | StreamTakenOver | TooManyFrames | SlowConsumer | TokenExpiredStreamsDone
         | InternalFailure | ServerRestart | SocketClosed)


# ---------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class SendFrame:
    """Send this reply: a v1 server frame (dict, as built by ``llm_relay_protocol.frames``), which the
    glue has the connection's codec encode in its dialect (``Codec.encode_reply``)."""

    frame: Frame


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection with ``code`` and ``reason`` (at most 123 UTF-8 bytes).
    ``note``: a line for the log saying why (None: the caller's own log line suffices)."""

    code: int
    reason: str
    note: str | None = None


@dataclass(frozen=True, slots=True)
class CloseWhenStreamsEnd:
    """Let the running streams finish and their frames go out, then feed
    ``TokenExpiredStreamsDone``."""


@dataclass(frozen=True, slots=True)
class AdoptCredentials:
    """Authenticated: the connection acts for ``credentials.principal`` from now on. The
    glue moves its accounting (one connection) from ``previous`` (its address) to the
    principal, whose state (``state``) the machine reads from now on."""

    credentials: Credentials
    previous: str
    state: PrincipalState


@dataclass(frozen=True, slots=True)
class ChargeStart:
    """A ``Begin`` passed the principal's start-rate check: the glue takes one start from
    ``state.starts`` (the machine only reads the bucket, it never changes the relay's
    accounting)."""

    state: PrincipalState


@dataclass(frozen=True, slots=True)
class HelloAccepted:
    """The hello passed (or, on a dialect without hello, the connection is authenticated or
    needs no credentials): the connection no longer counts as awaiting one."""


@dataclass(frozen=True, slots=True)
class StartStream:
    """An admitted ``Begin``: launch its stream (``request.start``)."""

    request: Begin

    @property
    def msg(self) -> Start:
        assert self.request.start is not None
        return self.request.start


@dataclass(frozen=True, slots=True)
class CancelStream:
    """Cancel the stream attached as ``id`` (``request``: the ``Stop`` asking it)."""

    request: Stop

    @property
    def id(self) -> str:
        return self.request.id


@dataclass(frozen=True, slots=True)
class ResumeStream:
    """Attach the stream a ``Reattach`` asks for (the hub, or the dialect's adapter, finds
    it)."""

    request: Reattach


Action = (SendFrame | Close | CloseWhenStreamsEnd | AdoptCredentials | HelloAccepted
          | ChargeStart | StartStream | CancelStream | ResumeStream)


# ---------------------------------------------------------------------------- the machine


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """The settings a connection's decisions read. Every limit is required: the one place
    for their defaults is ``relay.config.RelaySettings`` (build with ``from_settings``), so a
    connection never runs on numbers the operator did not configure. ``decode_limits``:
    None = the protocol's defaults."""

    hello_timeout: float
    max_streams: int
    max_streams_per_principal: int
    max_frame_bytes: int
    detach_grace: float
    slow_consumer_bytes: int
    slow_consumer_grace: float
    max_connections_per_principal: int
    decode_limits: DecodeLimits | None = field(default=None, compare=False)

    @classmethod
    def from_settings(cls, settings: RelaySettings) -> ConnectionLimits:
        return cls(
            hello_timeout=settings.hello_timeout, max_streams=settings.max_streams,
            max_streams_per_principal=settings.max_streams_per_principal,
            max_frame_bytes=settings.max_frame_bytes, detach_grace=settings.detach_grace,
            slow_consumer_bytes=settings.slow_consumer_bytes,
            slow_consumer_grace=settings.slow_consumer_grace,
            max_connections_per_principal=settings.max_connections_per_principal,
            decode_limits=settings.decode_limits())


class Connection:
    """The decisions of one connection (module docstring). ``codec``: its dialect (default
    llm-relay.v1); ``models``: the relay's aliases (the first is the default model of a
    dialect whose requests may omit one); ``principal``/``principal_state``: who the
    connection counts for until authentication moves it; ``auth``: None or a disabled
    Authenticator means no auth; ``principals``: the relay's accounting, read only (needed
    with auth, for the per-principal connection cap)."""

    def __init__(self, limits: ConnectionLimits, *, session_id: str, models: Sequence[str],
                 codec: Codec | None = None,
                 principal: str = "anonymous", principal_state: PrincipalState | None = None,
                 auth: Authenticator | None = None,
                 principals: PrincipalsView | None = None) -> None:
        self.limits = limits
        self.codec: Codec = codec if codec is not None else V1Codec()
        self.session_id = session_id
        self.models = list(models)
        self.principal = principal
        self.principal_state = principal_state or PrincipalState()
        self.auth = auth if auth is not None and auth.enabled else None
        self.principals = principals
        self.credentials: Credentials | None = None
        self.phase = Phase.OPENING
        self._decode_limits = limits.decode_limits or DecodeLimits()
        self._headers: Mapping[str, str] | None = None
        self._expiry_noticed = False
        self._start_charged = False

    # ------------------------------------------------------------------ entry point

    def handle(self, event: Event) -> list[Action]:
        """The actions for ``event``, in the order the glue carries them out."""
        phase = self.phase
        if isinstance(event, SocketClosed):
            self.phase = Phase.CLOSED
            return []
        if phase in (Phase.CLOSING, Phase.CLOSED):
            return []           # the first close decision wins; nothing more is answered
        if phase not in _LEGAL.get(type(event), ()):
            raise IllegalEvent(f"{type(event).__name__} in phase {phase.value!r} "
                               f"({self.codec.name})")
        if isinstance(event, Opened):
            return self._opened(event)
        if isinstance(event, HelloTimedOut):
            awaited = "hello" if phase is Phase.AWAITING_HELLO else "credentials"
            return self._close(CloseCode.HELLO_TIMEOUT,
                               f"no {awaited} within {self.limits.hello_timeout:g} s")
        if isinstance(event, FrameReceived):
            request = self.codec.decode(event.raw, self._decode_limits,
                                        self.models[0] if self.models else "")
            if phase is Phase.AWAITING_HELLO:
                return self._first_frame(request)
            return self._request(request, event)
        if isinstance(event, ActionFailed):
            return [SendFrame(error_frame_for(event.msg, event.exc))]
        if isinstance(event, StreamFailed):
            return [SendFrame(frames.error(event.code, event.message, ref="resume",
                                           id=event.id))]
        if isinstance(event, StreamTakenOver):
            return [SendFrame(frames.error(
                ErrorCode.STREAM_TAKEN_OVER, f"stream {event.id!r} was taken over by a resume "
                "of its stream_key; its frames go to that attachment from now on",
                ref="resume", id=event.id))]
        if isinstance(event, TooManyFrames):
            return self._close(CloseCode.TOO_MANY, "too many frames; slow down and reconnect")
        if isinstance(event, SlowConsumer):
            return self._close(CloseCode.SLOW_CONSUMER, self._slow_reason(event.kind))
        if isinstance(event, TokenExpiredStreamsDone):
            return self._close(CloseCode.NOT_AUTHENTICATED, "token expired")
        if isinstance(event, InternalFailure):
            self.phase = Phase.CLOSING
            return [internal_error_close()]
        assert isinstance(event, ServerRestart)          # (_LEGAL lists no other event)
        return self._close(CloseCode.SERVICE_RESTART, "relay restarting; reconnect and resume")

    # ------------------------------------------------------------------ derived facts

    def stream_cap(self) -> int:
        """Concurrent streams on this connection: the setting, lowered by a token's
        ``max_streams`` claim."""
        claim = self.credentials.max_streams if self.credentials is not None else None
        cap = self.limits.max_streams
        return cap if claim is None else min(cap, claim)

    def visible_models(self) -> list[str]:
        """``welcome.models``: the aliases, filtered by the token's ``models`` claim."""
        allowed = self.credentials.models if self.credentials is not None else None
        return self.models if allowed is None else [a for a in self.models if a in allowed]

    def room_for(self, id: str, open_ids: Collection[str]) -> RelayError | None:
        """Why a stream with ``id`` cannot be attached here now (a running id, the
        connection's stream cap), or None. For ``start`` and ``resume`` alike."""
        if id in open_ids:
            return DuplicateId(f"a stream with id {id!r} is already running", id=id)
        cap = self.stream_cap()
        if len(open_ids) >= cap:
            return TooManyStreams(f"at most {cap} concurrent streams per connection", id=id)
        return None

    # ------------------------------------------------------------------ internals

    def _close(self, code: CloseCode, reason: str, note: str | None = None) -> list[Action]:
        self.phase = Phase.CLOSING
        return [Close(int(code), close_reason(reason), note)]

    def _closed_by(self, close: Close) -> list[Action]:
        self.phase = Phase.CLOSING
        return [close]

    def _opened(self, event: Opened) -> list[Action]:
        self._headers = event.headers
        codec = self.codec
        if codec.subprotocol is not None and event.subprotocol != codec.subprotocol:
            return self._close(CloseCode.UNSUPPORTED_VERSION,
                               f"unsupported protocol version; supported: {codec.subprotocol}")
        if codec.handshake is Handshake.HELLO:
            self.phase = Phase.AWAITING_HELLO
            return []
        auth = self.auth
        if auth is None:
            self.phase = Phase.WELCOMED
            return [HelloAccepted()]
        try:
            creds = auth.check_header(self._headers) if self._headers is not None else None
            if creds is None and not codec.per_request_credentials:
                raise AuthError("missing token")
        except AuthError as exc:
            return self._closed_by(_auth_failed(exc))
        if creds is None:
            self.phase = Phase.AWAITING_CREDENTIALS
            return []
        return self._authenticated(creds)

    def _first_frame(self, request: Request) -> list[Action]:
        if not isinstance(request, Greet):
            problem = (request.error.message if isinstance(request, Malformed)
                       else f"expected hello, got {request.ref}")
            return self._close(CloseCode.NOT_AUTHENTICATED, f"first frame must be hello: {problem}")
        actions: list[Action] = []
        if self.auth is not None:
            try:
                creds = self.auth.check_header(self._headers) \
                    if self._headers is not None else None
                if creds is None:
                    if request.token is None:
                        raise AuthError("missing token")
                    creds = self.auth.authenticate(request.token)
            except AuthError as exc:
                return self._closed_by(_auth_failed(exc))
            adopted = self._adopt(creds)
            if isinstance(adopted, Close):
                return self._closed_by(adopted)
            actions.append(adopted)
        self.phase = Phase.WELCOMED
        limits = {"max_streams": self.stream_cap(),
                  "max_frame_bytes": self.limits.max_frame_bytes,
                  "max_messages_bytes": self._decode_limits.max_messages_bytes,
                  "detach_grace": self.limits.detach_grace}
        actions.append(HelloAccepted())
        actions.append(SendFrame(frames.welcome(self.session_id, self.visible_models(),
                                                limits, PROTOCOL_VERSION)))
        return actions

    def _adopt(self, creds: Credentials) -> AdoptCredentials | Close:
        """The principal's connection limit (read, never changed, here), then the action
        that moves the connection's accounting from its address to the principal (for
        every dialect)."""
        principals = self.principals
        assert principals is not None, "auth needs the server's Principals"
        if principals.connections_of(creds.principal) >= \
                self.limits.max_connections_per_principal:
            return Close(int(CloseCode.TOO_MANY), "too many connections for this principal",
                         "refused connection: too many connections for this principal")
        previous = self.principal
        state = principals.state_of(creds.principal)
        self.credentials, self.principal, self.principal_state = creds, creds.principal, state
        return AdoptCredentials(creds, previous, state)

    def _authenticated(self, creds: Credentials) -> list[Action]:
        adopted = self._adopt(creds)
        if isinstance(adopted, Close):
            return self._closed_by(adopted)
        self.phase = Phase.WELCOMED
        return [adopted, HelloAccepted()]

    def _request_credentials(self, request: Begin | Reattach) -> tuple[list[Action], bool]:
        """Per-request credentials (module docstring): the actions they call for, and
        whether the request goes on after them (False: those actions answer it)."""
        auth = self.auth
        assert auth is not None
        creds = self.credentials
        if request.authorization is None:
            if creds is None:
                return [self._refusal(request, NotAuthenticated(
                    "Not authenticated: missing credentials."))], False
            if auth.expired(creds):
                return [*self._expired(), self._refusal(request, NotAuthenticated(
                    "Not authenticated: token expired."))], False
            return [], True
        try:
            presented = auth.check_header({"Authorization": request.authorization})
        except AuthError as exc:
            return self._closed_by(_auth_failed(exc)), False
        assert presented is not None                 # (auth is on and a value was given)
        if creds is None:
            actions = self._authenticated(presented)
            return actions, self.phase is Phase.WELCOMED
        if presented.principal != creds.principal:
            return [self._refusal(request, NotAuthenticated(
                "Not authenticated: these credentials are for another principal than this "
                "connection's."))], False
        self.credentials = presented                 # a refreshed token
        return [], True

    def _refusal(self, request: Request, error: RelayError) -> SendFrame:
        return SendFrame(error_frame_for(request, error))

    def _request(self, request: Request, event: FrameReceived) -> list[Action]:
        if isinstance(request, Malformed):
            if not request.answerable:
                self.phase = Phase.CLOSING
                return [unanswerable_frame(request.error.message)]
            return [SendFrame(request.error.frame())]
        if isinstance(request, Stop):
            if request.id not in event.open_ids:
                if not request.strict:
                    return []
                return [SendFrame(frames.error(
                    ErrorCode.UNKNOWN_STREAM, f"no running stream with id {request.id!r}",
                    ref=request.ref, id=request.id))]
            return [CancelStream(request)]
        actions: list[Action] = []
        if isinstance(request, (Begin, Reattach)) and self.auth is not None \
                and self.codec.per_request_credentials:
            actions, go_on = self._request_credentials(request)
            if not go_on:
                return actions
        if self.phase is not Phase.WELCOMED:
            # (awaiting credentials: only a request that brings them is served)
            return [*actions, self._refusal(request, NotAuthenticated(
                "Not authenticated: missing credentials."))]
        if isinstance(request, Reattach):
            return [*actions, ResumeStream(request)]
        if isinstance(request, Begin):
            objection = event.dialect_refusal(request) if event.dialect_refusal else None
            if objection is not None:
                return [*actions, SendFrame(error_frame_for(request, objection))]
            if request.start is None:
                return [*actions, SendFrame(frames.error(
                    ErrorCode.BAD_REQUEST, request.invalid or "invalid request",
                    ref=request.ref, id=request.id))]
            self._start_charged = False
            refusal = self._admit(request.start, event.open_ids, event.draining)
            if self._start_charged:
                # A start that passed the start-rate check costs one start, admitted or
                # refused by a later check (duplicate id, a stream cap).
                actions = [*actions, ChargeStart(self.principal_state)]
            if refusal is _EXPIRED:
                return [*actions, *self._expired()]
            if refusal is not None:
                assert isinstance(refusal, RelayError)
                return [*actions, SendFrame(error_frame_for(request, refusal))]
            return [*actions, StartStream(request)]
        if isinstance(request, Probe):
            return [SendFrame(frames.pong(request.data))]
        if isinstance(request, Greet):
            return [SendFrame(frames.error(ErrorCode.BAD_REQUEST,
                                           "hello was already received on this connection",
                                           ref="hello"))]
        assert isinstance(request, Ignore)
        return []

    def _expired(self) -> list[Action]:
        if self._expiry_noticed:
            return []
        self._expiry_noticed = True
        return [CloseWhenStreamsEnd()]

    def _admit(self, msg: Start, open_ids: Collection[str],
               draining: bool) -> RelayError | object | None:
        """The refusal of ``msg`` by the first check (module docstring, in that order) that
        fails, ``_EXPIRED``, or None."""
        creds = self.credentials
        state = self.principal_state
        if creds is not None:
            if self.auth is not None and self.auth.expired(creds):
                return _EXPIRED
            if creds.models is not None and msg.model not in creds.models:
                # Exactly what an alias that does not exist gets (no hint that it does).
                visible = self.visible_models()
                return UnknownModel(f"unknown model {msg.model[:128]!r}; this relay serves: "
                                    f"{', '.join(visible) or 'nothing'}")
            cap = creds.max_streams
            if cap is not None and (len(open_ids) >= cap or state.streams >= cap):
                return TooManyStreams(f"at most {cap} concurrent streams for this token")
        budget = state.budget
        if budget is not None:
            wait = budget.retry_after()
            if wait > 0:
                return RateLimited(f"completion token budget of {budget.limit} per hour "
                                   "used up", retry_after=wait)
        if draining:
            return Draining("the relay is shutting down; start the stream on a new connection")
        if state.starts is not None:
            if not state.starts.can_take():
                return RateLimited("too many starts; slow down",
                                   retry_after=state.starts.retry_after())
            self._start_charged = True       # (the runtime takes it: ChargeStart)
        refusal = self.room_for(msg.id, open_ids)
        if refusal is not None:
            return refusal
        per_principal = self.limits.max_streams_per_principal
        if state.streams >= per_principal:
            return TooManyStreams(f"at most {per_principal} concurrent streams per principal")
        return None

    def _slow_reason(self, kind: Slowness) -> str:
        limit = self.limits.slow_consumer_bytes
        if kind is Slowness.LOG_TRIMMED:
            return ("the stream's log dropped frames this client had not read; "
                    "reconnect and resume")
        if kind is Slowness.CONTROL_QUEUE:
            return f"slow consumer: more than {2 * limit} bytes of replies unread"
        return (f"slow consumer: more than {limit} bytes unread for "
                f"{self.limits.slow_consumer_grace:g} s")


_EXPIRED = object()


def _auth_failed(exc: AuthError) -> Close:
    return Close(int(CloseCode.NOT_AUTHENTICATED), close_reason(exc.reason),
                 "authentication failed")


_OPEN = frozenset({Phase.OPENING, Phase.AWAITING_HELLO, Phase.AWAITING_CREDENTIALS,
                   Phase.WELCOMED})
_AFTER_WELCOME = frozenset({Phase.WELCOMED})
#: A connection reads frames from ``Opened`` on (a hello, credentials, or requests).
_READING = frozenset({Phase.AWAITING_HELLO, Phase.AWAITING_CREDENTIALS, Phase.WELCOMED})

#: The phases (besides ``CLOSING``/``CLOSED``, where every event is accepted and answered
#: with nothing) in which each event may happen. Anything else is a bug of the glue.
_LEGAL: dict[type, frozenset[Phase]] = {
    Opened: frozenset({Phase.OPENING}),
    HelloTimedOut: frozenset({Phase.AWAITING_HELLO, Phase.AWAITING_CREDENTIALS}),
    FrameReceived: _READING,
    # (a request refused while awaiting credentials is answered the same way)
    ActionFailed: frozenset({Phase.AWAITING_CREDENTIALS, Phase.WELCOMED}),
    StreamFailed: _AFTER_WELCOME,
    StreamTakenOver: _AFTER_WELCOME,
    TooManyFrames: _READING,
    SlowConsumer: _READING,
    TokenExpiredStreamsDone: _AFTER_WELCOME,
    # A task may fail, and the relay may restart, at any time.
    InternalFailure: _OPEN,
    ServerRestart: _OPEN,
}


def legal_pairs() -> frozenset[tuple[Phase, type]]:
    """Every (phase, event type) ``handle`` accepts while the connection is open."""
    return frozenset((phase, kind) for kind, phases in _LEGAL.items() for phase in phases)


def error_frame_for(msg: object, exc: Exception) -> Frame:
    """The ``error`` frame answering ``msg`` (a request, or None) whose handling raised
    ``exc``: the one place exceptions become error frames."""
    if isinstance(exc, FrameError):
        return exc.frame()
    ref = getattr(msg, "ref", None)
    id = getattr(msg, "id", None)
    if isinstance(exc, RelayError):
        return frames.error(exc.code, exc.message, ref=ref, id=exc.id or id,
                            retry_after=exc.retry_after)
    return frames.error(ErrorCode.INTERNAL_ERROR, "internal error", ref=ref, id=id)


# ---------------------------------------------------------------------------- outside a machine


class Door(enum.Enum):
    """Why the server refuses an accepted socket before its session starts."""

    RELAY_FULL = "relay-full"
    #: The pending-connection caps (``PendingConnections.enter`` says which, ``detail``).
    TOO_MANY_PENDING = "too-many-pending"
    PRINCIPAL_FULL = "principal-full"


def refuse_at_door(why: Door, detail: str | None = None) -> Close:
    """The close of a socket refused before its session (PROTOCOL.md "Limits and refusals
    at the door"): always 4429."""
    if why is Door.RELAY_FULL:
        reason = "too many connections to this relay"
    elif why is Door.PRINCIPAL_FULL:
        reason = "too many connections for this principal"
    else:
        reason = detail or "too many connections awaiting hello"
    return Close(int(CloseCode.TOO_MANY), close_reason(reason))


def server_shutdown_close() -> Close:
    """Every connection, once its streams got ``finish`` (``server_shutdown``), when the
    relay stops: 1001 (websockets' ``Server.close`` sends it to each open connection)."""
    return Close(int(CloseCode.GOING_AWAY), "")


def internal_error_close() -> Close:
    """A connection ended by a bug of the relay (logged by the caller): 1011."""
    return Close(int(CloseCode.INTERNAL_ERROR), "internal error")


#: RFC 6455 "policy violation"; not an llm-relay.v1 close code (dialects that cannot answer
#: a frame without a request id and the HTTP-only ports use it, as the AI SDK's own server
#: example does).
_POLICY_VIOLATION = 1008


def unanswerable_frame(message: str) -> Close:
    """A frame the dialect cannot answer (``Malformed`` with ``answerable`` False: the AI
    SDK's without a usable ``requestId``)."""
    return Close(_POLICY_VIOLATION, close_reason(message))


def not_a_websocket_endpoint() -> Close:
    """A WebSocket upgrade on a port that serves no WebSocket (metrics, worker control)."""
    return Close(_POLICY_VIOLATION, "no WebSocket here")


def close_reason(text: str) -> str:
    """A close reason fits in 123 UTF-8 bytes (RFC 6455); longer ones would fail the close."""
    data = text.encode("utf-8")
    if len(data) <= 123:
        return text
    return data[:120].decode("utf-8", errors="ignore") + "..."
