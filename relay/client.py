"""The Python client moved to its own distribution, ``llm-relay-client`` (import
``llm_relay_client``), so an application can use it without installing the server.

This module stays so code written against ``relay.client`` keeps working; new code imports
:mod:`llm_relay_client`. It re-exports the public names of :mod:`llm_relay_client.client`
(its ``__all__``, the one list of them).
"""

from __future__ import annotations

from llm_relay_client.client import *  # noqa: F403 (the compatibility re-export)
from llm_relay_client.client import __all__  # noqa: F401
