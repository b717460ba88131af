"""The fast path's HTTP client: one shared ``httpx.AsyncClient`` per event loop, its
keep-alive connections pooled across streams.

* On aiohttp's wire (``relay.upstream.transport.AiohttpTransport``: HTTP parsed in C),
  unless proxies are set in the environment (httpx honours them only for a transport it
  builds itself, so then httpx's own transport is used);
* one connection per concurrent stream: no cap on connections (a cap would queue streams
  silently), at most 256 idle ones kept alive 30 s;
* no redirects followed; the request timeout is LiteLLM's ``request_timeout``;
* ``close_idle_http_client()`` closes the loop's client once no response is open on it
  (``RelayServer.close``; the next request opens a new one).
"""

from __future__ import annotations

import asyncio
import weakref

import httpx

__all__ = ["close_idle_http_client", "http_client"]

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = \
    weakref.WeakKeyDictionary()


def http_client() -> httpx.AsyncClient:
    """The running event loop's shared client (made on first use, or after it was closed)."""
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None or client.is_closed:
        import urllib.request

        from relay.upstream.llm import get_litellm

        timeout = float(getattr(get_litellm(), "request_timeout", 600) or 600)
        # Without proxies from the environment (which httpx honours only for a transport
        # it builds itself): aiohttp's wire, HTTP parsed in C (relay/upstream/transport.py).
        transport = None
        if not urllib.request.getproxies():
            from relay.upstream.transport import AiohttpTransport

            transport = AiohttpTransport()
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout),
            # One connection per concurrent stream: a pool cap would queue streams silently.
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256,
                                keepalive_expiry=30.0),
            follow_redirects=False,
            transport=transport,
        )
        _clients[loop] = client
    return client


async def close_idle_http_client() -> None:
    """Close this event loop's shared client (and its keep-alive connections) unless a
    response is still open on it (another relay server on the same loop still streaming).
    ``RelayServer.close`` calls it once its streams ended: an aiohttp session left to the
    garbage collector reports itself unclosed. The next fast-path request opens a new one."""
    client = _clients.get(asyncio.get_running_loop())
    if client is None or client.is_closed:
        return
    open_responses = getattr(client._transport, "open_responses", 0)
    if open_responses == 0:
        await client.aclose()
