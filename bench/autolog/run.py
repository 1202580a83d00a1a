"""Benchmark of kernel-side autolog: small cells that each log a metric, and a 10,000-step loop.

    .venv/bin/python bench/autolog/run.py [--only cells|loop] [--cells 200] [--steps 10000] [--reps 3]
                                          [--out bench/autolog/results.json]

Starts a real ``mlflow server`` (sqlite). *Loop* modes (``loop.py``): per-point cost of
``mlflow.log_metric`` in a 10,000-step loop (the same loop without logging, back to back in the
same kernel, is subtracted), points on the server, and what a kill -9 mid-loop loses, for the
journal (interactive kernel and scheduled run), today's queue write path (MLflow's file store)
and MLflow's own asynchronous logging (``synchronous=False``). *Cell* modes: the same notebook of
200 cells with nbclient in a real kernel:

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


def loop_modes(server: MlflowServer, work: Path, steps: int, reps: int, out_path: Path) -> dict:
    from bench.autolog import loop

    res: dict = {"timed": [], "killed": [], "errors": []}

    def attempt(kind: str, fn, *a):
        try:
            res[kind].append(fn(*a))
        except Exception as e:  # noqa: BLE001 - record it, go on with the other modes
            res["errors"].append(f"{kind} {a[:1]}: {type(e).__name__}: {e}"[:2000])
        out_path.write_text(json.dumps(res, indent=1) + "\n")  # partial results as they come

    for m in ("today-autolog", "mlflow-async", "mlflow-async-registry", "autolog"):
        attempt("timed", loop.timed_kernel, m, server, work, steps, 1 if m.startswith("today") else reps)
    attempt("timed", loop.timed_scheduled, server, work, steps, reps)
    for down in (True, False):
        for m in ("autolog", "mlflow-async"):
            attempt("killed", loop.killed_kernel, m, server, work, steps, down)
    by = {(r["mode"], r["where"]): r["added_per_point_ms"] for r in res["timed"]}
    try:
        ours = max(by[("autolog", "interactive kernel")], by[("autolog", "scheduled run")])
        res["summary"] = {
            "autolog_added_per_point_ms": {"interactive": by[("autolog", "interactive kernel")],
                                           "scheduled": by[("autolog", "scheduled run")]},
            "times_faster_than_today": round(by[("today-autolog", "interactive kernel")] / ours, 1),
            "ratio_to_mlflow_async_enqueue": round(ours / by[("mlflow-async", "interactive kernel")], 3),
            "ratio_to_mlflow_async_enqueue_registry_named": round(ours / by[("mlflow-async-registry", "interactive kernel")], 3),
        }
    except KeyError as e:
        res["errors"].append(f"summary: missing {e}")
    return res


def loop_table(res: dict) -> str:
    rows = ["| mode | where | added per point | points on server (expected) | duplicates |", "|---|---|---:|---:|---:|"]
    for r in res["timed"]:
        on = f"{r['points_on_server']} ({r['points_expected']})" if "points_on_server" in r else "— (no sender)"
        rows.append(f"| {r['mode']} | {r['where']} | {r['added_per_point_ms']:.3f} ms | {on} | {r.get('duplicates', '—')} |")
    rows += ["", "| mode | scenario | acknowledged | on server | duplicates | lost |", "|---|---|---:|---:|---:|---:|"]
    for r in res["killed"]:
        rows.append(f"| {r['mode']} | {r['scenario']} | {r['acknowledged_points']} | {r['points_on_server']} | "
                    f"{r['duplicates']} | {r['lost_acknowledged']} |")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--only", choices=["cells", "loop"])
    p.add_argument("--cells", type=int, default=200)
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=str(Path(__file__).parent / "results.json"))
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="labyard-bench-autolog-"))
    server = MlflowServer(work / "server").start()
    out: dict = {"when": datetime.now().isoformat(timespec="seconds"), "machine": f"{os.cpu_count()} cores",
                 "load_average_at_start": os.getloadavg()[0]}
    ok = True
    try:
        if args.only != "cells":
            out["loop"] = loop_modes(server, work, args.steps, args.reps, work / "loop.partial.json")
            ok &= not out["loop"]["errors"]
            ok &= all(r["duplicates"] == 0 and r["points_on_server"] == r["points_expected"] for r in out["loop"]["timed"] if "points_on_server" in r)
            ok &= all(r["lost_acknowledged"] == 0 and r["duplicates"] == 0 for r in out["loop"]["killed"] if r["mode"] == "autolog")
        if args.only != "loop":
            results = [run_mode(m, args.cells, server, work) for m in ("no-logging", "plain", "autolog", "autolog-down")]
            base = results[1]["metric_cells_total_seconds"]
            none = results[0]["metric_cells_total_seconds"]
            for r in results:
                r["ratio_to_plain"] = round(r["metric_cells_total_seconds"] / base, 3) if base else None
                r["ratio_to_no_logging"] = round(r["metric_cells_total_seconds"] / none, 2) if none else None
            out["results"] = results
            ok &= all(r["points_on_server"] == args.cells and r["points_unique_steps"] == args.cells for r in results[1:])
    finally:
        server.stop()
    out["load_average_at_end"] = os.getloadavg()[0]
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    if "loop" in out:
        print(loop_table(out["loop"]))
        print(json.dumps(out["loop"].get("summary"), indent=1))
        for e in out["loop"]["errors"]:
            print("ERROR", e)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
