"""Authentication: static API keys and short-lived signed tokens (JWT, HS256).

Off by default (``auth = False``): every connection is admitted and its principal is the
client's address. With ``auth`` on, a connection presents one credential, either

* in the ``Authorization: Bearer <credential>`` header of the WebSocket upgrade (servers,
  agents; a present but bad header is refused with HTTP 401 at the handshake), or
* in ``hello.token`` (browsers cannot set headers). The header wins when both are sent.

A credential is an API key from ``api_keys`` (plain, or stored as ``sha256:<hex>``; compared
in constant time) or a token minted with :func:`mint_token` / ``relay token mint`` and
signed with ``token_secret``. Claims of a token: ``sub`` (the principal), ``iat``, ``exp``,
optional ``nbf`` (not valid before), ``models`` (aliases it may use) and ``max_streams``
(concurrent streams). ``iat``, ``exp`` and ``nbf`` are integers in [0, ``MAX_TIMESTAMP``].

Call order: ``RelayServer`` builds one :class:`Authenticator`. At the upgrade,
``RelayServer._refuse_bad_authorization`` (from ``_process_request``) calls
:meth:`Authenticator.check_header` (HTTP 401). After ``hello``, the connection's machine
(``relay.core.connection.Connection``) calls :meth:`Authenticator.check_header`, else
:meth:`Authenticator.authenticate` on ``hello.token`` (it closes 4401 on an ``AuthError``);
a dialect without hello is authenticated the same way by the upgrade's header or, when its
requests carry credentials, by each request's (:meth:`Authenticator.check_header`). The
machine then asks the session (``AdoptCredentials``) to move the connection's accounting
from its address to the authenticated principal. At
each ``start`` it calls :meth:`Authenticator.expired` (then close 4401 ``token expired``
once the running streams have ended) and applies the claims. This module decides no close
code itself.

Principals are namespaced by the kind of credential, so that no credential can act as
another's principal (share its limits, resume its streams): ``key:<first 8 hex digits of
sha256(key)>`` for an API key, ``jwt:<sub>`` for a token (a token whose ``sub`` is
``key:1234abcd`` is ``jwt:key:1234abcd``, not that key), ``ip:<address>`` for a connection
without auth (:func:`address_principal`). Every comparison of principals (stream ownership
at resume, here and through Redis; per-principal limits) uses these values.

Credentials never reach a log, an error frame or a ``repr``: API keys are named by their
label, tokens by their principal.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import jwt

if TYPE_CHECKING:
    from pydantic import SecretStr

    from relay.core.limits import Principals

__all__ = [
    "AuthError", "Authenticator", "Credentials", "address_principal", "api_key_label",
    "hash_api_key", "mint_token", "token_principal",
]

logger = logging.getLogger("relay.core.auth")


class AuthSettings(Protocol):
    """The settings auth reads (``relay.config.RelaySettings`` has them). A port rather than
    an import: config calls ``check_auth_settings`` from its validator, so auth importing
    config would be a cycle."""

    auth: bool
    api_keys: list[str]
    token_secret: SecretStr | None

ALGORITHM = "HS256"
MISSING = "missing token"
INVALID = "invalid token"
EXPIRED = "token expired"
NOT_YET_VALID = "token not yet valid"

#: Time claims (``iat``, ``exp``, ``nbf``) are integer Unix seconds in [0, this]: the end of
#: year 9999. Floats (``1e30``, ``inf``, ``NaN``: a NaN ``exp`` would never expire, since
#: every comparison with NaN is false) and absurd integers are invalid tokens.
MAX_TIMESTAMP = 253_402_300_799


class AuthError(Exception):
    """A credential was missing, invalid or expired. ``reason`` is safe to show and log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Credentials:
    """Who a connection acts for, and what its credential allows."""

    principal: str
    method: str  # "api_key" or "token"
    models: frozenset[str] | None = None  # None: every alias
    max_streams: int | None = None
    expires_at: float | None = None  # Unix time; None: never (API keys)


