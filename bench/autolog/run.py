"""Benchmark of kernel-side autolog: 200 small cells that each log a metric.

    .venv/bin/python bench/autolog/run.py [--cells 200] [--out bench/autolog/results.json]

Starts a real ``mlflow server`` (sqlite) and runs the same notebook with nbclient in a real
kernel, in three modes:

- ``no-logging``: autolog off, cells without the MLflow call (the cost of running a cell at all);
- ``plain``: autolog off; the cells' ``mlflow.log_metric`` goes straight to the server (what a
  user gets from MLflow alone);
- ``autolog``: autolog on (the platform's kernels), server up;
- ``autolog-down``: autolog on, nothing listening on the server's port.

Reports the time of the 200 metric cells (sum of execute_input → execute_reply), their median and
95th percentile, the first cell (``import mlflow``, which also waits for autolog's background
set-up), and checks that every point arrived on the server (for ``autolog-down``: after the
server is started and the queue replayed). Plain MLflow with the server down is not measured:
each call retries for minutes (MLflow's default HTTP retries), which is the problem autolog solves.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.mlflow.support import MlflowServer, platform_env, wait_for  # noqa: E402


def notebook(cells: int, log: bool = True) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell("import mlflow")]
    call = "mlflow.log_metric('m', x + {i}, step={i})" if log else "y = x + {i}"
    nb.cells += [nbformat.v4.new_code_cell("x = sum(range(1000))\n" + call.format(i=i)) for i in range(cells)]
    nb.cells.append(nbformat.v4.new_code_cell("mlflow.end_run()"))
    return nb


def cell_seconds(cell) -> float:
    ex = cell.metadata.get("execution", {})
    t0 = datetime.fromisoformat(ex["iopub.execute_input"].replace("Z", "+00:00"))
    t1 = datetime.fromisoformat(ex["shell.execute_reply"].replace("Z", "+00:00"))
    return (t1 - t0).total_seconds()


def run_mode(mode: str, cells: int, server: MlflowServer, work: Path) -> dict:
    project = work / mode / "project"
    home = work / mode / "home"
    project.mkdir(parents=True)
    home.mkdir(parents=True)
    path = project / f"bench-{mode}.ipynb"
    nb = notebook(cells, log=mode != "no-logging")
    nbformat.write(nb, path)
    env = platform_env(project_dir=project, home=home, notebook=path, mlflow_url=server.url)
    if mode in ("plain", "no-logging"):
        env["LABYARD_AUTOLOG"] = "off"
        env["MLFLOW_EXPERIMENT_NAME"] = f"vision/bench-{mode}.ipynb"
    if mode == "autolog-down":
        server.stop()
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(project)}}, record_timing=True)
        t0 = time.monotonic()
        client.execute()
        wall = time.monotonic() - t0
    finally:
        os.environ.clear()
        os.environ.update(saved)
    times = [cell_seconds(c) for c in nb.cells[1:-1]]
    result = {
        "mode": mode, "cells": cells, "wall_seconds_with_kernel_start": round(wall, 2),
        "first_cell_seconds": round(cell_seconds(nb.cells[0]), 3),
        "metric_cells_total_seconds": round(sum(times), 3),
        "metric_cell_median_ms": round(statistics.median(times) * 1000, 2),
        "metric_cell_p95_ms": round(sorted(times)[int(len(times) * 0.95) - 1] * 1000, 2),
    }
    if mode == "no-logging":
        return result
    if mode == "autolog-down":
        server.start()
        from labyard_lab.autolog.sync import Syncer

        t0 = time.monotonic()
        Syncer(home / ".labyard" / "mlflow-queue", server.url).sync_all()
        result["replay_seconds"] = round(time.monotonic() - t0, 2)
    exp = wait_for(lambda: server.experiment(f"vision/bench-{mode}.ipynb"), 60, what="experiment")
    run = wait_for(lambda: (r := server.runs(exp["experiment_id"])) and r[0]["info"]["status"] == "FINISHED" and r[0], 60, what="finished run")
    history = server.metric_history(run["info"]["run_id"], "m")
    result["points_on_server"] = len(history)
    result["points_unique_steps"] = len({m["step"] for m in history})
    return result


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--cells", type=int, default=200)
    p.add_argument("--out", default=str(Path(__file__).parent / "results.json"))
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="labyard-bench-autolog-"))
    server = MlflowServer(work / "server").start()
    try:
        results = [run_mode(m, args.cells, server, work) for m in ("no-logging", "plain", "autolog", "autolog-down")]
    finally:
        server.stop()
    base = results[1]["metric_cells_total_seconds"]
    none = results[0]["metric_cells_total_seconds"]
    for r in results:
        r["ratio_to_plain"] = round(r["metric_cells_total_seconds"] / base, 3) if base else None
        r["ratio_to_no_logging"] = round(r["metric_cells_total_seconds"] / none, 2) if none else None
    out = {"when": datetime.now().isoformat(timespec="seconds"), "machine": f"{os.cpu_count()} cores", "results": results}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    ok = all(r["points_on_server"] == args.cells and r["points_unique_steps"] == args.cells for r in results[1:])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
