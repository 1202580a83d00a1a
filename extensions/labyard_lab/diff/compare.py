"""When two cells, outputs or strings count as "the same item, changed": nbdime's rules, made cheap.

nbdime aligns cells and outputs with predicates (``nbdime.diffing.notebooks.compare_*``) whose
core is ``difflib.SequenceMatcher(...).ratio()`` on whole strings. That ratio costs O(n²) on the
small alphabets of numbers and logs (1.5 s for two 3 KB training logs here, 22 s for 10 KB), and
nbdime computes it inside its every-cell-against-every-cell grids.

The predicates here follow nbdime's rules field by field, with the same thresholds and length
limits, and decide in this order:

1. what nbdime decides without the ratio: empty against non-empty, equal strings, both longer
   than the limit (``maxlen``), the length bound (``real_quick_ratio``) and the character-count
   bound (``quick_ratio``, counted here with ``collections.Counter``);
2. strings of at most :data:`EXACT_CHARS` characters each: difflib's ratio, as nbdime computes
   it, so small notebooks get nbdime's decisions exactly;
3. longer strings: :func:`estimated_ratio`, a linear-time estimate of difflib's ratio from the
   lines (equal lines count whole, lines that differ only in their numbers count their other
   characters and equal digit runs). This is the one place where the engine may decide
   differently from nbdime; docs/dev/diff.md lists it.

Base64 payloads (images) are compared for equality, as nbdime does.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Callable

from . import align

#: strings up to this many characters (each) are compared with nbdime's own difflib similarity
EXACT_CHARS = 400
#: nbdime's length limits (``TEXT_MIMEDATA_MAX_COMPARE_LENGTH``, ``STREAM_MAX_COMPARE_LENGTH``)
MIMEDATA_MAXLEN = 10000
STREAM_MAXLEN = 1000
SHORT_TEXT = 10  # nbdime lets two texts shorter than this align without comparing them

_POINTER = re.compile(r"0x[a-f0-9]{8,16}", re.IGNORECASE)
_BASE64 = re.compile(r"^(?:[a-z0-9+/]{4})*(?:[a-z0-9+/]{2}==|[a-z0-9+/]{3}=)?$", re.IGNORECASE)
_DIGITS = re.compile(r"\d+")


def similar(x: str, y: str, threshold: float = 0.7, maxlen: int | None = None) -> bool:
    """nbdime's ``compare_strings_approximate(x, y, threshold, maxlen)``, cheap for long strings."""
    if bool(x) != bool(y):
        return False
    if len(x) == len(y) and x == y:
        return True
    la, lb = len(x), len(y)
    if 2.0 * min(la, lb) / (la + lb) < threshold:
        return False
    if maxlen is not None and la > maxlen and lb > maxlen:
        return False  # nbdime: either a bound fails or the length limit refuses
    if la <= EXACT_CHARS and lb <= EXACT_CHARS:
        matcher = difflib.SequenceMatcher(None, x, y, autojunk=False)
        return matcher.quick_ratio() >= threshold and matcher.ratio() > threshold
    common = Counter(x) & Counter(y)
    if 2.0 * sum(common.values()) / (la + lb) < threshold:
        return False
    return estimated_ratio(x, y) > threshold


def estimated_ratio(x: str, y: str) -> float:
    """An estimate of ``difflib.SequenceMatcher(None, x, y).ratio()`` in linear time, by lines."""
    xl, yl = x.splitlines(True), y.splitlines(True)
    matched = 0
    pairs = align.key_lcs(xl, yl)
    for i, j in pairs:
        matched += len(xl[i])
    # lines left over between equal ones: pair those of the same shape (equal but for numbers)
    ci = cj = 0
    for i, j in pairs + [(len(xl), len(yl))]:
        if i > ci and j > cj:
            xs = [_DIGITS.sub("0", s) for s in xl[ci:i]]
            ys = [_DIGITS.sub("0", s) for s in yl[cj:j]]
            for a, b in align.key_lcs(xs, ys):
                matched += _shape_match(xl[ci + a], yl[cj + b])
        ci, cj = i + 1, j + 1
    return 2.0 * matched / (len(x) + len(y))


