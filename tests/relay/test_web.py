"""The relay's static route for the browser chat page (relay/http/web.py): content types,
Cache-Control, and nothing outside client_demo/web/ (path traversal, hidden files,
unknown extensions, directories and symlinks all answer 404)."""

from __future__ import annotations

import asyncio
import os

import pytest

from relay.http import web

from .helpers import start_relay


async def _get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    """A raw HTTP/1.1 GET, so the path reaches the relay exactly as written (HTTP client
    libraries normalise `..` and percent-escapes away)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode("latin-1"))
    status_line = (await reader.readline()).decode()
    headers: dict[str, str] = {}
    while (line := (await reader.readline()).decode().rstrip("\r\n")):
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    writer.close()
    await writer.wait_closed()
    return int(status_line.split()[1]), headers, body


@pytest.mark.parametrize(("path", "file", "content_type"), [
    ("/", "index.html", "text/html; charset=utf-8"),
    ("/index.html", "index.html", "text/html; charset=utf-8"),
    ("/app.js", "app.js", "text/javascript; charset=utf-8"),
    ("/relay-client.js", "relay-client.js", "text/javascript; charset=utf-8"),
    ("/style.css", "style.css", "text/css; charset=utf-8"),
    ("/relay-client.js?v=2", "relay-client.js", "text/javascript; charset=utf-8"),
    ("/relay%2Dclient.js", "relay-client.js", "text/javascript; charset=utf-8"),
    ("/client-policy.js", "client-policy.js", "text/javascript; charset=utf-8"),
])
async def test_serves_page_files_with_content_type_and_no_cache(path, file, content_type):
    async with start_relay() as server:
        status, headers, body = await _get(server.port, path)
    assert status == 200
    assert headers["content-type"] == content_type
    assert headers["cache-control"] == "no-cache"
    assert headers["x-content-type-options"] == "nosniff"
    # The JS client's files are the npm package's own (clients/js), the rest the page's.
    served_from = web.CLIENT_PACKAGE_ROOT if file in web.CLIENT_PACKAGE_FILES else web.WEB_ROOT
    assert body == (served_from / file).read_bytes()
    if file.endswith(".html"):
        assert "script-src 'self'" in headers["content-security-policy"]


@pytest.mark.parametrize("path", [
    "/../pyproject.toml",
    "/../../../../etc/passwd",
    "/%2e%2e/pyproject.toml",
    "/%2E%2E/%2E%2E/pyproject.toml",
    "/..%2fpyproject.toml",
    "/..%2f..%2fpyproject.toml",
    "/.%2e/pyproject.toml",
    "/%2e%2e%5cpyproject.toml",
    "/..\\pyproject.toml",
    "/x/../index.html",
    "/./index.html",
    "//etc/passwd",
    "/%2fetc%2fpasswd",
    "/index.html%00.js",
    "/%ff.js",
    "/../README.md",
    "/../chat.py",
    "/.gitignore",
    "/.hidden.js",
    "/nope.js",
    "/nope",
    "/index.htm",
    "/index.html/",
])
async def test_refuses_traversal_and_unknown_files(path):
    async with start_relay() as server:
        status, headers, body = await _get(server.port, path)
        assert status == 404, (path, body)
        assert body == b"not found\n"
        # The other routes are unaffected.
        assert (await _get(server.port, "/healthz"))[0] == 200


def test_resolve_stays_inside_root(tmp_path):
    root = tmp_path / "web"
    (root / "sub").mkdir(parents=True)
    (root / "ok.js").write_text("ok")
    (root / "sub" / "deep.css").write_text("deep")
    (root / "notes.toml").write_text("unknown extension")
    (tmp_path / "secret.js").write_text("outside")
    os.symlink(tmp_path / "secret.js", root / "link.js")
    os.symlink(tmp_path, root / "up")
    assert web.resolve("/ok.js", root) == (root / "ok.js").resolve()
    assert web.resolve("/sub/deep.css", root) == (root / "sub" / "deep.css").resolve()
    for path in ("/link.js", "/up/secret.js", "/../secret.js", "/sub", "/sub/",
                 "/notes.toml", "/", "ok.js", "/sub//deep.css"):
        assert web.resolve(path, root) is None, path
