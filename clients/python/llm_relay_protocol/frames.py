"""The one place every outbound frame is built, as a plain dict: the frames the relay sends
its clients, the frames a client sends the relay, and the messages relays send each other.

Nothing else assembles a frame by hand: the relay (``relay.runtime.hub``,
``relay.runtime.session``, ``relay.core.streamlog``, ``llm_relay_protocol.codec.FrameError``), the Python
client (``llm_relay_client``, ``llm_relay_protocol.client_policy``) and the relay-to-relay control channel
(``relay.cluster.replication``) call these builders; the browser client builds its frames from the field table generated
from the same models (``llm_relay_protocol.client_policy.policy_tables()["frames"]``).

Validating every outbound frame with pydantic would cost more than the relay's whole
per-frame budget (see GUIDE: LiteLLM already spends ~600 µs a chunk), so builders return
dicts (a literal each, no validation) and ``encode_frame`` serialises them with orjson. The
shapes match the models of ``llm_relay_protocol.messages``: ``tests/protocol/test_frames.py`` checks
every builder's output against its model and against ``clients/python/llm_relay_protocol/schema.json``. Optional
fields given as ``None`` are left out, as the models' encoding leaves them out.

Sections: server -> client (the hot path: ``token`` and friends run once per streamed
chunk), client -> server, relay -> relay.
"""

from __future__ import annotations

from typing import Any, TypeAlias

#: A frame (or an object inside one) as built here: what ``encode_frame`` serialises. Its
#: values are JSON values whose type depends on the key (``llm_relay_protocol.messages`` types each
#: field; the builders' parameters say what goes in), hence ``Any``.
Frame: TypeAlias = dict[str, Any]   # (a type, not a builder: not in __all__)

__all__ = [
    # server -> client
    "error", "error_info", "finish", "limits", "pong", "readdressed", "reasoning", "refusal",
    "resumed",
    "started", "token", "tool_call_chunk", "tool_call_complete", "usage", "welcome",
    # client -> server
    "cancel", "client_info", "hello", "ping", "resume", "start",
    # relay -> relay
    "relay_cancel", "relay_takeover",
]

# ---------------------------------------------------------------- server -> client


def limits(max_streams: int, max_frame_bytes: int, detach_grace: float) -> Frame:
    """The ``limits`` object of ``welcome`` (``llm_relay_protocol.Limits``)."""
    return {"max_streams": max_streams, "max_frame_bytes": max_frame_bytes,
            "detach_grace": detach_grace}


def welcome(session_id: str, models: list[str], limits: Frame, protocol: str) -> Frame:
    """``limits`` from :func:`limits` (a relay may add keys; clients ignore unknown ones)."""
    return {"type": "welcome", "protocol": protocol, "session_id": session_id,
            "models": models, "limits": limits}


def started(id: str, model: str, stream_key: str | None = None) -> Frame:
    frame = {"type": "started", "id": id, "seq": 0, "model": model}
    if stream_key is not None:
        frame["stream_key"] = stream_key
    return frame


def resumed(id: str, stream_key: str, after_seq: int) -> Frame:
    return {"type": "resumed", "id": id, "stream_key": stream_key, "after_seq": after_seq}


def token(id: str, seq: int, text: str) -> Frame:
    return {"type": "token", "id": id, "seq": seq, "text": text}


def reasoning(id: str, seq: int, text: str) -> Frame:
    return {"type": "reasoning", "id": id, "seq": seq, "text": text}


def refusal(id: str, seq: int, text: str) -> Frame:
    """Text of the model's refusal to answer (``llm_relay_protocol.Refusal``)."""
    return {"type": "refusal", "id": id, "seq": seq, "text": text}


def tool_call_chunk(
    id: str, seq: int, index: int, call_id: str, name: str | None, arguments_delta: str
) -> Frame:
    frame = {"type": "tool_call_chunk", "id": id, "seq": seq, "index": index,
             "call_id": call_id, "arguments_delta": arguments_delta}
    if name is not None:
        frame["name"] = name
    return frame


def tool_call_complete(id: str, seq: int, index: int, call_id: str, name: str, arguments: str) -> Frame:
    return {"type": "tool_call_complete", "id": id, "seq": seq, "index": index,
            "call_id": call_id, "name": name, "arguments": arguments}


