"""``metrics_port``: /metrics on its own port (real HTTP GETs with urllib), not on the
WebSocket port; /healthz and /readyz stay on the WebSocket port."""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request

import pytest

from relay.cli import _build_parser
from relay.config import RelaySettings
from relay.runtime.server import RelayServer

from .helpers import Client, start_relay


def _get_blocking(port: int, path: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


async def get(port: int, path: str) -> tuple[int, str, str]:
    """A real HTTP GET from a thread (urllib), so the relay's loop keeps serving."""
    return await asyncio.to_thread(_get_blocking, port, path)


async def test_metrics_served_on_metrics_port_only_health_on_main_port():
    async with start_relay(metrics_port=0) as server:
        mport = server.metrics_port
        assert isinstance(mport, int) and mport not in (0, server.port)
        async with Client.connect(server.url) as c:
            await c.start("a", params={"max_tokens": 3})
            assert (await c.collect("a"))[-1]["status"] == "completed"
            status, ctype, body = await get(mport, "/metrics")
            assert status == 200 and ctype.startswith("text/plain")
            assert "relay_connections 1.0" in body
            assert 'relay_streams_total{status="completed"} 1.0' in body
            assert "relay_tokens_total 3.0" in body
            # query strings are fine, like on the main port
            assert (await get(mport, "/metrics?x=1"))[0] == 200
        # the main port no longer serves metrics; health stays there
        assert (await get(server.port, "/metrics"))[0] == 404
        assert (await get(server.port, "/healthz"))[:1] == (200,)
        assert (await get(server.port, "/readyz"))[0] == 200
        # the metrics port serves nothing else
        for path in ("/healthz", "/readyz", "/ws", "/"):
            assert (await get(mport, path))[0] == 404, path
    # stopped with the relay: nothing listens on the metrics port any more
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", mport), timeout=2).close()


async def test_without_metrics_port_metrics_stay_on_main_port():
    async with start_relay() as server:
        assert server.metrics_port is None
        status, ctype, body = await get(server.port, "/metrics")
        assert status == 200 and "relay_connections 0.0" in body


async def test_metrics_port_in_use_fails_start_and_frees_main_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = RelayServer(RelaySettings(port=0, metrics_port=port))
        with pytest.raises(OSError):
            await server.start()
        assert server._server is None and server.metrics_port is None


def test_metrics_port_flag_and_env_reach_the_setting(monkeypatch):
    args = vars(_build_parser().parse_args(["serve", "--metrics-port", "0"]))
    assert RelaySettings(**{k: v for k, v in args.items()
                            if k != "command" and v is not None}).metrics_port == 0
    monkeypatch.setenv("RELAY_METRICS_PORT", "9100")
    assert RelaySettings().metrics_port == 9100
    assert RelaySettings(metrics_port=None).metrics_port is None


class _Lines:
    """A stdout stand-in that wakes a waiter when a line containing ``needle`` is printed."""

    def __init__(self, needle: str) -> None:
        self.text = ""
        self.needle = needle
        self.seen = asyncio.Event()

    def write(self, data: str) -> int:
        self.text += data
        if self.needle in self.text:
            self.seen.set()
        return len(data)

    def flush(self) -> None:
        pass


async def test_serve_prints_metrics_url_and_serves_it(monkeypatch):
    import os
    import re
    import signal
    import sys

    from relay.app import build_registry
    from relay.cli import _run

    out = _Lines("/metrics")
    monkeypatch.setattr(sys, "stdout", out)
    settings = RelaySettings(port=0, metrics_port=0, demo_tps=0)
    serving = asyncio.create_task(_run(settings, build_registry(settings)))
    try:
        async with asyncio.timeout(10):
            await out.seen.wait()
        url = re.search(r"metrics on (http://127\.0\.0\.1:(\d+)/metrics)", out.text)
        assert url, out.text
        status, _, body = await get(int(url.group(2)), "/metrics")
        assert status == 200 and "relay_connections 0.0" in body
    finally:
        if not serving.done():  # _run's own SIGTERM handler: drain (nothing), close
            os.kill(os.getpid(), signal.SIGTERM)
        assert await asyncio.wait_for(serving, 10) == 0


async def test_metrics_port_answers_a_websocket_handshake_over_http_and_never_upgrades():
    """The metrics port is websockets' HTTP server whose ``process_request`` answers every
    request (relay.http.metrics_http.serve_http_only): a real WebSocket handshake gets the
    plain HTTP answer (200 at /metrics, 404 elsewhere), never a 101."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    async with start_relay(metrics_port=0) as server:
        for path, status in (("/metrics", 200), ("/ws", 404), ("/", 404)):
            with pytest.raises(InvalidStatus) as refused:
                async with connect(f"ws://127.0.0.1:{server.metrics_port}{path}",
                                   open_timeout=5):
                    pass
            assert refused.value.response.status_code == status, path
