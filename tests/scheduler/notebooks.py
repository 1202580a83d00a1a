"""Small real notebooks for the scheduler tests."""

from __future__ import annotations

import nbformat
from nbformat.v4 import new_code_cell, new_notebook

PARAMS_SOURCE = 'epochs = 1\nlr: float = 0.1\nname = "baseline"\nlayers = [1, 2]\nverbose = False\n'


def training(fail_at_epoch: int | None = None, sleep: float = 0.0) -> dict:
    """A notebook with a ``parameters`` cell; it fails in its third cell when epochs == fail_at_epoch."""
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        new_code_cell("import time, json, os"),
        new_code_cell(PARAMS_SOURCE, metadata={"tags": ["parameters"]}),
        new_code_cell(
            (f"time.sleep({sleep})\n" if sleep else "")
            + (f"if epochs == {fail_at_epoch}:\n    raise ValueError(f'diverged at epoch {{epochs}}')\n" if fail_at_epoch is not None else "")
            + "history = [lr * e for e in range(epochs)]\nprint('trained', name, epochs, len(history))"
        ),
        new_code_cell("result = {'epochs': epochs, 'cwd': os.getcwd(), 'project': os.environ.get('LABYARD_PROJECT'),"
                      " 'run': os.environ.get('LABYARD_RUN_ID'), 'token': os.environ.get('JUPYTERHUB_API_TOKEN'), 'uid': os.getuid(), 'gid': os.getgid()}\nprint(json.dumps(result))"),
    ]
    return nb


def write(path, nb) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
