"""The 10,000-step loop modes of ``bench/autolog/run.py``: per-point cost of a logged metric in a
training loop, points on the server, and what a kill -9 mid-loop loses, for Labyard's journal
and its anchors (today's queue write path, MLflow's own asynchronous logging).

Every kernel is a real ipykernel started by jupyter_client with a Labyard spawner's environment;
the server is a real ``mlflow server`` (sqlite) on loopback.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tests.mlflow.conftest import write_notebook
from tests.mlflow.support import Kernel, MlflowServer, platform_env, wait_for

#: one repetition: the loop without logging, then with it (same kernel, back to back)
TIMED = """
import json, time, mlflow
def _loop(n, key, **kw):
    t0 = time.perf_counter()
    if key is None:
        for i in range(n):
            x = 1.0 / (i + 1)
    else:
        for i in range(n):
            x = 1.0 / (i + 1)
            mlflow.log_metric(key, x, step=i, **kw)
    return time.perf_counter() - t0
mlflow.log_metric("warmup", 0.0{kw})  # starts the run
_out = []
for _r in range({reps}):
    _out.append({{"base": _loop({steps}, None), "logged": _loop({steps}, f"loss{{_r}}"{kw})}})
_t0 = time.perf_counter()
{flush}
print("BENCH " + json.dumps({{"reps": _out, "flush_s": time.perf_counter() - _t0}}))
"""

KILLED = """
fd = os.open({progress!r}, os.O_WRONLY | os.O_CREAT, 0o600)
for i in range({steps}):
    mlflow.log_metric("loss", 1.0 / (i + 1), step=i{kw})
    os.pwrite(fd, b"%10d" % i, 0)
    if i == {hold}:
        while True:
            time.sleep(0.05)
