"""Generate the chart's values.schema.json and docs/admin/helm-values.md from values.schema.yaml.

    .venv/bin/python helm/tools/schema.py          # write both
    .venv/bin/python helm/tools/schema.py --check  # exit 1 if either is not current

values.schema.yaml is the source (draft-07, ``additionalProperties: false`` everywhere, every key
described). The ``hub.ldap`` keys are filled in from the config traits of Directory and
LDAPAuthenticator (the flat ``ldap:`` settings go to either, labyard_hub.ldap.ldap_config), with
their ``help=`` as the description, so the chart accepts exactly the settings the code has. The reference lists every key with its type, its default from values.yaml and its
description.
"""

from __future__ import annotations

import copy
import inspect
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from traitlets import Bool, Dict, Enum, Float, Integer, List, TraitType, Unicode

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "labyard"
SOURCE = CHART / "values.schema.yaml"
SCHEMA = CHART / "values.schema.json"
DOC = ROOT / "docs" / "admin" / "helm-values.md"


def ldap_properties() -> dict[str, Any]:
    """JSON-schema properties for every Directory and LDAPAuthenticator config trait Labyard declares."""
    from labyard_hub.directory import Directory
    from labyard_hub.ldap import LDAPAuthenticator
    from labyard_hub.reference import _own_traits

    props = {}
    for name, trait in {**_own_traits(Directory), **_own_traits(LDAPAuthenticator)}.items():
        props[name] = {**_trait_type(trait), "default": trait.default(), "description": inspect.cleandoc(trait.help or "")}
    return props


def _trait_type(trait: TraitType) -> dict[str, Any]:
    if isinstance(trait, Enum):
        return {"enum": list(trait.values)}
    if isinstance(trait, Bool):
        return {"type": "boolean"}
    if isinstance(trait, Integer):
        return {"type": "integer"}
    if isinstance(trait, Float):
        return {"type": "number"}
    if isinstance(trait, Unicode):
        return {"type": "string"}
    if isinstance(trait, List):
        item = trait._trait
        return {"type": "array", **({"items": _trait_type(item)} if item is not None else {})}
    if isinstance(trait, Dict):
        return {"type": "object"}
    raise TypeError(f"no JSON type for trait {trait!r}: add it to helm/tools/schema.py")


def build_schema() -> dict[str, Any]:
    schema = yaml.safe_load(SOURCE.read_text())
    schema["properties"]["hub"]["properties"]["ldap"]["properties"] = ldap_properties()
    return schema


def render_schema(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """A property with its $ref merged in (its own keys win, as in the source's intent)."""
    ref = node.get("$ref")
    if not ref:
        return node
    target = schema
    for part in ref.removeprefix("#/").split("/"):
        target = target[part]
    return {**_resolve(schema, target), **{k: v for k, v in node.items() if k != "$ref"}}


def _type_of(node: dict[str, Any]) -> str:
    if "enum" in node:
        return " \\| ".join(f"`{json.dumps(v)}`" for v in node["enum"])
    t = node.get("type", "any")
    return " \\| ".join(t) if isinstance(t, list) else t


def _default(values: Any, path: list[str], schema_default: Any = None) -> str:
    node = values
    for key in path:
        if not isinstance(node, dict) or key not in node:
            if schema_default is None:
                return ""
            node = schema_default
            break
        node = node[key]
    text = json.dumps(node, ensure_ascii=False)
    return f"`{text}`" if len(text) <= 60 else "see values.yaml"


def _row(path: list[str], node: dict[str, Any], values: Any, desc: str) -> str:
    cells = [f"`{'.'.join(path)}`", _type_of(node), _default(values, path, node.get("default")), desc]
    return "| " + " | ".join(c.replace("|", "\\|") if i == 3 else c for i, c in enumerate(cells)) + " |"


def rows(schema: dict[str, Any], node: dict[str, Any], values: Any, path: list[str]) -> list[str]:
    """One table row per key, depth first; objects with fixed keys are expanded."""
    out = []
    for key, child in (node.get("properties") or {}).items():
        child = _resolve(schema, child)
        here = [*path, key]
        desc = " ".join(str(child.get("description", "")).split())
        if not desc:
            raise ValueError(f"{'.'.join(here)} has no description in {SOURCE.name}")
        out.append(_row(here, child, values, desc))
        if child.get("properties"):
            out += rows(schema, child, values, here)
    return out


def render_doc(schema: dict[str, Any]) -> str:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    lines = [
        "# Helm values reference",
        "",
        "Generated from `helm/labyard/values.schema.yaml` by `.venv/bin/python helm/tools/schema.py`;",
        "do not edit by hand. Helm refuses values that the schema does not describe (every object",
        "has `additionalProperties: false`), so a misspelt key fails `helm install` instead of being",
        "ignored. How to install: [install.md](install.md).",
        "",
    ]
    for key, section in schema["properties"].items():
        section = _resolve(schema, section)
        lines += [f"## `{key}`", "", " ".join(section.get("description", "").split()), ""]
        lines += ["| key | type | default | description |", "|---|---|---|---|"]
        desc = " ".join(str(section.get("description", "")).split())
        if not section.get("properties"):
            lines.append(_row([key], section, values, desc))
        lines += rows(schema, section, values, [key])
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str]) -> int:
    schema = build_schema()
    wanted = {SCHEMA: render_schema(schema), DOC: render_doc(copy.deepcopy(schema))}
    if "--check" in argv:
        stale = [str(p.relative_to(ROOT)) for p, text in wanted.items() if not p.exists() or p.read_text() != text]
        if stale:
            print(f"not current: {', '.join(stale)}; run .venv/bin/python helm/tools/schema.py", file=sys.stderr)
            return 1
        return 0
    for path, text in wanted.items():
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
