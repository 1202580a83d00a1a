"""Kernel-side autolog against a real ``mlflow server`` and real kernels started with the
environment a Labyard spawner gives them (no mocks)."""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from .conftest import write_notebook
from .support import Kernel, platform_env, tags_of, wait_for

pytestmark = pytest.mark.slow

FIT = """
import pandas as pd
from sklearn.linear_model import LogisticRegression
df = pd.read_csv("data/train.csv")
model = LogisticRegression(C=0.5, max_iter=200).fit(df[["a", "b"]], df["y"])
print("fitted")
"""


def start_kernel(workspace, server, notebook, **kw) -> Kernel:
    env = platform_env(project_dir=workspace["project"], home=workspace["home"], notebook=notebook, mlflow_url=server.url, **kw)
    return Kernel(env, cwd=notebook.parent if notebook else workspace["project"])


def test_sklearn_fit_creates_run_with_provenance(mlflow_server, workspace):
    nb = workspace["project"] / "analysis" / "fit.ipynb"
    write_notebook(nb, [FIT])
    # the notebook reads data relative to the project dir: run the kernel there, like a notebook at the root would
    k = start_kernel(workspace, mlflow_server, nb)
    try:
        out = k.run(f"import os; os.chdir({str(workspace['project'])!r})\n" + FIT)
        assert out["status"] == "ok" and out["stdout"].strip() == "fitted", out
        assert "Traceback" not in out["stderr"] and "rror" not in out["stderr"] and out["error"] is None, out
        exp = wait_for(lambda: mlflow_server.experiment("vision/analysis/fit.ipynb"), 300, what="experiment on the server")

        def finished_run():
            runs = mlflow_server.runs(exp["experiment_id"])
            return runs and runs[0]["info"]["status"] == "FINISHED" and len(mlflow_server.artifacts(runs[0]["info"]["run_id"])) >= 3 and runs[0]

        run = wait_for(finished_run, 300, what="finished run with artifacts")
        tags = tags_of(run)
        assert tags["labyard.user"] == "alice"
        assert tags["labyard.project"] == "vision"
        assert tags["labyard.notebook"] == "analysis/fit.ipynb"
        assert tags["labyard.notebook_sha256"] == hashlib.sha256(nb.read_bytes()).hexdigest()
        assert tags["mlflow.source.name"] == "analysis/fit.ipynb" and tags["mlflow.user"] == "alice"
        assert tags["labyard.gpu.count"] == "0" and tags["labyard.image"] == "local"
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert params["C"] == "0.5" and params["max_iter"] == "200"
        assert any(m["key"].startswith("training_") for m in run["data"]["metrics"])
        arts = mlflow_server.artifacts(run["info"]["run_id"])
        assert "notebook/fit.ipynb" in arts and "environment/requirements.txt" in arts and "inputs.json" in arts, arts
        assert "labyard.inputs_sha256" in tags_of(wait_for(lambda: [r for r in mlflow_server.runs(exp["experiment_id"])
                                                                   if "labyard.inputs_sha256" in tags_of(r)], 120)[0])
        # what autolog's threads print (MLflow's "View run ... at") never reaches a cell
        out = k.run("import threading\nt = threading.Thread(target=print, args=('from autolog',), name='labyard-autolog-x')\n"
                    "t.start(); t.join(); print('from the cell')")
        assert out["stdout"] == "from the cell\n", out
        # the input file the cell read is fingerprinted
        import requests

        body = requests.get(f"{mlflow_server.url}/get-artifact", params={"path": "inputs.json", "run_uuid": run["info"]["run_id"]}, timeout=10)
        inputs = body.json()
        data = (workspace["project"] / "data" / "train.csv").read_bytes()
        assert inputs["files"] == [{"path": "data/train.csv", "size": len(data), "mtime_ns": inputs["files"][0]["mtime_ns"],
                                    "sha256": hashlib.sha256(data).hexdigest()}]
    finally:
        k.shutdown()


