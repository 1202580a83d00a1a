"""Notebook parameters: found with ``papermill.inspect_notebook`` and validated by type.

The cell tagged ``parameters`` declares names, types (from annotations or from the default's
literal) and defaults. Values sent by the API or the UI must be of that type (lists and dicts
may be given as JSON text); unknown names and wrong types are refused with a message that
names them.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

from .models import Parameter

_TYPES = {"int", "float", "bool", "str", "list", "dict"}


class ParameterError(ValueError):
    """Values that do not fit the notebook's parameters (HTTP 400)."""


def _literal(source: str) -> Any:
    try:
        return ast.literal_eval(source)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def inspect_parameters(notebook_path: str | Path) -> list[Parameter]:
    """The parameters of a notebook's ``parameters`` cell, in order (empty without one)."""
    import papermill  # slow import; only where needed

    found = papermill.inspect_notebook(str(notebook_path))
    specs = []
    for name, p in found.items():
        kind = (p.get("inferred_type_name") or "").strip()
        kind = kind if kind in _TYPES else "any"
        source = p.get("default") or ""
        default = _literal(source)
        if kind == "any" and default is not None and type(default).__name__ in _TYPES:
            kind = type(default).__name__
        specs.append(Parameter(name=name, type=kind, default=default, default_source=source, help=p.get("help") or ""))
    return specs


def _coerce(spec: Parameter, value: Any) -> Any:
    kind = spec.type
    if kind in ("list", "dict") and isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ParameterError(f"parameter {spec.name!r} must be a {kind} (JSON text is accepted): {e}") from e
    ok = {
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "bool": lambda v: isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
        "list": lambda v: isinstance(v, list),
        "dict": lambda v: isinstance(v, dict),
        "any": lambda v: True,
    }[kind]
    if not ok(value):
        raise ParameterError(f"parameter {spec.name!r} must be {kind}, got {type(value).__name__} {value!r}")
    if kind == "float":
        value = float(value)
    return value


def validate_parameters(specs: list[Parameter], values: dict[str, Any]) -> dict[str, Any]:
    """Check ``values`` against ``specs``; return them coerced (JSON text -> list/dict, int -> float).

    Raises:
        ParameterError: unknown names (all of them named) or a value of the wrong type.
    """
    known = {s.name: s for s in specs}
    unknown = sorted(set(values) - set(known))
    if unknown:
        allowed = ", ".join(known) or "none (the notebook has no cell tagged 'parameters')"
        raise ParameterError(f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                             f"the notebook's parameters are: {allowed}")
    return {name: _coerce(known[name], value) for name, value in values.items()}
