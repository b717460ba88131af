"""One connection's protocol decisions, sans-I/O: handshake, admission, every close and error.

``Connection`` is a relay connection as a state machine, whatever its wire dialect
(``Dialect``: llm-relay.v1 on /ws, the AI SDK's chat transport on /ai-sdk). It imports
nothing of the event loop or the socket: ``handle(event)`` takes what happened (an inbound
frame, the hello timer expired, a flood, a slow consumer, a bug, a restart...) and returns
the *actions* the glue (``relay.runtime.session.Session``, which keeps only the socket, the
writer and the timers) carries out in order: send a frame, close with a code and reason,
start/cancel/resume a stream, adopt credentials. Nothing else in relay/ chooses a close
code for a connection: the server's refusals at the door (``refuse_at_door``), its shutdown
(``server_shutdown_close``) and its last resort for a crashed session
(``internal_error_close``) and the HTTP-only endpoints' refusal are the small pure functions
at the end of this module
(tests/relay/test_connection.py checks the sources of relay/ for it).

Phases (``Phase``): ``OPENING`` -> ``AWAITING_HELLO`` (v1) or ``AWAITING_CREDENTIALS``
(/ai-sdk with auth) -> ``WELCOMED`` -> ``CLOSING`` (``CLOSED`` once the socket is gone).
The rules of llm-relay.v1:

* ``Opened``: a subprotocol other than ``PROTOCOL_VERSION`` closes **4406** naming it.
* ``HelloTimedOut`` while awaiting hello: close **4408** ``no hello within N s``.
* The first ``FrameReceived``: anything but a valid ``hello`` (decode error, another type)
  closes **4401** ``first frame must be hello: <problem>``. A hello with auth on is
  authenticated (``Authorization`` header first, else ``hello.token``): a failure closes
  **4401** with the ``AuthError`` reason; a principal already at
  ``max_connections_per_principal`` closes **4429**; otherwise the connection's accounting
  moves from its address to the principal (``AdoptCredentials``). Then ``HelloAccepted``
  and ``SendFrame(welcome)``; the phase is ``WELCOMED``.
* After ``welcome`` every frame gets a defined answer, and exceptions become ``error``
  frames only here (``ActionFailed``: ``RelayError`` -> its code; ``FrameError`` -> its
  frame; anything else -> ``internal_error``, the glue having logged the traceback):
  a bad frame -> ``bad_request``; a second ``hello`` -> ``bad_request``; ``ping`` ->
  ``pong``; ``cancel`` of an id not running here -> ``unknown_stream``, else
  ``CancelStream``; ``resume`` -> ``ResumeStream`` (the hub decides, refusals come back as
  ``ActionFailed``); ``start`` -> admission, below.
* Admission of a ``start``, in this order (PROTOCOL.md "start", "Limits and refusals at the
  door"; the frame's decode limits and validation come first, in ``FrameReceived``): the
  token has expired -> no answer, and ``CloseWhenStreamsEnd`` **4401** ``token expired``
  (once); the token's ``models`` claim -> ``unknown_model`` (worded as for an alias that
  does not exist); the token's ``max_streams`` claim -> ``too_many_streams``; the
  principal's completion token budget -> ``rate_limited``; draining -> ``draining``; the
  principal's start rate -> ``rate_limited``; a running id -> ``duplicate_id``; the
  connection's stream cap -> ``too_many_streams``; the principal's stream cap ->
  ``too_many_streams``. Passed: ``StartStream``; what the glue checks then (the alias and
  its ``max_tokens`` ceiling, the group's limits on Redis) comes back as ``ActionFailed``.
* Closes after ``welcome``: ``TooManyFrames`` **4429**; ``SlowConsumer`` **4008** (three
  kinds, PROTOCOL.md "Backpressure"); ``TokenExpiredStreamsDone`` **4401** ``token
  expired``; ``InternalFailure`` **1011**; ``ServerRestart`` **1012**. The first close
  decision wins: once ``CLOSING``, later ones return no action. Frames that arrive while
  closing are not answered.
* Unprompted errors of attached streams: ``StreamFailed`` (a followed stream cannot go on)
  and ``StreamTakenOver`` (a resume took the stream elsewhere) -> one ``error`` naming the
  id the stream has on this connection, ``ref: "resume"``.

The /ai-sdk dialect (``Dialect.AI_SDK``) has no hello and no subprotocol; its adapter
(relay.runtime.aisdk) decodes its frames and feeds the requests' credentials here, and the
same code as above decides:

* ``Opened``: auth off -> ``HelloAccepted``, ``WELCOMED``. With auth, an ``Authorization``
  header on the upgrade is authenticated as a hello's would be (failure **4401**, the
  principal's connection cap **4429**, else ``AdoptCredentials``, ``HelloAccepted``,
  ``WELCOMED``); without one the phase is ``AWAITING_CREDENTIALS``: the connection holds its
  pending slot until a request authenticates it, and ``HelloTimedOut`` (the same
  ``hello_timeout``) closes it **4408** ``no credentials within N s``.
* ``RequestReceived`` (a ``send``/``resume`` with its ``authorization`` value, or None):
  credentials are checked like the upgrade header (``Authenticator.check_header``); wrong,
  expired or malformed ones close **4401** with the reason (a guess costs a connection, as
  on /ws). Valid ones authenticate a connection still awaiting them (the cap **4429**, as
  above); a connection acts for one principal, so another principal's are refused
  (``Refuse``, the connection stays). None while awaiting credentials -> ``Refuse``
  (``Not authenticated: missing credentials.``); None on an authenticated connection whose
  token has expired -> ``CloseWhenStreamsEnd`` (once) and ``Refuse``. Otherwise no action:
  the request goes on (a ``send`` to ``StartRequested``).
* ``UnanswerableFrame`` (not JSON, not an object, no usable request id): close **1008**.
* ``TooManyFrames`` and ``SlowConsumer`` close as above while awaiting credentials too, and
  ``ActionFailed`` (``msg``: the request's type and id) is its ``error`` as above, which the
  adapter says in its dialect.

Call order: construct once per accepted socket, feed ``Opened`` first; ``handle`` never
blocks and never raises for client input (a caller bug, such as a frame fed before
``Opened``, raises ``IllegalEvent``).
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from protocol import (
    PROTOCOL_VERSION,
    Cancel,
    CloseCode,
    ErrorCode,
    FrameError,
    Hello,
    Ping,
    Resume,
    Start,
    decode_client_frame,
    frames,
)

from protocol.codec import DecodeLimits

from relay.core.auth import AuthError
from relay.core.errors import (Draining, DuplicateId, NotAuthenticated, RateLimited, RelayError,
                               TooManyStreams, UnknownModel)
from relay.core.limits import PrincipalState

if TYPE_CHECKING:
    from relay.core.auth import Authenticator, Credentials
    from relay.core.limits import Principals

__all__ = [
    "ActionFailed", "AdoptCredentials", "CancelStream", "Close", "CloseWhenStreamsEnd",
    "Connection", "ConnectionLimits", "Dialect", "Door", "FrameReceived", "HelloAccepted",
    "HelloTimedOut", "IllegalEvent", "InternalFailure", "Opened", "Phase", "Refuse",
    "RequestReceived", "ResumeStream", "SendFrame", "ServerRestart", "SlowConsumer",
    "Slowness", "StartRequested", "StartStream", "StreamFailed", "StreamTakenOver",
    "TokenExpiredStreamsDone", "TooManyFrames", "UnanswerableFrame",
    "close_reason", "internal_error_close", "legal_pairs", "server_shutdown_close", "not_a_websocket_endpoint", "refuse_at_door",
    "unanswerable_frame",
]


class Phase(enum.Enum):
    OPENING = "opening"
    AWAITING_HELLO = "awaiting-hello"
    #: A dialect without hello (/ai-sdk) with auth on, until a request authenticates it.
    AWAITING_CREDENTIALS = "awaiting-credentials"
    WELCOMED = "welcomed"
    CLOSING = "closing"
    CLOSED = "closed"


class Dialect(enum.Enum):
    """The wire protocol a connection speaks; the machine's decisions are the same for all."""

    #: llm-relay.v1 on /ws: subprotocol, hello/welcome, credentials in the header or hello.
    V1 = "llm-relay.v1"
    #: The AI SDK's WebSocketChatTransport on /ai-sdk: no hello, credentials in the upgrade
    #: header or in each request (``RequestReceived``).
    AI_SDK = "ai-sdk"


