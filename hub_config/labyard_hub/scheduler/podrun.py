"""The command of a scheduled run's pod (Kubernetes backend).

``python -m labyard_hub.scheduler.podrun`` runs papermill on the notebook snapshot mounted from
the run's ConfigMap, with the parameters in ``$LABYARD_PARAMETERS`` (JSON), in the project
volume, and writes the output notebook to
``$LABYARD_OUTPUT_DIR/<notebook name>/<run id>.ipynb`` (the project's ``scheduled-runs``).
Its last log line is ``LABYARD-RESULT {json}`` (exit code, failing cell, error, output path),
which the scheduler service reads from the pod log. The exit code is papermill's, so the Job
controller counts a failed notebook as a failed pod (``backoffLimit`` = retries).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .runner import failure_from_output, papermill_command

RESULT_PREFIX = "LABYARD-RESULT "


def main() -> int:
    env = os.environ
    notebook = Path(env["LABYARD_NOTEBOOK_FILE"])
    run_id = env.get("LABYARD_RUN_ID") or env.get("HOSTNAME", "run")
    stem = Path(env.get("LABYARD_NOTEBOOK", notebook.name)).stem
    out_dir = Path(env.get("LABYARD_OUTPUT_DIR", "scheduled-runs")) / stem
    out_dir.mkdir(parents=True, exist_ok=True)
    output = out_dir / f"{run_id}.ipynb"
    params = Path(env.get("TMPDIR", "/tmp")) / f"labyard-parameters-{run_id}.json"
    params.write_text(env.get("LABYARD_PARAMETERS", "{}"))
    argv = [*papermill_command(dict(env)), str(notebook), str(output), "-f", str(params),
            "--cwd", os.getcwd(), "--log-output", "--request-save-on-cell-execute"]
    code = subprocess.call(argv)
    failed_cell, error = (None, None) if code == 0 else failure_from_output(output)
    print(RESULT_PREFIX + json.dumps({"exit_code": code, "failed_cell": failed_cell, "error": error, "output": str(output)}),
          flush=True)
    return code


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