def _shape_match(a: str, b: str) -> int:
    """Characters two lines of the same shape share: the non-digits, and digit runs' common prefixes."""
    da, db = _DIGITS.findall(a), _DIGITS.findall(b)
    same = len(a) - sum(map(len, da))
    for p, q in zip(da, db):
        k = 0
        while k < len(p) and k < len(q) and p[k] == q[k]:
            k += 1
        same += k
    return same


def _text(x) -> str | None:
    if isinstance(x, list) and all(isinstance(s, str) for s in x):
        return "".join(x)
    return x if isinstance(x, str) else None


def text_approximate(x, y, maxlen: int | None = None) -> bool:
    """nbdime's ``compare_text_approximate``."""
    x, y = _text(x), _text(y)
    if x is None or y is None:
        return x == y
    if bool(x) != bool(y):
        return False
    if len(x) < SHORT_TEXT and len(y) < SHORT_TEXT:
        return True
    return similar(x, y, 0.7, maxlen)


def text_strict(x, y, maxlen: int | None = None) -> bool:
    """nbdime's ``compare_text_strict``."""
    x, y = _text(x), _text(y)
    if x is None or y is None:
        return x == y
    if x == y:
        return True
    return similar(x, y, 0.95, maxlen)


def mimedata_same(mimetype: str, x, y, strict: bool) -> bool:
    """nbdime's ``compare_mimedata_*``: text by similarity, base64 data by equality."""
    mimetype = mimetype.lower()
    text = text_strict if strict else text_approximate
    if (mimetype == "text/plain" and isinstance(x, str) and isinstance(y, str)
            and "\n" not in x and "\n" not in y and _POINTER.split(x) == _POINTER.split(y)):
        return True
    if mimetype.startswith("text/"):
        return text(x, y, MIMEDATA_MAXLEN)
    if isinstance(x, str) and isinstance(y, str):
        if x == y:
            return True
        if len(x) > MIMEDATA_MAXLEN and len(y) > MIMEDATA_MAXLEN:
            return False  # nbdime: base64 → unequal; text → over the length limit
        if len(x) >= 64 and _BASE64.match("".join(x.splitlines())):
            return False
        return text(x, y, MIMEDATA_MAXLEN)
    return x == y


def mimebundle_same(x, y, strict: bool) -> bool:
    if x is None or y is None:
        return x is None and y is None
    if not isinstance(x, dict) or not isinstance(y, dict):
        return x == y
    if x.keys() != y.keys():
        return False
    return all(mimedata_same(k, x[k], y[k], strict) for k in x)


def output_approximate(x: dict, y: dict) -> bool:
    """nbdime's ``compare_output_approximate`` (metadata and execution count ignored)."""
    ot = x.get("output_type")
    if ot != y.get("output_type") or x.keys() != y.keys():
        return False
    handled = {"output_type", "metadata", "execution_count"}
    if ot == "stream":
        if x.get("name") != y.get("name"):
            return False
        tx, ty = _text(x.get("text")), _text(y.get("text"))
        if tx is None or ty is None:
            if tx != ty:
                return False
        elif not similar(tx, ty, 0.7, STREAM_MAXLEN):
            return False
        handled |= {"name", "text"}
    elif ot == "error":
        if x.get("ename") != y.get("ename") or x.get("evalue") != y.get("evalue"):
            return False
        xt, yt = x.get("traceback") or [], y.get("traceback") or []
        if len(xt) != len(yt):
            return False
        for a, b in zip(xt, yt):
            if not (isinstance(a, str) and isinstance(b, str) and similar(a, b, 0.7)):
                if a != b:
                    return False
        handled |= {"ename", "evalue", "traceback"}
    elif ot in ("display_data", "execute_result"):
        if not mimebundle_same(x.get("data"), y.get("data"), strict=False):
            return False
        handled.add("data")
    return all(x[k] == y[k] for k in x.keys() - handled)