class IllegalEvent(RuntimeError):
    """An event the glue must not feed in the current phase (a bug in the glue)."""


# ---------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Opened:
    """The upgrade was accepted. ``headers``: the upgrade request's (``Authorization``)."""

    subprotocol: str | None
    headers: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class HelloTimedOut:
    pass


@dataclass(frozen=True, slots=True)
class FrameReceived:
    """One inbound WebSocket message. ``open_ids``: the ids of the streams attached to this
    connection now; ``draining``: the relay refuses new starts."""

    raw: str | bytes
    open_ids: Collection[str] = ()
    draining: bool = False


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """A request of a dialect that carries credentials per request (/ai-sdk ``send`` and
    ``resume``), decoded by its adapter. ``id``: the request's id; ``authorization``: its
    ``Authorization`` value (``"Bearer <credential>"``), None when it carries none."""

    id: str
    authorization: str | None = None


@dataclass(frozen=True, slots=True)
class UnanswerableFrame:
    """/ai-sdk: a frame that cannot be parsed or names no usable request id, so that no
    answer could be correlated; ``problem`` says what is wrong with it."""

    problem: str


@dataclass(frozen=True, slots=True)
class StartRequested:
    """A ``start`` built by another protocol on the same connection (relay.runtime.aisdk): the same
    admission as a v1 ``start``; a refusal is returned as ``Refuse`` rather than a frame."""

    msg: Start
    open_ids: Collection[str] = ()
    draining: bool = False


