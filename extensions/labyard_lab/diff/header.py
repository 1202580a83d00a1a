"""The header above a run-vs-run or run-vs-notebook diff: what differs besides the cells.

Each side is described by *facts* (plain JSON):

``{"kind": "run", "label", "parameters": {name: value}, "metrics": {name: number},
"provenance": {"image", "git_commit", "git_dirty", "python", "gpu", "flavor"},
"requirements": "<pip freeze>", "inputs": [{"path", "fingerprint"}]}``

gathered by the server from the scheduler and MLflow (:mod:`labyard_lab.diff.sources`), or
``{"kind": "notebook", "label", "environment": "server" | None, "git_commit", "path"}`` for a
notebook, completed here in the worker (:func:`notebook_facts`): the defaults of its
``parameters`` cell and, for ``environment == "server"``, this server's image, Python and
packages (what the notebook would run with now). A fact that is missing (None) on a side is not
compared; :func:`compare_sides` lists the rest.
"""

from __future__ import annotations

import ast
import json
import math
import re
import sys
from typing import Any

PROVENANCE_KEYS = ("image", "git_commit", "git_dirty", "python", "gpu", "flavor")


def parameters_cell(nb: dict) -> dict[str, Any] | None:
    """``name = value`` of the notebook's cell tagged ``parameters`` (papermill's convention);
    values that are not literals are given as their source text. None without such a cell."""
    for cell in nb.get("cells", []):
        tags = (cell.get("metadata") or {}).get("tags") or []
        if cell.get("cell_type") == "code" and "parameters" in tags:
            source = cell.get("source") or ""
            try:
                tree = ast.parse(source)
            except SyntaxError:
                return {}
            out: dict[str, Any] = {}
            for node in tree.body:
                target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else (
                    node.target if isinstance(node, ast.AnnAssign) and node.value is not None else None)
                if isinstance(target, ast.Name):
                    try:
                        out[target.id] = ast.literal_eval(node.value)
                    except (ValueError, SyntaxError, TypeError, RecursionError):
                        out[target.id] = ast.get_source_segment(source, node.value)
            return out
    return None


def notebook_facts(facts: dict, nb: dict) -> dict:
    """Complete the facts of a notebook side from the notebook itself and this environment."""
    if facts.get("kind") != "notebook":
        return facts
    out = {**facts, "parameters": parameters_cell(nb), "metrics": None, "inputs": None}
    provenance: dict[str, Any] = {"git_commit": facts.get("git_commit")}
    if facts.get("environment") == "server":
        from ..autolog.provenance import git_state, image_name, pip_freeze

        provenance.update(image=image_name(), python=sys.version.split()[0])
        if facts.get("path") and not provenance["git_commit"]:
            from pathlib import Path

            state = git_state(Path(facts["path"]))
            provenance.update(git_commit=state.get("labyard.git.commit"), git_dirty=state.get("labyard.git.dirty"))
        out["requirements"] = pip_freeze()
    else:
        out.setdefault("requirements", None)
    out["provenance"] = provenance
    return out


def _norm(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True)


def _change(present_a: bool, present_b: bool, same: bool) -> str:
    if present_a and present_b:
        return "same" if same else "changed"
    return "added" if present_b else "removed"


def compare_values(a: dict | None, b: dict | None) -> list[dict] | None:
    """Parameters: every name on either side with ``change`` same/changed/added/removed."""
    if a is None and b is None:
        return None
    a, b = a or {}, b or {}
    return [{"name": k, "base": a.get(k), "remote": b.get(k),
             "change": _change(k in a, k in b, k in a and k in b and _norm(a[k]) == _norm(b[k]))}
            for k in sorted(a.keys() | b.keys())]


def compare_metrics(a: dict | None, b: dict | None) -> list[dict] | None:
    """Final metrics with ``delta`` (remote − base) where both sides have a number."""
    if a is None and b is None:
        return None
    out = []
    for row in compare_values(a, b):
        x, y = row["base"], row["remote"]
        numbers = isinstance(x, (int, float)) and isinstance(y, (int, float))
        delta = y - x if numbers and math.isfinite(x) and math.isfinite(y) else None
        out.append({**row, "delta": delta, "change": row["change"] if not numbers else ("same" if x == y else "changed")})
    return out


_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(?:==|@|===)\s*(.+?)\s*$")


def parse_requirements(text: str) -> dict[str, tuple[str, str]]:
    """``pip freeze`` lines to {normalised name: (name, version)}."""
    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip() if not line.lstrip().startswith("-") else ""
        m = _REQ.match(line)
        if m:
            out[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = (m.group(1), m.group(2))
    return out


def compare_packages(a: str | None, b: str | None) -> dict:
    if a is None or b is None:
        return {"compared": False, "added": [], "removed": [], "changed": [], "unchanged": 0}
    pa, pb = parse_requirements(a), parse_requirements(b)
    return {
        "compared": True,
        "added": [{"name": pb[k][0], "version": pb[k][1]} for k in sorted(pb.keys() - pa.keys())],
        "removed": [{"name": pa[k][0], "version": pa[k][1]} for k in sorted(pa.keys() - pb.keys())],
        "changed": [{"name": pb[k][0], "base": pa[k][1], "remote": pb[k][1]}
                    for k in sorted(pa.keys() & pb.keys()) if pa[k][1] != pb[k][1]],
        "unchanged": sum(1 for k in pa.keys() & pb.keys() if pa[k][1] == pb[k][1]),
    }


def compare_inputs(a: list | None, b: list | None) -> dict:
    if a is None or b is None:
        return {"compared": False, "added": [], "removed": [], "changed": [], "unchanged": 0}
    fa = {f["path"]: f.get("fingerprint") for f in a}
    fb = {f["path"]: f.get("fingerprint") for f in b}
    return {
        "compared": True,
        "added": [{"path": p, "fingerprint": fb[p]} for p in sorted(fb.keys() - fa.keys())],
        "removed": [{"path": p, "fingerprint": fa[p]} for p in sorted(fa.keys() - fb.keys())],
        "changed": [{"path": p, "base": fa[p], "remote": fb[p]} for p in sorted(fa.keys() & fb.keys()) if fa[p] != fb[p]],
        "unchanged": sum(1 for p in fa.keys() & fb.keys() if fa[p] == fb[p]),
    }


def _describe(facts: dict) -> dict:
    return {k: v for k, v in facts.items() if k not in ("parameters", "metrics", "provenance", "requirements", "inputs", "path")}


def compare_sides(base: dict, remote: dict) -> dict:
    """The header: both sides described, then what differs between them."""
    pa, pb = base.get("provenance") or {}, remote.get("provenance") or {}
    provenance = []
    for key in PROVENANCE_KEYS:
        x, y = pa.get(key), pb.get(key)
        if x is None and y is None:
            continue
        if x is None or y is None:
            change = "unknown"
        else:
            change = "same" if _norm(x) == _norm(y) else "changed"
        provenance.append({"name": key, "base": x, "remote": y, "change": change})
    return {
        "base": _describe(base),
        "remote": _describe(remote),
        "parameters": compare_values(base.get("parameters"), remote.get("parameters")),
        "metrics": compare_metrics(base.get("metrics"), remote.get("metrics")),
        "provenance": provenance,
        "packages": compare_packages(base.get("requirements"), remote.get("requirements")),
        "inputs": compare_inputs(base.get("inputs"), remote.get("inputs")),
    }
