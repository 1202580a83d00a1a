"""Benchmark of notebook diffs: Labyard's engine against nbdime 4.0.4, on the same pairs, in the same run.

    .venv/bin/python bench/diff/run.py [--quick] [--out bench/diff/results.json]

Pairs (bench/diff/notebooks.py): an executed ML notebook and its *edited re-run* (every text
output changed, plots redrawn, 20 cells inserted, 10 deleted, 5 % of sources edited), at
100 cells / 5 MB, 200 cells / 20 MB and 400 cells / 20 MB (the target of issue 13).

Engine: each (pair, engine) in a fresh subprocess that reads both notebooks as the engine's own
reader does (not timed), then times one diff: ours ``labyard_lab.diff.diff_notebooks``, nbdime's
``nbdime.diff_notebooks``; peak memory is the subprocess's peak RSS during the diff (VmHWM, reset
after reading), with the notebooks loaded, and how much the diff added to it. Our diff is checked: ``nbdime.patch(base, diff) == remote``, and the cells
added / removed / modified are nbdime's.

Server: a real Jupyter server with the Labyard extension; time to first byte of
``POST /labyard/diff`` for the 400-cell pair, and the event-loop lag of that server meanwhile
(``GET /api/status`` every 20 ms: worst and 95th-percentile latency minus the median latency of
the idle server; on a loaded machine this includes the time the OS does not run the server).
Then the same with nbdime's own handler (``/nbdime/api/diff`` on a server started with
``LabyardDiff.replace_nbdime_api=False``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.diff.notebooks import edited_rerun, executed  # noqa: E402

SHAPES = [(100, 5_000_000), (200, 20_000_000), (400, 20_000_000)]
QUICK = [(60, 1_000_000), (100, 5_000_000)]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def peak_mb() -> float:
    """The process's peak RSS (VmHWM) since the last :func:`reset_peak`."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1e3


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: reset VmHWM to the current RSS


def child(engine: str, base: str, remote: str) -> None:
    """In the fresh subprocess: read, diff once (timed), report."""
    if engine == "ours":
        from labyard_lab.diff import diff_notebooks, load_notebook

        a = load_notebook(Path(base).read_bytes(), validate=False)[0]
        b = load_notebook(Path(remote).read_bytes(), validate=False)[0]
        run = lambda: diff_notebooks(a, b)  # noqa: E731
    else:
        import nbformat
        from nbdime import diff_notebooks

        a, b = nbformat.read(base, as_version=4), nbformat.read(remote, as_version=4)
        run = lambda: diff_notebooks(a, b)  # noqa: E731
    before = rss_mb()
    reset_peak()
    t0 = time.perf_counter()
    diff = run()
    seconds = time.perf_counter() - t0
    peak = peak_mb()
    out = {"seconds": seconds, "peak_mb": peak, "diff_peak_mb": max(0.0, peak - before), "loaded_mb": before}
    from tests.diff.support import cell_sets, patched, plain

    out["cells"] = [sorted(s) for s in cell_sets(plain(diff))]
    if engine == "ours":
        out["roundtrip"] = patched(a, diff) == plain(b)
    print(json.dumps(out))


