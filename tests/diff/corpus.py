"""A generated corpus of notebook pairs for the engine's equivalence tests.

Small notebooks (so that nbdime 4.0.4 finishes on every pair), each pair one kind of edit or a
mix: cells inserted, deleted, moved, sources edited, outputs only, metadata only, cell types
changed, attachments added/changed/removed, execution counts renumbered; with cell ids
(nbformat 4.5) and without (4.4, where nbdime aligns cells by content alone).
"""

from __future__ import annotations

import base64
import copy
import random

WORDS = ["model", "loss", "train", "data", "frame", "score", "plot", "batch", "epoch", "layer", "mean", "value"]


def _source(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(1, 8)):
        a, b = rng.sample(WORDS, 2)
        lines.append(f"{a}_{rng.randint(0, 9)} = {b}.{rng.choice(WORDS)}({rng.randint(0, 99)})")
    return "\n".join(lines)


def _stream(rng: random.Random, lines: int) -> dict:
    text = "".join(f"{rng.choice(WORDS)} {k}: {rng.random():.3f}\n" for k in range(lines))
    return {"output_type": "stream", "name": rng.choice(["stdout", "stdout", "stderr"]), "text": text}


def _png(rng: random.Random) -> str:
    return base64.b64encode(b"\x89PNG" + rng.randbytes(rng.randint(60, 400))).decode()


def _output(rng: random.Random, count: int) -> dict:
    kind = rng.random()
    if kind < 0.4:
        return _stream(rng, rng.choice([1, 2, 5, 12, 30]))
    if kind < 0.65:
        return {"output_type": "execute_result", "execution_count": count, "metadata": {},
                "data": {"text/plain": f"{rng.random():.4f}" if rng.random() < 0.5 else "\n".join(
                    f"{k}  {rng.random():.3f}" for k in range(rng.randint(2, 9)))}}
    if kind < 0.85:
        return {"output_type": "display_data", "metadata": {"image/png": {"width": 300}},
                "data": {"image/png": _png(rng), "text/plain": "<Figure size 640x480 with 1 Axes>"}}
    return {"output_type": "error", "ename": "ValueError", "evalue": f"bad value {rng.randint(0, 9)}",
            "traceback": [f"line {k}: {rng.choice(WORDS)}" for k in range(rng.randint(1, 4))]}


def _cell(rng: random.Random, ids: bool, count: int) -> dict:
    if rng.random() < 0.25:
        cell = {"cell_type": "markdown", "metadata": {}, "source": f"# {rng.choice(WORDS)}\n\n{_source(rng)}"}
        if rng.random() < 0.3:
            cell["attachments"] = {"plot.png": {"image/png": _png(rng)}}
            cell["source"] += "\n![plot](attachment:plot.png)"
    else:
        cell = {"cell_type": "code", "metadata": {}, "execution_count": count, "source": _source(rng),
                "outputs": [_output(rng, count) for _ in range(rng.choice([0, 1, 1, 2, 3]))]}
    if ids:
        cell["id"] = f"{rng.getrandbits(48):012x}"
    return cell


def notebook(rng: random.Random, cells: int, ids: bool = True) -> dict:
    count = 0
    out = []
    for _ in range(cells):
        count += 1
        out.append(_cell(rng, ids, count))
    return {"nbformat": 4, "nbformat_minor": 5 if ids else 4, "cells": out,
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}}


# ---- edits -----------------------------------------------------------------------------------

def insert(rng, nb, ids):
    for _ in range(rng.randint(1, 4)):
        nb["cells"].insert(rng.randint(0, len(nb["cells"])), _cell(rng, ids, 0))


def delete(rng, nb, ids):
    for _ in range(min(rng.randint(1, 4), len(nb["cells"]) - 1)):
        nb["cells"].pop(rng.randrange(len(nb["cells"])))


def move(rng, nb, ids):
    for _ in range(rng.randint(1, 2)):
        cell = nb["cells"].pop(rng.randrange(len(nb["cells"])))
        nb["cells"].insert(rng.randint(0, len(nb["cells"])), cell)


