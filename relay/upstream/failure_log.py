"""What the log says about a provider failure: which upstream host, and the cause in words.

The wire gets a fixed sentence (``relay.upstream.errors``); the operator's log line needs
more, to fix it: ``upstream failure for model openai/gpt-x at 127.0.0.1:8000:
upstream_error (ConnectError <- ConnectionRefusedError: Connect call failed ('127.0.0.1',
8000))``. Only safe parts are written: the host
and port (never the URL: a path or query may carry a key), exception class names, the
operating system's error text (``strerror``), the TLS verification message, and an HTTP
status. Exception messages and provider response bodies are never copied (LiteLLM puts the
provider's body in them, and a body may echo the key).
"""

from __future__ import annotations

import ssl
from urllib.parse import urlsplit

__all__ = ["failure_cause", "upstream_host"]

#: Exception modules whose ``request`` is the request really sent. LiteLLM's own exceptions
#: may carry a placeholder request (a default URL), so their host is not believed.
_REAL_REQUEST_MODULES = ("httpx", "httpcore", "openai", "anthropic")


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps (``original_exception``, ``__cause__``, ``__context__``),
    outermost first, each once."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(seen) < 12 and all(current is not s for s in seen):
        seen.append(current)
        inner = getattr(current, "original_exception", None)
        current = inner if isinstance(inner, BaseException) else (current.__cause__
                                                                  or current.__context__)
    return seen


def upstream_host(exc: BaseException, api_base: str | None) -> str | None:
    """``host:port`` the failed request went to: from the HTTP library's own request when
    the exception carries it, else from the alias's ``api_base``; None when neither says
    (a provider's default endpoint reached through a library that does not tell)."""
    for candidate in _chain(exc):
        if not type(candidate).__module__.startswith(_REAL_REQUEST_MODULES):
            continue
        try:
            # (getattr: only the exceptions of _REAL_REQUEST_MODULES carry a request)
            url = getattr(candidate, "request").url   # httpx raises RuntimeError when unset
        except Exception:
            continue
        host = getattr(url, "host", None)
        if host:
            port = getattr(url, "port", None)
            return f"{host}:{port}" if port else str(host)
    if api_base:
        try:
            parts = urlsplit(api_base)
            host, port = parts.hostname, parts.port
        except ValueError:
            return None
        if host:
            return f"{host}:{port}" if port else host
    return None


def failure_cause(exc: BaseException) -> str:
    """The failure in a few safe words: the outermost exception's class, then the innermost
    one's (the root cause) when it differs, with the root's OS or TLS error text or HTTP
    status. Only the root is asked for a status: wrappers invent one (LiteLLM reports a
    stream cut after a 200 as status 500)."""
    chain = _chain(exc)
    outer, root = chain[0], chain[-1]
    names = type(outer).__name__
    if root is not outer and type(root).__name__ != names:
        names += f" <- {type(root).__name__}"
    detail = None
    if isinstance(root, ssl.SSLCertVerificationError) and root.verify_message:
        detail = root.verify_message
    elif isinstance(root, OSError) and isinstance(root.strerror, str):
        detail = root.strerror
    elif _status(root) is not None:
        detail = f"HTTP {_status(root)}"
    return f"{names}: {detail}" if detail else names


def _status(exc: BaseException) -> int | None:
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        return status
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return status if isinstance(status, int) else None