def hash_api_key(key: str) -> str:
    """``sha256:<hex>``, the form in which a key may be stored in the settings."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def api_key_label(digest_hex: str) -> str:
    """The principal of an API key (also how logs name it)."""
    return "key:" + digest_hex[:8]


def token_principal(sub: str) -> str:
    """The principal of a signed token with this ``sub``."""
    return "jwt:" + sub


def address_principal(address: str) -> str:
    """The principal of a connection without auth: its client address."""
    return "ip:" + address


def mint_token(secret: str, sub: str, ttl: float, models: list[str] | None = None,
               max_streams: int | None = None) -> str:
    """A token for ``sub`` valid for ``ttl`` seconds, signed HS256 with ``secret``."""
    if not sub:
        raise ValueError("sub must be a non-empty string")
    if ttl <= 0:
        raise ValueError("ttl must be positive")
    if max_streams is not None and max_streams < 1:
        raise ValueError("max_streams must be at least 1")
    now = int(time.time())
    claims: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + int(round(ttl))}
    if models is not None:
        claims["models"] = list(models)
    if max_streams is not None:
        claims["max_streams"] = int(max_streams)
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def _parse_key(entry: str) -> bytes:
    if entry.startswith("sha256:"):
        hexdigest = entry[len("sha256:"):].strip().lower()
        try:
            digest = bytes.fromhex(hexdigest)
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise ValueError("an api_keys entry starting with 'sha256:' must be followed by "
                             "64 hex digits")
        return digest
    if not entry:
        raise ValueError("an api_keys entry is empty")
    return hashlib.sha256(entry.encode("utf-8")).digest()


def check_auth_settings(auth: bool, api_keys: list[str], token_secret: Any) -> None:
    """Startup checks (raise ValueError with a message that names no secret)."""
    for entry in api_keys:
        _parse_key(entry)
    if auth and not api_keys and token_secret is None:
        raise ValueError("auth is on but no credentials are configured: set api keys "
                         "(--api-key or RELAY_API_KEYS) or a token secret (RELAY_TOKEN_SECRET)")
    if token_secret is not None and not token_secret.get_secret_value():
        raise ValueError("token_secret is empty")


def _is_timestamp(value: Any) -> bool:
    """An integer Unix time in [0, MAX_TIMESTAMP] (``bool`` is an int in Python: not one)."""
    return (isinstance(value, int) and not isinstance(value, bool)
            and 0 <= value <= MAX_TIMESTAMP)


class Authenticator:
    """Checks credentials against the settings; admits connections (see module docstring).

    ``clock`` (Unix time) is used for token expiry; tests may replace it."""

    def __init__(self, settings: AuthSettings, principals: Principals | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.enabled = settings.auth
        self.clock = clock
        self._principals = principals
        self._keys = [_parse_key(k) for k in settings.api_keys]
        secret = settings.token_secret
        self._secret = secret.get_secret_value() if secret is not None else None

    def __repr__(self) -> str:
        return (f"Authenticator(enabled={self.enabled}, api_keys={len(self._keys)}, "
                f"tokens={self._secret is not None})")

    # ------------------------------------------------------------------ credentials

    def check_header(self, headers: Mapping[str, str]) -> Credentials | None:
        """Credentials from an ``Authorization`` header; None when auth is off or the header
        is absent. A present header that is not ``Bearer <valid credential>`` raises."""
        if not self.enabled:
            return None
        try:
            value = headers.get("Authorization")
        except LookupError:  # websockets: the header was sent more than once
            raise AuthError(INVALID) from None
        if value is None:
            return None
        scheme, _, credential = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            raise AuthError(INVALID)
        return self.authenticate(credential.strip())

    def authenticate(self, credential: str) -> Credentials:
        """An API key or a signed token -> Credentials; raises :class:`AuthError`."""
        if not credential:
            raise AuthError(MISSING)
        digest = hashlib.sha256(credential.encode("utf-8")).digest()
        matched = False
        for key in self._keys:  # every key is compared, in constant time each
            matched |= hmac.compare_digest(digest, key)
        if matched:
            return Credentials(api_key_label(digest.hex()), "api_key")
        if self._secret is None or credential.count(".") != 2:
            raise AuthError(INVALID)
        return self._decode(credential)

    def _decode(self, token: str) -> Credentials:
        try:
            # Expiry is checked below against self.clock (so it can be tested without sleeping).
            claims = jwt.decode(token, self._secret, algorithms=[ALGORITHM],
                                options={"require": ["sub", "iat", "exp"], "verify_exp": False,
                                         "verify_iat": False, "verify_nbf": False})
        except jwt.PyJWTError:
            raise AuthError(INVALID) from None
        sub, exp, models, max_streams = (claims.get("sub"), claims.get("exp"),
                                         claims.get("models"), claims.get("max_streams"))
        nbf = claims.get("nbf")
        if (not isinstance(sub, str) or not sub
                or not _is_timestamp(exp) or not _is_timestamp(claims.get("iat"))
                or (nbf is not None and not _is_timestamp(nbf))
                or (models is not None and (not isinstance(models, list)
                                            or not all(isinstance(m, str) for m in models)))
                or (max_streams is not None and (isinstance(max_streams, bool)
                                                 or not isinstance(max_streams, int)
                                                 or max_streams < 1))):
            raise AuthError(INVALID)
        creds = Credentials(token_principal(sub), "token",
                            frozenset(models) if models is not None else None,
                            max_streams, float(exp))
        if self.expired(creds):
            raise AuthError(EXPIRED)
        if nbf is not None and self.clock() < nbf:
            raise AuthError(NOT_YET_VALID)
        return creds

    @property
    def principals(self) -> Principals | None:
        """The server's per-principal counters, which a connection's accounting moves to
        once it is authenticated (relay.core.connection)."""
        return self._principals

    def expired(self, creds: Credentials | None) -> bool:
        return (creds is not None and creds.expires_at is not None
                and self.clock() >= creds.expires_at)
