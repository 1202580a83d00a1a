"""What isolating users costs in local mode as root (docs/admin/local.md).

    .venv/bin/python bench/isolation.py [--runs 15]

1. Starting a user's process through the launcher (``python -m labyard_hub.isolation``: switch
   identity, then exec) against starting the same command directly, as the platform did before
   isolation: the command is what a server start imports first (``import jupyterhub.singleuser``)
   and an empty Python (``-c pass``) for the launcher's own cost. Medians of ``--runs`` starts,
   alternating, in the same run; the ratio is launched / direct.
2. The start-up check of ``labyard up`` (``unusable_by_users``: the data dir's parents and a
   Python started as nobody), once, in seconds.

Must run as root (the launcher switches identity). Prints a table and writes
bench/results/isolation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from labyard_hub import isolation
from labyard_hub.isolation import RunAs


def timed(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/isolation.py must run as root (the launcher switches identity)", file=sys.stderr)
        return 2
    place = Path(tempfile.mkdtemp(prefix="labyard-bench-"))
    place.chmod(0o711)
    try:
        bob = RunAs("bob", 10002, 20001, place / "home")
        isolation.prepare_private_dir(bob.home, bob)
        env = {"PATH": os.environ["PATH"]}
        rows = []
        for label, code in (("python -c pass", "pass"), ("import jupyterhub.singleuser", "import jupyterhub.singleuser")):
            argv = [sys.executable, "-c", code]
            timed(argv, env), timed(bob.command(argv, place), bob.environment(env))  # warm the page cache
            direct, launched = [], []
            for _ in range(args.runs):
                direct.append(timed(argv, env))
                launched.append(timed(bob.command(argv, place), bob.environment(env)))
            d, lo = statistics.median(direct), statistics.median(launched)
            rows.append({"command": label, "direct_s": round(d, 4), "launched_s": round(lo, 4),
                         "added_s": round(lo - d, 4), "ratio": round(lo / d, 2)})
        t0 = time.perf_counter()
        problem = isolation.unusable_by_users(place)
        check = time.perf_counter() - t0
    finally:
        shutil.rmtree(place, ignore_errors=True)
    print(f"{'command':32} {'direct':>9} {'launched':>9} {'added':>8} {'ratio':>6}")
    for r in rows:
        print(f"{r['command']:32} {r['direct_s']:8.3f}s {r['launched_s']:8.3f}s {r['added_s']:7.3f}s {r['ratio']:6.2f}")
    print(f"start-up check (unusable_by_users): {check:.2f}s ({'ok' if problem is None else problem})")
    out = Path(__file__).parent / "results" / "isolation.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"runs": args.runs, "starts": rows, "startup_check_s": round(check, 3)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
