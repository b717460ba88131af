"""The relay's WebSocket server: handshake checks, HTTP routes, one ``Session`` per socket.

``RelayServer`` is an async context manager so tests and the CLI share one lifecycle::

    async with RelayServer(settings) as server:   # listening on server.port
        ...
                                                   # on exit: sessions stopped, socket closed
"""

from __future__ import annotations

import asyncio
import dataclasses
import http
import logging
import socket
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from protocol import SUPPORTED_VERSIONS, CloseCode, FinishReason

from . import web
from .auth import AuthError, Authenticator
from .config import RelaySettings
from .hub import StreamHub
from .replication import Replicator
from .limits import Principals
from .metrics import CONTENT_TYPE_LATEST, RelayMetrics
from .metrics_http import MetricsHTTPServer
from .providers import ModelRegistry
from .session import Session, StreamerFactory

__all__ = ["RelayServer", "WS_PATH"]

logger = logging.getLogger("relay.server")

WS_PATH = "/ws"


def _select_subprotocol(connection: ServerConnection, offered: Any) -> str | None:
    # Accept even when no supported version is offered, so the handler can close with 4406
    # and a reason a browser can read (an HTTP 400 would only show up as 1006).
    for version in SUPPORTED_VERSIONS:
        if version in offered:
            return version
    return None