@dataclass(frozen=True, slots=True)
class ActionFailed:
    """Carrying out an action for ``msg`` (a decoded client frame, or None) raised ``exc``.
    Anything but ``RelayError``/``FrameError`` is a relay bug, already logged by the glue."""

    msg: Any
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
    pass


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


Event = (Opened | HelloTimedOut | FrameReceived | RequestReceived | UnanswerableFrame
         | StartRequested | ActionFailed | StreamFailed | StreamTakenOver | TooManyFrames
         | SlowConsumer | TokenExpiredStreamsDone | InternalFailure | ServerRestart
         | SocketClosed)


# ---------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class SendFrame:
    """Send this server frame (dict, as built by ``protocol.frames``)."""

    frame: dict


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
    """Authenticated: the connection acts for ``credentials.principal`` from now on (its
    accounting has already moved there, ``state``)."""

    credentials: Credentials
    state: PrincipalState


@dataclass(frozen=True, slots=True)
class HelloAccepted:
    """The hello passed (or, on a dialect without hello, the connection is authenticated or
    needs no credentials): the connection no longer counts as awaiting one."""


@dataclass(frozen=True, slots=True)
class StartStream:
    msg: Start


@dataclass(frozen=True, slots=True)
class CancelStream:
    msg: Cancel


@dataclass(frozen=True, slots=True)
class ResumeStream:
    msg: Resume


@dataclass(frozen=True, slots=True)
class Refuse:
    """Answer of ``StartRequested`` or ``RequestReceived``: the request is refused with
    ``error`` (the adapter answers it in its dialect; the connection stays)."""

    error: RelayError


