"""LiteLLM, imported once and configured for a relay.

``import litellm`` costs seconds and ~200 MB, so nothing imports it at module level except
through ``get_litellm()``. Settings the relay applies (documented in README):

* ``LITELLM_LOCAL_MODEL_COST_MAP=True``: use the bundled cost map, no network fetch.
* ``litellm.num_retries = 0`` (and ``max_retries=0`` per request): no hidden retries.
* no success/failure callbacks, telemetry off, debug info suppressed: nothing per chunk.
* ``litellm.disable_hf_tokenizer_download = True``: usage estimates count with tiktoken.
  Otherwise counting tokens for a model LiteLLM maps to a Hugging Face tokenizer (Llama,
  Mistral, ... names) downloads it from huggingface.co at the end of the stream; offline
  that retried for ~23 s before the stream's ``finish`` could be sent.
* the embedded ``demo`` provider registered through ``litellm.custom_provider_map``.
* no post-stream response assembly for relay streams: see ``_install_lean_streaming``.
* every async HTTP transport LiteLLM builds reads under the relay's caps on upstream bytes
  (error bodies, one SSE event, decompression) and hands its SDKs standard SSE:
  ``relay.upstream.caps.install``.
"""

from __future__ import annotations

import os
import threading
from contextvars import ContextVar, Token
from typing import Any

__all__ = ["DEMO_MODEL", "DEMO_PROVIDER", "acompletion", "begin_relay_stream",
           "end_relay_stream", "get_litellm", "set_demo_tps"]

DEMO_PROVIDER = "llm-relay-demo"
# The embedded demo model's LiteLLM model string. Library users may just say "demo"
# (EventStreamer and the TOML config translate it).
DEMO_MODEL = f"{DEMO_PROVIDER}/demo"

_lock = threading.Lock()
_litellm: Any = None
_demo_handler: Any = None


def get_litellm() -> Any:
    """The configured ``litellm`` module (imported and set up on first call)."""
    global _litellm, _demo_handler
    if _litellm is not None:
        return _litellm
    with _lock:
        if _litellm is None:
            os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            os.environ.setdefault("LITELLM_LOG", "ERROR")
            import litellm

            from relay.upstream.demo import DemoLLM

            litellm.telemetry = False
            litellm.suppress_debug_info = True
            litellm.num_retries = 0
            litellm.set_verbose = False
            litellm.disable_hf_tokenizer_download = True
            _demo_handler = DemoLLM()
            litellm.custom_provider_map = [
                item for item in litellm.custom_provider_map if item["provider"] != DEMO_PROVIDER
            ] + [{"provider": DEMO_PROVIDER, "custom_handler": _demo_handler}]
            litellm.utils.custom_llm_setup()
            _install_lean_streaming(litellm)
            from relay.upstream import caps

            caps.install(litellm)  # its responses are read under the relay's caps
            _litellm = litellm
    return _litellm


#: True while a relay stream is read: LiteLLM work started from it (its worker threads and
#: tasks copy the context) skips the post-stream response assembly.
_relay_stream: ContextVar[bool] = ContextVar("llm_relay_stream", default=False)


def begin_relay_stream() -> Token:
    """Mark the current context as reading a relay stream (see ``_install_lean_streaming``).
    Returns the token for ``end_relay_stream``."""
    return _relay_stream.set(True)


def end_relay_stream(token: Token) -> None:
    try:
        _relay_stream.reset(token)
    except ValueError:  # closed from another context; that context never saw the mark
        pass


def _install_lean_streaming(litellm: Any) -> None:
    """No post-stream response assembly for the relay's streams.

    After every stream, LiteLLM's ``CustomStreamWrapper`` rebuilds the whole response from
    its chunks (``litellm.stream_chunk_builder``, in a worker thread holding the GIL), and its
    async success handler does it again, for logging callbacks, cost tracking and caching:
    about a quarter of the LiteLLM path's CPU per token here. The relay uses none of it (it
    reads the provider's usage from the chunks and estimates the rest itself), and LiteLLM
    1.110 has no switch for the async path (``disable_streaming_logging`` only guards its sync
    iterator). So inside a relay stream (``begin_relay_stream``) the builder answers ``None``,
    its own "nothing assembled", which both callers handle; any other LiteLLM use in the
    process still gets the real builder.
    """
    real = litellm.stream_chunk_builder
    if getattr(real, "llm_relay_lean", False):
        return

    def stream_chunk_builder(*args: Any, **kwargs: Any) -> Any:
        if _relay_stream.get():
            return None
        return real(*args, **kwargs)

    stream_chunk_builder.llm_relay_lean = True  # type: ignore[attr-defined]
    stream_chunk_builder.__wrapped__ = real  # type: ignore[attr-defined]
    litellm.stream_chunk_builder = stream_chunk_builder


def set_demo_tps(tps: float) -> None:
    """Tokens per second of the embedded demo model (0 = as fast as possible)."""
    get_litellm()
    _demo_handler.tps = tps


def demo_handler() -> Any:
    get_litellm()
    return _demo_handler


async def acompletion(**kwargs: Any) -> Any:
    """``litellm.acompletion`` with the relay's setup applied."""
    return await get_litellm().acompletion(**kwargs)