def output_strict(x: dict, y: dict) -> bool:
    """nbdime's ``compare_output_strict``: everything but ``data`` equal, ``data`` strictly similar."""
    if x.get("output_type") != y.get("output_type") or x.keys() != y.keys():
        return False
    if any(x[k] != y[k] for k in x.keys() - {"output_type", "data"}):
        return False
    return mimebundle_same(x.get("data"), y.get("data"), strict=True)


def align_outputs(a: list, b: list) -> list[tuple[int, int, int]]:
    """Snakes of two output lists: nbdime's two levels (strict, then approximate)."""
    n, m = len(a), len(b)
    if n * m <= align.GRID_LIMIT:
        levels = [lambda i0, i1, j0, j1, same=same: _grid(i0, i1, j0, j1, lambda i, j: same(a[i], b[j]))
                  for same in (output_approximate, output_strict)]
    else:  # thousands of outputs: exact equality, then approximate along the diagonal
        from .engine import json_key

        ka, kb = [json_key(o) for o in a], [json_key(o) for o in b]
        levels = [lambda i0, i1, j0, j1: _diagonal(i0, i1, j0, j1, lambda i, j: output_approximate(a[i], b[j])),
                  lambda i0, i1, j0, j1: _offset(align.key_lcs(ka[i0:i1], kb[j0:j1]), i0, j0)]
    return align.multilevel(levels, 0, n, 0, m)


def outputs_approximate(a: list, b: list) -> bool:
    """nbdime's ``compare_outputs_approximate``: every output aligned with one of the other side."""
    if len(a) != len(b):
        return False
    snakes = align_outputs(a, b)
    return sum(s[2] for s in snakes) == len(a)


def _grid(i0: int, i1: int, j0: int, j1: int, same: Callable[[int, int], bool]) -> align.Pairs:
    return _offset(align.grid_lcs(i1 - i0, j1 - j0, lambda i, j: same(i0 + i, j0 + j)), i0, j0)


def _diagonal(i0: int, i1: int, j0: int, j1: int, same: Callable[[int, int], bool]) -> align.Pairs:
    """Pair items at the same offset from the window's start while they are similar (a window
    too large for the grid: items edited in place)."""
    pairs = []
    for k in range(min(i1 - i0, j1 - j0)):
        if same(i0 + k, j0 + k):
            pairs.append((i0 + k, j0 + k))
    return pairs


def _offset(pairs: align.Pairs, i0: int, j0: int) -> align.Pairs:
    return [(i + i0, j + j0) for i, j in pairs] if i0 or j0 else pairs


# ---- cells ------------------------------------------------------------------------------------

def cell_approximate(x: dict, y: dict) -> bool:
    return x.get("cell_type") == y.get("cell_type") and text_approximate(x.get("source", ""), y.get("source", ""))


def cell_moderate(x: dict, y: dict) -> bool:
    if not cell_approximate(x, y):
        return False
    if x.get("cell_type") == "code":
        xo, yo = x.get("outputs") or [], y.get("outputs") or []
        if bool(xo) != bool(yo):
            return False
        return outputs_approximate(xo, yo)
    return True


def cell_strict(x: dict, y: dict) -> bool:
    if x.get("cell_type") != y.get("cell_type") or not text_strict(x.get("source", ""), y.get("source", "")):
        return False
    if x.get("cell_type") == "code":
        xo, yo = x.get("outputs") or [], y.get("outputs") or []
        return len(xo) == len(yo) and all(output_strict(p, q) for p, q in zip(xo, yo))
    return True


def cell_id(x: dict):
    cid = x.get("id")
    return cid if isinstance(cid, str) else None