Action = (SendFrame | Close | CloseWhenStreamsEnd | AdoptCredentials | HelloAccepted
          | StartStream | CancelStream | ResumeStream | Refuse)


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
    def from_settings(cls, settings: Any) -> ConnectionLimits:
        return cls(
            hello_timeout=settings.hello_timeout, max_streams=settings.max_streams,
            max_streams_per_principal=settings.max_streams_per_principal,
            max_frame_bytes=settings.max_frame_bytes, detach_grace=settings.detach_grace,
            slow_consumer_bytes=settings.slow_consumer_bytes,
            slow_consumer_grace=settings.slow_consumer_grace,
            max_connections_per_principal=settings.max_connections_per_principal,
            decode_limits=settings.decode_limits())


class Connection:
    """The decisions of one connection (module docstring). ``models``: the relay's aliases;
    ``principal``/``principal_state``: who the connection counts for until authentication
    moves it; ``auth``: None or a disabled Authenticator means no auth; ``dialect``: the
    wire protocol it speaks."""

    def __init__(self, limits: ConnectionLimits, *, session_id: str, models: Sequence[str],
                 principal: str = "anonymous", principal_state: PrincipalState | None = None,
                 auth: Authenticator | None = None, principals: Principals | None = None,
                 dialect: Dialect = Dialect.V1) -> None:
        self.limits = limits
        self.session_id = session_id
        self.models = list(models)
        self.principal = principal
        self.principal_state = principal_state or PrincipalState()
        self.auth = auth if auth is not None and auth.enabled else None
        self.principals = principals
        self.credentials: Credentials | None = None
        self.dialect = dialect
        self.phase = Phase.OPENING
        self._decode_limits = limits.decode_limits or DecodeLimits()
        self._headers: Mapping[str, str] | None = None
        self._expiry_noticed = False

    # ------------------------------------------------------------------ entry point

    def handle(self, event: Event) -> list[Action]:
        """The actions for ``event``, in the order the glue carries them out."""
        phase = self.phase
        if isinstance(event, SocketClosed):
            self.phase = Phase.CLOSED
            return []
        if phase in (Phase.CLOSING, Phase.CLOSED):
            return []           # the first close decision wins; nothing more is answered
        if phase not in _LEGAL.get(type(event), ()) or \
                _DIALECT_ONLY.get(type(event), self.dialect) is not self.dialect:
            raise IllegalEvent(f"{type(event).__name__} in phase {phase.value!r} "
                               f"({self.dialect.value})")
        if isinstance(event, Opened):
            self._headers = event.headers
            if self.dialect is Dialect.AI_SDK:
                return self._open_without_hello()
            if event.subprotocol != PROTOCOL_VERSION:
                return self._close(CloseCode.UNSUPPORTED_VERSION,
                                   f"unsupported protocol version; supported: {PROTOCOL_VERSION}")
            self.phase = Phase.AWAITING_HELLO
            return []
        if isinstance(event, HelloTimedOut):
            awaited = "hello" if phase is Phase.AWAITING_HELLO else "credentials"
            return self._close(CloseCode.HELLO_TIMEOUT,
                               f"no {awaited} within {self.limits.hello_timeout:g} s")
        if isinstance(event, RequestReceived):
            return self._request(event)
        if isinstance(event, UnanswerableFrame):
            self.phase = Phase.CLOSING
            return [unanswerable_frame(event.problem)]
        if isinstance(event, FrameReceived):
            if phase is Phase.AWAITING_HELLO:
                return self._first_frame(event.raw)
            return self._frame(event)
        if isinstance(event, StartRequested):
            refusal = self._admit(event.msg, event.open_ids, event.draining)
            if refusal is _EXPIRED:
                return self._expired()
            if refusal is not None:
                return [Refuse(refusal)]
            return [StartStream(event.msg)]
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

    def _first_frame(self, raw: str | bytes) -> list[Action]:
        try:
            hello = decode_client_frame(raw, self._decode_limits)
            if not isinstance(hello, Hello):
                raise FrameError(f"expected hello, got {type(hello).__name__.lower()}")
        except FrameError as exc:
            return self._close(CloseCode.NOT_AUTHENTICATED,
                               f"first frame must be hello: {exc}")
        actions: list[Action] = []
        if self.auth is not None:
            admitted = self._authenticate(hello)
            if isinstance(admitted, Close):
                self.phase = Phase.CLOSING
                return [admitted]
            actions.append(admitted)
        self.phase = Phase.WELCOMED
        limits = {"max_streams": self.stream_cap(),
                  "max_frame_bytes": self.limits.max_frame_bytes,
                  "max_messages_bytes": self._decode_limits.max_messages_bytes,
                  "detach_grace": self.limits.detach_grace}
        actions.append(HelloAccepted())
        actions.append(SendFrame(frames.welcome(self.session_id, self.visible_models(),
                                                limits, PROTOCOL_VERSION)))
        return actions

    def _authenticate(self, hello: Hello) -> AdoptCredentials | Close:
        """Header first, else ``hello.token``; then the principal's connection limit, then
        the accounting moves from the address to the principal."""
        auth = self.auth
        assert auth is not None
        try:
            creds = auth.check_header(self._headers) if self._headers is not None else None
            if creds is None:
                if hello.token is None:
                    raise AuthError("missing token")
                creds = auth.authenticate(hello.token)
        except AuthError as exc:
            return _auth_failed(exc)
        return self._adopt(creds)

    def _adopt(self, creds: Credentials) -> AdoptCredentials | Close:
        """The principal's connection limit, then the accounting moves from the address to
        the principal (for every dialect)."""
        principals = self.principals
        assert principals is not None, "auth needs the server's Principals"
        if principals.get(creds.principal).connections >= \
                self.limits.max_connections_per_principal:
            return Close(int(CloseCode.TOO_MANY), "too many connections for this principal",
                         "refused connection: too many connections for this principal")
        state = principals.connect(creds.principal)
        principals.disconnect(self.principal)
        self.credentials, self.principal, self.principal_state = creds, creds.principal, state
        return AdoptCredentials(creds, state)

    def _open_without_hello(self) -> list[Action]:
        """``Opened`` on a dialect without hello: no credentials needed, the upgrade's
        header, or ``AWAITING_CREDENTIALS`` (module docstring)."""
        auth = self.auth
        if auth is None:
            self.phase = Phase.WELCOMED
            return [HelloAccepted()]
        try:
            creds = auth.check_header(self._headers) if self._headers is not None else None
        except AuthError as exc:
            return self._closed_by(_auth_failed(exc))
        if creds is None:
            self.phase = Phase.AWAITING_CREDENTIALS
            return []
        return self._authenticated(creds)

    def _authenticated(self, creds: Credentials) -> list[Action]:
        adopted = self._adopt(creds)
        if isinstance(adopted, Close):
            return self._closed_by(adopted)
        self.phase = Phase.WELCOMED
        return [adopted, HelloAccepted()]

    def _closed_by(self, close: Close) -> list[Action]:
        self.phase = Phase.CLOSING
        return [close]

    def _request(self, event: RequestReceived) -> list[Action]:
        """The credentials of a request of a dialect without hello (module docstring)."""
        auth = self.auth
        if auth is None:
            return []
        creds = self.credentials
        if event.authorization is None:
            if creds is None:
                return [Refuse(NotAuthenticated("Not authenticated: missing credentials.",
                                                id=event.id))]
            if auth.expired(creds):
                return [*self._expired(),
                        Refuse(NotAuthenticated("Not authenticated: token expired.",
                                                id=event.id))]
            return []
        try:
            presented = auth.check_header({"Authorization": event.authorization})
        except AuthError as exc:
            return self._closed_by(_auth_failed(exc))
        assert presented is not None                 # (auth is on and a value was given)
        if creds is None:
            return self._authenticated(presented)
        if presented.principal != creds.principal:
            return [Refuse(NotAuthenticated(
                "Not authenticated: these credentials are for another principal than this "
                "connection's.", id=event.id))]
        self.credentials = presented                 # a refreshed token
        return []

    def _frame(self, event: FrameReceived) -> list[Action]:
        msg: Any = None
        try:
            msg = decode_client_frame(event.raw, self._decode_limits)
        except FrameError as exc:
            return [SendFrame(exc.frame())]
        if isinstance(msg, Start):
            refusal = self._admit(msg, event.open_ids, event.draining)
            if refusal is _EXPIRED:
                return self._expired()
            if refusal is not None:
                return [SendFrame(error_frame_for(msg, refusal))]
            return [StartStream(msg)]
        if isinstance(msg, Cancel):
            if msg.id not in event.open_ids:
                return [SendFrame(frames.error(
                    ErrorCode.UNKNOWN_STREAM, f"no running stream with id {msg.id!r}",
                    ref="cancel", id=msg.id))]
            return [CancelStream(msg)]
        if isinstance(msg, Resume):
            return [ResumeStream(msg)]
        if isinstance(msg, Ping):
            return [SendFrame(frames.pong(msg.data))]
        if isinstance(msg, Hello):
            return [SendFrame(frames.error(ErrorCode.BAD_REQUEST,
                                           "hello was already received on this connection",
                                           ref="hello"))]
        return []       # a client frame type this relay decodes but does not answer

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
        if state.starts is not None and not state.starts.take():
            return RateLimited("too many starts; slow down",
                               retry_after=state.starts.retry_after())
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
#: A connection that reads frames before it is authenticated (/ai-sdk awaiting credentials).
_READING = frozenset({Phase.AWAITING_CREDENTIALS, Phase.WELCOMED})

