"""Docstrings name what exists (issue 22, item 5: ``server.py`` once cited an
``Authenticator.admit`` that was never written).

Every ````Name.attr```` in a docstring of ``relay/`` or ``clients/python/llm_relay_protocol/`` whose head is a module
path of those packages (````relay.core.auth.Authenticator````) or a class defined in them
(````Authenticator.check_header````) must resolve: the module's attribute, the class's
attribute (inherited ones included), or an instance attribute the class (or a project base)
assigns as ``self.attr`` or declares as a field. Heads that are neither (wire fields such as
````welcome.limits.detach_grace````, third-party objects) are not checked.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from functools import cache

from tests.test_import_cycles import PACKAGES, _modules

#: ``Name.attr``, ``a.b.C.d`` and ``C.m()`` / ``C.m(x)`` in double backticks.
REFERENCE = re.compile(r"``([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?:\([^`]*\))?``")

MODULES = _modules()


@cache
def _tree(module: str) -> ast.Module:
    return ast.parse(MODULES[module].read_text(encoding="utf-8"))


def _project_classes() -> dict[str, list[str]]:
    """Class name -> the modules defining it at top level."""
    found: dict[str, list[str]] = {}
    for module in MODULES:
        for node in _tree(module).body:
            if isinstance(node, ast.ClassDef):
                found.setdefault(node.name, []).append(module)
    return found


CLASSES = _project_classes()


def _declared(module: str, class_name: str) -> set[str]:
    """What a class body declares or assigns on ``self`` (read with ``ast``)."""
    names: set[str] = set()
    for node in _tree(module).body:
        if not (isinstance(node, ast.ClassDef) and node.name == class_name):
            continue
        for n in ast.walk(node):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(n.name)
            elif (isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                  and n.value.id == "self" and isinstance(n.ctx, ast.Store)):
                names.add(n.attr)
            elif isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name):
                names.add(n.target.id)
            elif isinstance(n, ast.Assign):
                names.update(t.id for t in n.targets if isinstance(t, ast.Name))
    return names


def _has(obj: object, attr: str) -> bool:
    if hasattr(obj, attr):
        return True
    if inspect.isclass(obj):
        return any(attr in _declared(klass.__module__, klass.__name__)
                   for klass in obj.__mro__ if klass.__module__ in MODULES)
    return False


def resolves(reference: str) -> bool | None:
    """True/False if ``reference`` is checkable and does/doesn't exist; None if its head is
    neither a project module path nor a project class."""
    parts = reference.split(".")
    if parts[0] in PACKAGES:
        for cut in range(len(parts), 0, -1):
            if ".".join(parts[:cut]) in MODULES:
                obj: object = importlib.import_module(".".join(parts[:cut]))
                rest = parts[cut:]
                break
        else:
            return False
    elif parts[0] in CLASSES:
        owners = [getattr(importlib.import_module(m), parts[0]) for m in CLASSES[parts[0]]]
        return any(_walk(owner, parts[1:]) for owner in owners)
    else:
        return None
    return _walk(obj, rest)


def _walk(obj: object, attrs: list[str]) -> bool:
    for attr in attrs:
        if not _has(obj, attr):
            return False
        if not hasattr(obj, attr):      # an instance attribute: its type is not known here
            return True
        obj = getattr(obj, attr)
    return True


def _docstrings(module: str):
    for node in ast.walk(_tree(module)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                yield doc


def test_docstring_references_resolve():
    checked, broken = 0, []
    for module in MODULES:
        for doc in _docstrings(module):
            for reference in REFERENCE.findall(doc):
                found = resolves(reference)
                checked += found is not None
                if found is False:
                    broken.append(f"{module}: ``{reference}``")
    assert not broken, "docstrings name what does not exist:\n" + "\n".join(sorted(set(broken)))
    assert checked > 100, checked       # 126 when written: the pattern still finds them


def test_the_check_tells_a_drifted_reference_from_a_real_one():
    assert resolves("Authenticator.check_header") is True
    assert resolves("relay.core.auth.Authenticator.authenticate") is True
    assert resolves("ConnectionLimits.detach_grace") is True        # a slotted field
    assert resolves("Authenticator.admit") is False                 # the drift issue 22 found
    assert resolves("relay.core.auth.Authenticator.admit") is False
    assert resolves("relay.core.nowhere") is False
    assert resolves("welcome.limits.detach_grace") is None           # a wire field
