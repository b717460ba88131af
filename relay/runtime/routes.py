"""The relay's WebSocket routes: one per wire dialect, each a codec over the one core.

A ``DialectRoute`` is what the server needs to serve a dialect: its path, its sans-I/O codec
(``llm_relay_protocol.dialect.Codec``), and, when its requests mean more than v1's, the runtime adapter
(``relay.runtime.session.DialectAdapter``) that carries them out. Everything else (the
Origin check, the door's caps, the handshake, authentication, limits, errors, closes, the
writer and the backpressure rule) is the same code for every route. Adding a dialect is a
codec module in clients/python/llm_relay_protocol/ and one entry in ``DIALECTS``; tests/relay/test_dialect_doors.py
holds every registered dialect to the same door and limits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from websockets.datastructures import Headers

from llm_relay_protocol.aisdk import AiSdkCodec
from llm_relay_protocol.dialect import Codec
from llm_relay_protocol.responses import ResponsesCodec
from llm_relay_protocol.v1 import V1Codec

from relay.config import RelaySettings
from relay.core.auth import Authenticator
from relay.runtime.aisdk import AI_SDK_PATH, AiSdkAdapter, ChatIndex, issue_chat_owner
from relay.runtime.responses import RESPONSES_PATH, ChainStore, ResponsesAdapter
from relay.runtime.session import DialectAdapter, Session

__all__ = ["DIALECTS", "DialectRoute", "WS_PATH", "route_for"]

WS_PATH = "/ws"

class ServerServices(Protocol):
    """What the server passes a route's hooks: the ``RelayServer`` (its shared services
    the routes use)."""

    settings: RelaySettings
    auth: Authenticator
    chats: ChatIndex
    chains: ChainStore


def _v1_adapter(server: ServerServices) -> Callable[[Session], DialectAdapter]:
    return DialectAdapter


def _aisdk_adapter(server: ServerServices) -> Callable[[Session], DialectAdapter]:
    chats = server.chats
    return lambda session: AiSdkAdapter(session, chats=chats)


def _responses_adapter(server: ServerServices) -> Callable[[Session], DialectAdapter]:
    chains = server.chains
    return lambda session: ResponsesAdapter(session, chains=chains)


def _aisdk_upgrade(server: ServerServices, request_headers: Headers,
                   response_headers: Headers) -> None:
    """Without ``--auth``, the chat owner cookie (relay.runtime.aisdk ``issue_chat_owner``)."""
    if not server.auth.enabled:
        public = server.settings.public_url or ""
        issue_chat_owner(request_headers, response_headers,
                         secure=public.startswith(("https:", "wss:")))


@dataclass(frozen=True)
class DialectRoute:
    """One WebSocket path and the dialect spoken on it (module docstring). ``adapter``:
    given the server, what builds a connection's runtime adapter; ``on_upgrade``: a hook
    on the 101 response (server, request headers, response headers), or None."""

    path: str
    codec: Codec
    adapter: Callable[[ServerServices], Callable[[Session], DialectAdapter]] = _v1_adapter
    on_upgrade: Callable[[ServerServices, Headers, Headers], None] | None = None

    @property
    def name(self) -> str:
        return self.codec.name


#: Every dialect the relay serves, by path.
DIALECTS: tuple[DialectRoute, ...] = (
    DialectRoute(WS_PATH, V1Codec()),
    DialectRoute(AI_SDK_PATH, AiSdkCodec(), _aisdk_adapter, _aisdk_upgrade),
    DialectRoute(RESPONSES_PATH, ResponsesCodec(), _responses_adapter),
)


def route_for(path: str) -> DialectRoute | None:
    """The route serving ``path`` (without its query), or None."""
    return next((route for route in DIALECTS if route.path == path), None)
