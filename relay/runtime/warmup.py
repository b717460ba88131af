"""Warm-up of what LiteLLM loads lazily, so the first stream after ``relay serve`` starts is
as fast as the later ones.

LiteLLM imports and builds much of its streaming machinery on the first call: the tiktoken
encoding (``cl100k_base``, loaded in an executor thread by its logging), about 80 modules
(provider configs, proxy types, anyio backends), pydantic model rebuilds, its model-info
cache. Done by the first stream, that holds the GIL for 0.3-1 s while clients wait.

``start_warm_up()`` does all of it in a daemon thread, off the event loop. ``relay serve``
binds its port first (a port in use fails at once), then waits for the warm-up to finish
before it accepts connections: a thread importing modules holds the GIL in long stretches of
C-level work, so overlapping the first streams stalled every connection's loop for 0.5-0.8 s
(``bench/cold_start.py`` measures it). The warm-up counts tokens once (loads the encoding
through LiteLLM's public ``token_counter``) and runs one complete stream of the embedded
demo model through ``litellm.acompletion`` on a private event loop in that thread, which
walks the same lazy paths a client's first stream would. It never raises: a failure is logged and the relay
serves as before (the first stream then pays the cost itself).

Then it calls ``gc.freeze()``: the ~400,000 objects LiteLLM and its imports leave behind
live as long as the process, and a full collection walking them took 0.6-0.7 s here, on the
event loop, whenever the streams' garbage triggered one; frozen, they are skipped (it also
shortens the exit). Objects alive at that moment are never collected as cyclic garbage:
at startup that is what the process keeps anyway.

And it raises the young generation's threshold from CPython's 700 to ``GC_THRESHOLDS``'s
10,000. A full collection walks every live object (~150-200 ms at 1,000 open streams here),
and CPython starts one after every 100 young collections once the objects that survived
grew by a quarter: a burst of connections or streams growing the heap from few objects to
many set off three or four in a row (measured: pauses of 40-190 ms on the event loop in the
first second of a burst of 1,000 streams, which were its whole p99). With 10,000 a full
collection needs ~14x as many surviving allocations, so such a burst sets off none and steady
load rarely; a young collection then walks at most ~10,000 new objects (a few ms).

Call order: ``get_litellm()`` first (``build_registry`` does it), then ``start_warm_up()``
once per process; ``WarmUp.done`` is set when it has finished (either way).
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging
import threading
import time
from dataclasses import dataclass, field

__all__ = ["WarmUp", "start_warm_up", "warm_up"]

logger = logging.getLogger("relay.runtime.warmup")

_PROMPT = [{"role": "user", "content": "warm up"}]

#: What the first stream to a real provider still imports after the demo stream (measured
#: with an OpenAI-format upstream on each path): the fast path's HTTP transport (aiohttp,
#: httpx), and LiteLLM's service logger (~13 ms) on its openai/ provider path.
_FIRST_PROVIDER_STREAM_IMPORTS = ("relay.upstream.transport", "litellm._service_logger")

#: ``gc.set_threshold`` once started up (see the module docstring): the young generation's
#: threshold raised from 700, the older generations' left at CPython's 10.
GC_THRESHOLDS = (10_000, 10, 10)


@dataclass
class WarmUp:
    """A running or finished warm-up: ``done`` is set at its end; ``seconds`` and ``error``
    (an exception's class name, or None) describe it then."""

    done: threading.Event = field(default_factory=threading.Event)
    seconds: float | None = None
    error: str | None = None
    thread: threading.Thread | None = None


def warm_up() -> float:
    """Load LiteLLM's lazy parts in the calling thread (it must not be running an event
    loop). Returns the seconds it took; raises what LiteLLM raised."""
    from relay.upstream.llm import DEMO_PROVIDER, get_litellm

    started = time.perf_counter()
    litellm = get_litellm()
    # The tokenizer: loaded once here, not on the first stream's usage/cost path.
    litellm.token_counter(model="gpt-4o-mini", messages=_PROMPT)
    asyncio.run(_one_demo_stream(litellm, f"{DEMO_PROVIDER}/demo"))
    for name in _FIRST_PROVIDER_STREAM_IMPORTS:
        importlib.import_module(name)
    _first_provider_stream_setup()
    return time.perf_counter() - started


def _first_provider_stream_setup() -> None:
    """What a first stream to a real provider still built on the event loop after the demo
    stream (measured with cProfile): the fast path's SSL context (certifi's CA bundle, ~90 ms
    of CPU) and the OpenAI SDK's deferred pydantic build of its chunk model (~20 ms), used by
    LiteLLM's openai/ provider to parse every chunk."""
    from openai.types.chat import ChatCompletionChunk

    from relay.upstream.transport import shared_ssl_context

    shared_ssl_context()
    ChatCompletionChunk.model_validate(
        {"id": "warm-up", "object": "chat.completion.chunk", "created": 0, "model": "warm-up",
         "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": None}]})


async def _one_demo_stream(litellm, model: str) -> None:
    response = await litellm.acompletion(
        model=model, messages=_PROMPT, stream=True, max_tokens=3,
        stream_options={"include_usage": True}, num_retries=0, max_retries=0)
    try:
        async for _ in response:
            pass
    finally:
        aclose = getattr(response, "aclose", None)
        if aclose is not None:
            await aclose()


def start_warm_up() -> WarmUp:
    """Run ``warm_up()`` in a daemon thread, then freeze the objects it leaves and set the
    process's GC thresholds (``GC_THRESHOLDS``, even when the warm-up failed); returns at
    once."""
    state = WarmUp()

    def run() -> None:
        try:
            state.seconds = warm_up()
            gc.freeze()
            logger.info("LiteLLM warmed up in %.2f s (tokenizer and stream path loaded)",
                        state.seconds)
        except Exception as exc:  # the relay works without it; the first stream pays
            state.error = type(exc).__name__
            logger.warning("LiteLLM warm-up failed (%s); the first stream loads it instead",
                           state.error)
        finally:
            gc.set_threshold(*GC_THRESHOLDS)
            state.done.set()

    state.thread = threading.Thread(target=run, name="litellm warm-up", daemon=True)
    state.thread.start()
    return state