def test_server_down_then_back_every_metric_arrives_once(mlflow_server, workspace):
    nb = workspace["project"] / "loop.ipynb"
    write_notebook(nb, ["import mlflow"])
    k = start_kernel(workspace, mlflow_server, nb)
    try:
        assert k.run("import mlflow\nfor i in range(50): mlflow.log_metric('loss', 1.0 / (i + 1), step=i)")["status"] == "ok"
        exp = wait_for(lambda: mlflow_server.experiment("vision/loop.ipynb"), 300, what="experiment")
        run_id = wait_for(lambda: (r := mlflow_server.runs(exp["experiment_id"])) and r[0]["info"]["run_id"], 120)
        wait_for(lambda: len(mlflow_server.metric_history(run_id, "loss")) == 50, 120, what="first 50 points")

        mlflow_server.stop()
        slowest = 0.0
        for start in range(50, 150, 10):  # ten cells while the server is down
            out = k.run(f"for i in range({start}, {start + 10}): mlflow.log_metric('loss', 1.0 / (i + 1), step=i)\n"
                        "mlflow.log_param(f'p{" + str(start) + "}', 'x')" if False else
                        f"for i in range({start}, {start + 10}): mlflow.log_metric('loss', 1.0 / (i + 1), step=i)")
            assert out["status"] == "ok" and out["stderr"] == "" and out["error"] is None, out
            slowest = max(slowest, out["seconds"])
        assert slowest < 2.0, f"a cell took {slowest:.2f}s while MLflow was down"
        time.sleep(3)  # the syncer tries (and fails) meanwhile
        status = json.loads((workspace["home"] / ".labyard" / "mlflow-queue" / "status.json").read_text())
        assert status["reachable"] is False and status["last_error"]
        assert k.run("mlflow.end_run()")["status"] == "ok"

        mlflow_server.start()
        def all_arrived():
            run = mlflow_server.api("GET", "runs/get", params={"run_id": run_id})["run"]
            return run["info"]["status"] == "FINISHED" and len(mlflow_server.metric_history(run_id, "loss")) >= 150

        wait_for(all_arrived, 300, what="replay after restart")
        time.sleep(3)  # more passes must not send anything twice
        history = mlflow_server.metric_history(run_id, "loss")
        assert sorted(m["step"] for m in history) == list(range(150))
        assert all(abs(m["value"] - 1.0 / (m["step"] + 1)) < 1e-12 for m in history)
    finally:
        k.shutdown()


def test_queue_left_by_a_dead_kernel_is_replayed_by_the_next(mlflow_server, workspace):
    nb = workspace["project"] / "replay.ipynb"
    write_notebook(nb, [])
    mlflow_server.stop()
    try:
        k = start_kernel(workspace, mlflow_server, nb)
        assert k.run("import mlflow\nwith mlflow.start_run(run_name='offline'):\n"
                     "    mlflow.log_param('lr', 0.1)\n    [mlflow.log_metric('acc', i / 10, step=i) for i in range(10)]")["status"] == "ok"
        k.km.shutdown_kernel(now=True)  # killed: no chance to flush
        k.kc.stop_channels()
    finally:
        mlflow_server.start()
    assert mlflow_server.experiment("vision/replay.ipynb") is None
    other = workspace["project"] / "other.ipynb"
    write_notebook(other, [])
    k2 = start_kernel(workspace, mlflow_server, other)
    try:
        exp = wait_for(lambda: mlflow_server.experiment("vision/replay.ipynb"), 300, what="replayed experiment")
        run = wait_for(lambda: (r := mlflow_server.runs(exp["experiment_id"])) and r[0]["info"]["status"] == "FINISHED" and r[0], 300)
        assert {p["key"]: p["value"] for p in run["data"]["params"]} == {"lr": "0.1"}
        assert len(mlflow_server.metric_history(run["info"]["run_id"], "acc")) == 10
        # the replayed store is removed once everything arrived
        stores = workspace["home"] / ".labyard" / "mlflow-queue" / "stores"
        wait_for(lambda: len(list(stores.iterdir())) == 1, 120, what="replayed store removed")
    finally:
        k2.shutdown()


@pytest.mark.parametrize("switch", ["notebook", "user", "env"])
def test_switched_off_records_nothing(mlflow_server, workspace, switch):
    nb = workspace["project"] / f"off-{switch}.ipynb"
    write_notebook(nb, [FIT], metadata={"labyard": {"autolog": False}} if switch == "notebook" else None)
    extra = {}
    if switch == "user":
        settings = workspace["home"] / ".jupyter" / "lab" / "user-settings" / "labyard-lab"
        settings.mkdir(parents=True)
        (settings / "runs.jupyterlab-settings").write_text('{\n  // off for me\n  "autolog": false,\n}\n')
    env = platform_env(project_dir=workspace["project"], home=workspace["home"], notebook=nb, mlflow_url=mlflow_server.url)
    if switch == "env":
        env["LABYARD_AUTOLOG"] = "off"
    k = Kernel({**env, **extra}, cwd=workspace["project"])
    try:
        assert k.run(FIT)["status"] == "ok"
        assert k.value("__import__('labyard_lab.autolog').autolog.current() is None") is True
        assert "turned off" in k.value("__import__('labyard_lab.autolog').autolog.why_off()")
        assert k.value("__import__('os').environ['MLFLOW_TRACKING_URI']") == mlflow_server.url
        time.sleep(2)
        assert mlflow_server.experiment(f"vision/off-{switch}.ipynb") is None
        assert not (workspace["home"] / ".labyard").exists()
    finally:
        k.shutdown()


def test_no_project_no_autolog(mlflow_server, workspace):
    env = platform_env(project_dir=workspace["project"], home=workspace["home"], notebook=None, mlflow_url=mlflow_server.url)
    del env["LABYARD_PROJECT"]
    k = Kernel(env, cwd=workspace["project"])
    try:
        assert "LABYARD_PROJECT" in k.value("__import__('labyard_lab.autolog').autolog.why_off()")
    finally:
        k.shutdown()
