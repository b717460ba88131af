"""JSON Schema of every llm-relay.v1 frame.

``python -m llm_relay_protocol.schema`` prints it; ``python -m llm_relay_protocol.schema --write`` rewrites the
committed ``clients/python/llm_relay_protocol/schema.json`` (a test fails when that file is stale).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from .messages import ClientMessage, RelayMessage, ServerMessage
from .version import PROTOCOL_VERSION

__all__ = ["SCHEMA_PATH", "json_schema", "render"]

SCHEMA_PATH = Path(__file__).with_name("schema.json")


def json_schema() -> dict[str, Any]:
    """Both directions' schemas, keyed ``client_to_server`` and ``server_to_client``, and
    the control messages relays sharing a store send each other (``relay_to_relay``)."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"{PROTOCOL_VERSION} frames",
        "client_to_server": TypeAdapter(ClientMessage).json_schema(),
        "server_to_client": TypeAdapter(ServerMessage).json_schema(),
        "relay_to_relay": TypeAdapter(RelayMessage).json_schema(),
    }


def render() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--write" in argv:
        SCHEMA_PATH.write_text(render(), encoding="utf-8")
        print(f"wrote {SCHEMA_PATH}")
    else:
        sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
