"""The relay's HTTP door (issue 10, items 4, 6, 7, 13, 14), against a real relay on a real
socket: own origin from configuration (not ``Host``), the client address from the rightmost
untrusted ``X-Forwarded-For`` entry, caps on connections that never send ``hello``, 400 for
malformed or pipelined requests, GET/HEAD only.

Raw requests are written by hand (``asyncio.open_connection``) so that they reach the relay
exactly as an attacker would send them; HTTP and WebSocket client libraries refuse to."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import pytest
from pydantic import ValidationError
from websockets.asyncio.client import connect

from relay.http import web
from relay.config import RelaySettings
from relay.http.handshake import client_address, own_origins, parse_networks

from .helpers import SUBPROTOCOL, Client, eventually, start_relay
from .test_core import _close_of

KEY = "sk-relay-TEST-key-http-hardening-01"
UPGRADE = ("Upgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
           f"Sec-WebSocket-Protocol: {SUBPROTOCOL}\r\n")


async def exchange(port: int, raw: str | bytes) -> tuple[int, dict[str, str], bytes]:
    """Write ``raw`` in one piece; return the status, headers (lower-case names, last wins)
    and every byte after the head until the relay closes (or, after a 101, none)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw.encode("latin-1") if isinstance(raw, str) else raw)
        async with asyncio.timeout(10):
            status_line = (await reader.readline()).decode("latin-1")
            assert status_line, "the relay closed without an HTTP response"
            headers: dict[str, str] = {}
            while (line := (await reader.readline()).decode("latin-1").rstrip("\r\n")):
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            status = int(status_line.split()[1])
            rest = b"" if status == 101 else await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return status, headers, rest


def upgrade(port: int, *, host: str | None = None, extra: str = "") -> str:
    host = host if host is not None else f"127.0.0.1:{port}"
    return f"GET /ws HTTP/1.1\r\nHost: {host}\r\n{UPGRADE}{extra}\r\n"


def no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, "\n".join(f"{r.name}: {r.getMessage()}" for r in bad)


# ---------------------------------------------------------------------- 4: DNS rebinding

async def test_dns_rebinding_host_header_does_not_make_an_origin_the_relays_own():
    """A rebinding page at http://evil.example:P reaches the relay by IP: its requests carry
    ``Host: evil.example:P`` and ``Origin: http://evil.example:P``. Before, the own origin was
    derived from ``Host``, so that matched; now it comes from the listen address."""
    for allow in ([], ["https://app.example"]):
        async with start_relay(allow_origins=allow) as server:
            p = server.port
            evil = f"evil.example:{p}"
            status, _, _ = await exchange(p, upgrade(p, host=evil,
                                                     extra=f"Origin: http://{evil}\r\n"))
            assert status == 403, allow
            # The loopback names of a loopback listener are its own, whatever Host says.
            for own in (f"http://127.0.0.1:{p}", f"http://localhost:{p}", f"http://[::1]:{p}",
                        f"HTTP://LOCALHOST:{p}"):
                status, _, _ = await exchange(p, upgrade(p, host=evil,
                                                         extra=f"Origin: {own}\r\n"))
                assert status == 101, own
            for other in (f"http://127.0.0.1:{p + 1}", f"https://127.0.0.1:{p}", "null",
                          f"http://127.0.0.1:{p}/path"):
                status, _, _ = await exchange(p, upgrade(p, extra=f"Origin: {other}\r\n"))
                assert status == 403, other


async def test_public_url_is_the_own_origin_and_the_page_still_connects():
    async with start_relay(public_url="wss://relay.example/llm/") as server:
        p = server.port
        for origin, status in (("https://relay.example", 101), ("https://relay.example:443", 101),
                               ("http://relay.example", 403), (f"http://127.0.0.1:{p}", 403)):
            got, _, _ = await exchange(p, upgrade(p, host="relay.example",
                                                  extra=f"Origin: {origin}\r\n"))
            assert got == status, origin
    # The default: the demo page, opened via 127.0.0.1 or localhost, connects with the
    # websockets client too (it sends Origin and Host like a browser would).
    async with start_relay() as server:
        for name in ("127.0.0.1", "localhost"):
            async with Client.connect(server.url, origin=f"http://{name}:{server.port}") as c:
                assert c.welcome["type"] == "welcome"


