"""CPU cost of decoding one heavy ``/ai-sdk`` ``send`` next to the same v1 ``start``.

Builds the frame of issue 20 item 7 (2,000 UIMessages, 10,000 parts, ~790 KB) and the v1
``start`` with the same content, then times what the relay does with each before admission:

* v1: ``decode_client_frame`` (refused by its limits, or validated);
* /ai-sdk: ``decode_request``, then (when it passes) ``to_chat_messages`` and the v1 checks
  of the ``start`` it becomes (``validate_client_object``), as ``llm_relay_protocol.aisdk.AiSdkCodec`` does;

with the relay's default ``DecodeLimits``, and prints the median and the answer of each.

    python bench/aisdk_decode_cost.py [--runs 30]

No relay runs: this is the decode path alone, in-process (the garbage collector stays on, as
in the relay; the decoders pause it themselves).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llm_relay_protocol import DecodeLimits, FrameError, decode_client_frame, frames  # noqa: E402
from llm_relay_protocol.aisdk import AiSdkFrameError, decode_request, to_chat_messages  # noqa: E402
from llm_relay_protocol.codec import validate_client_object  # noqa: E402

MESSAGES = 2000
PARTS_PER_MESSAGE = 5
TEXT = "lorem ipsum dolor sit amet, consectetur ad"  # a ~787 KB send, as measured in issue 20


def heavy_send(parts: int = PARTS_PER_MESSAGE, text: str = TEXT) -> str:
    messages = [{"id": f"m{i}", "role": "user" if i % 2 == 0 else "assistant",
                 "parts": [{"type": "text", "text": text} for _ in range(parts)]}
                for i in range(MESSAGES)]
    return json.dumps({"type": "send", "requestId": "r1", "id": "chat",
                       "trigger": "submit-message", "messageId": None, "messages": messages,
                       "headers": {}, "body": {}, "metadata": None})


def same_start(parts: int = PARTS_PER_MESSAGE, text: str = TEXT) -> str:
    messages = [{"role": "user" if i % 2 == 0 else "assistant",
                 "content": [{"type": "text", "text": text} for _ in range(parts)]}
                for i in range(MESSAGES)]
    return json.dumps({"type": "start", "id": "r1", "model": "demo", "messages": messages})


def decode_v1(data: str, limits: DecodeLimits) -> str:
    try:
        decode_client_frame(data, limits)
    except FrameError as exc:
        return f"refused: {exc.message}"
    return "accepted"


def decode_aisdk(data: str, limits: DecodeLimits) -> str:
    try:
        request = decode_request(data, limits)
        start = frames.start(request.requestId, "demo", to_chat_messages(request.messages))
        validate_client_object(start, limits)
    except AiSdkFrameError as exc:
        return f"refused: {exc.message}"
    except FrameError as exc:
        return f"refused as a v1 start: {exc.message}"
    return "accepted"


def median_ms(fn, data: str, limits: DecodeLimits, runs: int) -> tuple[float, str]:
    answer = fn(data, limits)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(data, limits)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000, answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    limits = DecodeLimits()
    # The frame of issue 20 item 7, then the heaviest that passes every default limit
    # (2,000 messages of 2 parts: max_messages and max_content_parts, short texts).
    for label, send, start in (("issue 20 #7", heavy_send(), same_start()),
                               ("at limits", heavy_send(2, "x" * 40), same_start(2, "x" * 40))):
        for name, fn, data in (("v1 start", decode_v1, start),
                               ("/ai-sdk send", decode_aisdk, send)):
            ms, answer = median_ms(fn, data, limits, args.runs)
            print(f"{label:12} {name:13} {len(data) / 1000:5.0f} KB {ms:7.2f} ms  "
                  f"{answer[:100]}")


if __name__ == "__main__":
    main()
