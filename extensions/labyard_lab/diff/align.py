"""Which items of two sequences correspond: monotonic pairs ``(i, j)``, ``a[i]`` matching ``b[j]``.

Three ways, chosen by size, all returning a longest common subsequence under their notion of
"the same":

* :func:`grid_lcs`: the O(n·m) table nbdime builds for every alignment, with nbdime's exact
  tie-breaking (walk back from the end, on a tie drop an item of ``a``). Used only where
  ``n·m`` is small, so that on small inputs our alignment *is* nbdime's.
* :func:`unique_lcs`: items identified by a key that occurs at most once on each side (cell
  ids): the LCS is a longest increasing subsequence, found in O(n log n) time and linear space,
  and walked back with the same tie-breaking as the grid, so it gives the grid's answer exactly.
* :func:`key_lcs`: any hashable keys (lines, content hashes): common prefix and suffix, then
  patience anchors (keys unique on both sides, their longest increasing subsequence), recursing
  between anchors; gaps without anchors use the grid when small, else the positions stay
  unmatched. Linear space; O(n log n) time on typical inputs.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Hashable, Sequence

Pairs = list[tuple[int, int]]

#: largest n·m for which the O(n·m) table is built
GRID_LIMIT = 4096


def grid_lcs(n: int, m: int, same: Callable[[int, int], bool]) -> Pairs:
    """LCS of ``range(n)`` and ``range(m)`` where ``same(i, j)`` says a[i] matches b[j]."""
    if not n or not m:
        return []
    g = [[same(i, j) for j in range(m)] for i in range(n)]
    rows = [[0] * (m + 1)]
    for i in range(n):
        prev, cur, gi = rows[-1], [0] * (m + 1), g[i]
        for j in range(m):
            if gi[j]:
                cur[j + 1] = prev[j] + 1
            else:
                left, up = cur[j], prev[j + 1]
                cur[j + 1] = left if left > up else up
        rows.append(cur)
    pairs: Pairs = []
    x, y = n, m
    while x > 0 and y > 0:
        if g[x - 1][y - 1]:
            x -= 1
            y -= 1
            pairs.append((x, y))
        elif rows[x][y] == rows[x - 1][y]:
            x -= 1
        else:
            y -= 1
    pairs.reverse()
    return pairs


def unique_lcs(a: Sequence[Hashable | None], b: Sequence[Hashable | None]) -> Pairs:
    """LCS of two key sequences in which no key repeats on either side (None never matches).

    Same result as :func:`grid_lcs` with key equality: walking back, the grid takes for each
    length the point with the smallest ``i`` (largest ``j``) among those that can still precede
    the last one taken.
    """
    where = {k: j for j, k in enumerate(b) if k is not None}
    points = [(i, where[k]) for i, k in enumerate(a) if k is not None and k in where]
    tails: list[int] = []
    by_rank: list[list[tuple[int, int]]] = []
    for i, j in points:
        r = bisect_left(tails, j)
        if r == len(tails):
            tails.append(j)
            by_rank.append([])
        else:
            tails[r] = j
        by_rank[r].append((i, j))
    pairs: Pairs = []
    y = len(b)
    for level in reversed(by_rank):  # points of one rank: i increasing, j decreasing
        lo, hi = 0, len(level)
        while lo < hi:  # the first point with j < y
            mid = (lo + hi) // 2
            if level[mid][1] < y:
                hi = mid
            else:
                lo = mid + 1
        i, y = level[lo]
        pairs.append((i, y))
    pairs.reverse()
    return pairs


def is_unique(keys: Sequence[Hashable | None]) -> bool:
    present = [k for k in keys if k is not None]
    return len(set(present)) == len(present)


def key_lcs(a: Sequence[Hashable], b: Sequence[Hashable], grid_limit: int = GRID_LIMIT) -> Pairs:
    """Pairs of equal keys, in order (see the module docstring). ``None`` keys never match."""
    pairs: Pairs = []
    _keys(a, b, 0, len(a), 0, len(b), pairs, grid_limit)
    return pairs


def _keys(a, b, i0: int, i1: int, j0: int, j1: int, out: Pairs, grid_limit: int) -> None:
    # common prefix and suffix
    while i0 < i1 and j0 < j1 and a[i0] is not None and a[i0] == b[j0]:
        out.append((i0, j0))
        i0 += 1
        j0 += 1
    tail: Pairs = []
    while i1 > i0 and j1 > j0 and a[i1 - 1] is not None and a[i1 - 1] == b[j1 - 1]:
        i1 -= 1
        j1 -= 1
        tail.append((i1, j1))
    if i0 < i1 and j0 < j1:
        n, m = i1 - i0, j1 - j0
        if n * m <= grid_limit:
            out.extend((i0 + i, j0 + j) for i, j in grid_lcs(n, m, lambda i, j: a[i0 + i] is not None and a[i0 + i] == b[j0 + j]))
        else:
            anchors = _patience(a, b, i0, i1, j0, j1)
            if anchors:
                ci, cj = i0, j0
                for i, j in anchors:
                    _keys(a, b, ci, i, cj, j, out, grid_limit)
                    out.append((i, j))
                    ci, cj = i + 1, j + 1
                _keys(a, b, ci, i1, cj, j1, out, grid_limit)
    out.extend(reversed(tail))


def _patience(a, b, i0: int, i1: int, j0: int, j1: int) -> Pairs:
    """Keys that occur exactly once in both windows, as a longest increasing run of positions."""
    count_a: dict = {}
    for i in range(i0, i1):
        k = a[i]
        if k is not None:
            count_a[k] = i if k not in count_a else -1
    count_b: dict = {}
    for j in range(j0, j1):
        k = b[j]
        if k is not None and count_a.get(k, -1) >= 0:
            count_b[k] = j if k not in count_b else -1
    points = sorted((count_a[k], j) for k, j in count_b.items() if j >= 0)
    if not points:
        return []
    keys_a = [None] * len(points)
    keys_b = [None] * len(points)
    # re-use unique_lcs on the anchor candidates: positions are unique keys on both sides
    order_b = sorted(range(len(points)), key=lambda q: points[q][1])
    for q in range(len(points)):
        keys_a[q] = q
    for rank, q in enumerate(order_b):
        keys_b[rank] = q
    return [points[qa] for qa, _ in unique_lcs(keys_a, keys_b)]


def snakes_from_pairs(pairs: Pairs) -> list[tuple[int, int, int]]:
    """Runs of consecutive pairs as ``(i, j, n)``."""
    snakes: list[tuple[int, int, int]] = []
    for i, j in pairs:
        if snakes and snakes[-1][0] + snakes[-1][2] == i and snakes[-1][1] + snakes[-1][2] == j:
            si, sj, sn = snakes[-1]
            snakes[-1] = (si, sj, sn + 1)
        else:
            snakes.append((i, j, 1))
    return snakes


Matcher = Callable[[int, int, int, int], Pairs]


def multilevel(matchers: Sequence[Matcher], i0: int, i1: int, j0: int, j1: int) -> list[tuple[int, int, int]]:
    """nbdime's multilevel alignment: match with the strictest matcher (the last one), then align
    each unmatched window between its matches with the next one, down to the first.

    A matcher ``m(i0, i1, j0, j1)`` returns pairs inside that window.
    """
    level = len(matchers) - 1
    pairs = matchers[level](i0, i1, j0, j1)
    if level == 0:
        return snakes_from_pairs(pairs)
    out: list[tuple[int, int, int]] = []
    ci, cj = i0, j0
    for i, j, n in snakes_from_pairs(pairs) + [(i1, j1, 0)]:
        if i > ci and j > cj:
            out += multilevel(matchers[:level], ci, i, cj, j)
        if n:
            if out and out[-1][0] + out[-1][2] == i and out[-1][1] + out[-1][2] == j:
                oi, oj, on = out[-1]
                out[-1] = (oi, oj, on + n)
            else:
                out.append((i, j, n))
        ci, cj = i + n, j + n
    return out