def test_own_origins_come_from_the_listen_address_or_public_url():
    loopback = {"http://127.0.0.1:8765", "http://localhost:8765", "http://[::1]:8765"}
    assert own_origins(RelaySettings(host="127.0.0.1"), 8765) == loopback
    assert own_origins(RelaySettings(host="::1"), 8765) == loopback
    assert own_origins(RelaySettings(host="127.0.0.2"), 8765) == loopback | {
        "http://127.0.0.2:8765"}
    # All interfaces and no --public-url: the names others use are unknown; loopback only.
    assert own_origins(RelaySettings(host="0.0.0.0"), 8765) == loopback
    assert own_origins(RelaySettings(host="::"), 8765) == loopback
    assert own_origins(RelaySettings(host="192.0.2.7"), 80) == {"http://192.0.2.7:80"}
    assert own_origins(RelaySettings(host="0.0.0.0", public_url="https://Relay.Example:8443/x"),
                       8765) == {"https://relay.example:8443"}
    for bad in ("ftp://relay.example", "https://", "relay.example", "https://u:p@relay.example",
                "https://relay.example:99999"):
        with pytest.raises(ValidationError):
            RelaySettings(public_url=bad)


# ---------------------------------------------------------------------- 6: X-Forwarded-For

async def test_forwarded_for_uses_the_rightmost_untrusted_entry():
    """A client behind the proxy 127.0.0.1 prepends an address of its choice; the proxy
    appends the address it saw (10.0.0.5). Rotating the prepended address must not make a
    new principal: the second connection is over the per-principal limit of 1."""
    async with start_relay(trusted_proxies=["127.0.0.1"],
                           max_connections_per_principal=1) as server:
        async with Client.connect(server.url, additional_headers={
                "X-Forwarded-For": "1.1.1.1, 10.0.0.5"}) as first:
            assert [s.principal for s in server.sessions] == ["ip:10.0.0.5"]
            async with connect(server.url, subprotocols=[SUBPROTOCOL], additional_headers={
                    "X-Forwarded-For": "2.2.2.2, 10.0.0.5"}) as second:
                code, reason = await _close_of(second)
            assert code == 4429 and "principal" in reason
            await first.send({"type": "ping"})
            assert (await first.recv())["type"] == "pong"


async def test_forwarded_for_trusted_cidrs_and_two_headers_as_one_list(caplog):
    """Proxies given as CIDRs are skipped from the right; two X-Forwarded-For headers are one
    comma-joined list (before: 1011 and a traceback)."""
    caplog.set_level(logging.INFO)
    async with start_relay(trusted_proxies=["127.0.0.0/8", "10.0.0.0/8"]) as server:
        async with Client.connect(server.url, additional_headers={
                "X-Forwarded-For": "6.6.6.6, 203.0.113.7, 10.1.2.3"}):
            assert [s.principal for s in server.sessions] == ["ip:203.0.113.7"]
        await eventually(lambda: not server.sessions)
        async with Client.connect(server.url, additional_headers=[
                ("X-Forwarded-For", "6.6.6.6, 198.51.100.9"),
                ("X-Forwarded-For", "10.9.9.9")]) as c:
            assert c.welcome["type"] == "welcome"
            assert [s.principal for s in server.sessions] == ["ip:198.51.100.9"]
    no_errors_logged(caplog)


async def test_forwarded_for_from_an_untrusted_peer_is_ignored():
    async with start_relay(trusted_proxies=["10.0.0.0/8"]) as server:
        async with Client.connect(server.url, additional_headers={"X-Forwarded-For": "6.6.6.6"}):
            assert [s.principal for s in server.sessions] == ["ip:127.0.0.1"]


