"""``/metrics`` on a port of its own (setting ``metrics_port``), so Prometheus can scrape
from an internal network while the WebSocket port is exposed.

The HTTP side is websockets' own HTTP/1.1 server (the same parser the relay port uses), via
``serve_http_only``: ``process_request`` answers every request, so no connection is ever
upgraded and no handler runs (the supervisor's aggregate ``/metrics`` uses it too).
Lifecycle (``RelayServer`` drives it)::

    http = MetricsHTTPServer(metrics, host, port)   # port 0: the OS picks one
    await http.start()                              # http.port: the bound port
    ...
    await http.close()                              # listening socket and connections closed

Routes: ``GET /metrics`` (Prometheus text format); anything else is 404. Only ``GET`` is
parsed by websockets; other methods are rejected by it with a 4xx before reaching us.
"""

from __future__ import annotations

import dataclasses
import http

from collections.abc import Awaitable, Callable

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from relay.metrics import CONTENT_TYPE_LATEST, RelayMetrics

__all__ = ["MetricsHTTPServer", "metrics_response", "serve_http_only"]

#: What answers a plain HTTP request: a response, never None (None would upgrade).
AnswerRequest = Callable[[ServerConnection, Request], Response | Awaitable[Response]]


async def serve_http_only(answer: AnswerRequest, host: str, port: int) -> Server:
    """websockets' HTTP/1.1 server on ``host:port`` for a port that speaks plain HTTP:
    ``answer`` is its ``process_request`` and must return a response for every request, so
    no connection is ever upgraded to a WebSocket and the connection handler never runs."""
    return await serve(_never_upgraded, host, port, process_request=answer,
                       compression=None, server_header="llm-relay")


async def _never_upgraded(ws: ServerConnection) -> None:  # pragma: no cover - see above
    # Unreachable while ``answer`` answers every request; websockets wants a handler anyway.
    from relay.core.connection import not_a_websocket_endpoint

    close = not_a_websocket_endpoint()
    await ws.close(close.code, close.reason)


def metrics_response(connection: ServerConnection, metrics: RelayMetrics) -> Response:
    """A 200 response carrying ``metrics`` in the Prometheus text exposition format."""
    body = metrics.render()
    response = connection.respond(http.HTTPStatus.OK, "")
    del response.headers["Content-Type"], response.headers["Content-Length"]
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    response.headers["Content-Length"] = str(len(body))
    return dataclasses.replace(response, body=body)


class MetricsHTTPServer:
    """Serves ``metrics`` at ``/metrics`` on ``host:port``; nothing else."""

    def __init__(self, metrics: RelayMetrics, host: str, port: int) -> None:
        self.metrics = metrics
        self.host = host
        self._requested_port = port
        self._server: Server | None = None

    async def start(self) -> None:
        self._server = await serve_http_only(self._process_request, self.host,
                                             self._requested_port)

    @property
    def port(self) -> int:
        assert self._server is not None, "metrics server not started"
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close(close_connections=True)
        await server.wait_closed()

    def _process_request(self, connection: ServerConnection, request: Request) -> Response:
        if request.path.split("?", 1)[0] == "/metrics":
            return metrics_response(connection, self.metrics)
        return connection.respond(http.HTTPStatus.NOT_FOUND, "not found\n")