def measure(engine: str, base: Path, remote: Path, timeout: float) -> dict:
    try:
        r = subprocess.run([sys.executable, __file__, "--child", engine, str(base), str(remote)], capture_output=True,
                           text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"timeout": timeout}
    if r.returncode != 0:
        raise RuntimeError(f"{engine} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def make_pair(work: Path, cells: int, size: int) -> tuple[Path, Path]:
    """The notebook (``size`` bytes as a file, within a few %) and its edited re-run."""
    text = json.dumps(executed(cells, size, seed=cells), indent=1)
    a = executed(cells, int(size * size / len(text)), seed=cells)
    base, remote = work / f"nb-{cells}-{size}.ipynb", work / f"nb-{cells}-{size}-rerun.ipynb"
    base.write_text(json.dumps(a, indent=1))
    remote.write_text(json.dumps(edited_rerun(a, seed=cells + 1), indent=1))
    return base, remote


def ttfb(port: int, path: str, body: dict, headers: dict) -> tuple[float, int, float]:
    """(seconds to the first byte of the answer, status, seconds to the last byte)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    t0 = time.perf_counter()
    conn.request("POST", path, body=json.dumps(body), headers={**headers, "Content-Type": "application/json"})
    resp = conn.getresponse()  # returns when the status line (the first byte) has arrived
    first = time.perf_counter() - t0
    resp.read()
    return first, resp.status, time.perf_counter() - t0


def server_case(work: Path, base: Path, remote: Path, nbdime_handler: bool) -> dict:
    from tests.support.jupyter import JupyterServer

    root = work / ("server-nbdime" if nbdime_handler else "server-ours")
    root.mkdir()
    for p in (base, remote):
        (root / p.name).write_bytes(p.read_bytes())
    args = ["--LabyardDiff.replace_nbdime_api=False"] if nbdime_handler else []
    server = JupyterServer(root, args=args).start()
    try:
        session = server.api()

        def status() -> float:
            t = time.perf_counter()
            session.get(f"{server.url}/api/status", timeout=3600).raise_for_status()
            return time.perf_counter() - t

        idle = statistics.median(status() for _ in range(50))
        if nbdime_handler:
            path, body = "/nbdime/api/diff", {"base": base.name, "remote": remote.name}
        else:
            path, body = "/labyard/diff", {"base": {"kind": "path", "path": base.name}, "remote": {"kind": "path", "path": remote.name}}
        ttfb(server.port, path, body, server.headers)  # warm: the first diff also pays imports
        result: dict = {}
        thread = threading.Thread(target=lambda: result.update(zip(("ttfb", "status", "total"), ttfb(server.port, path, body, server.headers))))
        thread.start()
        latencies = []
        while thread.is_alive():
            latencies.append(status())
            time.sleep(0.02)
        thread.join()
        latencies.sort()
        p95 = latencies[int(0.95 * (len(latencies) - 1))] if latencies else idle
        return {"ttfb": result["ttfb"], "total": result["total"], "status": result["status"], "idle_latency": idle,
                "lag": max(latencies, default=idle) - idle, "lag_p95": p95 - idle, "polls": len(latencies)}
    finally:
        server.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small pairs only (a minute)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results.json")
    p.add_argument("--nbdime-timeout", type=float, default=1800)
    p.add_argument("--no-server", action="store_true")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child)
        return 0
    rows = []
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-diff-") as tmp:
        work = Path(tmp)
        for cells, size in QUICK if args.quick else SHAPES:
            base, remote = make_pair(work, cells, size)
            mb = base.stat().st_size / 1e6
            ours = measure("ours", base, remote, args.nbdime_timeout)
            theirs = measure("nbdime", base, remote, args.nbdime_timeout)
            row = {"cells": cells, "file_mb": round(mb, 1), "ours": ours, "nbdime": theirs,
                   "ratio": theirs["seconds"] / ours["seconds"] if "seconds" in theirs else None,
                   "same_cells": ours["cells"] == theirs["cells"] if "cells" in theirs else None}
            rows.append(row)
            print(f"{cells} cells, {mb:.1f} MB edited re-run: ours {ours['seconds']:.3f} s / {ours['peak_mb']:.0f} MB peak "
                  f"(+{ours['diff_peak_mb']:.0f} MB), nbdime " + (f"{theirs['seconds']:.1f} s / {theirs['peak_mb']:.0f} MB peak "
                  f"(+{theirs['diff_peak_mb']:.0f} MB), {row['ratio']:.0f}× faster" if row["ratio"] else f"> {theirs['timeout']:.0f} s")
                  + f"; patch round-trip {'ok' if ours['roundtrip'] else 'FAILED'}; same cells as nbdime: {row['same_cells']}",
                  flush=True)
        server = None
        if not args.no_server:
            cells, size = (QUICK if args.quick else SHAPES)[-1]
            base, remote = work / f"nb-{cells}-{size}.ipynb", work / f"nb-{cells}-{size}-rerun.ipynb"
            server = {"ours": server_case(work, base, remote, False), "nbdime": server_case(work, base, remote, True)}
            for name, s in server.items():
                print(f"server, {name}: first byte after {s['ttfb']:.2f} s (all {s['total']:.2f} s, HTTP {s['status']}), "
                      f"event-loop lag meanwhile {s['lag'] * 1000:.0f} ms worst, {s['lag_p95'] * 1000:.0f} ms p95 over {s['polls']} requests "
                      f"(idle latency {s['idle_latency'] * 1000:.1f} ms)", flush=True)
    results = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
               "load_average_at_start": load, "rows": rows, "server": server}
    args.out.write_text(json.dumps(results, indent=1))
    ok = all(r["ours"]["roundtrip"] and r["same_cells"] is not False for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