def test_client_address_walk():
    trusted = parse_networks(["10.0.0.0/8", "192.0.2.1", "::1"])
    assert client_address("192.0.2.1", ["1.1.1.1, 203.0.113.7"], trusted) == "203.0.113.7"
    assert client_address("192.0.2.1", ["1.1.1.1, 203.0.113.7, 10.2.3.4"], trusted) == \
        "203.0.113.7"
    # All hops trusted: the leftmost. An entry that is no IP ends the walk at the last
    # trusted hop. Empty entries are skipped; an IPv4-mapped peer is its IPv4 address.
    assert client_address("192.0.2.1", ["10.1.1.1, 10.2.2.2"], trusted) == "10.1.1.1"
    assert client_address("192.0.2.1", ["1.1.1.1, nonsense, 10.2.2.2"], trusted) == "10.2.2.2"
    assert client_address("192.0.2.1", ["203.0.113.7, , "], trusted) == "203.0.113.7"
    assert client_address("::ffff:192.0.2.1", ["203.0.113.8"], trusted) == "203.0.113.8"
    assert client_address("::1", ["[2001:db8::1]"], trusted) == "2001:db8::1"
    assert client_address("198.51.100.1", ["203.0.113.7"], trusted) == "198.51.100.1"
    assert client_address("192.0.2.1", [], trusted) == "192.0.2.1"
    with pytest.raises(ValidationError):
        RelaySettings(trusted_proxies=["proxy.example"])


# ---------------------------------------------------------------------- 7: pre-hello caps

async def _silent(url: str, source: str, stack: contextlib.AsyncExitStack):
    """A socket from ``source`` (a loopback address) that upgrades and never says hello."""
    return await stack.enter_async_context(
        connect(url, subprotocols=[SUBPROTOCOL], local_addr=(source, 0)))


async def test_sockets_without_hello_cannot_lock_out_an_authenticated_user():
    """12 sockets that never send hello from 127.0.0.2 (the relay allows 12 connections):
    only 4 are held, the rest are closed 4429, and a user from 127.0.0.1 gets in with its
    key. Before, the 12 filled --max-connections and the user got 4429."""
    async with start_relay(auth=True, api_keys=[KEY], max_connections=12,
                           max_pending_connections=6, max_pending_per_address=4,
                           hello_timeout=30) as server:
        async with contextlib.AsyncExitStack() as stack:
            silent = [await _silent(server.url, "127.0.0.2", stack) for _ in range(12)]
            closed = []
            for ws in silent[4:]:
                closed.append(await _close_of(ws))
            assert {c for c, _ in closed} == {4429}
            assert all("awaiting hello from this address" in r for _, r in closed)
            assert server.pending.count("ip:127.0.0.2") == 4
            async with Client.connect(server.url, hello=False) as user:
                await user.send({"type": "hello", "token": KEY,
                                 "client": {"name": "tests", "version": "0"}})
                assert (await user.recv())["type"] == "welcome"
                await user.start("1")
                assert (await user.collect("1"))[-1]["type"] == "finish"
            assert server.pending.count("ip:127.0.0.1") == 0  # released at hello
        await eventually(lambda: server.pending.total == 0)  # and when a socket ends


async def test_pending_connections_are_capped_in_total():
    """Default total cap: a quarter of --max-connections (8 -> 2), whatever the address."""
    async with start_relay(max_connections=8) as server:
        async with contextlib.AsyncExitStack() as stack:
            first = await _silent(server.url, "127.0.0.2", stack)
            await _silent(server.url, "127.0.0.3", stack)
            third = await _silent(server.url, "127.0.0.4", stack)
            code, reason = await _close_of(third)
            assert code == 4429 and "awaiting hello on this relay" in reason
            # A hello frees its slot: the next newcomer is admitted.
            await first.send(json.dumps({"type": "hello",
                                         "client": {"name": "tests", "version": "0"}}))
            assert json.loads(await first.recv())["type"] == "welcome"
            async with Client.connect(server.url) as c:
                assert c.welcome["type"] == "welcome"
    with pytest.raises(ValidationError):
        RelaySettings(max_pending_per_address=0)
    assert RelaySettings(max_connections=10_000).pending_connections_cap == 2_500
    assert RelaySettings(max_pending_connections=7).pending_connections_cap == 7


# ---------------------------------------------------------------------- 13: malformed requests

