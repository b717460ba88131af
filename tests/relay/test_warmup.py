"""The first stream after ``relay serve`` starts must not load LiteLLM's lazy parts on the
event loop (issue: it stalled the loop 0.5-1 s for tiktoken and ~80 modules): the relay
warms them up in a thread at startup. Checked in fresh interpreters, since any earlier test
in this process has loaded them already. Asserts what was loaded, never a duration."""

from __future__ import annotations

import gc
import json
import subprocess
import sys

from relay.runtime.warmup import GC_THRESHOLDS

from .test_limits import ROOT, _env

#: CPython's own young-generation threshold (gc.get_threshold() in a fresh interpreter; this
#: process's may have been raised by another test that ran the warm-up in-process).
CPYTHON_GC_THRESHOLD0 = 700

# Runs in a fresh interpreter: which lazy parts of LiteLLM does a first stream load, before
# and after the warm-up?
_PROBE = r"""
import asyncio, gc, json, sys
from relay.upstream.llm import get_litellm, set_demo_tps
from relay.streamer import TokenStreamer
from relay.runtime.warmup import start_warm_up

get_litellm()
set_demo_tps(0)
LAZY = "litellm.litellm_core_utils.default_encoding"   # the tiktoken encoding
before = LAZY in sys.modules
state = start_warm_up()
assert state.done.wait(300), "warm-up did not finish"
after = LAZY in sys.modules
loaded_before_stream = set(sys.modules)
# What a first stream to a real provider would otherwise build on the event loop.
from openai.types.chat import ChatCompletionChunk
from relay.upstream.transport import shared_ssl_context
ssl_built = shared_ssl_context.cache_info().currsize == 1
chunk_model_built = bool(ChatCompletionChunk.__pydantic_complete__)

async def first_stream():
    streamer = TokenStreamer("llm-relay-demo/demo")
    events = [e async for e in streamer.events([{"role": "user", "content": "first"}])]
    return str(events[-1].status)

status = asyncio.run(first_stream())
print(json.dumps({"before": before, "after": after, "error": state.error,
                  "frozen": gc.get_freeze_count(), "status": status,
                  "thresholds": gc.get_threshold(), "ssl_built": ssl_built,
                  "chunk_model_built": chunk_model_built,
                  "first_stream_imported": sorted(set(sys.modules) - loaded_before_stream)}))
"""


def test_warm_up_loads_litellm_lazy_parts_so_the_first_stream_imports_nothing():
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                         env=_env(), cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["before"] is False            # lazy indeed: not loaded by the import
    assert result["error"] is None
    assert result["after"] is True              # the tokenizer, loaded by the warm-up
    assert result["frozen"] > 100_000           # startup objects moved out of the GC's way
    assert tuple(result["thresholds"]) == GC_THRESHOLDS    # full collections far rarer
    assert GC_THRESHOLDS[0] > CPYTHON_GC_THRESHOLD0   # full collections rarer than by default
    assert result["status"] == "completed"
    assert result["first_stream_imported"] == []
    # The fast path's SSL context (~90 ms of CPU) and the OpenAI SDK's chunk model (LiteLLM's
    # openai/ provider) are built by the warm-up, not by a first provider stream on the loop.
    assert result["ssl_built"] is True
    assert result["chunk_model_built"] is True


def test_relay_serve_listens_only_after_its_warm_up_finished():
    """The warm-up's imports hold the GIL in long stretches: run while the first streams
    did, they stalled every connection's loop (issue 21 item 7). So the port opens, and
    "listening" is printed, only once it has finished. One pipe for both streams keeps the
    order in which the lines were written."""
    proc = subprocess.Popen([sys.executable, "-m", "relay", "serve", "--port", "0",
                             "--log-level", "info"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env(), cwd=ROOT)
    try:
        warmed = False
        for line in proc.stdout:
            if "relay.runtime.warmup" in line:
                assert "LiteLLM warmed up" in line, line
                warmed = True
            if "listening on" in line:
                break
        else:
            raise AssertionError("relay serve never said it listens")
        assert warmed, "relay serve listened before its warm-up finished"
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        proc.stdout.close()


async def test_a_bound_relay_refuses_connections_until_it_listens():
    """``relay serve`` binds first (a port in use fails at once, before the warm-up) and
    accepts connections only after the warm-up: ``start(listen=False)``, then ``listen()``."""
    import asyncio

    from relay.app import build_registry
    from relay.config import RelaySettings
    from relay.runtime.server import RelayServer

    from .helpers import Client

    settings = RelaySettings(port=0, demo_tps=0)
    server = RelayServer(settings, build_registry(settings))
    await server.start(listen=False)
    try:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        except ConnectionRefusedError:
            pass
        else:
            writer.close()
            raise AssertionError("a connection was accepted before listen()")
        await server.listen()
        async with Client.connect(server.url) as client:
            assert client.welcome["type"] == "welcome"
    finally:
        await server.close()
