"""The command of a scheduled run's pod (Kubernetes backend).

``python -m labyard_hub.scheduler.podrun`` runs the notebook snapshot mounted from the run's
ConfigMap with :class:`labyard_hub.scheduler.runner.Runner`, exactly as local mode does
(papermill, the parameters from ``$LABYARD_PARAMETERS``, ``$LABYARD_RETRIES`` attempts of at
most ``$LABYARD_TIMEOUT_SECONDS`` each), in the project volume. Next to each other in
``$LABYARD_OUTPUT_DIR/<notebook name>/`` it leaves ``<run id>.ipynb`` (the output notebook),
``<run id>.log`` and ``<run id>.result.json`` (the runner's result); its last log line is
``LABYARD-RESULT {json}``.

The scheduler service reads none of these (it has no rights on pods, logs or volumes): the
pod's **exit code** carries what the Run shows, and the Job's pod failure policy puts it into
the Job's ``Failed`` condition. :func:`exit_code` and :func:`result_of_exit_code` are the two
ends of that encoding:

====== ==============================================
0      succeeded
1      failed, in no cell we could name
2      the last attempt timed out
3      cancelled
10+N   failed in cell N (N < 100; cells are counted in the user's notebook, from 0)
====== ==============================================
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from .runner import Runner, write_json

RESULT_PREFIX = "LABYARD-RESULT "
CELL_BASE = 10
MAX_CELL = 99


def exit_code(result: dict) -> int:
    """The pod's exit code for a runner result (see the module's table)."""
    status = result.get("status")
    if status == "succeeded":
        return 0
    if status == "cancelled":
        return 3
    if (result.get("error") or "").startswith("timed out"):
        return 2
    cell = result.get("failed_cell")
    return CELL_BASE + cell if isinstance(cell, int) and 0 <= cell <= MAX_CELL else 1


def result_of_exit_code(message: str, output: str) -> tuple[int | None, int | None, str]:
    """(exit code, failing cell, error) from a Job's ``Failed`` condition message.

    Args:
        message: e.g. ``Container notebook for pod labyard-vision/x failed with exit code 12
            matching FailJob rule at index 1`` (written by the Job controller).
        output: the output notebook's path in the project volume (named in the error).
    """
    found = re.search(r"exit code (\d+)", message)
    if not found:
        return None, None, f"the run's pod failed ({message or 'no reason given'})"
    code = int(found.group(1))
    where = f"; see {output} in the project"
    if code == 2:
        return code, None, f"timed out{where}"
    if code == 3:
        return code, None, "cancelled"
    if CELL_BASE <= code <= CELL_BASE + MAX_CELL:
        return code, code - CELL_BASE, f"the notebook failed in cell {code - CELL_BASE}{where}"
    if code == 137:
        return code, None, f"killed (out of memory?){where}"
    return code, None, f"the notebook failed (exit code {code}){where}"


def shared_dir(path: Path) -> None:
    """Make ``path`` (and its parents) for every member of the project: the pod's group is the
    project's, so a directory another member's run made must be group-writable, or this run could
    not write its output there (the first run of ``scheduled-runs/`` made it 0755 with the
    default umask). Directories of ours that are not are made so."""
    old = os.umask(0o002)
    try:
        path.mkdir(parents=True, exist_ok=True)
    finally:
        os.umask(old)
    for d in (path.parent, path):
        try:
            st = d.stat()
            if st.st_uid == os.getuid() and not st.st_mode & 0o020:
                d.chmod(st.st_mode | 0o070)
        except OSError:
            pass


def main() -> int:
    env = os.environ
    notebook = Path(env["LABYARD_NOTEBOOK_FILE"])
    run_id = env.get("LABYARD_RUN_ID") or env.get("HOSTNAME", "run")
    stem = Path(env.get("LABYARD_NOTEBOOK", notebook.name)).stem
    out_dir = Path(env.get("LABYARD_OUTPUT_DIR", "scheduled-runs")) / stem
    shared_dir(out_dir)
    run_dir = Path(env.get("TMPDIR", "/tmp")) / f"labyard-run-{run_id}"
    run_dir.mkdir(parents=True, exist_ok=True)
    parameters = run_dir / "parameters.json"
    write_json(parameters, json.loads(env.get("LABYARD_PARAMETERS", "{}")))
    write_json(run_dir / "spec.json", {
        "input": str(notebook), "output": str(out_dir / f"{run_id}.ipynb"), "log": str(out_dir / f"{run_id}.log"),
        "parameters_file": str(parameters), "cwd": os.getcwd(), "env": {},
        "timeout_seconds": int(env.get("LABYARD_TIMEOUT_SECONDS", "3600")), "retries": int(env.get("LABYARD_RETRIES", "0")),
    })
    Runner(run_dir).run()
    log = out_dir / f"{run_id}.log"
    if log.exists():  # also in the pod's log, for `kubectl logs`
        sys.stdout.write(log.read_text(errors="replace"))
    result = json.loads((run_dir / "result.json").read_text())
    result["output"] = str(out_dir / f"{run_id}.ipynb")
    write_json(out_dir / f"{run_id}.result.json", result)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return exit_code(result)


def parse_result(log: str) -> dict | None:
    """The ``LABYARD-RESULT`` of a pod log (None if the pod did not get that far)."""
    for line in reversed(log.splitlines()):
        if line.startswith(RESULT_PREFIX):
            try:
                return json.loads(line[len(RESULT_PREFIX):])
            except json.JSONDecodeError:
                return None
    return None


if __name__ == "__main__":
    sys.exit(main())
