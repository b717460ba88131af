"""What the relay decides about an HTTP request before any WebSocket exists.

Identity never comes from the request: a client chooses every header it sends.

* **Own origin** (:func:`own_origins`): from configuration, never from ``Host``. With
  ``public_url`` set, its origin (``ws``/``wss`` count as ``http``/``https``). Else from the
  listen address: a loopback listener (``127.0.0.1``, ``::1``, ``localhost``) owns
  ``http://127.0.0.1:P``, ``http://localhost:P`` and ``http://[::1]:P`` (P = the bound port)
  plus its own host; an all-interfaces listener (``0.0.0.0``, ``::``) owns only those loopback
  origins, because the names other machines reach it by are unknown (set ``public_url``);
  any other host owns ``http://<host>:P``. :class:`OriginPolicy` adds ``allow_origins``.
  Origins are compared normalised (scheme and host lower case, default port spelled out).
* **Client address** (:func:`client_address`): the TCP peer, unless the peer is a trusted
  proxy (an address or CIDR of ``trusted_proxies``). Then the ``X-Forwarded-For`` entries (all
  such headers, read as one comma-joined list) are walked from the right, skipping trusted
  proxies: the first other entry is the client. A client can prepend anything to the list
  but cannot change what the proxies appended after it. An entry that is not an IP address
  ends the walk at the last trusted hop; all entries trusted: the leftmost one.
* **One request per connection** (:class:`RelayConnection`): until the response is sent, the
  relay's HTTP parser sees the request head and nothing after it. Bytes after the head (a
  pipelined request, a frame sent before the ``101``) are dropped and the request is answered
  400 (``RelayConnection.sent_data_early``), instead of being read as WebSocket frames, which
  failed the connection under the pending response (an ``AssertionError`` in websockets).
* **Headers that must appear once** (:func:`repeated_header`): ``Host`` and ``Origin``;
  twice is 400, never an exception out of a header lookup (a repeated ``Authorization``
  is auth's 401). Several ``X-Forwarded-For`` headers are one list (above).
"""

from __future__ import annotations

import re

import ipaddress
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.protocol import CONNECTING

if TYPE_CHECKING:
    from websockets.datastructures import Headers

