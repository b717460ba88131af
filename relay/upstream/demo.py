"""The embedded ``demo`` model: a real LiteLLM custom provider, so the default path runs
through LiteLLM's own streaming machinery with no API key and no network.

Reply (deterministic, derived from the request): a sentence that echoes the last user
message, one word-token per chunk, at ``tps`` tokens per second (0 = as fast as possible).
When the last user message contains the word "markdown" (any case, e.g. "show me markdown"),
the reply is instead ``DEMO_MARKDOWN``: a heading, a list, a table, a fenced code block and a
link, streamed the same way, so the chat page's rendering can be seen without a provider.
``max_tokens`` cuts it with finish reason ``length``. With ``tools`` the reply is one call
to the first tool whose JSON arguments stream over several chunks (finish ``tool_calls``).
Usage is reported (prompt = words in the request, completion = chunks sent).

``opened`` / ``closed_early`` count streams, so in-process tests can see that a cancel
really stopped the generator ("upstream closed") rather than just hiding frames.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import AsyncIterator
from typing import Any

from litellm.llms.custom_llm import CustomLLM
from litellm.types.utils import GenericStreamingChunk

__all__ = ["DEMO_MARKDOWN", "DemoLLM", "demo_reply_tokens", "demo_tool_arguments"]

_WORD = re.compile(r"\S+\s*")
_ASKS_FOR_MARKDOWN = re.compile(r"\bmarkdown\b", re.IGNORECASE)

#: The demo's answer to a prompt that mentions "markdown": one of each block the chat page
#: renders. Every token is a word with the whitespace after it (newlines and the code's
#: indentation included), so the tokens join back to exactly this text.
DEMO_MARKDOWN = """\
## What the demo model can show

This answer streams **token by token**, like a real model, so you can watch the page render \
*Markdown* as it arrives:

- a heading, **bold** and *italic* text
- this list, with `inline code`
- a table and a code block with a **Copy** button

| Door | Endpoint | Client |
| --- | --- | --- |
| llm-relay.v1 | `/ws` | `llm_relay_client`, `relay-client.js` |
| AI SDK | `/ai-sdk` | `WebSocketChatTransport` |

```python
from llm_relay_client import RelayClient

async with RelayClient("ws://127.0.0.1:8765/ws") as client:
    result = await client.complete("demo", [{"role": "user", "content": "hi"}])
    print(result.text)
```

