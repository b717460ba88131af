"""LiteLLM, imported once and configured for a relay.

``import litellm`` costs seconds and ~200 MB, so nothing imports it at module level except
through ``get_litellm()``. Settings the relay applies (documented in README):

* ``LITELLM_LOCAL_MODEL_COST_MAP=True``: use the bundled cost map, no network fetch.
* ``litellm.num_retries = 0`` (and ``max_retries=0`` per request): no hidden retries.
* no success/failure callbacks, telemetry off, debug info suppressed: nothing per chunk.
* the embedded ``demo`` provider registered through ``litellm.custom_provider_map``.
* no post-stream response assembly (``lean_streaming``): see ``_skip_stream_assembly``.
"""

from __future__ import annotations

import os
import threading
from typing import Any

__all__ = ["DEMO_PROVIDER", "acompletion", "get_litellm", "set_demo_tps"]

DEMO_PROVIDER = "llm-relay-demo"

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

            from .demo import DemoLLM

            litellm.telemetry = False
            litellm.suppress_debug_info = True
            litellm.num_retries = 0
            litellm.set_verbose = False
            _demo_handler = DemoLLM()
            litellm.custom_provider_map = [
                item for item in litellm.custom_provider_map if item["provider"] != DEMO_PROVIDER
            ] + [{"provider": DEMO_PROVIDER, "custom_handler": _demo_handler}]
            litellm.utils.custom_llm_setup()
            _install_lean_streaming(litellm)
            _litellm = litellm
    return _litellm


def _skip_stream_assembly(*args: Any, **kwargs: Any) -> None:
    """Stands in for ``litellm.stream_chunk_builder`` in a relay process.

    After every stream, LiteLLM's ``CustomStreamWrapper`` rebuilds the whole response from
    its chunks (``stream_chunk_builder``, in a worker thread holding the GIL), and its async
    success handler does it again, for logging callbacks, cost tracking and caching: about a
    quarter of the LiteLLM path's CPU per token here. The relay uses none of it (it reads the
    provider's usage from the chunks and estimates the rest itself), and LiteLLM 1.110 has no
    switch for the async path (``disable_streaming_logging`` only guards its sync iterator).
    ``None`` is the builder's own "nothing assembled" answer, which both callers handle.
    """
    return None


def _install_lean_streaming(litellm: Any) -> None:
    # The relay is the only LiteLLM user in its process; nothing here calls the builder.
    litellm.stream_chunk_builder = _skip_stream_assembly


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
