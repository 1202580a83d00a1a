"""The engine against nbdime 4.0.4: nbdime's own test notebooks, a generated corpus, large notebooks.

Every pair: ``nbdime.patch(base, our diff) == remote``, and the cells we report added, removed and
modified are nbdime's. Where they are not, the test prints the pair and the reason, and passes
only for the documented intended disagreements (tests/diff/support.py REASONS, docs/dev/diff.md).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import nbdime
import pytest

from bench.diff.notebooks import edited_rerun, executed
from labyard_lab.diff import DiffOptions, NotebookError, diff_notebooks, load_notebook
from labyard_lab.diff import align, compare as predicates

from . import corpus
from .support import REASONS, cell_sets, compare, patched, plain

NBDIME_FILES = sorted((Path(nbdime.__file__).parent / "tests" / "files").glob("*.ipynb"))


def load(path: Path) -> dict:
    return load_notebook(path.read_bytes(), path.name)[0]


def report(results) -> None:
    """Print every disagreement with its reason; fail on round-trip errors or unexplained ones."""
    roundtrip = [r.name for r in results if not r.roundtrip]
    differing = [r for r in results if not r.same_cells]
    for r in differing:
        print(f"DISAGREES {r.name}: {', '.join(sorted(r.reasons))}: {r.detail}")
        for reason in sorted(r.reasons):
            print(f"    {reason}: {REASONS.get(reason, 'NOT A DOCUMENTED REASON')}")
    print(f"{len(results)} pairs: {sum(r.identical for r in results)} diffs identical to nbdime's, "
          f"{sum(r.same_cells for r in results)} with the same cells added/removed/modified, {len(differing)} disagreeing")
    assert not roundtrip, f"patch(base, diff) != remote for {roundtrip}"
    unexplained = [r.name for r in differing if not r.reasons <= set(REASONS)]
    assert not unexplained, f"disagreements without a documented reason: {unexplained}"


def test_nbdime_test_notebooks_every_pair():
    assert len(NBDIME_FILES) > 40, "nbdime's test notebooks are missing from its package"
    notebooks = {p.name: load(p) for p in NBDIME_FILES}
    results = [compare(f"{x} -> {y}", notebooks[x], notebooks[y]) for x in notebooks for y in notebooks]
    report(results)
    assert all(r.same_cells for r in results)  # no intended disagreement applies without options


def test_generated_corpus():
    pairs = corpus.pairs()
    kinds = {name.split("-", 2)[2] for name, _, _ in pairs}
    assert {e.__name__ for e in corpus.EDITS} <= kinds
    results = [compare(name, load_notebook(json.dumps(a))[0], load_notebook(json.dumps(b))[0]) for name, a, b in pairs]
    report(results)
    assert all(r.same_cells for r in results)


@pytest.mark.parametrize("options", [
    DiffOptions(outputs=False), DiffOptions(metadata=False, identifier=False), DiffOptions(details=False),
    DiffOptions.sources_only(),
], ids=["ignore-outputs", "ignore-metadata-and-id", "ignore-details", "sources-only"])
def test_generated_corpus_with_ignore_options(options):
    results = [compare(name, load_notebook(json.dumps(a))[0], load_notebook(json.dumps(b))[0], options)
               for name, a, b in corpus.pairs(count=120, seed=29)]
    report(results)


def _matched_pairs(diff: list, n: int) -> set[tuple[int, int]]:
    ops = next((e["diff"] for e in diff if e["key"] == "cells"), [])
    pairs, i, j = set(), 0, 0
    for e in [*ops, {"op": "end", "key": n}]:
        while i < e["key"]:
            pairs.add((i, j))
            i, j = i + 1, j + 1
        if e["op"] == "addrange":
            j += len(e["valuelist"])
        elif e["op"] == "removerange":
            i += e["length"]
        elif e["op"] == "patch":
            pairs.add((i, j))
            i, j = i + 1, j + 1
    return pairs


@pytest.mark.slow
@pytest.mark.parametrize("cells,size,seed", [(60, 120_000, 60), (150, 300_000, 150)])
def test_large_notebooks_with_and_without_ids(cells, size, seed):
    """With ids: nbdime's result exactly. Without ids (nbformat 4.4) the windows are larger than
    nbdime's grid and we anchor on exact content first: we check the alignment against the truth
    (the ids we removed) and print how nbdime's differs."""
    a = executed(cells, size, seed=seed)
    b = edited_rerun(a, seed=seed + 1)
    with_ids = compare("ids", load_notebook(json.dumps(a))[0], load_notebook(json.dumps(b))[0])
    assert with_ids.roundtrip and with_ids.identical
    ids_a, ids_b = [c["id"] for c in a["cells"]], [c["id"] for c in b["cells"]]
    truth = {(i, ids_b.index(x)) for i, x in enumerate(ids_a) if x in ids_b}
    for nb in (a, b):
        nb["nbformat_minor"] = 4
        for c in nb["cells"]:
            del c["id"]
    base, remote = load_notebook(json.dumps(a))[0], load_notebook(json.dumps(b))[0]
    ours = plain(diff_notebooks(base, remote))
    assert patched(base, ours) == plain(remote)
    assert _matched_pairs(ours, len(base["cells"])) == truth
    from .support import nbdime_diff

    theirs = _matched_pairs(nbdime_diff(base, remote), len(base["cells"]))
    print(f"without ids, {cells} cells: we pair {len(truth)} of {len(truth)} cells as the ids do; nbdime pairs "
          f"{len(theirs & truth)} correctly and {len(theirs - truth)} wrongly (large-window anchoring, docs/dev/diff.md)")


