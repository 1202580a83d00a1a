from __future__ import annotations

import json

import pytest

from .support import MlflowServer


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield server
    server.stop()


def write_notebook(path, cells: list[str], metadata: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "nbformat": 4, "nbformat_minor": 5,
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}, **(metadata or {})},
        "cells": [{"cell_type": "code", "id": f"c{i}", "metadata": {}, "execution_count": None, "outputs": [], "source": src}
                  for i, src in enumerate(cells)],
    }))


@pytest.fixture
def workspace(tmp_path):
    """A project directory with a notebook and a CSV, and the user's home (the queue lives there)."""
    project = tmp_path / "projects" / "vision"
    home = tmp_path / "homes" / "alice"
    home.mkdir(parents=True)
    (project / "data").mkdir(parents=True)
    rows = "\n".join(f"{i % 7},{(i * 3) % 11},{int(i % 7 > 3)}" for i in range(60))
    (project / "data" / "train.csv").write_text("a,b,y\n" + rows + "\n")
    return {"project": project, "home": home}
