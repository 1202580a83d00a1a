"""Notebooks of a given shape for the diff benchmark and the engine's tests.

``executed(cells, output_bytes, seed)`` is an ML notebook as JupyterLab saves it after a run:
nbformat 4.5 with cell ids, one markdown cell in six, code cells with a few lines of source and
outputs spread over the cells: training logs (``stream``), tables (``execute_result`` with
``text/plain`` and ``text/html``) and plots (``display_data`` with a base64 ``image/png``),
about ``output_bytes`` of output in all.

``edited_rerun(nb, seed)`` is the same notebook after someone edited it and ran it again (the
shape of issue 13): every text output changed (new numbers), the plots redrawn, new execution
counts, 20 cells inserted, 10 deleted and 5 % of the cells' sources edited.
"""

from __future__ import annotations

import base64
import copy
import random
import uuid

IMAGE_SHARE = 0.4  # of the output bytes: plots; the rest is text


def _id(rng: random.Random) -> str:
    return uuid.UUID(int=rng.getrandbits(128)).hex[:12]


def _source(rng: random.Random, i: int) -> str:
    lines = [f"# step {i}: {rng.choice(['load', 'clean', 'fit', 'plot', 'evaluate', 'export'])}"]
    for k in range(rng.randint(2, 12)):
        var = rng.choice(["df", "model", "X", "y", "scores", "history", "fig", "ax"])
        fn = rng.choice(["fit", "transform", "predict", "plot", "describe", "groupby", "merge", "sample"])
        lines.append(f"{var}_{k} = {var}.{fn}(n={rng.randint(1, 500)}, seed={rng.randint(0, 99)})")
    return "\n".join(lines)


def _log(rng: random.Random, nbytes: int) -> str:
    out, size, epoch = [], 0, 0
    while size < nbytes:
        epoch += 1
        line = (f"epoch {epoch:4d} - loss: {rng.random():.4f} - accuracy: {rng.random():.4f}"
                f" - val_loss: {rng.random():.4f} - val_accuracy: {rng.random():.4f} - {rng.randint(10, 999)}ms/step\n")
        out.append(line)
        size += len(line)
    return "".join(out)


def _table(rng: random.Random, nbytes: int) -> tuple[str, str]:
    rows = max(1, nbytes // 160)
    plain = ["      feature      mean       std"] + [
        f"{r:4d}  f{r:<8d} {rng.gauss(0, 1):9.5f} {abs(rng.gauss(1, 0.3)):9.5f}" for r in range(rows)]
    html = ["<table><thead><tr><th></th><th>mean</th><th>std</th></tr></thead><tbody>"] + [
        f"<tr><th>{r}</th><td>{rng.gauss(0, 1):.5f}</td><td>{abs(rng.gauss(1, 0.3)):.5f}</td></tr>" for r in range(rows)]
    return "\n".join(plain), "\n".join(html) + "</tbody></table>"


def _png(rng: random.Random, nbytes: int) -> str:
    raw = b"\x89PNG\r\n\x1a\n" + rng.randbytes(max(16, nbytes * 3 // 4))
    return base64.b64encode(raw).decode() + "\n"


def _outputs(rng: random.Random, count: int, nbytes: int) -> list[dict]:
    kind = rng.random()
    if nbytes <= 0:
        return []
    if kind < IMAGE_SHARE:
        return [{"output_type": "display_data", "metadata": {},
                 "data": {"image/png": _png(rng, nbytes), "text/plain": "<Figure size 640x480 with 1 Axes>"}}]
    if kind < IMAGE_SHARE + 0.2:
        plain, html = _table(rng, nbytes // 2)
        return [{"output_type": "execute_result", "execution_count": count, "metadata": {},
                 "data": {"text/plain": plain, "text/html": html}}]
    return [{"output_type": "stream", "name": "stdout", "text": _log(rng, nbytes)}]


def code_cell(rng: random.Random, i: int, count: int, nbytes: int) -> dict:
    return {"cell_type": "code", "id": _id(rng), "metadata": {}, "execution_count": count,
            "source": _source(rng, i), "outputs": _outputs(rng, count, nbytes)}


def markdown_cell(rng: random.Random, i: int) -> dict:
    return {"cell_type": "markdown", "id": _id(rng), "metadata": {},
            "source": f"## Part {i}\n\nWhat this part does, with a [link](https://example.org/{i})."}


def notebook(cells: list[dict]) -> dict:
    return {"nbformat": 4, "nbformat_minor": 5, "cells": cells,
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                         "language_info": {"name": "python", "version": "3.11.7"}}}


def executed(cells: int, output_bytes: int, seed: int = 0) -> dict:
    """An executed notebook of ``cells`` cells with about ``output_bytes`` of outputs."""
    rng = random.Random(seed)
    code = [i for i in range(cells) if i % 6 != 0] or list(range(cells))
    per_cell = output_bytes // max(1, len(code))
    out, count = [], 0
    for i in range(cells):
        if i in code:
            count += 1
            out.append(code_cell(rng, i, count, per_cell))
        else:
            out.append(markdown_cell(rng, i))
    return notebook(out)


def _rerun_outputs(rng: random.Random, outputs: list[dict], count: int) -> list[dict]:
    new = []
    for o in outputs:
        o = copy.deepcopy(o)
        if o["output_type"] == "stream":
            o["text"] = _log(rng, len(o["text"]))
        elif "image/png" in o.get("data", {}):
            o["data"]["image/png"] = _png(rng, len(o["data"]["image/png"]) * 3 // 4)
        else:
            o["execution_count"] = count
            o["data"]["text/plain"], o["data"]["text/html"] = _table(rng, len(o["data"]["text/plain"]))
        new.append(o)
    return new


def edited_rerun(nb: dict, seed: int = 1, inserted: int = 20, deleted: int = 10, edited: float = 0.05) -> dict:
    """``nb`` edited and run again: new outputs everywhere, cells inserted, deleted and edited."""
    rng = random.Random(seed)
    cells = [copy.deepcopy(c) for c in nb["cells"]]
    for _ in range(min(deleted, max(0, len(cells) - 1))):
        cells.pop(rng.randrange(len(cells)))
    sizes = [sum(len(str(o)) for o in c.get("outputs", [])) for c in cells if c["cell_type"] == "code"] or [1000]
    for k in range(inserted):
        pos = rng.randrange(len(cells) + 1)
        cells.insert(pos, code_cell(rng, 1000 + k, 0, rng.choice(sizes)))
    for c in rng.sample(cells, max(1, int(len(cells) * edited))) if cells else []:
        lines = c["source"].split("\n")
        at = rng.randrange(len(lines))
        lines[at] = lines[at] + f"  # changed {rng.randint(0, 9999)}"
        if rng.random() < 0.5:
            lines.insert(at, f"extra_{rng.randint(0, 999)} = {rng.random():.3f}")
        c["source"] = "\n".join(lines)
    count = 0
    for c in cells:
        if c["cell_type"] == "code":
            count += 1
            c["execution_count"] = count
            c["outputs"] = _rerun_outputs(rng, c["outputs"], count)
    return notebook(cells) | {"metadata": copy.deepcopy(nb["metadata"])}
