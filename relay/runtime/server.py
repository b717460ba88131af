"""The relay's WebSocket server: handshake checks, HTTP routes, one ``Session`` per socket.

Each WebSocket path is a dialect route (``relay.runtime.routes.DIALECTS``); every route gets
the same checks at the upgrade (GET only, the Origin, a bad ``Authorization`` header) and at
connect (the relay's connection cap, the pending-connection caps, and without ``--auth`` the
address's per-principal cap; with ``--auth`` the connection machine applies the principal's
cap once the connection is authenticated, whatever the dialect).

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
from collections.abc import Callable, Sequence

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from llm_relay_protocol import SUPPORTED_VERSIONS, FinishReason

from relay.http import web
from relay.runtime.aisdk import AI_SDK_EXAMPLE_PATH, AI_SDK_EXAMPLE_ROOT, ChatIndex
from relay.core.auth import AuthError, Authenticator, address_principal
from relay.http.handshake import (OriginPolicy, RelayConnection, client_address, own_origins,
                        parse_networks, repeated_header)
from relay.config import RelaySettings
from relay.core.connection import (Close, Door, internal_error_close, refuse_at_door,
                         server_shutdown_close)
from relay.runtime.hub import StreamHub
from relay.cluster.replication import Replicator
from relay.core.limits import PendingConnections, Principals, start_rate_limit
from relay.metrics import CONTENT_TYPE_LATEST, RelayMetrics
from relay.http.metrics_http import MetricsHTTPServer
from relay.upstream.providers import ModelRegistry
from relay.runtime.responses import ChainStore
from relay.runtime.routes import DIALECTS, WS_PATH, route_for
from relay.runtime.session import Session
from relay.runtime.streams import StreamerFactory, StreamService
from relay.cluster.shared_limits import SharedLimits

__all__ = ["RelayServer", "WS_PATH"]

logger = logging.getLogger("relay.runtime.server")


def _select_subprotocol(connection: ServerConnection,
                        offered: Sequence[Subprotocol]) -> Subprotocol | None:
    # Accept even when no supported version is offered, so the handler can close with 4406
    # and a reason a browser can read (an HTTP 400 would only show up as 1006).
    for version in SUPPORTED_VERSIONS:
        if version in offered:
            return Subprotocol(version)
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
        port (relay.runtime.workers). ``metrics_host``: interface of the separate ``/metrics``
        server (default: ``settings.host``)."""
        self.settings = settings or RelaySettings()
        self._reuse_port = reuse_port
        self._metrics_host = metrics_host
        self.registry = registry or ModelRegistry.demo_only()
        self._streamer_factory = streamer_factory
        self._server: Server | None = None
        self._sessions: set[Session] = set()
        self.draining = False
        self._drain_cut = asyncio.Event()     # end_drain(): stop waiting for streams
        self.metrics = RelayMetrics()
        self._metrics_http: MetricsHTTPServer | None = None
        self.principals = Principals(*start_rate_limit(self.settings.start_rate_per_minute,
                                                       self.settings.start_burst,
                                                       auth=self.settings.auth),
                                     self.settings.completion_token_budget_per_hour,
                                     self.settings.replay_events_per_second or None,
                                     self.settings.replay_event_burst)
        self.pending = PendingConnections(self.settings.max_pending_per_address,
                                          self.settings.pending_connections_cap)
        self._trusted_proxies = parse_networks(self.settings.trusted_proxies)
        self.origins: OriginPolicy | None = None  # known once the port is bound
        self.hub = StreamHub(self.settings, self.metrics)
        #: /ai-sdk: the latest response of each (principal, chat id), for resume.
        self.chats = ChatIndex(is_live=lambda key: self.hub.get(key) is not None)
        #: /v1/responses: stored responses for previous_response_id.
        self.chains = ChainStore(max_entries=self.settings.responses_chain_entries,
                                 max_bytes=self.settings.responses_chain_bytes,
                                 max_total_bytes=self.settings.responses_chain_total_bytes,
                                 ttl=self.settings.responses_chain_ttl)
        self.metrics.responses_chain_bytes.set_function(self.chains.bytes_held)
        self.replicator: Replicator | None = None
        self.shared_limits: SharedLimits | None = None
        if self.settings.redis_url is not None:
            self.replicator = Replicator(self.settings, self.hub)
            self.chats.replicator = self.replicator
            self.chains.attach_redis(self.replicator)
            self.hub.replicator = self.replicator
            self.shared_limits = SharedLimits(self.replicator.store, self.replicator.node,
                                              lease=self.settings.redis_owner_ttl)
            self.hub.shared_limits = self.shared_limits
        self.auth = Authenticator(self.settings, self.principals)
        #: Launches and resumes the streams of every connection, whatever its dialect.
        self.streams = StreamService(self.hub, self.registry, self.settings, self.metrics,
                                     streamer_factory)

    # ------------------------------------------------------------------ lifecycle

    async def start(self, *, listen: bool = True) -> None:
        """Bind and listen. With ``redis_url``, Redis must answer first (``StoreUnavailable``).
        ``listen=False`` binds the port (a port in use fails here) without accepting
        connections (they are refused) until ``listen()``: ``relay serve`` warms up between."""
        s = self.settings
        if self.replicator is not None:
            await self.replicator.start()
        self._server = await serve(
            self._handler,
            s.host,
            s.port,
            subprotocols=[Subprotocol(v) for v in SUPPORTED_VERSIONS],
            select_subprotocol=_select_subprotocol,
            process_request=self._process_request,
            process_response=self._process_response,
            max_size=s.max_frame_bytes,
            # Inbound frames queue while a session handles one; a relay needs few.
            max_queue=16,
            compression=None,  # token frames gain little; it would cost ~50 KiB per socket
            server_header="llm-relay",
            create_connection=RelayConnection,  # one request per connection (handshake.py)
            reuse_port=self._reuse_port,
            start_serving=listen,
        )
        self.origins = OriginPolicy(own_origins(s, self.port), s.allow_origins)
        self._apply_upstream_limits()
        self._announce_model_paths()   # once bound: a refused bind prints one line only
        if s.public_url is None and not self.origins.any and _all_interfaces(s.host):
            logger.info("listening on all interfaces without --public-url: browsers may "
                        "connect only from the loopback origins and --allow-origin")
        if s.metrics_port is not None:
            self._metrics_http = MetricsHTTPServer(self.metrics, self._metrics_host or s.host,
                                                   s.metrics_port)
            try:
                await self._metrics_http.start()
            except BaseException:  # e.g. metrics port in use: do not leave the main port open
                self._metrics_http = None
                await self.close()
                raise
        if self.shared_limits is not None:
            await self.shared_limits.start()     # listening: close() stops it from now on

    def _apply_upstream_limits(self) -> None:
        """The caps on upstream bytes, for both paths (relay/upstream/caps.py; process-wide,
        as LiteLLM's HTTP clients are), said once in the log."""
        from relay.upstream import caps

        limits = self.settings.upstream_limits()
        caps.configure(limits)
        logger.info("upstream caps: error body %d B, SSE event %d B, decompressed %d B "
                    "(ratio %g); LiteLLM's path reads through the same caps and SSE parser "
                    "(CR/LF/CRLF, BOM, events without data dropped)",
                    limits.max_error_body_bytes, limits.max_event_bytes,
                    limits.max_decompressed_bytes, limits.max_decompression_ratio)

    def _announce_model_paths(self) -> None:
        """One log line per alias naming its streaming path (fast or litellm) and why; the
        same in ``/metrics`` as ``relay_model_path{alias,path} 1``."""
        for spec in self.registry.specs:
            choice = spec.path
            self.metrics.model_path.labels(spec.alias, choice.path).set(1)
            logger.info("model alias %s: %s path (%s)", spec.alias, choice.path, choice.reason,
                        extra={"model": spec.alias, "path": choice.path})

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

    async def listen(self) -> None:
        """Accept connections on the port ``start(listen=False)`` bound."""
        assert self._server is not None, "server not started"
        await self._server.server.start_serving()

    async def shutdown(self, drain_timeout: float | None = None) -> None:
        """Graceful stop: refuse new connections (``/readyz`` 503) and new starts
        (``draining``), let running streams finish for up to ``drain_timeout`` seconds
        (default: the setting), then cancel the rest (``server_shutdown``) and close every
        connection with 1001. websockets' ``Server.close()`` closes all connections at once,
        so the draining happens before it. With Redis, connections are closed 1012 at once
        instead and the streams keep running (detached, resumable on any relay) for the
        drain. ``end_drain()`` (the CLI's second Ctrl-C) cuts the drain short: the streams
        still running end at once with their ``finish``."""
        if self._server is None:
            return
        self.draining = True
        timeout = self.settings.drain_timeout if drain_timeout is None else drain_timeout
        tasks = self.hub.tasks()
        if self.replicator is not None:
            # Relays share streams through Redis: clients reconnect (to another relay) and
            # resume right away, while this one finishes its upstream calls into Redis.
            logger.info("shutting down: closing %d connection(s) with 1012 so their clients "
                        "resume on another relay; %d stream(s) go on writing to Redis for up "
                        "to %g s, then this relay exits", len(self._sessions), len(tasks),
                        timeout)
            for session in list(self._sessions):
                session.close_for_restart()
        if tasks and timeout > 0 and not self._drain_cut.is_set():
            logger.info("draining %d stream(s) for up to %g s", len(tasks), timeout)
            all_ended = asyncio.ensure_future(asyncio.wait(tasks))
            cut = asyncio.ensure_future(self._drain_cut.wait())
            try:
                await asyncio.wait([all_ended, cut], timeout=timeout,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                all_ended.cancel()         # (the waits only: the streams end in close())
                cut.cancel()
        await self.close()

    def end_drain(self) -> None:
        """Stop waiting for running streams: ``shutdown()`` (now or later) goes straight
        to ``close()``, which ends them with ``finish`` (``server_shutdown``)."""
        self._drain_cut.set()

    async def close(self) -> None:
        """Stop accepting, end every session (streams cancelled upstream), close sockets."""
        if self._server is None:
            return
        self.draining = True
        # Streams end first, so their clients receive finish (server_shutdown) before 1001.
        await self.hub.close(FinishReason.SERVER_SHUTDOWN)
        await asyncio.gather(*(session.flush(timeout=2.0) for session in list(self._sessions)))
        going_away = server_shutdown_close()
        self._server.close(close_connections=True, code=going_away.code,
                           reason=going_away.reason)
        await self._server.wait_closed()
        self._server = None
        if self.shared_limits is not None:
            await self.shared_limits.close()     # every stream has ended: last writes
        if self.replicator is not None:
            await self.replicator.close()
        if self._metrics_http is not None:
            await self._metrics_http.close()
            self._metrics_http = None
        from relay.upstream.fast import close_idle_http_client

        await close_idle_http_client()

    async def __aenter__(self) -> RelayServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ connections

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Answer a plain HTTP request, refuse an upgrade, or return None to upgrade.
        One request per connection; GET (and HEAD, without the body) only."""
        response = self._refuse_malformed(connection, request)
        if response is None:
            response = self._route(connection, request)
        if response is not None and _method(request) == "HEAD":
            return dataclasses.replace(response, body=b"")  # headers as for GET
        return response

    def _process_response(self, connection: ServerConnection, request: Request,
                          response: Response) -> None:
        """The upgrade's response, through its route's hook (``DialectRoute.on_upgrade``: an
        ``/ai-sdk`` client without ``--auth`` gets its chat owner cookie when it has none)."""
        if response.status_code != http.HTTPStatus.SWITCHING_PROTOCOLS:
            return
        route = route_for(request.path.split("?", 1)[0])
        if route is not None and route.on_upgrade is not None:
            route.on_upgrade(self, request.headers, response.headers)

    def _refuse_malformed(self, connection: ServerConnection,
                          request: Request) -> Response | None:
        """400 for bytes after the request head (pipelining) or a header sent twice that
        must appear once; 405 for a method other than GET/HEAD (GET only on the WebSocket
        path). One INFO line each, never a traceback."""
        method = _method(request)
        allowed = (("GET",) if route_for(request.path.split("?", 1)[0]) is not None
                   else ("GET", "HEAD"))
        if method not in allowed:
            # The method is the client's text: logged escaped, never echoed.
            response = _refuse(connection, http.HTTPStatus.METHOD_NOT_ALLOWED,
                               "method not allowed", method=ascii(method[:20]))
            response.headers["Allow"] = ", ".join(allowed)
            return response
        if getattr(connection, "had_body", False):
            return _refuse(connection, http.HTTPStatus.BAD_REQUEST,
                           "a request body is not accepted here")
        if getattr(connection, "sent_data_early", False):
            return _refuse(connection, http.HTTPStatus.BAD_REQUEST,
                           "one request per connection: nothing may follow the request "
                           "before its response")
        repeated = repeated_header(request.headers)
        if repeated is not None:
            return _refuse(connection, http.HTTPStatus.BAD_REQUEST,
                           f"header {repeated} appears more than once")
        return None

    def _route(self, connection: ServerConnection, request: Request) -> Response | None:
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
        if path.startswith(AI_SDK_EXAMPLE_PATH):
            # The useChat example (client_demo/ai-sdk/): its page and its built bundle only.
            sub = path[len(AI_SDK_EXAMPLE_PATH) - 1:]
            if sub in ("/", "/index.html", "/style.css") or sub.startswith("/dist/"):
                found = web.respond(connection, sub, root=AI_SDK_EXAMPLE_ROOT)
                if found is not None:
                    return found
            return _text(connection, http.HTTPStatus.NOT_FOUND, "not found\n")
        if route_for(path) is None:
            # The browser chat page (client_demo/web/), static files only; see relay/http/web.py.
            return web.respond(connection, path) or _text(
                connection, http.HTTPStatus.NOT_FOUND, "not found\n")
        if self.draining:
            return _text(connection, http.HTTPStatus.SERVICE_UNAVAILABLE, "draining\n")
        origin = request.headers.get("Origin")
        if origin is not None and not self._origin_allowed(origin):
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

    def _origin_allowed(self, origin: str) -> bool:
        """Browsers always send Origin; servers, agents and IDE plugins usually do not and
        are not restricted by it. Default: only the relay's own origins (its demo page),
        which come from ``public_url`` or the listen address, never from the request's
        ``Host`` (DNS rebinding); see relay/http/handshake.py."""
        assert self.origins is not None, "server not started"
        return self.origins.allows(origin)

    def _principal_of(self, ws: ServerConnection) -> str:
        """The client's address: the peer, or from a trusted proxy the rightmost
        X-Forwarded-For entry that is not a trusted proxy (relay/http/handshake.py)."""
        peer = ws.remote_address[0] if ws.remote_address else None
        forwarded = ws.request.headers.get_all("X-Forwarded-For") if ws.request else []
        return client_address(peer, forwarded, self._trusted_proxies)

    async def _handler(self, ws: ServerConnection) -> None:
        principal = address_principal(self._principal_of(ws))
        if self.principals.total_connections >= self.settings.max_connections:
            await _close(ws, refuse_at_door(Door.RELAY_FULL))
            return
        # Until its hello is accepted a connection holds a pending slot of its address, so
        # sockets that never authenticate cannot take the whole relay.
        release_pending, refusal = self.pending.enter(principal)
        if release_pending is None:
            logger.info("refused connection: %s", refusal, extra={"address": principal})
            await _close(ws, refuse_at_door(Door.TOO_MANY_PENDING, refusal))
            return
        try:
            await self._serve_connection(ws, principal, release_pending)
        finally:
            release_pending()

    async def _serve_connection(self, ws: ServerConnection, principal: str,
                                release_pending: Callable[[], None]) -> None:
        s = self.settings
        state = self.principals.get(principal)
        # With auth on, the principal is known once authenticated, on every route alike:
        # the connection machine checks its cap then (relay.core.connection). Without,
        # the principal is the address, capped here for every route.
        if state.connections >= s.max_connections_per_principal and not self.auth.enabled:
            await _close(ws, refuse_at_door(Door.PRINCIPAL_FULL))
            return
        state = self.principals.connect(principal)
        if s.send_buffer_bytes is not None:
            _set_send_buffer(ws, s.send_buffer_bytes)
        path = ws.request.path.split("?", 1)[0] if ws.request is not None else WS_PATH
        route = route_for(path) or DIALECTS[0]
        session = Session(ws, self.settings, self.registry, streams=self.streams,
                          draining=lambda: self.draining, principal=principal,
                          principal_state=state, metrics=self.metrics, auth=self.auth,
                          on_hello=release_pending, codec=route.codec,
                          adapter=route.adapter(self))
        self._sessions.add(session)
        self.metrics.connections.inc()
        try:
            await session.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            # The session task's boundary: a relay bug, logged with its traceback.
            logger.exception("session %s crashed", session.session_id)
            await _close(ws, internal_error_close())
        finally:
            self._sessions.discard(session)
            self.principals.disconnect(session.principal)  # the authenticated one, if any
            self.metrics.connections.dec()


async def _close(ws: ServerConnection, close: Close) -> None:
    """Carry out a close decided by relay.core.connection."""
    await ws.close(close.code, close.reason)


def _set_send_buffer(ws: ServerConnection, size: int) -> None:
    # Caps what the kernel holds for a client that stops reading; beyond it the backlog
    # stays in the stream logs, where slow_consumer_bytes measures it.
    sock = ws.transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


def _text(connection: ServerConnection, status: http.HTTPStatus, body: str) -> Response:
    return connection.respond(status, body)


def _refuse(connection: ServerConnection, status: http.HTTPStatus, reason: str,
            **extra: str) -> Response:
    peer = connection.remote_address[0] if connection.remote_address else None
    logger.info("refused HTTP request: %s", reason, extra={"peer": peer, **extra})
    return _text(connection, status, reason + "\n")


def _method(request: Request) -> str:
    # Older websockets releases have no Request.method: their parser closes a non-GET
    # request itself, without an answer.
    return getattr(request, "method", "GET")


def _all_interfaces(host: str) -> bool:
    return host.strip().strip("[]") in ("", "0.0.0.0", "::")