__all__ = ["OriginPolicy", "RelayConnection", "SINGLE_VALUED_HEADERS", "client_address",
           "normalize_origin", "origin_of_public_url", "own_origins", "parse_networks",
           "repeated_header"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_DEFAULT_PORTS = {"http": 80, "https": 443}
_WS_SCHEMES = {"ws": "http", "wss": "https"}
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

# Authorization is not here: relay/core/auth.py answers a repeated one with its own 401.
SINGLE_VALUED_HEADERS = ("Host", "Origin")


# ---------------------------------------------------------------------- origins

def _origin(scheme: str, host: str, port: int | None) -> str:
    ip = _parse_ip(host)
    if ip is not None:
        host = f"[{ip.compressed}]" if ip.version == 6 else ip.compressed
    return f"{scheme}://{host}:{port or _DEFAULT_PORTS[scheme]}"


def normalize_origin(value: str) -> str | None:
    """``scheme://host:port`` (lower case, default port spelled out) of an ``Origin`` value,
    or None when it is no http(s) origin (``null``, a path, user info, a bad port)."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if (scheme not in _DEFAULT_PORTS or not parts.hostname or parts.path or parts.query
            or parts.fragment or "@" in parts.netloc):
        return None
    return _origin(scheme, parts.hostname, port)


def origin_of_public_url(url: str) -> str:
    """The origin of ``public_url`` (its path is ignored); ValueError names what is wrong."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"public_url {url!r}: {exc}") from None
    scheme = _WS_SCHEMES.get(parts.scheme.lower(), parts.scheme.lower())
    if scheme not in _DEFAULT_PORTS:
        raise ValueError(f"public_url {url!r}: the scheme must be http, https, ws or wss")
    if not parts.hostname or "@" in parts.netloc:
        raise ValueError(f"public_url {url!r}: needs a host (and no user info)")
    return _origin(scheme, parts.hostname, port)


class AddressSettings(Protocol):
    """The settings ``own_origins`` reads (``relay.config.RelaySettings`` has them). A port,
    not an import: config's validators call this module, so importing config is a cycle."""

    public_url: str | None
    host: str


def own_origins(settings: AddressSettings, bound_port: int) -> frozenset[str]:
    """The origins that are the relay's own (see the module docstring)."""
    if settings.public_url is not None:
        return frozenset({origin_of_public_url(settings.public_url)})
    host = settings.host.strip().strip("[]").lower()
    loopback = {_origin("http", name, bound_port) for name in _LOOPBACK_HOSTS}
    ip = _parse_ip(host)
    if host in ("", "localhost") or (ip is not None and ip.is_unspecified):
        return frozenset(loopback)
    if ip is not None and ip.is_loopback:
        return frozenset(loopback | {_origin("http", host, bound_port)})
    return frozenset({_origin("http", host, bound_port)})


class OriginPolicy:
    """Which browser ``Origin`` may open a WebSocket: the relay's own origins and
    ``allow_origins`` (``*`` = any; entries also match exactly as written, e.g. ``null``)."""

    def __init__(self, own: Iterable[str], allow_origins: Iterable[str]) -> None:
        allowed = list(allow_origins)
        self.any = "*" in allowed
        self._exact = frozenset(allowed)
        self.origins = frozenset(own) | {n for a in allowed if (n := normalize_origin(a))}

    def allows(self, origin: str) -> bool:
        if self.any or origin in self._exact:
            return True
        normalized = normalize_origin(origin)
        return normalized is not None and normalized in self.origins


# ---------------------------------------------------------------------- client address

def _parse_ip(text: str) -> IPAddress | None:
    try:
        ip = ipaddress.ip_address(text.strip().removeprefix("[").removesuffix("]"))
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:  # a dual-stack socket's IPv4 peer
        return ip.ipv4_mapped
    return ip


def parse_networks(entries: Iterable[str]) -> tuple[IPNetwork, ...]:
    """``trusted_proxies`` as networks (a plain address is a /32 or /128)."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValueError(f"trusted proxy {entry!r} is not an IP address or CIDR") from None
    return tuple(networks)


def _trusted(ip: IPAddress, networks: tuple[IPNetwork, ...]) -> bool:
    return any(ip in network for network in networks)


def client_address(peer: str | None, forwarded_for: Iterable[str],
                   trusted: tuple[IPNetwork, ...]) -> str:
    """The address a connection's limits are keyed by (see the module docstring).
    ``forwarded_for`` holds the values of every ``X-Forwarded-For`` header, in order."""
    peer_ip = _parse_ip(peer) if peer else None
    if peer_ip is None:
        return peer or "unknown"
    if not _trusted(peer_ip, trusted):
        return str(peer_ip)
    hop = peer_ip
    entries = [entry for value in forwarded_for for entry in value.split(",")]
    for entry in reversed(entries):
        if not entry.strip():
            continue
        ip = _parse_ip(entry)
        if ip is None:
            break  # not written by a proxy we trust to write addresses
        hop = ip
        if not _trusted(ip, trusted):
            break
    return str(hop)


# ---------------------------------------------------------------------- request sanity

def repeated_header(headers: Headers) -> str | None:
    """The first of :data:`SINGLE_VALUED_HEADERS` the request carries more than once."""
    for name in SINGLE_VALUED_HEADERS:
        if len(headers.get_all(name)) > 1:
            return name
    return None


_MAX_HEAD_BYTES = 64 * 1024
_BODY_HEADER = re.compile(rb"(?im)^(content-length|transfer-encoding)[ \t]*:[ \t]*([^\r\n]*)\r\n")


def _without_body_headers(head: bytes) -> tuple[bytes, bool]:
    """``head`` without the headers announcing a body, and whether it announced one
    (``Content-Length`` other than 0, or any ``Transfer-Encoding``)."""
    had_body = False

    def drop(match: re.Match[bytes]) -> bytes:
        nonlocal had_body
        if match.group(1).lower() == b"transfer-encoding" or match.group(2).strip() != b"0":
            had_body = True
        return b""

    first_line_end = head.find(b"\r\n") + 2
    rest = _BODY_HEADER.sub(drop, head[first_line_end:])
    return head[:first_line_end] + rest, had_body


class RelayConnection(ServerConnection):
    """websockets' server connection, fed only the request head until the response is sent.

    websockets parses whatever follows the request head as WebSocket frames at once, even
    before the handshake response: a pipelined second request fails the connection (EOF
    sent), then sending the response asserts. Here those bytes are held back and dropped, and
    ``sent_data_early`` tells ``process_request`` to answer 400. After a ``101`` every byte
    goes to the protocol as before (a client must wait for the ``101`` before sending frames,
    RFC 6455 section 4.1)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent_data_early = False
        #: The request announced a body (websockets' parser takes none): its body headers
        #: were removed before parsing, so ``process_request`` can still answer it (405 for
        #: a method other than GET/HEAD, else 400) instead of the connection just closing.
        self.had_body = False
        self._head_done = False
        self._head = b""   # the request head, buffered until its blank line

    def data_received(self, data: bytes) -> None:
        if self.protocol.state is not CONNECTING or self.protocol.handshake_exc is not None:
            super().data_received(data)  # open (or refused by the parser): not ours to hold
            return
        if self._head_done:
            self.sent_data_early = True
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > _MAX_HEAD_BYTES:   # let the parser refuse it, as before
                self._head_done = True
                head, self._head = self._head, b""
                super().data_received(head)
            return
        self._head_done = True
        head, rest = self._head[:end + 4], self._head[end + 4:]
        self._head = b""
        head, self.had_body = _without_body_headers(head)
        if rest:
            self.sent_data_early = True
        super().data_received(head)