class RelayServer:
    def __init__(
        self,
        settings: RelaySettings | None = None,
        registry: ModelRegistry | None = None,
        *,
        streamer_factory: StreamerFactory | None = None,
        reuse_port: bool = False,
        metrics_host: str | None = None,
    ) -> None:
        """``reuse_port``: bind with SO_REUSEPORT, so several worker processes share the
        port (relay.workers). ``metrics_host``: interface of the separate ``/metrics``
        server (default: ``settings.host``)."""
        self.settings = settings or RelaySettings()
        self._reuse_port = reuse_port
        self._metrics_host = metrics_host
        self.registry = registry or ModelRegistry.demo_only()
        self._streamer_factory = streamer_factory
        self._server: Server | None = None
        self._sessions: set[Session] = set()
        self.draining = False
        self.metrics = RelayMetrics()
        self._metrics_http: MetricsHTTPServer | None = None
        self.principals = Principals(self.settings.start_rate_per_minute,
                                     self.settings.start_burst,
                                     self.settings.completion_token_budget_per_hour)
        self.hub = StreamHub(self.settings, self.metrics)
        self.replicator: Replicator | None = None
        if self.settings.redis_url is not None:
            self.replicator = Replicator(self.settings, self.hub)
            self.hub.replicator = self.replicator
        self.auth = Authenticator(self.settings, self.principals)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Listen. With ``redis_url``, Redis must answer first (``StoreUnavailable``)."""
        s = self.settings
        if self.replicator is not None:
            await self.replicator.start()
        self._server = await serve(
            self._handler,
            s.host,
            s.port,
            subprotocols=list(SUPPORTED_VERSIONS),
            select_subprotocol=_select_subprotocol,
            process_request=self._process_request,
            max_size=s.max_frame_bytes,
            # Inbound frames queue while a session handles one; a relay needs few.
            max_queue=16,
            compression=None,  # token frames gain little; it would cost ~50 KiB per socket
            server_header="llm-relay",
            reuse_port=self._reuse_port,
        )
        if s.metrics_port is not None:
            self._metrics_http = MetricsHTTPServer(self.metrics, self._metrics_host or s.host,
                                                   s.metrics_port)
            try:
                await self._metrics_http.start()
            except BaseException:  # e.g. metrics port in use: do not leave the main port open
                self._metrics_http = None
                await self.close()
                raise

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return self._server.sockets[0].getsockname()[1]

    @property
    def metrics_port(self) -> int | None:
        """Bound port of the separate ``/metrics`` server; None when metrics share ``port``."""
        return None if self._metrics_http is None else self._metrics_http.port

    @property
    def url(self) -> str:
        return f"ws://{self.settings.host}:{self.port}{WS_PATH}"

    @property
    def sessions(self) -> frozenset[Session]:
        return frozenset(self._sessions)

    async def shutdown(self, drain_timeout: float | None = None) -> None:
        """Graceful stop: refuse new connections (``/readyz`` 503) and new starts
        (``draining``), let running streams finish for up to ``drain_timeout`` seconds
        (default: the setting), then cancel the rest (``server_shutdown``) and close every
        connection with 1001. websockets' ``Server.close()`` closes all connections at once,
        so the draining happens before it. With Redis, connections are closed 1012 at once
        instead and the streams keep running (detached, resumable on any relay) for the
        drain."""
        if self._server is None:
            return
        self.draining = True
        timeout = self.settings.drain_timeout if drain_timeout is None else drain_timeout
        if self.replicator is not None:
            # Relays share streams through Redis: clients reconnect (to another relay) and
            # resume right away, while this one finishes its upstream calls into Redis.
            logger.info("restarting: closing %d connection(s) with 1012", len(self._sessions))
            for session in list(self._sessions):
                session.close_soon(CloseCode.SERVICE_RESTART,
                                   "relay restarting; reconnect and resume")
        tasks = self.hub.tasks()
        if tasks and timeout > 0:
            logger.info("draining %d stream(s) for up to %g s", len(tasks), timeout)
            await asyncio.wait(tasks, timeout=timeout)
        await self.close()

    async def close(self) -> None:
        """Stop accepting, end every session (streams cancelled upstream), close sockets."""
        if self._server is None:
            return
        self.draining = True
        # Streams end first, so their clients receive finish (server_shutdown) before 1001.
        await self.hub.close(FinishReason.SERVER_SHUTDOWN)
        await asyncio.gather(*(session.flush(timeout=2.0) for session in list(self._sessions)))
        self._server.close(close_connections=True)
        await self._server.wait_closed()
        self._server = None
        if self.replicator is not None:
            await self.replicator.close()
        if self._metrics_http is not None:
            await self._metrics_http.close()
            self._metrics_http = None

    async def __aenter__(self) -> RelayServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ connections

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            return _text(connection, http.HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            if self.draining:
                return _text(connection, http.HTTPStatus.SERVICE_UNAVAILABLE, "draining\n")
            return _text(connection, http.HTTPStatus.OK, "ready\n")
        if path == "/metrics" and self.settings.metrics_port is None:  # else on its own port
            body = self.metrics.render()
            response = connection.respond(http.HTTPStatus.OK, "")
            del response.headers["Content-Type"], response.headers["Content-Length"]
            response.headers["Content-Type"] = CONTENT_TYPE_LATEST
            response.headers["Content-Length"] = str(len(body))
            return dataclasses.replace(response, body=body)
        if path != WS_PATH:
            # The browser chat page (client_demo/web/), static files only; see relay/web.py.
            return web.respond(connection, path) or _text(
                connection, http.HTTPStatus.NOT_FOUND, "not found\n")
        if self.draining:
            return _text(connection, http.HTTPStatus.SERVICE_UNAVAILABLE, "draining\n")
        origin = request.headers.get("Origin")
        if origin is not None and not self._origin_allowed(origin, request.headers.get("Host")):
            logger.warning("refused WebSocket upgrade from a disallowed Origin",
                           extra={"origin": origin[:200]})
            return _text(connection, http.HTTPStatus.FORBIDDEN, "origin not allowed\n")
        return self._refuse_bad_authorization(connection, request)

    def _refuse_bad_authorization(self, connection: ServerConnection,
                                  request: Request) -> Response | None:
        """Auth hook of the upgrade: with auth on, an ``Authorization`` header that is present
        but not ``Bearer <valid credential>`` gets HTTP 401 (no header: ``hello.token``)."""
        try:
            self.auth.check_header(request.headers)
        except AuthError as exc:
            logger.info("refused WebSocket upgrade: bad Authorization header",
                        extra={"reason": exc.reason})
            response = _text(connection, http.HTTPStatus.UNAUTHORIZED, f"{exc.reason}\n")
            response.headers["WWW-Authenticate"] = 'Bearer realm="llm-relay"'
            return response
        return None

    def _origin_allowed(self, origin: str, host: str | None) -> bool:
        """Browsers always send Origin; servers, agents and IDE plugins usually do not and
        are not restricted by it. Default: only the relay's own origin (its demo page)."""
        allowed = self.settings.allow_origins
        if "*" in allowed or origin in allowed:
            return True
        scheme, _, netloc = origin.partition("://")
        return scheme in ("http", "https") and host is not None and netloc == host

    def _principal_of(self, ws: ServerConnection) -> str:
        """The client's address; X-Forwarded-For only when the peer is a trusted proxy."""
        peer = ws.remote_address[0] if ws.remote_address else "unknown"
        if peer in self.settings.trusted_proxies and ws.request is not None:
            forwarded = ws.request.headers.get("X-Forwarded-For")
            if forwarded:
                return forwarded.split(",")[0].strip() or peer
        return str(peer)

    async def _handler(self, ws: ServerConnection) -> None:
        principal = self._principal_of(ws)
        s = self.settings
        state = self.principals.get(principal)
        if self.principals.total_connections >= s.max_connections:
            await ws.close(CloseCode.TOO_MANY, "too many connections to this relay")
            return
        # With auth on, the principal is known after hello (Authenticator.admit checks it).
        if state.connections >= s.max_connections_per_principal and not self.auth.enabled:
            await ws.close(CloseCode.TOO_MANY, "too many connections for this principal")
            return
        state = self.principals.connect(principal)
        if s.send_buffer_bytes is not None:
            _set_send_buffer(ws, s.send_buffer_bytes)
        session = Session(ws, self.settings, self.registry,
                          hub=self.hub, streamer_factory=self._streamer_factory,
                          draining=lambda: self.draining,
                          principal=principal, principal_state=state,
                          metrics=self.metrics, auth=self.auth)
        self._sessions.add(session)
        self.metrics.connections.inc()
        try:
            await session.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("session %s crashed", session.session_id)
            await ws.close(1011, "internal error")
        finally:
            self._sessions.discard(session)
            self.principals.disconnect(session.principal)  # the authenticated one, if any
            self.metrics.connections.dec()


def _set_send_buffer(ws: ServerConnection, size: int) -> None:
    # Caps what the kernel holds for a client that stops reading; beyond it the backlog
    # stays in the stream logs, where slow_consumer_bytes measures it.
    sock = ws.transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


def _text(connection: ServerConnection, status: http.HTTPStatus, body: str) -> Response:
    return connection.respond(status, body)

