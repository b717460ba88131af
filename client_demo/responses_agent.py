"""A tool-using agent over the OpenAI Responses API's WebSocket mode, through llm-relay.

The official ``openai`` SDK, unchanged: only ``base_url`` points at the relay, which serves
``/v1/responses`` for every provider it has an alias for (the built-in ``demo`` model needs
no key). One socket for the whole run; each turn after the first sends only the tool
results plus ``previous_response_id``: the relay keeps the conversation.

    relay serve &
    python client_demo/responses_agent.py "What is the weather in Paris?"
    python client_demo/responses_agent.py --base-url http://127.0.0.1:8765/v1 \\
        --model demo --api-key "$RELAY_KEY" "What is the weather in Paris?"

With ``--auth`` on the relay, ``--api-key`` is the relay's API key or token (never a
provider key). The demo model calls the first tool, then answers quoting its result.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from openai import AsyncOpenAI

TOOLS: list[Any] = [{
    "type": "function",
    "name": "get_weather",
    "description": "The current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]},
}]


def get_weather(city: str) -> dict[str, Any]:
    """The agent's tool (a stand-in for a real weather API)."""
    return {"city": city, "forecast": "sunny", "celsius": 24}


HANDLERS = {"get_weather": get_weather}


def call_tool(name: str, arguments: str) -> str:
    """Run one function call; its result (or its failure) as the JSON the model gets back."""
    try:
        return json.dumps(HANDLERS[name](**json.loads(arguments)))
    except Exception as exc:  # a bad call is the model's to fix: tell it, do not crash
        return json.dumps({"error": f"{type(exc).__name__}: {exc}"})


async def run_agent(question: str, *, base_url: str, api_key: str, model: str,
                    max_turns: int = 8, out: Any = sys.stdout) -> str:
    """Answer ``question``, calling tools as the model asks; the final answer's text."""
    client = AsyncOpenAI(base_url=base_url, api_key=api_key)
    async with client.responses.connect() as conn:
        await conn.response.create(model=model, input=question, tools=TOOLS,
                                   instructions="Use the tools to answer.")
        for _ in range(max_turns):
            text: list[str] = []
            calls: list[Any] = []
            async for event in conn:
                if event.type == "response.output_text.delta":
                    text.append(event.delta)
                    print(event.delta, end="", file=out, flush=True)
                elif event.type == "response.output_item.done" \
                        and event.item.type == "function_call":
                    calls.append(event.item)
                    print(f"[tool] {event.item.name}({event.item.arguments})", file=out)
                elif event.type == "error":
                    raise RuntimeError(f"relay refused the turn: {event.error.message}")
                elif event.type in ("response.completed", "response.incomplete",
                                    "response.failed"):
                    response = event.response
                    break
            if response.status != "completed":
                raise RuntimeError(f"the response ended {response.status}")
            if not calls:
                print(file=out)
                return "".join(text)
            await conn.response.create(
                model=model, previous_response_id=response.id, tools=TOOLS,
                input=[{"type": "function_call_output", "call_id": call.call_id,
                        "output": call_tool(call.name, call.arguments)} for call in calls])
    raise RuntimeError(f"no answer within {max_turns} turns")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("question")
    parser.add_argument("--base-url", default="http://127.0.0.1:8765/v1")
    parser.add_argument("--api-key", default="unused-without-auth")
    parser.add_argument("--model", default="demo")
    args = parser.parse_args(argv)
    asyncio.run(run_agent(args.question, base_url=args.base_url, api_key=args.api_key,
                          model=args.model))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
