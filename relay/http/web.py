"""Static files of the browser chat page (``client_demo/web/``), served by the relay itself.

``RelayServer._process_request`` calls :func:`respond` for every plain HTTP request that is
not one of its own routes. The rules, each one tested (``tests/relay/test_web.py``):

* ``/`` is ``index.html``; any other path names one file directly inside the web root
  (sub-directories too, if ever added) after percent-decoding.
* ``/relay-client.js`` and ``/client-policy.js`` are the JS client package's own files
  (``clients/js/``, the npm package ``llm-relay-client``): the page runs exactly the client
  that ``npm pack`` ships, never a copy.
* Refused with 404 (never with a hint of what exists): a ``..`` or ``.`` segment, a segment
  starting with ``.`` (hidden files), a backslash or NUL, an empty segment (``//``), a
  directory, a symlink leading outside the root, a file whose extension has no content type
  below, a missing file.
* Every file answer carries its content type, ``Cache-Control: no-cache`` (the page is
  small; an edited file shows up on reload), ``X-Content-Type-Options: nosniff`` and a
  Content-Security-Policy that allows only the relay's own scripts and styles.

No build step: the files are plain HTML, CSS and ES modules, read from disk per request
(the page's two Markdown libraries are checked in under ``vendor/``, a sub-directory).
"""

from __future__ import annotations

import dataclasses
import http
from pathlib import Path
from urllib.parse import unquote

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Response

__all__ = ["WEB_ROOT", "CLIENT_PACKAGE_ROOT", "CLIENT_PACKAGE_FILES", "CONTENT_TYPES", "respond"]

WEB_ROOT = Path(__file__).resolve().parents[2] / "client_demo" / "web"
#: The JS client package (npm ``llm-relay-client``) and the files of it the page imports.
CLIENT_PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "clients" / "js"
CLIENT_PACKAGE_FILES = frozenset({"relay-client.js", "client-policy.js"})

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
}

# The page talks only to its own relay (connect-src 'self' covers same-origin ws: in CSP 3);
# ws:/wss: stay allowed so relay-client.js can be pointed at another relay from the console.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self' ws: wss:; object-src 'none'; base-uri 'none'; "
       "frame-ancestors 'none'; form-action 'none'")


def resolve(path: str, root: Path = WEB_ROOT) -> Path | None:
    """The file ``path`` (the URL path, query already removed) names, or None."""
    if path in ("", "/"):
        path = "/index.html"
    if not path.startswith("/"):
        return None
    decoded = unquote(path[1:], errors="strict") if "%" in path else path[1:]
    if "\\" in decoded or "\x00" in decoded:
        return None
    parts = decoded.split("/")
    if any(part == "" or part.startswith(".") for part in parts):
        return None  # also rejects "." and ".."
    if root == WEB_ROOT and decoded in CLIENT_PACKAGE_FILES:
        root = CLIENT_PACKAGE_ROOT
    if Path(parts[-1]).suffix.lower() not in CONTENT_TYPES:
        return None
    try:
        root = root.resolve(strict=True)
        candidate = root.joinpath(*parts).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not candidate.is_relative_to(root) or not candidate.is_file():
        return None
    return candidate


def respond(connection: ServerConnection, path: str, root: Path = WEB_ROOT) -> Response | None:
    """A response for a static file, or None when ``path`` names none (the caller 404s)."""
    try:
        file = resolve(path, root)
    except UnicodeDecodeError:
        return None
    if file is None:
        return None
    try:
        body = file.read_bytes()
    except OSError:
        return None
    response = connection.respond(http.HTTPStatus.OK, "")
    del response.headers["Content-Type"], response.headers["Content-Length"]
    response.headers["Content-Type"] = CONTENT_TYPES[file.suffix.lower()]
    response.headers["Content-Length"] = str(len(body))
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Content-Type-Options"] = "nosniff"
    if file.suffix.lower() == ".html":
        response.headers["Content-Security-Policy"] = CSP
        response.headers["Referrer-Policy"] = "no-referrer"
    return dataclasses.replace(response, body=body)
