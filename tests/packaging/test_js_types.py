"""The JS client's hand-written types (clients/js/relay-client.d.ts) say what the relay
sends: one interface per server frame type, each with exactly the fields of the frame's
pydantic model in clients/python/llm_relay_protocol/messages.py, optional (``?``) exactly where the model has a
default; the nested shapes (``Limits``, ``Usage``, ``ErrorInfo``) likewise. A field added to
a model without its type fails here, so the ``.d.ts`` cannot drift from the protocol.
"""

from __future__ import annotations

import re

from llm_relay_protocol import messages
from llm_relay_protocol.messages import ErrorInfo, Limits, ServerMessage, Usage, union_members

from ..test_import_cycles import ROOT

DTS = (ROOT / "clients" / "js" / "relay-client.d.ts").read_text(encoding="utf-8")

_INTERFACE = re.compile(r"^export interface (\w+) \{\n(.*?)^\}", re.M | re.S)
_FIELD = re.compile(r"^  (\w+)(\??): (.+);$", re.M)


def interfaces(text: str) -> dict[str, dict[str, bool]]:
    """Interface name -> {field: optional} of every ``export interface`` in ``text``."""
    return {name: {field: bool(optional) for field, optional, _ in _FIELD.findall(body)}
            for name, body in _INTERFACE.findall(text)}


def _by_frame_type(found: dict[str, dict[str, bool]]) -> dict[str, dict[str, bool]]:
    """Frame type -> fields of the ``...Frame`` interfaces (by their ``type`` literal)."""
    out = {}
    for name, fields in found.items():
        if not name.endswith("Frame"):
            continue
        match = re.search(rf"^export interface {name} \{{\n  type: \"(\w+)\";", DTS, re.M)
        if match:
            out[match.group(1)] = fields
    return out


def _model_fields(model) -> dict[str, bool]:
    return {name: not info.is_required() for name, info in model.model_fields.items()}


def test_every_server_frame_has_an_interface_with_the_models_fields():
    declared = _by_frame_type(interfaces(DTS))
    models = {messages.model_tag(model): model for model in union_members(ServerMessage)}
    assert set(declared) == set(messages.SERVER_FRAME_TYPES)
    for frame_type, model in models.items():
        assert declared[frame_type] == _model_fields(model), frame_type


def test_the_nested_shapes_match_their_models():
    found = interfaces(DTS)
    for model in (Limits, Usage, ErrorInfo):
        assert found[model.__name__] == _model_fields(model), model.__name__


def test_the_check_sees_a_missing_or_extra_field():
    text = ('export interface TokenFrame {\n  type: "token";\n  id: string;\n  seq?: number;\n'
            '  extra: string;\n}\n')
    assert interfaces(text) == {"TokenFrame": {"type": False, "id": False, "seq": True,
                                               "extra": False}}
    assert interfaces(text)["TokenFrame"] != _model_fields(messages.Token)
