"""System metrics per run (MLflow's own monitor, ``system/...`` metrics) in platform kernels and
scheduled runs, against a real ``mlflow server``.

There is no GPU here: the GPU runs use the fake NVML in ``fake_nvml/`` (the API shape of
``pynvml``, replaying the readings in ``fake_nvml/readings.json``, which were written in NVML's
shape for these tests, not recorded on a GPU), put first on the kernel's ``PYTHONPATH``. The CPU
runs use the real ``pynvml``, which finds no NVML library here, so they get no GPU metrics.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import write_notebook
from .support import Kernel, platform_env, wait_for

pytestmark = pytest.mark.slow

FAKE_NVML = Path(__file__).parent / "fake_nvml"
READINGS = json.loads((FAKE_NVML / "readings.json").read_text())
CPU_KEYS = {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
            "system/system_memory_usage_percentage"}


def gpu_env(env: dict) -> dict:
    return {**env, "PYTHONPATH": str(FAKE_NVML), "LABYARD_FLAVOR": "gpu-2", "LABYARD_GPUS": "2",
            "LABYARD_SYSTEM_METRICS_INTERVAL": "0.5"}


def check_gpu_metrics(server, run_id: str) -> None:
    run = server.api("GET", "runs/get", params={"run_id": run_id})["run"]
    keys = {m["key"] for m in run["data"].get("metrics", [])}
    assert CPU_KEYS <= keys, keys
    for i, device in enumerate(READINGS["devices"]):
        for what in ("utilization_percentage", "memory_usage_percentage", "memory_usage_megabytes", "power_usage_watts"):
            assert f"system/gpu_{i}_{what}" in keys, (i, what, keys)
        recorded = {s["gpu_util"] for s in device["samples"]}
        logged = {m["value"] for m in server.metric_history(run_id, f"system/gpu_{i}_utilization_percentage")}
        assert logged and logged <= recorded, (logged, recorded)  # the readings, device by device
        memory = {round(s["memory_used"] / 1e6, 1) for s in device["samples"]}
        assert {m["value"] for m in server.metric_history(run_id, f"system/gpu_{i}_memory_usage_megabytes")} <= memory
    assert "system/gpu_2_utilization_percentage" not in keys


def finished_run(server, experiment: str) -> dict:
    exp = wait_for(lambda: server.experiment(experiment), 300, what=f"experiment {experiment}")
    return wait_for(lambda: (r := server.runs(exp["experiment_id"])) and r[0]["info"]["status"] == "FINISHED" and r[0],
                    300, what="a finished run")


def test_gpu_flavour_kernel_records_gpu_metrics_per_device(mlflow_server, workspace):
    nb = workspace["project"] / "gpu.ipynb"
    write_notebook(nb, [])
    env = gpu_env(platform_env(project_dir=workspace["project"], home=workspace["home"], notebook=nb, mlflow_url=mlflow_server.url))
    k = Kernel(env, cwd=workspace["project"])
    try:
        out = k.run("import time, mlflow\nwith mlflow.start_run(run_name='train'):\n"
                    "    for i in range(30):\n        mlflow.log_metric('loss', 1 / (i + 1), step=i); time.sleep(0.1)")
        assert out["status"] == "ok" and out["stderr"] == "", out
        run = finished_run(mlflow_server, "vision/gpu.ipynb")
        check_gpu_metrics(mlflow_server, run["info"]["run_id"])
    finally:
        k.shutdown()


def test_cpu_flavour_kernel_has_none_unless_switched_on(mlflow_server, workspace):
    for switch, name in (("", "cpu-default"), ("on", "cpu-on")):
        nb = workspace["project"] / f"{name}.ipynb"
        write_notebook(nb, [])
        env = platform_env(project_dir=workspace["project"], home=workspace["home"], notebook=nb, mlflow_url=mlflow_server.url)
        env.update({"LABYARD_GPUS": "0", "LABYARD_SYSTEM_METRICS": switch, "LABYARD_SYSTEM_METRICS_INTERVAL": "0.5"})
        k = Kernel(env, cwd=workspace["project"])
        try:
            assert k.run("import time, mlflow\nwith mlflow.start_run():\n    time.sleep(3)")["status"] == "ok"
            run = finished_run(mlflow_server, f"vision/{name}.ipynb")
            keys = {m["key"] for m in run["data"].get("metrics", [])}
            if switch == "on":
                assert CPU_KEYS <= keys and not any(k.startswith("system/gpu") for k in keys), keys
            else:
                assert not any(k.startswith("system/") for k in keys), keys
        finally:
            k.shutdown()


@pytest.mark.parametrize("gpu", [True, False], ids=["gpu-2", "cpu"])
def test_scheduled_run_records_system_metrics(mlflow_server, workspace, gpu):
    nb = workspace["project"] / f"sched-{gpu}.ipynb"
    write_notebook(nb, ["import time\ntime.sleep(3)\nprint('slept')"])
    env = platform_env(project_dir=workspace["project"], home=workspace["home"], notebook=None, mlflow_url=mlflow_server.url)
    env.update({"LABYARD_GPUS": "0", "LABYARD_SYSTEM_METRICS_INTERVAL": "0.5"})
    if gpu:
        env = gpu_env(env)
    r = subprocess.run([sys.executable, "-m", "labyard_lab.autolog.papermill", str(nb), str(nb.with_suffix(".out.ipynb"))],
                       env=env, capture_output=True, text=True, timeout=600, cwd=workspace["project"])
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    run = mlflow_server.api("GET", "runs/get", params={"run_id": result["run_id"]})["run"]
    keys = {m["key"] for m in run["data"].get("metrics", [])}
    if gpu:
        check_gpu_metrics(mlflow_server, result["run_id"])
    else:
        assert CPU_KEYS <= keys and not any(k.startswith("system/gpu") for k in keys), keys
