"""The notebook diff engine: nbdime's diff format and rules, without nbdime's quadratic work.

``diff_notebooks(base, remote)`` returns what ``nbdime.diff_notebooks`` returns (a list of diff
entries: dicts with attribute access, as nbdime's ``DiffEntry``) for notebooks in nbformat 4 as
``json.load`` reads them with multi-line strings joined (:func:`labyard_lab.diff.loading.load_notebook`), so that
``nbdime.patch(base, diff) == remote`` and nbdime's widgets render it.

How cells are aligned (nbdime: every cell against every cell, four times):

1. cells by id (nbformat 4.5): a longest common subsequence of the id sequences, in O(n log n)
   (:func:`labyard_lab.diff.align.unique_lcs`), with nbdime's own tie-breaking;
2. in each window of unmatched cells between two matched ones, nbdime's three fuzzy levels
   (strict, moderate, approximate: :mod:`labyard_lab.diff.compare`). A window of at most
   :data:`CELL_GRID_LIMIT` pairs is aligned exactly as nbdime aligns it; a larger one (a
   notebook without ids) is anchored on exact content hashes and then paired in place.

Outputs of matched cells are aligned by nbdime's two levels (strict, approximate), strings line
by line (exact lines first, then similar lines within small windows, then lines that differ
only in their numbers), and a changed line is diffed character by character (difflib for
short lines, as nbdime; prefix/suffix for long ones). Values nbdime never diffs inside (images
and other binary outputs) are compared by equality and replaced.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass

from . import align, compare

#: largest window of unmatched cells (n·m) aligned exactly as nbdime aligns it
CELL_GRID_LIMIT = 256
#: largest window of unmatched lines (n·m) paired by nbdime's line similarity
LINE_GRID_LIMIT = 100
#: lines up to this length (both) are diffed character by character with difflib, as nbdime
CHAR_DIFF_LIMIT = 2000

#: mimetypes whose values nbdime diffs inside (others are replaced whole)
SPLIT_MIMES = ("text/", "image/svg+xml", "application/javascript", "application/json")
_DIGITS = re.compile(r"\d+")


@dataclass(frozen=True)
class DiffOptions:
    """What to compare (nbdime's ``set_notebook_diff_targets``): False ignores that part.

    ``details`` covers execution counts (of cells and outputs). Ignoring a part only leaves its
    changes out of the diff; cells are still aligned on everything, as nbdime does.
    """

    sources: bool = True
    outputs: bool = True
    attachments: bool = True
    metadata: bool = True
    identifier: bool = True
    details: bool = True

    @classmethod
    def sources_only(cls) -> DiffOptions:
        return cls(outputs=False, attachments=False, metadata=False, identifier=False, details=False)

    @property
    def complete(self) -> bool:
        """True when nothing is ignored (then ``patch(base, diff) == remote``)."""
        return all((self.sources, self.outputs, self.attachments, self.metadata, self.identifier, self.details))


def diff_notebooks(base: dict, remote: dict, options: DiffOptions | None = None) -> list[DiffEntry]:
    """The nbdime-format diff that turns ``base`` into ``remote``."""
    if not isinstance(base, dict) or not isinstance(remote, dict):
        raise TypeError("notebooks must be dicts")
    return _Differ(options or DiffOptions()).notebook(base, remote)


def json_key(value) -> str:
    """A hashable stand-in for a JSON value (equal values, equal keys)."""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


# ---- diff entries (the canonical order nbdime produces: keys ascending, addrange first) -------

class DiffEntry(dict):
    """One diff entry (``op``, ``key`` and ``value``/``valuelist``/``length``/``diff``): a dict, so it
    is JSON as it is, with attribute access like nbdime's own, so ``nbdime.patch`` applies it."""

    __slots__ = ()

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value


def _add(key, value) -> DiffEntry:
    return DiffEntry(op="add", key=key, value=value)


def _remove(key) -> DiffEntry:
    return DiffEntry(op="remove", key=key)


def _replace(key, value) -> DiffEntry:
    return DiffEntry(op="replace", key=key, value=value)


def _patch(key, diff) -> DiffEntry:
    return DiffEntry(op="patch", key=key, diff=diff)


def _sequence_diff(a_len: int, b, snakes, inner) -> list[DiffEntry]:
    """Entries for a sequence: the gaps between ``snakes`` become addrange/removerange, the matched
    items are diffed with ``inner(i, j)`` (None or [] for no change)."""
    out: list[DiffEntry] = []
    ci = cj = 0
    for i, j, n in [*snakes, (a_len, len(b), 0)]:
        if j > cj:
            out.append(DiffEntry(op="addrange", key=ci, valuelist=b[cj:j]))
        if i > ci:
            out.append(DiffEntry(op="removerange", key=ci, length=i - ci))
        for k in range(n):
            d = inner(i + k, j + k)
            if d:
                out.append(_patch(i + k, d))
        ci, cj = i + n, j + n
    return out


# ---- strings ---------------------------------------------------------------------------------

def diff_text(a: str, b: str) -> list[DiffEntry]:
    """nbdime's line-based string diff: lines added/removed, changed lines patched by character."""
    if a == b:
        return []
    la, lb = a.splitlines(True), b.splitlines(True)
    n, m = len(la), len(lb)

    def exact(i0, i1, j0, j1):
        if (i1 - i0) * (j1 - j0) <= align.GRID_LIMIT:
            return compare._grid(i0, i1, j0, j1, lambda i, j: la[i] == lb[j])
        return compare._offset(align.key_lcs(la[i0:i1], lb[j0:j1]), i0, j0)

    def similar(i0, i1, j0, j1):
        if (i1 - i0) * (j1 - j0) <= LINE_GRID_LIMIT:
            return compare._grid(i0, i1, j0, j1, lambda i, j: compare.similar(la[i], lb[j]))
        # a large window of changed lines: pair lines that differ only in their numbers
        xs = [_DIGITS.sub("0", s) for s in la[i0:i1]]
        ys = [_DIGITS.sub("0", s) for s in lb[j0:j1]]
        return compare._offset(align.key_lcs(xs, ys), i0, j0)

    snakes = align.multilevel([similar, exact], 0, n, 0, m)
    return _sequence_diff(n, lb, snakes, lambda i, j: diff_chars(la[i], lb[j]))


def diff_chars(a: str, b: str) -> list[DiffEntry]:
    """Character diff of two lines (nbdime: difflib opcodes)."""
    if a == b:
        return []
    if len(a) + len(b) <= CHAR_DIFF_LIMIT:
        out = []
        for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
            if tag in ("replace", "insert"):
                out.append(DiffEntry(op="addrange", key=i1, valuelist=b[j1:j2]))
            if tag in ("replace", "delete"):
                out.append(DiffEntry(op="removerange", key=i1, length=i2 - i1))
        return out
    if _DIGITS.sub("0", a) == _DIGITS.sub("0", b):
        return _digit_runs(a, b)
    p = 0
    while p < len(a) and p < len(b) and a[p] == b[p]:
        p += 1
    s = 0
    while s < len(a) - p and s < len(b) - p and a[-1 - s] == b[-1 - s]:
        s += 1
    out = []
    if len(b) - s > p:
        out.append(DiffEntry(op="addrange", key=p, valuelist=b[p:len(b) - s]))
    if len(a) - s > p:
        out.append(DiffEntry(op="removerange", key=p, length=len(a) - s - p))
    return out


def _digit_runs(a: str, b: str) -> list[DiffEntry]:
    """Character diff of two long lines equal but for their digit runs: replace the runs that differ."""
    out = []
    for ma, mb in zip(_DIGITS.finditer(a), _DIGITS.finditer(b)):
        if ma.group() != mb.group():
            out.append(DiffEntry(op="addrange", key=ma.start(), valuelist=mb.group()))
            out.append(DiffEntry(op="removerange", key=ma.start(), length=ma.end() - ma.start()))
    return out


# ---- generic values --------------------------------------------------------------------------

def diff_value(a, b) -> list[DiffEntry] | None:
    """nbdime's generic diff of two JSON values; None when they cannot be diffed inside (replace)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return diff_dict(a, b, diff_value)
    if isinstance(a, list) and isinstance(b, list):
        if a == b:
            return []
        ka, kb = [json_key(x) for x in a], [json_key(x) for x in b]
        if len(a) * len(b) <= align.GRID_LIMIT:
            pairs = align.grid_lcs(len(a), len(b), lambda i, j: ka[i] == kb[j])
        else:
            pairs = align.key_lcs(ka, kb)
        return _sequence_diff(len(a), b, align.snakes_from_pairs(pairs), lambda i, j: None)
    if isinstance(a, str) and isinstance(b, str):
        return diff_text(a, b)
    return None


def diff_dict(a: dict, b: dict, inner, skip: frozenset = frozenset()) -> list[DiffEntry]:
    """Keys removed, changed (``inner(a[k], b[k], k)`` or replaced) and added, sorted by key."""
    out = []
    for key in a.keys() - b.keys():
        if key not in skip:
            out.append(_remove(key))
    for key in b.keys() - a.keys():
        if key not in skip:
            out.append(_add(key, b[key]))
    for key in a.keys() & b.keys():
        if key in skip:
            continue
        x, y = a[key], b[key]
        if x is y or (type(x) is type(y) and x == y):
            continue
        d = inner(x, y) if inner is diff_value else inner(x, y, key)
        if d is None:
            if x != y:
                out.append(_replace(key, y))
        elif d:
            out.append(_patch(key, d))
    out.sort(key=lambda e: e["key"])
    return out


# ---- the notebook ----------------------------------------------------------------------------

class _Differ:
    def __init__(self, options: DiffOptions):
        self.o = options
        skip = set()
        if not options.metadata:
            skip.add("metadata")
        if not options.details:
            skip.add("execution_count")
        self.output_skip = frozenset(skip)
        if not options.sources:
            skip.add("source")
        if not options.outputs:
            skip.add("outputs")
        if not options.attachments:
            skip.add("attachments")
        if not options.identifier:
            skip.add("id")
        self.cell_skip = frozenset(skip)
        self.top_skip = frozenset({"metadata"} if not options.metadata else ())

    def notebook(self, a: dict, b: dict) -> list[DiffEntry]:
        def inner(x, y, key):
            if key == "cells" and isinstance(x, list) and isinstance(y, list):
                return self.cells(x, y)
            return diff_value(x, y)

        return diff_dict(a, b, inner, self.top_skip)

    # cells
    def cells(self, a: list, b: list) -> list[DiffEntry]:
        if not all(isinstance(c, dict) for c in a) or not all(isinstance(c, dict) for c in b):
            return diff_value(a, b)
        ids_a, ids_b = [compare.cell_id(c) for c in a], [compare.cell_id(c) for c in b]
        keys: dict[str, tuple[list, list]] = {}

        def content_keys(kind: str):
            if kind not in keys:
                if kind == "strict":
                    f = lambda c: json_key([c.get("cell_type"), c.get("source"), c.get("outputs")])  # noqa: E731
                else:
                    f = lambda c: json_key([c.get("cell_type"), c.get("source")])  # noqa: E731
                keys[kind] = ([f(c) for c in a], [f(c) for c in b])
            return keys[kind]

        def by_id(i0, i1, j0, j1):
            wa, wb = ids_a[i0:i1], ids_b[j0:j1]
            if align.is_unique(wa) and align.is_unique(wb):
                return compare._offset(align.unique_lcs(wa, wb), i0, j0)
            same = lambda i, j: ids_a[i] is not None and ids_a[i] == ids_b[j]  # noqa: E731
            if (i1 - i0) * (j1 - j0) <= CELL_GRID_LIMIT:
                return compare._grid(i0, i1, j0, j1, same)
            return compare._offset(align.key_lcs(wa, wb), i0, j0)

        similar_source: dict[tuple[int, int], bool] = {}

        def approximate(i, j):  # asked again at the moderate level: remember
            if (i, j) not in similar_source:
                similar_source[i, j] = compare.cell_approximate(a[i], b[j])
            return similar_source[i, j]

        def moderate(i, j):
            return approximate(i, j) and compare.cell_moderate(a[i], b[j])

        def nbdime_levels(i0, i1, j0, j1) -> align.Pairs:
            grids = [lambda *w, same=same: compare._grid(*w, same) for same in
                     (approximate, moderate, lambda i, j: compare.cell_strict(a[i], b[j]))]
            return [(i + k, j + k) for i, j, n in align.multilevel(grids, i0, i1, j0, j1) for k in range(n)]

        def window(i0, i1, j0, j1) -> align.Pairs:
            """Cells between two matched by id: nbdime's three fuzzy levels in a small window; a
            large one is anchored on equal content, then equal sources, first."""
            if (i1 - i0) * (j1 - j0) <= CELL_GRID_LIMIT:
                return nbdime_levels(i0, i1, j0, j1)
            pairs: align.Pairs = []
            for kind in ("strict", "source"):
                ka, kb = content_keys(kind)
                found: align.Pairs = []
                ci, cj = i0, j0
                for i, j in [*pairs, (i1, j1)]:
                    if i > ci and j > cj:
                        found += compare._offset(align.key_lcs(ka[ci:i], kb[cj:j]), ci, cj)
                    ci, cj = i + 1, j + 1
                pairs = sorted(pairs + found)
            out: align.Pairs = []
            ci, cj = i0, j0
            for i, j in [*pairs, (i1, j1)]:
                if i > ci and j > cj:
                    if (i - ci) * (j - cj) <= CELL_GRID_LIMIT:
                        out += nbdime_levels(ci, i, cj, j)
                    else:
                        out += compare._diagonal(ci, i, cj, j, approximate)
                if i < i1:
                    out.append((i, j))
                ci, cj = i + 1, j + 1
            return out

        snakes = align.multilevel([window, by_id], 0, len(a), 0, len(b))
        return _sequence_diff(len(a), b, snakes, lambda i, j: self.cell(a[i], b[j]))

    def cell(self, a: dict, b: dict) -> list[DiffEntry]:
        return diff_dict(a, b, self._cell_key, self.cell_skip)

    def _cell_key(self, x, y, key):
        if key == "id":
            return None  # atomic: replaced
        if key == "outputs" and isinstance(x, list) and isinstance(y, list):
            return self.outputs(x, y)
        if key == "attachments" and isinstance(x, dict) and isinstance(y, dict):
            return diff_dict(x, y, lambda p, q, k: self.mimebundle(p, q))
        return diff_value(x, y)

    # outputs
    def outputs(self, a: list, b: list) -> list[DiffEntry]:
        if not all(isinstance(o, dict) for o in a) or not all(isinstance(o, dict) for o in b):
            return diff_value(a, b)
        snakes = compare.align_outputs(a, b)
        return _sequence_diff(len(a), b, snakes, lambda i, j: self.output(a[i], b[j]))

    def output(self, a: dict, b: dict) -> list[DiffEntry] | None:
        if a.get("output_type") in ("execute_result", "display_data"):
            def inner(x, y, key):
                if key == "data" and isinstance(x, dict) and isinstance(y, dict):
                    return self.mimebundle(x, y)
                return diff_value(x, y)

            return diff_dict(a, b, inner, self.output_skip)
        return diff_dict(a, b, lambda x, y, key: diff_value(x, y), self.output_skip)

    @staticmethod
    def mimebundle(a: dict, b: dict) -> list[DiffEntry] | None:
        if not isinstance(a, dict) or not isinstance(b, dict):
            return diff_value(a, b)

        def inner(x, y, mime):
            if mime.lower().startswith(SPLIT_MIMES):
                return diff_value(x, y)
            return None  # images and other data: replaced when different

        return diff_dict(a, b, inner)
