"""One run: papermill in a child process, with a timeout and retries; the result as JSON.

``python -m labyard_hub.scheduler.runner RUN_DIR`` reads ``RUN_DIR/spec.json`` and writes
``RUN_DIR/state.json`` (``running``, the attempt) while it works and ``RUN_DIR/result.json``
(atomically) when it is done. It does not need the scheduler service: started in its own session,
it survives a restart of the service (or of ``labyard up``), and the service adopts its result.
SIGTERM cancels the run.

The same module parses a papermill output notebook (:func:`failure_from_output`) for the
Kubernetes backend, whose pods run papermill themselves.

spec.json: ``input`` and ``output`` notebook paths, ``parameters_file`` (JSON), ``cwd``, ``env``
(added to the environment), ``timeout_seconds``, ``retries``, ``kernel`` (optional), ``log``
path, ``run_as`` (optional: papermill and its kernel run as that user through the launcher of
:mod:`labyard_hub.isolation`, while the runner stays the platform's; what they write is read
back without following links).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..isolation import RunAs, read_user_file


def papermill_command(env: dict[str, str]) -> list[str]:
    """papermill, through Labyard's MLflow wrapper (one MLflow run per scheduled run, with the
    parameters as params and both notebooks as artifacts) when an MLflow server is configured."""
    if env.get("MLFLOW_TRACKING_URI") or os.environ.get("MLFLOW_TRACKING_URI"):
        return [sys.executable, "-m", "labyard_lab.autolog.papermill"]
    return [sys.executable, "-m", "papermill", "--no-progress-bar"]


#: the papermill engine of isolated runs: kernel channels encrypted (labyard_hub.scheduler.engine)
ISOLATED_ENGINE = "labyard"

#: papermill's own cells, not part of the notebook the user wrote
_PAPERMILL_TAGS = {"injected-parameters", "papermill-error-cell-tag"}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def failure_from_output(output: Path, owner: RunAs | None = None) -> tuple[int | None, str | None]:
    """The failing cell of a papermill output notebook: (index in the user's notebook, "Name: value").

    A cell that raised gives its error; failing that, the cell papermill was still running
    (a timeout or a killed kernel) gives ``(index, None)``. ``owner``: who wrote it.
    """
    try:
        nb = json.loads(read_user_file(output, owner) or b"{}")
    except (OSError, ValueError):
        return None, None
    index, running = 0, None
    for cell in nb.get("cells", []):
        tags = set(cell.get("metadata", {}).get("tags", []))
        if tags & _PAPERMILL_TAGS:
            continue
        for out in cell.get("outputs", []) or []:
            if out.get("output_type") == "error":
                return index, f"{out.get('ename', 'Error')}: {out.get('evalue', '')}"
        pm = cell.get("metadata", {}).get("papermill", {})
        if pm.get("exception"):
            return index, "exception"
        if pm.get("status") == "running" and running is None:
            running = index
        index += 1
    return running, None


#: held (flock) by the runner of a run for its whole life, with its pid in it: the service takes the
#: lock before it starts the runner and hands it over (the runner inherits it), so a run has one
#: runner even when the service dies between starting it and recording it
LOCK = "runner.lock"


def holder(run_dir: Path) -> int | None:
    """The pid of the runner holding ``run_dir``'s lock (0: one holds it and has not written its pid
    yet), None when no runner runs the run."""
    try:
        fd = os.open(run_dir / LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).strip()
            return int(pid) if pid.isdigit() else 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class Runner:
    def __init__(self, run_dir: Path):
        self.dir = run_dir
        self.spec = json.loads((run_dir / "spec.json").read_text())
        self.run_as = RunAs.from_json(self.spec.get("run_as"))
        self.child: subprocess.Popen | None = None
        self.cancelled = False

    def _on_term(self, signum, frame) -> None:
        self.cancelled = True
        self._kill()

    def _kill(self) -> None:
        if self.child and self.child.poll() is None:
            try:
                os.killpg(self.child.pid, signal.SIGTERM)
                try:
                    self.child.wait(5)
                except subprocess.TimeoutExpired:
                    os.killpg(self.child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def attempt(self, n: int, log) -> tuple[int, bool]:
        """One papermill execution; returns (exit code, timed out)."""
        spec = self.spec
        argv = [*papermill_command(spec.get("env", {})), spec["input"], spec["output"], "-f", spec["parameters_file"],
                "--cwd", spec["cwd"], "--log-output", "--request-save-on-cell-execute"]
        if spec.get("kernel"):
            argv += ["--kernel", spec["kernel"]]
        log.write(f"--- attempt {n} at {_now()}: {' '.join(argv)}"
                  + (f" (as uid {self.run_as.uid}, gid {self.run_as.gid})" if self.run_as else "") + "\n")
        log.flush()
        env = {**os.environ, **spec.get("env", {}), "LABYARD_RUN_ATTEMPT": str(n), "PYTHONUNBUFFERED": "1"}
        cwd = spec["cwd"]
        if self.run_as is not None:  # the launcher enters cwd as the user
            argv = self.run_as.command([*argv, "--engine", ISOLATED_ENGINE], cwd)
            env, cwd = self.run_as.environment(env), "/"
        self.child = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env=env, cwd=cwd, start_new_session=True)
        try:
            return self.child.wait(spec["timeout_seconds"]), False
        except subprocess.TimeoutExpired:
            log.write(f"--- attempt {n} timed out after {spec['timeout_seconds']}s; stopping it\n")
            self._kill()
            return self.child.wait(), True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_term)
        spec = self.spec
        started = _now()
        result: dict[str, Any] = {"started": started}
        retries = int(spec.get("retries", 0))
        with open(spec["log"], "a", buffering=1) as log:
            for n in range(1, retries + 2):
                write_json(self.dir / "state.json", {"status": "running", "attempt": n, "started": started, "pid": os.getpid()})
                code, timed_out = self.attempt(n, log)
                failed_cell, error = (None, None) if code == 0 else failure_from_output(Path(spec["output"]), self.run_as)
                if timed_out:
                    error = f"timed out after {spec['timeout_seconds']}s" + (f" (in cell {failed_cell})" if failed_cell is not None else "")
                result.update(attempts=n, exit_code=code, failed_cell=failed_cell, error=error)
                if self.cancelled:
                    result.update(status="cancelled", error="cancelled")
                    break
                if code == 0:
                    result.update(status="succeeded", failed_cell=None, error=None)
                    break
                if error is None:
                    error = f"papermill exited with {code}; see the log"
                    result["error"] = error
                result["status"] = "failed"
                log.write(f"--- attempt {n} failed: {error}\n")
            log.write(f"--- {result['status']} at {_now()}\n")
        record = Path(spec.get("env", {}).get("LABYARD_RUN_RECORD", self.dir / "record.json"))
        try:
            result["mlflow_run_id"] = json.loads(read_user_file(record, self.run_as) or b"{}").get("mlflow_run_id")
        except (OSError, ValueError, AttributeError):
            pass
        result["finished"] = _now()
        write_json(self.dir / "result.json", result)
        return 0 if result["status"] == "succeeded" else 1


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: python -m labyard_hub.scheduler.runner RUN_DIR", file=sys.stderr)
        return 2
    return Runner(Path(args[0])).run()


if __name__ == "__main__":
    sys.exit(main())