@pytest.mark.parametrize("extra", [
    "Origin: http://127.0.0.1:{p}\r\nOrigin: http://evil.example\r\n",
    "Host: evil.example\r\n",
])
async def test_a_header_sent_twice_is_400_not_a_traceback(extra, caplog):
    caplog.set_level(logging.INFO)
    async with start_relay(auth=True, api_keys=[KEY]) as server:
        p = server.port
        status, _, body = await exchange(p, upgrade(p, extra=extra.format(p=p)))
        assert status == 400 and b"more than once" in body
        assert (await exchange(p, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"))[0] == 200
    no_errors_logged(caplog)
    refusals = [r for r in caplog.records if r.name == "relay.runtime.server"
                and r.getMessage().startswith("refused HTTP request")]
    assert len(refusals) == 1


@pytest.mark.parametrize("second", [
    "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",   # a pipelined request
    "\x81\x85\x00\x00\x00\x00hello",                # a frame sent before the 101
])
async def test_pipelined_requests_are_400_not_a_traceback(second, caplog):
    """Before: the bytes after the first request were parsed as WebSocket frames, which
    failed the connection under the pending response (AssertionError, no answer)."""
    caplog.set_level(logging.INFO)
    async with start_relay() as server:
        p = server.port
        for first in ("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", upgrade(p)):
            for _ in range(3):
                status, headers, body = await exchange(p, first + second)
                assert status == 400 and b"one request per connection" in body
                assert headers["connection"] == "close"
        assert (await exchange(p, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"))[0] == 200
    no_errors_logged(caplog)


# ---------------------------------------------------------------------- 14: methods

@pytest.mark.parametrize("path", ["/", "/healthz", "/app.js", "/nope"])
async def test_head_answers_like_get_without_the_body(path):
    async with start_relay() as server:
        p = server.port
        get = await exchange(p, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await exchange(p, f"HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head[0] == get[0]
    assert head[1]["content-length"] == str(len(get[2])) and head[1]["content-type"]
    assert head[2] == b""
    if path == "/":
        assert get[2] == (web.WEB_ROOT / "index.html").read_bytes()


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "TRACE", "OPTIONS", "PATCH"])
async def test_other_methods_are_405_with_allow(method, caplog):
    caplog.set_level(logging.INFO)
    async with start_relay() as server:
        p = server.port
        for path in ("/", "/healthz", "/readyz", "/index.html"):
            status, headers, body = await exchange(
                p, f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            assert (status, headers["allow"]) == (405, "GET, HEAD"), path
            assert body == b"method not allowed\n"
        # The WebSocket path takes GET only; HEAD there is 405 as well.
        for verb in (method, "HEAD"):
            status, headers, _ = await exchange(
                p, upgrade(p).replace("GET /ws", f"{verb} /ws", 1))
            assert (status, headers["allow"]) == (405, "GET")
    no_errors_logged(caplog)


@pytest.mark.parametrize("request_with_body, status", [
    ("POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", 405),
    ("PUT / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
     405),
    ("POST /ws HTTP/1.1\r\nHost: x\r\ncontent-length : 2\r\n\r\n{}", 405),
    ("GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", 400),
])
async def test_a_request_with_a_body_gets_405_or_400(request_with_body, status, caplog):
    """websockets' request parser accepts no body (Content-Length other than 0, any
    Transfer-Encoding): the relay takes the body headers out of the head before it is
    parsed, so a POST/PUT with a body still gets 405 (with Allow) and a GET with one 400,
    instead of a silently closed connection. Quietly."""
    caplog.set_level(logging.INFO)
    async with start_relay() as server:
        answer = await exchange(server.port, request_with_body)
        assert answer[0] == status, answer
        if status == 405:
            assert answer[1]["allow"] in ("GET, HEAD", "GET")
        healthz = await exchange(server.port, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert healthz[0] == 200
    no_errors_logged(caplog)


async def test_a_request_head_arriving_in_pieces_is_answered_normally():
    """The end of the head is found across reads (the blank line split between them)."""
    async with start_relay() as server:
        head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        for cut in (1, len(head) - 3, len(head) - 2, len(head) - 1):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            for piece in (head[:cut], head[cut:]):
                writer.write(piece)
                await writer.drain()
            async with asyncio.timeout(10):
                answer = await reader.read()
            writer.close()
            assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"ok\n"), cut
