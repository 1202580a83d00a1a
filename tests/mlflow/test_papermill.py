"""The scheduled-run path: ``python -m labyard_lab.autolog.papermill`` makes one MLflow run with
the parameters as params and both notebooks as artifacts, on a real ``mlflow server``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import write_notebook
from .support import platform_env, tags_of

pytestmark = pytest.mark.slow

CELLS = [
    "alpha = 0.1\nepochs = 1",  # tagged "parameters" below
    "import mlflow\nfor i in range(int(epochs)): mlflow.log_metric('score', alpha * i, step=i)\nprint('done', alpha, epochs)",
]


def papermill(workspace, server, *args, timeout=300):
    env = platform_env(project_dir=workspace["project"], home=workspace["home"], notebook=None, mlflow_url=server.url)
    env["LABYARD_SCHEDULE_ID"] = "nightly"
    return subprocess.run([sys.executable, "-m", "labyard_lab.autolog.papermill", *args], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=workspace["project"])


def make_notebook(path):
    write_notebook(path, CELLS)
    nb = json.loads(path.read_text())
    nb["cells"][0]["metadata"]["tags"] = ["parameters"]
    path.write_text(json.dumps(nb))


def test_scheduled_run_is_one_mlflow_run(mlflow_server, workspace):
    nb = workspace["project"] / "jobs" / "train.ipynb"
    make_notebook(nb)
    out = workspace["project"] / "jobs" / "out" / "train-1.ipynb"
    out.parent.mkdir()
    params = workspace["project"] / "jobs" / "params.json"
    params.write_text(json.dumps({"epochs": 3}))
    r = papermill(workspace, mlflow_server, str(nb), str(out), "-p", "alpha", "0.5", "-f", str(params), "--run-name", "nightly-1")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["status"] == "FINISHED" and result["run_id"] and result["experiment"] == "vision/jobs/train.ipynb"
    run = mlflow_server.api("GET", "runs/get", params={"run_id": result["run_id"]})["run"]
    assert run["info"]["status"] == "FINISHED" and run["info"]["run_name"] == "nightly-1"
    assert {p["key"]: p["value"] for p in run["data"]["params"]} == {"alpha": "0.5", "epochs": "3"}
    tags = tags_of(run)
    assert tags["labyard.run_kind"] == "scheduled" and tags["labyard.schedule"] == "nightly"
    assert tags["labyard.user"] == "alice" and tags["labyard.project"] == "vision" and tags["labyard.notebook"] == "jobs/train.ipynb"
    # the notebook's own MLflow calls went into the same run
    assert [m["step"] for m in mlflow_server.metric_history(result["run_id"], "score")] == [0, 1, 2]
    arts = mlflow_server.artifacts(result["run_id"])
    assert "notebook/train.ipynb" in arts and "output/train-1.ipynb" in arts and "environment/requirements.txt" in arts
    assert "done 0.5 3" in out.read_text()
    # one experiment, one run
    exp = mlflow_server.experiment("vision/jobs/train.ipynb")
    assert len(mlflow_server.runs(exp["experiment_id"])) == 1


def test_failing_notebook_is_a_failed_run(mlflow_server, workspace):
    nb = workspace["project"] / "broken.ipynb"
    write_notebook(nb, ["raise RuntimeError('boom')"])
    r = papermill(workspace, mlflow_server, str(nb), str(workspace["project"] / "broken-out.ipynb"))
    assert r.returncode == 1
    result = json.loads(r.stdout.strip().splitlines()[-1])
    run = mlflow_server.api("GET", "runs/get", params={"run_id": result["run_id"]})["run"]
    assert run["info"]["status"] == "FAILED"
    assert "output/broken-out.ipynb" in mlflow_server.artifacts(result["run_id"])


def test_server_down_run_stays_queued_then_replays(tmp_path, workspace):
    from .support import MlflowServer

    server = MlflowServer(tmp_path / "never-started")  # nothing listens on its port
    nb = workspace["project"] / "offline.ipynb"
    make_notebook(nb)
    r = papermill(workspace, server, str(nb), str(workspace["project"] / "offline-out.ipynb"), "--sync-timeout", "3")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["run_id"] is None and result["local_run_id"]
    stores = list((workspace["home"] / ".labyard" / "mlflow-queue" / "stores").iterdir())
    assert len(stores) == 1 and list(stores[0].glob(f"mlruns/*/{result['local_run_id']}/meta.yaml"))

    # the server comes up; any syncer of this user (here one in this process) replays it, once
    from labyard_lab.autolog.sync import Syncer

    server.start()
    try:
        syncer = Syncer(workspace["home"] / ".labyard" / "mlflow-queue", server.url)
        assert syncer.sync_all() and syncer.sync_all()
        exp = server.experiment("vision/offline.ipynb")
        runs = server.runs(exp["experiment_id"])
        assert len(runs) == 1 and runs[0]["info"]["status"] == "FINISHED"
        assert tags_of(runs[0])["labyard.local_run_id"] == result["local_run_id"]
        assert "output/offline-out.ipynb" in server.artifacts(runs[0]["info"]["run_id"])
        assert not stores[0].exists()  # fully replayed, its owner gone: removed
    finally:
        server.stop()
