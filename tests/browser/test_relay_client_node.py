"""relay-client.js under the machine's real Node (20+; `node` on PATH), as a plain ES module.

Node 20 has no global WebSocket: the client must say so at once (and how to inject one)
rather than fail later with a close code, and an injected implementation (the `ws` package,
pinned in tests/aisdk, installed there by `npm ci` as .ci/run does) must be the one used,
streaming from a live relay. Each script prints one JSON line; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

from relay.upstream.demo import demo_reply_tokens

from ..relay.helpers import start_relay

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients" / "js" / "relay-client.js"
WS_MODULE = ROOT / "tests" / "aisdk" / "node_modules" / "ws" / "wrapper.mjs"

# Node 22+ has a global WebSocket: the script removes it so every Node runs the Node 20 case.
NO_WEBSOCKET_SCRIPT = """
const [clientPath, url] = process.argv.slice(2);
const hadGlobal = typeof globalThis.WebSocket === "function";
delete globalThis.WebSocket;
const m = await import(clientPath);
const describe = (e) => ({name: e.name, code: e.code ?? null, message: e.message,
                          isLocal: typeof m.RelayClientError === "function" && e instanceof m.RelayClientError});
let thrown = null;
try { new m.RelayClient(url); } catch (e) { thrown = describe(e); }
const rejected = await m.RelayClient.connect(url).then(() => null, describe);
console.log(JSON.stringify({hadGlobal, version: process.versions.node, thrown, rejected}));
"""

INJECTED_SCRIPT = """
const [clientPath, wsPath, url] = process.argv.slice(2);
const m = await import(clientPath);
const { WebSocket } = await import(wsPath);
let constructed = 0;
class CountingWebSocket extends WebSocket {
  constructor(...args) { super(...args); constructed += 1; }
}
const c = await m.RelayClient.connect(url, { WebSocket: CountingWebSocket, pingInterval: 0 });
const s = c.start({ model: c.models[0], messages: [{ role: "user", content: "hi" }] });
let text = "";
for await (const frame of s) if (frame.type === "token") text += frame.text;
const finish = await s.done;
c.close();
console.log(JSON.stringify({ constructed, text, status: finish.status }));
"""


async def node(*args: str, cwd: Path | None = None) -> str:
    """stdout of `node args...` (which must exit 0), killed after 30 s."""
    executable = shutil.which("node")
    assert executable, "node (20+) is required for the JS client's Node tests"
    proc = await asyncio.create_subprocess_exec(
        executable, *args, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(30):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, f"node exited {proc.returncode}: {err.decode()}"
    return out.decode()


async def run_node(tmp_path: Path, script: str, *args: str) -> dict:
    """The JSON line a script (written to tmp_path) prints last."""
    path = tmp_path / "script.mjs"
    path.write_text(script)
    return json.loads((await node(str(path), *args)).strip().splitlines()[-1])


async def test_without_a_websocket_the_client_fails_at_once_saying_how_to_inject_one(tmp_path):
    """Node 20: no global WebSocket and none passed. The constructor throws RelayClientError
    `no_websocket` naming the fix; connect() rejects with it; no close code (4400 before)."""
    out = await run_node(tmp_path, NO_WEBSOCKET_SCRIPT, CLIENT.as_uri(), "ws://127.0.0.1:9/ws")
    assert int(out["version"].split(".")[0]) >= 20
    expected = {"name": "RelayClientError", "code": "no_websocket", "isLocal": True,
                "message": out["thrown"] and out["thrown"]["message"]}
    assert out["thrown"] == expected and out["rejected"] == expected
    message = expected["message"]
    assert "no WebSocket implementation" in message and "no global WebSocket" in message
    assert "new RelayClient(url, { WebSocket: (await import('ws')).WebSocket })" in message
    assert "4400" not in message and "protocol violation" not in message


async def test_an_injected_websocket_is_used_and_streams_from_a_live_relay(tmp_path):
    """The `WebSocket` option with the `ws` package on Node 20: the client builds its sockets
    with it and streams the demo answer from a real relay."""
    assert WS_MODULE.is_file(), "run `npm ci` in tests/aisdk (.ci/run does): it pins `ws`"
    async with start_relay() as server:
        out = await run_node(tmp_path, INJECTED_SCRIPT, CLIENT.as_uri(), WS_MODULE.as_uri(),
                             f"ws://127.0.0.1:{server.port}/ws")
    assert out["constructed"] == 1
    assert out["status"] == "completed"
    assert out["text"] == "".join(demo_reply_tokens([{"role": "user", "content": "hi"}]))