def edit_source(rng, nb, ids):
    for cell in rng.sample(nb["cells"], max(1, len(nb["cells"]) // 5)):
        lines = cell["source"].split("\n")
        at = rng.randrange(len(lines))
        choice = rng.random()
        if choice < 0.4:
            lines[at] = lines[at].replace(rng.choice(WORDS), rng.choice(WORDS)) + f"  # {rng.randint(0, 9)}"
        elif choice < 0.7:
            lines.insert(at, f"{rng.choice(WORDS)} = {rng.randint(0, 999)}")
        elif len(lines) > 1:
            lines.pop(at)
        else:
            lines = [_source(rng)]
        cell["source"] = "\n".join(lines)


def outputs_only(rng, nb, ids):
    for cell in nb["cells"]:
        if cell["cell_type"] != "code" or rng.random() < 0.4:
            continue
        for k, out in enumerate(cell["outputs"]):
            choice = rng.random()
            if out["output_type"] == "stream" and choice < 0.6:
                lines = out["text"].splitlines(True)
                lines[rng.randrange(len(lines))] = f"{rng.choice(WORDS)} x: {rng.random():.3f}\n"
                out["text"] = "".join(lines)
            elif choice < 0.8:
                cell["outputs"][k] = _output(rng, cell["execution_count"] or 0)
        if rng.random() < 0.2:
            cell["outputs"].append(_output(rng, 0))
        if rng.random() < 0.1:
            cell["outputs"] = []


def metadata_only(rng, nb, ids):
    nb["metadata"]["language_info"] = {"name": "python", "version": f"3.{rng.randint(8, 13)}"}
    for cell in rng.sample(nb["cells"], max(1, len(nb["cells"]) // 4)):
        choice = rng.random()
        if choice < 0.5:
            cell["metadata"]["tags"] = rng.sample(["parameters", "hide", "slow", "skip"], rng.randint(1, 2))
        elif choice < 0.8:
            cell["metadata"]["collapsed"] = rng.random() < 0.5
        else:
            cell["metadata"] = {}
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            if "metadata" in out and rng.random() < 0.3:
                out["metadata"]["isolated"] = True


def cell_type(rng, nb, ids):
    for cell in rng.sample(nb["cells"], max(1, len(nb["cells"]) // 6)):
        if cell["cell_type"] == "code":
            cell["cell_type"] = "markdown"
            cell.pop("outputs", None)
            cell.pop("execution_count", None)
        else:
            cell["cell_type"] = "code"
            cell["outputs"], cell["execution_count"] = [], None
            cell.pop("attachments", None)
        if ids and rng.random() < 0.5:
            cell["id"] = f"{rng.getrandbits(48):012x}"


def attachments(rng, nb, ids):
    md = [c for c in nb["cells"] if c["cell_type"] == "markdown"]
    if not md:
        nb["cells"].insert(0, {"cell_type": "markdown", "metadata": {}, "source": "![x](attachment:x.png)",
                               "attachments": {"x.png": {"image/png": _png(rng)}}, **({"id": "att0"} if ids else {})})
        return
    for cell in md:
        choice = rng.random()
        att = cell.setdefault("attachments", {})
        if choice < 0.4:
            att[f"new{rng.randint(0, 9)}.png"] = {"image/png": _png(rng)}
        elif choice < 0.7 and att:
            att[rng.choice(sorted(att))] = {"image/png": _png(rng)}
        elif att:
            att.pop(rng.choice(sorted(att)))


def execution_counts(rng, nb, ids):
    count = rng.randint(1, 50)
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["execution_count"] = count
            for out in cell["outputs"]:
                if "execution_count" in out:
                    out["execution_count"] = count
            count += 1


EDITS = [insert, delete, move, edit_source, outputs_only, metadata_only, cell_type, attachments, execution_counts]


def pairs(count: int = 240, seed: int = 13):
    """``(name, base, remote)``: each edit kind alone on notebooks with and without ids, then mixes."""
    rng = random.Random(seed)
    out = []
    for n in range(count):
        ids = n % 3 != 2
        base = notebook(rng, rng.randint(3, 24), ids=ids)
        remote = copy.deepcopy(base)
        if n < len(EDITS) * 12:
            edits = [EDITS[n % len(EDITS)]]
        else:
            edits = rng.sample(EDITS, rng.randint(2, 4))
        for edit in edits:
            edit(rng, remote, ids)
        out.append((f"{n:03d}-{'ids' if ids else 'noids'}-{'+'.join(e.__name__ for e in edits)}", base, remote))
    return out
