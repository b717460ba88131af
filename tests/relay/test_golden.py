"""Real provider streams, replayed through the whole relay on both paths (issue 21 item 9).

``tests/golden/`` holds stream transcripts recorded from real providers (or written by the
providers' own SDK authors as test fixtures), each from a public source named with its licence
in ``tests/golden/manifest.json``, with the answer a client must get according to the
provider's documentation: text, reasoning, tool calls (id, name, the exact argument text),
finish status and reason, usage.

Each test serves one transcript's bytes from a loopback fake provider (``tests/fakes/upstream.py``)
to a real relay on a real socket, once through an alias with ``fast = false`` (LiteLLM's own
provider code) and once through the same alias on the fast path, and checks the frames the
WebSocket client receives against the manifest. A case the relay is known to get wrong, while
the fix is on another branch, is marked ``xfail(strict=True)`` with that issue item, so it
fails loudly the moment the fix lands and the marker can go.

Framing: ``sse`` files are the bytes as the provider sent them (the SDK fixtures drop the blank
line after the last event, which the API sends: it is restored, as an SSE decoder would not
dispatch an unterminated event); ``json-lines`` files (the Vercel AI SDK's recordings) hold one
``data:`` payload per line, served as ``data: <line>\\n\\n`` events and then ``data: [DONE]``
(Anthropic's: ``event: <its type>`` before each, no ``[DONE]``, as api.anthropic.com sends).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay.app import load_models
from relay.upstream.providers import ModelRegistry
from relay.upstream.event_streamer import Timeouts
from tests.fakes.upstream import FakeUpstream, Script

from .helpers import Client, start_relay

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())
KEY = "sk-golden-test-key-0123456789"
PATHS = ("litellm", "fast")
#: The LiteLLM model string per provider whose wire LiteLLM reads its own way; every other
#: OpenAI-format provider is replayed through ``openai/`` (the alias a user writes for an
#: OpenAI-compatible server with its ``api_base``).
MODELS = {"anthropic": "anthropic/claude-golden", "groq": "groq/golden-model",
          "openrouter": "openrouter/golden/model", "azure": "azure/golden-deployment"}


@dataclass(frozen=True)
class RawBytes:
    """One write of raw bytes on the fake's SSE response (``Script.events`` duck type)."""

    data: bytes
    usage_chunk: bool = False

    def encode(self) -> bytes:
        return self.data


def wire_bytes(case: dict) -> bytes:
    raw = (GOLDEN / case["file"]).read_bytes()
    if case["framing"] == "json-lines":
        lines = [line for line in raw.decode().splitlines() if line.strip()]
        if case["format"] == "anthropic":   # named events, no [DONE] (Anthropic's wire)
            return "".join(f"event: {json.loads(line)['type']}\ndata: {line}\n\n"
                           for line in lines).encode()
        return "".join(f"data: {line}\n\n" for line in lines).encode() + b"data: [DONE]\n\n"
    while not raw.endswith(b"\n\n"):   # restore the final event's terminating blank line
        raw += b"\n"
    return raw


def model_of(case: dict) -> str:
    if case["format"] == "anthropic":
        return MODELS["anthropic"]
    return MODELS.get(case["provider"], "openai/golden-model")


def registry_for(up: FakeUpstream, case: dict) -> ModelRegistry:
    base = {"anthropic": up.anthropic_base, "azure": up.azure_base}.get(
        "anthropic" if case["format"] == "anthropic" else case["provider"], up.openai_base)
    models = {path: {"model": model_of(case), "api_base": base,
                     "api_key_env": "GOLDEN_PROVIDER_KEY", "fast": path == "fast"}
              for path in PATHS}
    timeouts = Timeouts(first_token=20.0, idle=20.0, total=60.0)
    return ModelRegistry(load_models({"models": models}, timeouts))


def cases():
    for case in MANIFEST["transcripts"]:
        for path in PATHS:
            why = (case.get("xfail") or {}).get(path)
            marks = [pytest.mark.xfail(strict=True, reason=why)] if why else []
            yield pytest.param(case, path, id=f"{case['file'].split('.')[0]}-{path}",
                               marks=marks)


def received(frames: list[dict]) -> dict:
    """What the client got, in the manifest's terms."""
    finish = frames[-1]
    usage = finish.get("usage") or {}
    return {
        "text": "".join(f["text"] for f in frames if f["type"] == "token"),
        "reasoning": "".join(f["text"] for f in frames if f["type"] == "reasoning"),
        "refusal": "".join(f["text"] for f in frames if f["type"] == "refusal"),
        "tool_calls": [{"id": f["call_id"], "name": f["name"], "arguments": f["arguments"]}
                       for f in frames if f["type"] == "tool_call_complete"],
        "status": finish.get("status"),
        "reason": finish.get("reason"),
        "usage": None if usage.get("estimated", True) else {
            "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"]},
    }


def expected(case: dict) -> dict:
    want = case["expected"]
    return {"text": want.get("text", ""), "reasoning": want.get("reasoning", ""),
            "refusal": want.get("refusal", ""),
            "tool_calls": want.get("tool_calls", []), "status": want["status"],
            "reason": want["reason"], "usage": want.get("usage")}


def test_manifest_lists_every_transcript_once_with_source_and_licence():
    files = [case["file"] for case in MANIFEST["transcripts"]]
    assert len(files) == len(set(files)) >= 30
    stored = {p.name for p in GOLDEN.iterdir() if p.name not in ("manifest.json", "README.md")}
    assert stored == set(files)
    for case in MANIFEST["transcripts"]:
        assert case["source"] and case["licence"] and case["provider"], case["file"]
        assert case["format"] in ("openai", "anthropic") and case["framing"] in (
            "sse", "json-lines"), case["file"]


@pytest.mark.parametrize(("case", "path"), cases())
async def test_golden_transcript(case, path, monkeypatch):
    monkeypatch.setenv("GOLDEN_PROVIDER_KEY", KEY)
    script = Script(format=case["format"], events=(RawBytes(wire_bytes(case)),))
    async with FakeUpstream() as up:
        registry = registry_for(up, case)
        assert registry.resolve("fast").path.path == "fast", registry.resolve("fast").path
        assert registry.resolve("litellm").path.path == "litellm"
        async with start_relay(registry=registry) as server:
            async with Client.connect(server.url) as client:
                up.enqueue(script)
                await client.start("g", model=path, content="golden")
                frames = await client.collect("g")
        assert len(up.requests) == 1
    assert frames[0]["type"] == "started", frames[0]
    assert received(frames) == expected(case)