#: The phases (besides ``CLOSING``/``CLOSED``, where every event is accepted and answered
#: with nothing) in which each event may happen. Anything else is a bug of the glue.
_LEGAL: dict[type, frozenset[Phase]] = {
    Opened: frozenset({Phase.OPENING}),
    HelloTimedOut: frozenset({Phase.AWAITING_HELLO, Phase.AWAITING_CREDENTIALS}),
    FrameReceived: frozenset({Phase.AWAITING_HELLO, Phase.WELCOMED}),
    RequestReceived: _READING,
    UnanswerableFrame: _READING,
    StartRequested: _AFTER_WELCOME,
    # (/ai-sdk: a request refused while awaiting credentials is answered the same way)
    ActionFailed: _READING,
    StreamFailed: _AFTER_WELCOME,
    StreamTakenOver: _AFTER_WELCOME,
    TooManyFrames: _READING,
    SlowConsumer: _READING,
    TokenExpiredStreamsDone: _AFTER_WELCOME,
    # A task may fail, and the relay may restart, at any time.
    InternalFailure: _OPEN,
    ServerRestart: _OPEN,
}


#: Events only one dialect's glue feeds (any other event: every dialect).
_DIALECT_ONLY: dict[type, Dialect] = {
    FrameReceived: Dialect.V1,
    RequestReceived: Dialect.AI_SDK,
    UnanswerableFrame: Dialect.AI_SDK,
}


def legal_pairs() -> frozenset[tuple[Phase, type]]:
    """Every (phase, event type) ``handle`` accepts while the connection is open."""
    return frozenset((phase, kind) for kind, phases in _LEGAL.items() for phase in phases)


def error_frame_for(msg: Any, exc: Exception) -> dict:
    """The ``error`` frame answering ``msg`` (a decoded client frame, or None) whose
    handling raised ``exc``: the one place exceptions become error frames."""
    if isinstance(exc, FrameError):
        return exc.frame()
    ref = getattr(msg, "type", None)
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


#: RFC 6455 "policy violation"; not an llm-relay.v1 close code (the /ai-sdk protocol and
#: the HTTP-only ports use it, as the AI SDK's own server example does).
_POLICY_VIOLATION = 1008


def unanswerable_frame(message: str) -> Close:
    """/ai-sdk: a frame that cannot be parsed or names no ``requestId`` (``UnanswerableFrame``)."""
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
