"""Fast checks of the pure parts: switches, paths, fingerprints."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from labyard_lab.autolog import config as cfg
from labyard_lab.autolog.provenance import InputTracker, fingerprint_file, pip_freeze
from labyard_lab.runs import clean_notebook_path


@pytest.mark.parametrize("path,expected", [
    ("fit.ipynb", "fit.ipynb"), ("/a/b/../fit.ipynb", "a/fit.ipynb"), ("a//b.ipynb", "a/b.ipynb"),
])
def test_notebook_paths_are_normalised(path, expected):
    assert clean_notebook_path(path) == expected


@pytest.mark.parametrize("path", ["", None, "..", "../nlp/x.ipynb", "a/../../x.ipynb", "x\x00.ipynb", "."])
def test_notebook_paths_may_not_leave_the_project(path):
    with pytest.raises(ValueError):
        clean_notebook_path(path)


def env_for(tmp_path: Path, **extra) -> dict:
    nb = tmp_path / "p" / "n.ipynb"
    nb.parent.mkdir(exist_ok=True)
    if not nb.exists():
        nb.write_text(json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    return {"LABYARD_PROJECT": "vision", "MLFLOW_TRACKING_URI": "http://127.0.0.1:1", "HOME": str(tmp_path / "home"),
            "LABYARD_PROJECT_DIR": str(tmp_path / "p"), "JPY_SESSION_NAME": str(nb), "JUPYTERHUB_USER": "alice", **extra}


def test_config_from_platform_env(tmp_path):
    c, why = cfg.from_env(env_for(tmp_path))
    assert why == "" and c.experiment_name == "vision/n.ipynb" and c.user == "alice"
    assert c.queue_dir == tmp_path / "home" / ".labyard" / "mlflow-queue"
    # a relative JPY_SESSION_NAME (a session without a name) is relative to the server root
    c, _ = cfg.from_env(env_for(tmp_path, JPY_SESSION_NAME="sub/x.ipynb"))
    assert c.notebook_relpath == "sub/x.ipynb"


def test_switches(tmp_path):
    assert cfg.from_env({**env_for(tmp_path), "LABYARD_AUTOLOG": "Off"})[0] is None
    env = env_for(tmp_path)
    del env["LABYARD_PROJECT"]
    assert "LABYARD_PROJECT" in cfg.from_env(env)[1]
    settings = tmp_path / "home" / ".jupyter" / "lab" / "user-settings" / "labyard-lab"
    settings.mkdir(parents=True)
    (settings / "runs.jupyterlab-settings").write_text('{\n  /* mine */\n  "autolog": true, // yes\n}')
    assert cfg.from_env(env_for(tmp_path))[0] is not None
    (settings / "runs.jupyterlab-settings").write_text('{"autolog": false}')
    assert "user's settings" in cfg.from_env(env_for(tmp_path))[1]


def test_notebook_metadata_switch(tmp_path):
    nb = tmp_path / "off.ipynb"
    nb.write_text(json.dumps({"cells": [], "metadata": {"labyard": {"autolog": False}}, "nbformat": 4, "nbformat_minor": 5}))
    assert cfg.notebook_enabled(nb) is False
    nb.write_text(json.dumps({"cells": [], "metadata": {"labyard": {"autolog": True}}, "nbformat": 4, "nbformat_minor": 5}))
    assert cfg.notebook_enabled(nb) is True
    nb.write_text("not json")
    assert cfg.notebook_enabled(nb) is True


def test_input_tracker_sees_reads_under_the_project_only(tmp_path):
    root = tmp_path / "proj"
    (root / "data").mkdir(parents=True)
    (root / ".git").mkdir()
    for name in ("data/a.csv", "data/b.csv", ".git/config", "n.ipynb"):
        (root / name).write_text("x")
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("y")
    tracker = InputTracker(root)
    tracker.install()
    try:
        open(root / "data" / "a.csv").read()
        with open(root / "data" / "out.csv", "w") as f:  # a write is not an input
            f.write("z")
        open(root / ".git" / "config").read()
        open(root / "n.ipynb").read()
        open(outside).read()
        cwd = os.getcwd()
        os.chdir(root)
        try:
            open("data/b.csv").read()  # relative to the working directory
        finally:
            os.chdir(cwd)
        assert [f["path"] for f in tracker.snapshot()] == ["data/a.csv", "data/b.csv"]
    finally:
        tracker.active = False


def test_fingerprints(tmp_path):
    f = tmp_path / "d.bin"
    f.write_bytes(b"abc" * 1000)
    st = f.stat()
    assert fingerprint_file(f, st.st_size, st.st_mtime_ns) == {"sha256": hashlib.sha256(b"abc" * 1000).hexdigest()}
    assert fingerprint_file(f, st.st_size + 1, st.st_mtime_ns) == {"changed": True}
    assert fingerprint_file(tmp_path / "gone", 1, 1) == {"missing": True}


def test_pip_freeze_lists_this_environment():
    lines = pip_freeze().splitlines()
    assert any(line.lower().startswith("mlflow==") for line in lines)
    assert all("==" in line for line in lines)


def test_system_metrics_switch():
    """On for GPU flavours and scheduled runs, off for interactive CPU kernels; the switch wins."""
    assert cfg.system_metrics({"LABYARD_GPUS": "2"}) == (True, 10.0)
    assert cfg.system_metrics({"LABYARD_GPUS": "0"})[0] is False and cfg.system_metrics({})[0] is False
    assert cfg.system_metrics({}, scheduled=True)[0] is True
    assert cfg.system_metrics({"LABYARD_GPUS": "4", "LABYARD_SYSTEM_METRICS": "off"})[0] is False
    assert cfg.system_metrics({"LABYARD_SYSTEM_METRICS": "on", "LABYARD_SYSTEM_METRICS_INTERVAL": "2"}) == (True, 2.0)
    assert cfg.system_metrics({"LABYARD_GPUS": "x", "LABYARD_SYSTEM_METRICS_INTERVAL": "y"}) == (False, 10.0)