A real model is one alias away: see \
[the providers LiteLLM supports](https://docs.litellm.ai/docs/providers)."""

_MAX_ECHO_WORDS = 20_000  # long prompts make long replies: the benchmark relies on it


def _last_user_text(messages: list[dict]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def demo_reply_tokens(messages: list[dict]) -> list[str]:
    """The demo's full reply for ``messages``, split into its stream tokens: ``DEMO_MARKDOWN``
    when the last user message mentions "markdown", else a short echo of that message."""
    if _ASKS_FOR_MARKDOWN.search(_last_user_text(messages)):
        return _WORD.findall(DEMO_MARKDOWN)
    said = " ".join(_last_user_text(messages).split()[:_MAX_ECHO_WORDS]) or "nothing"
    reply = (
        f"Hello from the llm-relay demo model. You said: {said}. "
        "This reply streams one token per chunk through LiteLLM, so cancel, usage and "
        "timeouts behave as they do with a real provider."
    )
    return _WORD.findall(reply)


def demo_tool_arguments(tool: dict, messages: list[dict]) -> str:
    """JSON arguments the demo sends for ``tool``: each string parameter gets the last
    user message, numbers 1, booleans true."""
    params = ((tool.get("function") or {}).get("parameters") or {}).get("properties") or {}
    said = " ".join(_last_user_text(messages).split())[:200]
    args: dict[str, Any] = {}
    for name, schema in params.items():
        kind = schema.get("type") if isinstance(schema, dict) else None
        args[name] = {"integer": 1, "number": 1, "boolean": True}.get(kind, said)
    return json.dumps(args or {"input": said})


def _count_prompt_words(messages: list[dict]) -> int:
    total = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            total += len(content.split())
        total += 4  # role and framing, as chat formats charge per message
    return total


class DemoLLM(CustomLLM):
    def __init__(self, tps: float = 40.0) -> None:
        super().__init__()
        self.tps = tps
        self.opened = 0
        self.closed_early = 0
        self.completed = 0
        self._waiters: list[tuple[int, asyncio.Future]] = []

    async def wait_closed_early(self, count: int, timeout: float = 5.0) -> None:
        """Wait until ``closed_early`` reaches ``count`` (for tests: no polling)."""
        if self.closed_early >= count:
            return
        future = asyncio.get_running_loop().create_future()
        self._waiters.append((count, future))
        async with asyncio.timeout(timeout):
            await future

    def _note_closed_early(self) -> None:
        self.closed_early += 1
        for count, future in list(self._waiters):
            if self.closed_early >= count:
                self._waiters.remove((count, future))
                if not future.done():
                    future.set_result(None)

    async def astreaming(self, model, messages, api_base, custom_prompt_dict, model_response,
                         print_verbose, encoding, api_key, logging_obj, optional_params,
                         acompletion=None, litellm_params=None, logger_fn=None, headers={},
                         timeout=None, client=None) -> AsyncIterator[GenericStreamingChunk]:
        # LiteLLM iterates what this coroutine function returns when called, so it must be
        # an async generator function itself.
        params = dict(optional_params or {})
        self.opened += 1
        finished = False
        try:
            prompt_tokens = _count_prompt_words(messages)
            max_tokens = params.get("max_tokens")
            tools = params.get("tools") or []
            if tools:
                async for chunk in self._tool_chunks(tools[0], messages, prompt_tokens):
                    yield chunk
            else:
                tokens = demo_reply_tokens(messages)
                reason = "stop"
                if isinstance(max_tokens, int) and max_tokens < len(tokens):
                    tokens, reason = tokens[:max_tokens], "length"
                for i, tok in enumerate(tokens):
                    await self._pace()
                    last = i == len(tokens) - 1
                    yield _chunk(tok, finished=last, reason=reason if last else "",
                                 usage=(prompt_tokens, len(tokens)) if last else None)
            finished = True
            self.completed += 1
        finally:
            if not finished:
                self._note_closed_early()

    async def _tool_chunks(self, tool: dict, messages: list[dict], prompt_tokens: int):
        name = (tool.get("function") or {}).get("name") or "tool"
        arguments = demo_tool_arguments(tool, messages)
        pieces = [arguments[i:i + 8] for i in range(0, len(arguments), 8)] or [""]
        call_id = "call_demo_" + hashlib.sha256(f"{name}:{arguments}".encode()).hexdigest()[:16]
        for i, piece in enumerate(pieces):
            await self._pace()
            last = i == len(pieces) - 1
            tool_use = {"id": call_id if i == 0 else None, "type": "function", "index": 0,
                        "function": {"name": name if i == 0 else None, "arguments": piece}}
            yield _chunk("", finished=last, reason="tool_calls" if last else "",
                         usage=(prompt_tokens, len(pieces)) if last else None, tool_use=tool_use)

    async def _pace(self) -> None:
        # Pacing of the demo's output rate, not synchronisation: a real model is slow too.
        await asyncio.sleep(1.0 / self.tps if self.tps > 0 else 0)


def _chunk(text: str, *, finished: bool, reason: str, usage: tuple[int, int] | None,
           tool_use: dict | None = None) -> GenericStreamingChunk:
    return {
        "text": text,
        "tool_use": tool_use,
        "is_finished": finished,
        "finish_reason": reason,
        "usage": None if usage is None else {
            "prompt_tokens": usage[0], "completion_tokens": usage[1],
            "total_tokens": usage[0] + usage[1],
        },
        "index": 0,
    }
