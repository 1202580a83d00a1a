"""Benchmark of the MLflow gate: a 1 GB artifact up and down, and small API calls.

    .venv/bin/python bench/mlflow_gate.py [--size-mb 1024] [--calls 200] [--out bench/mlflow_gate.json]

Starts, in the same run, the anchor — a plain ``mlflow server`` (no gate, no login; what MLflow
alone does) — and a whole ``labyard up --demo``, whose MLflow is ``mlflow server --app-name
labyard`` behind the hub's proxy. For each it measures, as alice with her hub token:

- a streamed 1 GB artifact upload (``PUT mlflow-artifacts``) and download (``GET``): seconds, MB/s,
  and the growth of the serving process's resident memory (peak RSS during the transfer minus
  RSS before it, sampled every 20 ms from /proc: the uvicorn process of ``mlflow server``);
- ``--calls`` ``runs/get`` calls one after the other: median and p95 latency (the gate adds the
  login check, the identity read from the hub — both cached — and the run's project lookup).

The gate is measured twice: through the proxy at ``/services/mlflow`` (how browsers and laptops
reach it) and straight on its port (how pods may reach it). Ratios are against the anchor.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.mlflow.support import MlflowServer, PeakRss, gate_server_pid, serving_process, stream, wait_for  # noqa: E402
from tests.support.stack import Stack  # noqa: E402

CHUNK = 1 << 20


def measure(name: str, api: str, session: requests.Session, server, size_mb: int, calls: int) -> dict:
    exp = session.post(f"{api}/api/2.0/mlflow/experiments/create", json={"name": f"vision/bench-{name}-{time.time_ns()}"},
                       timeout=60).json()["experiment_id"]
    run = session.post(f"{api}/api/2.0/mlflow/runs/create", json={"experiment_id": exp}, timeout=60).json()["run"]["info"]["run_id"]
    url = f"{api}/api/2.0/mlflow-artifacts/artifacts/{exp}/{run}/artifacts/big.bin"
    out = {"name": name}
    with PeakRss(server) as up:
        t0 = time.monotonic()
        r = session.put(url, data=stream(size_mb, os.urandom(CHUNK)), timeout=3600)
        out["upload_s"] = time.monotonic() - t0
    assert r.status_code == 200, r.text[:300]
    out["upload_rss_growth_mb"] = up.growth_mb
    n = 0
    with PeakRss(server) as down:
        t0 = time.monotonic()
        with session.get(url, stream=True, timeout=3600) as r:
            assert r.status_code == 200, r.text[:300]
            for chunk in r.iter_content(CHUNK):
                n += len(chunk)
        out["download_s"] = time.monotonic() - t0
    assert n == size_mb * CHUNK, n
    out["download_rss_growth_mb"] = down.growth_mb
    out["upload_mb_s"] = size_mb / out["upload_s"]
    out["download_mb_s"] = size_mb / out["download_s"]
    lat = []
    for _ in range(calls):
        t0 = time.monotonic()
        r = session.get(f"{api}/api/2.0/mlflow/runs/get", params={"run_id": run}, timeout=60)
        lat.append(time.monotonic() - t0)
        assert r.status_code == 200
    out["runs_get_median_ms"] = statistics.median(lat) * 1000
    out["runs_get_p95_ms"] = sorted(lat)[int(0.95 * (len(lat) - 1))] * 1000
    session.delete(url, timeout=600)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "bench" / "mlflow_gate.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="labyard-bench-gate-"))
    plain = MlflowServer(work / "plain").start()
    stack = Stack(work / "stack").start(timeout=300)
    results = []
    try:
        wait_for(lambda: requests.get(f"{stack.url}/services/mlflow/health", timeout=10).status_code == 200, 300, 1)
        gate_port = yaml.safe_load((stack.data_dir / "settings.yaml").read_text())["mlflow_url"].rsplit(":", 1)[1]
        gate = serving_process(gate_server_pid(stack.data_dir))
        alice = requests.Session()
        alice.headers["Authorization"] = f"Bearer {stack.token('alice')}"
        results.append(measure("plain mlflow server (anchor)", plain.url, requests.Session(), serving_process(plain.proc.pid),
                               args.size_mb, args.calls))
        results.append(measure("gate, through the proxy", f"{stack.url}/services/mlflow", alice, gate, args.size_mb, args.calls))
        results.append(measure("gate, on its port", f"http://127.0.0.1:{gate_port}/services/mlflow", alice, gate,
                               args.size_mb, args.calls))
    finally:
        stack.stop()
        plain.stop()
    anchor = results[0]
    for r in results:
        r["upload_vs_anchor"] = r["upload_s"] / anchor["upload_s"]
        r["download_vs_anchor"] = r["download_s"] / anchor["download_s"]
        r["runs_get_vs_anchor"] = r["runs_get_median_ms"] / anchor["runs_get_median_ms"]
    report = {"size_mb": args.size_mb, "calls": args.calls, "load_average": os.getloadavg(), "results": results}
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"{args.size_mb} MB artifact, {args.calls} runs/get calls; load average {os.getloadavg()[0]:.1f}")
    print(f"{'':32} {'up s':>7} {'MB/s':>6} {'RSS+ MB':>8} {'down s':>7} {'MB/s':>6} {'RSS+ MB':>8} {'runs/get ms':>12} {'vs anchor':>9}")
    for r in results:
        print(f"{r['name']:32} {r['upload_s']:7.1f} {r['upload_mb_s']:6.1f} {r['upload_rss_growth_mb']:8.1f} "
              f"{r['download_s']:7.1f} {r['download_mb_s']:6.1f} {r['download_rss_growth_mb']:8.1f} "
              f"{r['runs_get_median_ms']:12.1f} {r['runs_get_vs_anchor']:9.2f}")


if __name__ == "__main__":
    main()