def usage(prompt_tokens: int, completion_tokens: int, estimated: bool) -> Frame:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "estimated": estimated}


def error_info(code: str, message: str, retry_after: float | None = None) -> Frame:
    """The ``error`` object of a failed or timed-out ``finish`` (``llm_relay_protocol.ErrorInfo``)."""
    info: Frame = {"code": str(code), "message": message}
    if retry_after is not None:
        info["retry_after"] = retry_after
    return info


def finish(
    id: str, seq: int, status: str, reason: str | None, usage: Frame,
    error: Frame | None = None,
) -> Frame:
    """``usage`` from :func:`usage`; ``error`` from :func:`error_info`."""
    frame: Frame = {"type": "finish", "id": id, "seq": seq, "status": status, "usage": usage}
    if reason is not None:
        frame["reason"] = reason
    if error is not None:
        frame["error"] = error
    return frame


def error(
    code: str, message: str, *, ref: str | None = None, id: str | None = None,
    retry_after: float | None = None,
) -> Frame:
    frame: Frame = {"type": "error", "code": code, "message": message}
    if ref is not None:
        frame["ref"] = ref
    if id is not None:
        frame["id"] = id
    if retry_after is not None:
        frame["retry_after"] = retry_after
    return frame


def pong(data: Any = None) -> Frame:   # Any: ``ping.data`` echoed, any JSON value
    frame: Frame = {"type": "pong"}
    if data is not None:
        frame["data"] = data
    return frame


def readdressed(frame: Frame, id: str) -> Frame:
    """``frame`` (a stream's frame) as sent to a reader that calls the stream ``id``: the
    same frame with its ``id`` replaced (a ``resume`` under another id)."""
    return {**frame, "id": id}


# ---------------------------------------------------------------- client -> server


def client_info(name: str, version: str) -> Frame:
    """The ``client`` object of ``hello``."""
    return {"name": name, "version": version}


def hello(token: str | None = None, client: Frame | None = None) -> Frame:
    """First frame of a connection; ``client`` from :func:`client_info`."""
    frame: Frame = {"type": "hello"}
    if token is not None:
        frame["token"] = token
    if client is not None:
        frame["client"] = client
    return frame


def start(
    id: str, model: str, messages: list[Any], *, tools: list[Any] | None = None,
    tool_choice: Any = None, params: Frame | None = None,
) -> Frame:
    """Begin stream ``id``. ``params``: sampling parameters (the relay's allowlist). Values
    go in as given (the relay validates what it receives; a wrong type must reach it as
    sent, so the builder converts nothing: hence ``Any``)."""
    frame: Frame = {"type": "start", "id": id, "model": model, "messages": messages}
    if tools is not None:
        frame["tools"] = tools
    if tool_choice is not None:
        frame["tool_choice"] = tool_choice
    if params is not None:
        frame["params"] = params
    return frame


def cancel(id: str) -> Frame:
    return {"type": "cancel", "id": id}


def ping(data: Any = None) -> Frame:   # Any: any JSON value, echoed in ``pong``
    frame: Frame = {"type": "ping"}
    if data is not None:
        frame["data"] = data
    return frame


def resume(stream_key: str, after_seq: int, id: str | None = None, *,
           takeover: bool = False) -> Frame:
    """Attach stream ``stream_key`` (under ``id``, default its original id) and replay every
    frame with ``seq > after_seq``: as a viewer, or (``takeover``) as its new owner."""
    frame: Frame = {"type": "resume", "stream_key": stream_key, "after_seq": after_seq}
    if id is not None:
        frame["id"] = id
    if takeover:
        frame["takeover"] = True
    return frame


# ---------------------------------------------------------------- relay -> relay


def relay_cancel(key: str) -> Frame:
    """Ask the relay that owns stream ``key`` to cancel its upstream call
    (``llm_relay_protocol.RelayCancel``)."""
    return {"op": "cancel", "key": key}


def relay_takeover(key: str, node: str) -> Frame:
    """Tell the other relays that a connection on ``node`` attached stream ``key``
    (``llm_relay_protocol.RelayTakeover``)."""
    return {"op": "takeover", "key": key, "node": node}
