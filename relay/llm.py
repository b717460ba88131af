"""LiteLLM, imported once and configured for a relay.

``import litellm`` costs seconds and ~200 MB, so nothing imports it at module level except
through ``get_litellm()``. Settings the relay applies (documented in README):

* ``LITELLM_LOCAL_MODEL_COST_MAP=True``: use the bundled cost map, no network fetch.
* ``litellm.num_retries = 0`` (and ``max_retries=0`` per request): no hidden retries.
* no success/failure callbacks, telemetry off, debug info suppressed: nothing per chunk.
* the embedded ``demo`` provider registered through ``litellm.custom_provider_map``.
"""

from __future__ import annotations

import os
import threading
from typing import Any

__all__ = ["DEMO_MODEL", "DEMO_PROVIDER", "acompletion", "get_litellm", "set_demo_tps"]

DEMO_PROVIDER = "llm-relay-demo"
# The embedded demo model's LiteLLM model string. Library users may just say "demo"
# (TokenStreamer and the TOML config translate it).
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
            _litellm = litellm
    return _litellm


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