def test_edited_rerun_roundtrip_and_same_cells_as_nbdime():
    a = load_notebook(json.dumps(executed(120, 1_500_000, seed=5)))[0]
    b = load_notebook(json.dumps(edited_rerun(a, seed=6)))[0]
    r = compare("edited re-run", a, b)
    assert r.roundtrip and r.identical
    added, removed, modified = cell_sets(plain(diff_notebooks(a, b)))
    assert len(added) == 20 and len(removed) == 10 and modified


# ---- building blocks -------------------------------------------------------------------------

def _nbdime_lcs(a, b):
    from nbdime.diffing.seq_bruteforce import bruteforce_compare_grid, bruteforce_lcs_indices, bruteforce_llcs_grid

    grid = bruteforce_compare_grid(a, b)
    return list(zip(*bruteforce_lcs_indices(a, b, grid, bruteforce_llcs_grid(grid))))


def test_unique_lcs_is_nbdimes_alignment():
    rng = random.Random(7)
    for _ in range(2000):
        a = rng.sample(range(30), rng.randint(0, 16))
        b = rng.sample(range(30), rng.randint(0, 16))
        assert align.unique_lcs(a, b) == _nbdime_lcs(a, b) == align.grid_lcs(len(a), len(b), lambda i, j: a[i] == b[j])


def test_key_lcs_is_a_common_subsequence_and_finds_long_runs():
    rng = random.Random(3)
    for _ in range(300):
        a = [rng.randint(0, 5) for _ in range(rng.randint(0, 90))]
        b = [rng.randint(0, 5) for _ in range(rng.randint(0, 90))]
        pairs = align.key_lcs(a, b, grid_limit=16)
        assert all(a[i] == b[j] for i, j in pairs)
        assert all(p[0] < q[0] and p[1] < q[1] for p, q in zip(pairs, pairs[1:]))
    lines = [f"line {k}" for k in range(20000)]
    edited = lines[:5000] + ["new"] + lines[5000:15000] + lines[15001:]
    assert len(align.key_lcs(lines, edited)) == 19999


def test_similarity_matches_nbdime_on_short_strings():
    from nbdime.diffing.generic import compare_strings_approximate

    rng = random.Random(11)
    words = ["loss", "acc", "0.5", "epoch", " ", "\n", "=", "x", "model.fit(", ")"]
    for _ in range(3000):
        x = "".join(rng.choice(words) for _ in range(rng.randint(0, 40)))
        y = "".join(rng.choice(words) for _ in range(rng.randint(0, 40))) if rng.random() < 0.7 else x + "z"
        for threshold, maxlen in ((0.7, None), (0.95, None), (0.7, 50)):
            assert predicates.similar(x, y, threshold, maxlen) == compare_strings_approximate(x, y, threshold, maxlen)


# ---- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("data,status,words", [
    (b"", 400, "empty"),
    (b"   \n", 400, "empty"),
    (b"{not json", 400, "not JSON"),
    (b"\xff\xfe\x00garbage", 400, "not"),
    (b"[1, 2]", 400, "not a notebook"),
    (b'{"cells": []}', 400, "nbformat"),
    (b'{"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": {"a": 1}}', 400, "'cells'"),
    (b'{"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [{"source": "x"}]}', 400, "cell_type"),
    (b'{"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [{"cell_type": "code", "source": "", "outputs": [1]}]}',
     400, "output 0"),
    (b'{"nbformat": 5, "cells": []}', 400, "nbformat 5"),
    (b"[" * 100000 + b"]" * 100000, 400, "nested too deeply"),
])
def test_bad_notebooks_are_refused_with_a_message(data, status, words):
    with pytest.raises(NotebookError) as e:
        load_notebook(data, "base (x.ipynb)")
    assert e.value.status == status and words in str(e.value) and "base (x.ipynb)" in str(e.value)


def test_missing_ids_are_warnings_not_errors():
    nb = {"nbformat": 4, "nbformat_minor": 5, "metadata": {},
          "cells": [{"cell_type": "code", "source": "x", "metadata": {}, "outputs": [], "execution_count": None}]}
    loaded, warnings = load_notebook(json.dumps(nb), "base")
    assert loaded["cells"][0]["source"] == "x" and any("id" in w for w in warnings)


def test_size_limit_is_413():
    with pytest.raises(NotebookError) as e:
        load_notebook(b"{" + b" " * 2000 + b"}", "remote", max_bytes=1000)
    assert e.value.status == 413 and "over the limit" in str(e.value)


def test_old_notebooks_are_converted():
    v3 = {"nbformat": 3, "nbformat_minor": 0, "metadata": {"name": "old"},
          "worksheets": [{"cells": [{"cell_type": "code", "input": "print(1)", "language": "python", "outputs": [],
                                     "prompt_number": 1, "metadata": {}}]}]}
    nb, _ = load_notebook(json.dumps(v3), "old.ipynb")
    assert nb["nbformat"] == 4 and nb["cells"][0]["source"] == "print(1)"