"""


def _per_point_ms(reps: list[dict], steps: int) -> dict:
    added = [(r["logged"] - r["base"]) / steps * 1000 for r in reps]
    return {"added_per_point_ms": round(statistics.median(added), 4),
            "added_per_point_ms_each": [round(a, 4) for a in added],
            "loop_without_logging_ms": round(statistics.median(r["base"] for r in reps) * 1000, 1),
            "loop_with_logging_ms": round(statistics.median(r["logged"] for r in reps) * 1000, 1)}


def _kernel_env(mode: str, server: MlflowServer, work: Path) -> tuple[dict, Path, str]:
    project, home = work / mode / "project", work / mode / "home"
    project.mkdir(parents=True)
    home.mkdir(parents=True)
    nb = project / f"bench-{mode}.ipynb"
    write_notebook(nb, [])
    env = platform_env(project_dir=project, home=home, notebook=nb, mlflow_url=server.url)
    experiment = f"vision/bench-{mode}.ipynb"
    if mode.startswith("today"):  # today's autolog: MLflow's file store in the user's home, as it set it up
        env.update({"LABYARD_AUTOLOG": "off", "MLFLOW_ALLOW_FILE_STORE": "true", "MLFLOW_EXPERIMENT_NAME": experiment,
                    "MLFLOW_TRACKING_URI": (home / ".labyard" / "mlflow-queue" / "stores" / "x" / "mlruns").as_uri()})
    elif mode.startswith("mlflow-async"):
        env.update({"LABYARD_AUTOLOG": "off", "MLFLOW_EXPERIMENT_NAME": experiment})
        if mode.endswith("registry"):  # the same, with the registry named (spares the pyspark probe)
            env["MLFLOW_REGISTRY_URI"] = server.url
    return env, project, experiment


def _points(server: MlflowServer, experiment: str, keys: list[str], expect: int, timeout: float = 600) -> dict:
    """Wait until every key has ``expect`` points (or the time is up); count them and duplicates."""
    exp = wait_for(lambda: server.experiment(experiment), timeout, what=f"experiment {experiment}")
    run = wait_for(lambda: server.runs(exp["experiment_id"]), timeout, what="its run")[0]
    rid = run["info"]["run_id"]
    deadline = time.monotonic() + timeout
    while True:
        hist = {k: server.metric_history(rid, k) for k in keys}
        if all(len(h) >= expect for h in hist.values()) or time.monotonic() > deadline:
            break
        time.sleep(1)
    time.sleep(2)
    hist = {k: server.metric_history(rid, k) for k in keys}
    total = sum(len(h) for h in hist.values())
    unique = sum(len({m["step"] for m in h}) for h in hist.values())
    return {"points_on_server": total, "points_expected": expect * len(keys), "duplicates": total - unique, "run_id": rid}


def timed_kernel(mode: str, server: MlflowServer, work: Path, steps: int, reps: int) -> dict:
    env, project, experiment = _kernel_env(mode, server, work)
    kw = ", synchronous=False" if mode.startswith("mlflow-async") else ""
    flush = "mlflow.flush_async_logging()" if kw else "pass"
    k = Kernel(env, cwd=project)
    try:
        assert k.run("import mlflow")["status"] == "ok"
        out = k.run(TIMED.format(kw=kw, reps=reps, steps=steps, flush=flush), timeout=3600)
        assert out["status"] == "ok", out
        data = json.loads(out["stdout"].split("BENCH ", 1)[1])
        result = {"mode": mode, "where": "interactive kernel", "steps": steps, "reps": reps,
                  **_per_point_ms(data["reps"], steps), "flush_seconds": round(data["flush_s"], 2)}
        if not mode.startswith("today"):  # today's path never reaches the server here (no sender thread)
            k.run("mlflow.end_run()")
            t0 = time.monotonic()  # the kernel stays up meanwhile: its sender is what we wait for
            result.update(_points(server, experiment, [f"loss{r}" for r in range(reps)], steps))
            result["seconds_until_all_on_server_after_loop"] = round(time.monotonic() - t0 + data["flush_s"], 1)
    finally:
        k.shutdown()
    return result


def timed_scheduled(server: MlflowServer, work: Path, steps: int, reps: int) -> dict:
    project, home = work / "scheduled" / "project", work / "scheduled" / "home"
    project.mkdir(parents=True)
    home.mkdir(parents=True)
    nb = project / "bench-scheduled.ipynb"
    write_notebook(nb, ["import mlflow", TIMED.format(kw="", reps=reps, steps=steps, flush="pass")])
    env = platform_env(project_dir=project, home=home, notebook=None, mlflow_url=server.url)
    env["LABYARD_SYSTEM_METRICS"] = "off"  # the same work as the interactive kernel (the monitor is a separate process)
    out = project / "bench-scheduled.out.ipynb"
    r = subprocess.run([sys.executable, "-m", "labyard_lab.autolog.papermill", str(nb), str(out), "--sync-timeout", "600"],
                       env=env, capture_output=True, text=True, timeout=3600, cwd=project)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    result_line = json.loads(r.stdout.strip().splitlines()[-1])
    texts = [o.get("text", "") for o in json.loads(out.read_text())["cells"][1]["outputs"]]
    printed = "".join("".join(t) if isinstance(t, list) else t for t in texts)
    data = json.loads(printed.split("BENCH ", 1)[1])
    result = {"mode": "autolog", "where": "scheduled run", "steps": steps, "reps": reps, **_per_point_ms(data["reps"], steps)}
    result.update(_points(server, "vision/bench-scheduled.ipynb", [f"loss{i}" for i in range(reps)], steps))
    result["run_status"] = server.api("GET", "runs/get", params={"run_id": result_line["run_id"]})["run"]["info"]["status"]
    return result


def killed_kernel(mode: str, server: MlflowServer, work: Path, steps: int, server_down: bool) -> dict:
    """kill -9 the kernel mid-loop (server down or up); then the server (re)starts and, for the
    journal, the next kernel replays what the dead one left. Counts what reached the server."""
    name = f"{mode}-kill-{'down' if server_down else 'up'}"
    env, project, experiment = _kernel_env(name, server, work)
    kw = ", synchronous=False" if mode.startswith("mlflow-async") else ""
    progress = project / "progress"
    k = Kernel(env, cwd=project)
    try:  # the run starts while the server is up (plain MLflow cannot even start one without it)
        assert k.run(f"import os, time, mlflow\nmlflow.log_metric('warmup', 0.0{kw})")["status"] == "ok"
        if server_down:
            server.stop()
        k.kc.execute(KILLED.format(kw=kw, progress=str(progress), steps=steps, hold=steps - 1000))
        wait_for(lambda: progress.exists() and int(progress.read_bytes() or 0) >= steps // 2, 600, interval=0.005,
                 what="the loop half way")
        os.kill(k.km.provisioner.process.pid, signal.SIGKILL)
        k.km.provisioner.process.wait()
        acked = int(progress.read_bytes()) + 1  # points whose log_metric had returned
    finally:
        k.kc.stop_channels()
        if server_down:
            server.start()
    if mode == "autolog":  # the next kernel of the user replays the dead kernel's store
        nb = project / "next.ipynb"
        write_notebook(nb, [])
        nxt = Kernel(platform_env(project_dir=project, home=Path(env["HOME"]), notebook=nb, mlflow_url=server.url), cwd=project)
    try:
        if server.experiment(experiment) is None and mode != "autolog":
            counted = {"points_on_server": 0, "duplicates": 0}
        else:
            counted = _points(server, experiment, ["loss"], acked, timeout=300 if mode == "autolog" else 30)
    finally:
        if mode == "autolog":
            nxt.shutdown()
    on, dup = counted["points_on_server"], counted["duplicates"]
    return {"mode": mode, "scenario": f"kill -9 mid-loop, server {'down' if server_down else 'up'}", "steps": steps,
            "acknowledged_points": acked, "points_on_server": on, "duplicates": dup,
            "lost_acknowledged": max(0, acked - (on - dup))}
