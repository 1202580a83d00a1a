"""Comparing our engine with nbdime 4.0.4 on the same pair, and explaining where they differ."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field

import nbdime
import nbformat
from nbdime.diffing.notebooks import reset_notebook_differ, set_notebook_diff_targets

from labyard_lab.diff import DiffOptions, diff_notebooks

#: the documented intended disagreements (docs/dev/diff.md), by the name the tests report
REASONS = {
    "ignored-id": "nbdime 4.0.4 reports changed cell ids even with ids ignored (its ignore rule is never "
                  "applied to atomic values); we leave them out",
    "ignored-output-metadata": "nbdime 4.0.4 reports metadata of display_data/execute_result outputs even with "
                               "metadata ignored (it diffs them without its configuration); we leave it out",
    "ignored-part-added-or-removed": "nbdime 4.0.4 reports an ignored part (outputs, execution count...) that "
                                     "appears or disappears, e.g. on a cell type change; we leave it out",
}


def plain(x):
    return json.loads(json.dumps(x))


def entries(diff: list) -> list:
    """A diff as JSON gives it (what the browser and ``labyard diff --json`` get) back as nbdime's
    DiffEntry objects, for ``nbdime.patch``."""
    from nbdime.diff_format import DiffEntry

    def conv(e):
        e = DiffEntry(e)
        if e.op == "patch":
            e["diff"] = [conv(x) for x in e["diff"]]
        return e

    return [conv(e) for e in diff]


def patched(base: dict, diff: list) -> dict:
    """``nbdime.patch(base, diff)`` of the JSON form of a diff."""
    return plain(nbdime.patch(copy.deepcopy(base), entries(plain(diff))))


def nbdime_diff(a: dict, b: dict, options: DiffOptions = DiffOptions()) -> list:
    """nbdime's diff_notebooks with the same options (set_notebook_diff_targets), as JSON."""
    if not options.complete:
        set_notebook_diff_targets(sources=options.sources, outputs=options.outputs, attachments=options.attachments,
                                  metadata=options.metadata, identifier=options.identifier, details=options.details)
    try:
        return plain(nbdime.diff_notebooks(nbformat.from_dict(copy.deepcopy(a)), nbformat.from_dict(copy.deepcopy(b))))
    finally:
        reset_notebook_differ()


def cell_sets(diff: list) -> tuple[frozenset, frozenset, frozenset]:
    """(added, removed, modified) cells: added by their index in the remote, the others in the base."""
    added, removed, modified = set(), set(), set()
    ops = next((e["diff"] for e in diff if e["key"] == "cells" and e["op"] == "patch"), [])
    shift = 0  # remote index = base index + shift
    for e in ops:
        if e["op"] == "addrange":
            added.update(range(e["key"] + shift, e["key"] + shift + len(e["valuelist"])))
            shift += len(e["valuelist"])
        elif e["op"] == "removerange":
            removed.update(range(e["key"], e["key"] + e["length"]))
            shift -= e["length"]
        elif e["op"] == "patch":
            modified.add(e["key"])
    return frozenset(added), frozenset(removed), frozenset(modified)


def _strip_ignored(diff: list, options: DiffOptions) -> tuple[list, set[str]]:
    """nbdime's diff without what our intended semantics leave out; the reasons that applied."""
    cell_keys = {k for k, on in (("source", options.sources), ("outputs", options.outputs),
                                 ("attachments", options.attachments), ("metadata", options.metadata),
                                 ("id", options.identifier), ("execution_count", options.details)) if not on}
    output_keys = {k for k, on in (("metadata", options.metadata), ("execution_count", options.details)) if not on}
    reasons: set[str] = set()

    def outputs(ops):
        out = []
        for e in ops:
            if e["op"] == "patch":
                inner = [x for x in e["diff"] if x["key"] not in output_keys]
                if len(inner) != len(e["diff"]):
                    reasons.add("ignored-output-metadata")
                if inner:
                    out.append({**e, "diff": inner})
            else:
                out.append(e)
        return out

    def cell(ops):
        out = []
        for e in ops:
            if e["key"] in cell_keys:
                reasons.add("ignored-id" if e["key"] == "id" else "ignored-part-added-or-removed")
                continue
            if e["key"] == "outputs" and e["op"] == "patch":
                e = {**e, "diff": outputs(e["diff"])}
                if not e["diff"]:
                    continue
            out.append(e)
        return out

    stripped = []
    for e in diff:
        if e["key"] == "cells" and e["op"] == "patch":
            cells = []
            for c in e["diff"]:
                if c["op"] == "patch":
                    c = {**c, "diff": cell(c["diff"])}
                    if not c["diff"]:
                        continue
                cells.append(c)
            e = {**e, "diff": cells}
        stripped.append(e)
    return stripped, reasons


@dataclass
class Comparison:
    name: str
    roundtrip: bool
    identical: bool
    same_cells: bool
    reasons: set[str] = field(default_factory=set)
    detail: str = ""


def compare(name: str, a: dict, b: dict, options: DiffOptions = DiffOptions()) -> Comparison:
    ours = plain(diff_notebooks(copy.deepcopy(a), copy.deepcopy(b), options))
    roundtrip = not options.complete or patched(a, ours) == plain(b)
    ref = nbdime_diff(a, b, options)
    if ours == ref:
        return Comparison(name, roundtrip, True, True)
    if cell_sets(ours) == cell_sets(ref):
        return Comparison(name, roundtrip, False, True)
    stripped, reasons = _strip_ignored(ref, options)
    explained = cell_sets(ours) == cell_sets(stripped)
    ours_sets, ref_sets = cell_sets(ours), cell_sets(ref)
    detail = (f"added/removed/modified ours {[sorted(s) for s in ours_sets]} nbdime {[sorted(s) for s in ref_sets]}")
    return Comparison(name, roundtrip, False, False, reasons if explained else {"unexplained"}, detail)
