"""``cancel_and_wait``, shared by every layer that owns tasks (the runtime, the Redis
adapters) with the client library, which defines it: :mod:`llm_relay_client.aio` (the
server depends on the client distribution; the client must not depend on the server).
"""

from __future__ import annotations

from llm_relay_client.aio import cancel_and_wait

__all__ = ["cancel_and_wait"]
