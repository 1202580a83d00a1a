"""Run a notebook with papermill as one MLflow run (the scheduled-runs path).

Usage (what the scheduler runs in the job's process or pod)::

    python -m labyard_lab.autolog.papermill INPUT.ipynb OUTPUT.ipynb \\
        [-p NAME VALUE]... [-y YAML] [-f PARAMS.yaml|json] [--cwd DIR] [--kernel NAME] [--engine NAME] [--run-name NAME]
        [--log-output] [--request-save-on-cell-execute] [--sync-timeout S]

Environment: ``LABYARD_PROJECT`` (required), ``JUPYTERHUB_USER`` (or ``LABYARD_USER``),
``MLFLOW_TRACKING_URI`` (the platform server), ``LABYARD_PROJECT_DIR`` (notebook paths are made
relative to it), optionally ``LABYARD_AUTOLOG_QUEUE``, and ``LABYARD_SCHEDULE_ID`` and ``LABYARD_RUN_ID`` (the
scheduler's names of the run, recorded as the tags ``labyard.schedule`` and ``labyard.scheduled_run``),
and ``LABYARD_REPRODUCE`` (JSON, set by the scheduler when the run reproduces a recorded one:
``of`` the original MLflow run id, ``changes``, ``changed_inputs``, ``warnings``,
``tolerance``, ``metrics`` (the original's), ``autolog_libraries``).

A reproduction is tagged ``labyard.reproduces = <original run id>``, ``labyard.reproduce.changes``
(``none``, or e.g. ``parameters: alpha; use_current_data``), ``labyard.reproduce.inputs`` (the
input files that changed or vanished since the original) and, when the notebook is done, its
verdict ``labyard.verdict`` (``reproduced``, ``differs`` or ``failed``) with
``labyard.verdict.detail`` (which metrics differ, and by how much): computed here, by the run
itself, so that it is recorded whatever happens to the scheduler meanwhile.

The run is recorded in the experiment ``<project>/<input notebook path>`` with the parameters as
params, the tags of an interactive run plus ``labyard.run_kind = scheduled``, and the input and
output notebooks as artifacts ``notebook/<name>`` and ``output/<name>``. Code in the notebook that
calls MLflow logs into the same run (the kernel gets ``MLFLOW_RUN_ID``). Recording goes through
the durable queue (the kernel's MLflow calls go to the journal, see :mod:`.journal`), sent to
the server while the notebook runs and until ``--sync-timeout`` after it: if the server is
unreachable the rest is replayed later by any kernel of the user (or the next scheduled run).
System metrics (``system/...``: CPU, memory and, where NVML is present, each GPU) are sampled
into the run by this process every ``LABYARD_SYSTEM_METRICS_INTERVAL`` seconds (default 10)
unless ``LABYARD_SYSTEM_METRICS=off``. The last line on stdout is JSON:
``{"local_run_id", "run_id" (null if not yet on the server), "experiment", "status"}``.
Exit status: 0 when the notebook ran, 1 when it failed, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import yaml

from .config import AutologConfig, default_queue_dir, experiment_name, system_metrics
from .provenance import Provenance, fingerprint_file
from . import journal, reproduce, sync


def latest_metrics(store: Path, run_id: str) -> dict[str, float]:
    """The latest value of each metric of ``run_id`` in every journal of ``store`` (the kernel's
    and this process's), as MLflow picks it: the highest (step, timestamp)."""
    best: dict[str, tuple] = {}

    def note(key, value, ts, step):
        point = (step, ts, value)
        if key not in best or point[:2] >= best[key][:2]:
            best[key] = point

    for path in sorted((store / journal.JOURNAL_DIR).glob("*.jsonl")):
        offset = 0
        while True:
            records, nxt, _ = journal.read_records(path, offset)
            for _, rec in records:
                if rec[0] == "m" and rec[1] == run_id:
                    note(rec[2], rec[3], rec[4], rec[5])
                elif rec[0] == "b" and rec[1] == run_id:
                    for m in rec[2]:
                        note(m[0], m[1], m[2], m[3])
            if nxt == offset:
                break
            offset = nxt
    return {k: float(v[2]) for k, v in best.items()}


def input_fingerprints(listed: Path, root: Path) -> dict | None:
    """``inputs.json`` of a scheduled run: the files its kernel read (``listed``), fingerprinted now."""
    try:
        files = json.loads(listed.read_text())
    except (OSError, ValueError):
        return None
    for entry in files:
        entry.update(fingerprint_file(root / entry["path"], entry["size"], entry["mtime_ns"]))
    return {"root": str(root), "files": files}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m labyard_lab.autolog.papermill", description=__doc__.split("\n\n")[0])
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="a parameter (value parsed as YAML, like papermill -p)")
    p.add_argument("-y", "--parameters-yaml", help="parameters as a YAML mapping")
    p.add_argument("-f", "--parameters-file", help="parameters from a YAML or JSON file")
    p.add_argument("--log-output", action="store_true", help="echo the notebook's outputs (papermill --log-output)")
    p.add_argument("--request-save-on-cell-execute", action="store_true", help="save the output notebook after every cell")
    p.add_argument("--cwd", help="working directory of the kernel (default: the input's directory)")
    p.add_argument("--kernel", help="kernel name (default: the notebook's)")
    p.add_argument("--engine", help="papermill engine (default: papermill's own)")
    p.add_argument("--run-name")
    p.add_argument("--sync-timeout", type=float, default=60, help="seconds to wait for the server (the rest stays queued)")
    return p.parse_args(argv)


def run(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.log_output:  # papermill logs the notebook's outputs to its logger, as its CLI shows them
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    env = os.environ
    project = env.get("LABYARD_PROJECT")
    remote = env.get("LABYARD_MLFLOW_URI") or env.get("MLFLOW_TRACKING_URI")
    if not project or not remote:
        print("LABYARD_PROJECT and MLFLOW_TRACKING_URI must be set", file=sys.stderr)
        return 2
    params: dict = {}
    if args.parameters_file:
        params.update(yaml.safe_load(Path(args.parameters_file).read_text()) or {})
    if args.parameters_yaml:
        params.update(yaml.safe_load(args.parameters_yaml) or {})
    for name, value in args.parameter:
        params[name] = yaml.safe_load(value)
    inp = Path(args.input).absolute()
    out = Path(args.output).absolute()
    config = AutologConfig(
        project=project, user=env.get("JUPYTERHUB_USER") or env.get("LABYARD_USER") or env.get("USER", "unknown"),
        remote_uri=remote, project_dir=Path(env.get("LABYARD_PROJECT_DIR") or inp.parent), notebook_path=inp,
        queue_dir=default_queue_dir(),
    )
    config.queue_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    sync.allow_local_store()
    sync.quiet_client_env()
    # held: the kernel ends "its" run at exit, before the output notebook is attached; no syncer
    # (ours or another process's of this user) may finish the run on the server before that
    store, owner = sync.new_store(config.queue_dir, hold=True)
    local = sync.local_env(store)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=sync.file_uri(store), registry_uri=sync.file_uri(store))
    # a scheduled run executes a snapshot; it belongs to the notebook it was made from
    notebook_rel = env.get("LABYARD_NOTEBOOK")
    experiment = experiment_name(project, notebook_rel) if notebook_rel else config.experiment_name
    exp_id = client.create_experiment(experiment)
    provenance = Provenance(config, inputs=None)
    provenance.gather_kernel_facts()
    tags = provenance.run_tags(parameters=params)
    repro = json.loads(env.get("LABYARD_REPRODUCE") or "null")
    if repro:
        tags["labyard.reproduces"] = repro["of"]
        tags["labyard.reproduce.changes"] = "; ".join(repro.get("changes") or []) or "none"
        tags["labyard.reproduce.inputs"] = ", ".join(repro.get("changed_inputs") or []) or "unchanged"
        if repro.get("warnings"):
            tags["labyard.reproduce.warnings"] = "; ".join(repro["warnings"])[:8000]
    if notebook_rel:
        tags.update({"labyard.notebook": notebook_rel, "mlflow.source.name": notebook_rel})
    tags["labyard.run_kind"] = "scheduled"
    # what the scheduler calls this run (both backends set these): an MLflow run leads back to it
    if env.get("LABYARD_SCHEDULE_ID"):
        tags["labyard.schedule"] = env["LABYARD_SCHEDULE_ID"]
    if env.get("LABYARD_RUN_ID"):
        tags["labyard.scheduled_run"] = env["LABYARD_RUN_ID"]
    r = client.create_run(exp_id, tags=tags, run_name=args.run_name)
    run_id = r.info.run_id
    for name, value in params.items():
        client.log_param(run_id, name, json.dumps(value) if not isinstance(value, str) else value)

    import papermill
    # Imported here, before any thread of ours starts: the syncer's and the system-metrics
    # threads import parts of IPython too (through MLflow), and concurrent first imports of
    # IPython's circular package race in Python 3.11's import machinery (a run failed with
    # "KeyError: 'IPython'" inside jupyter_client's kernelspec while another run's records synced)
    import IPython  # noqa: F401
    import jupyter_client.kernelspec  # noqa: F401

    # the kernel logs into this run through the journal; system metrics are this process's job
    kernel_inputs = store / "kernel-inputs.json"
    kernel_env = {**local, "MLFLOW_RUN_ID": run_id, "LABYARD_AUTOLOG": "off", "LABYARD_MLFLOW_URI": remote,
                  "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false", "LABYARD_KERNEL_INPUTS": str(kernel_inputs),
                  "LABYARD_PROJECT_DIR": str(config.project_dir),
                  "LABYARD_AUTOLOG_LIBRARIES": "1" if repro and repro.get("autolog_libraries") else "0"}
    saved = {k: os.environ.get(k) for k in kernel_env}
    os.environ.update(kernel_env)
    monitor = None
    sysmetrics, interval = system_metrics(scheduled=True)
    if sysmetrics:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, tracking_uri=local["MLFLOW_TRACKING_URI"])
        monitor.start()
    syncer = sync.Syncer(config.queue_dir, remote, provenance.spool)
    syncer.start()  # metrics reach the server while the notebook runs
    status = "FINISHED"
    try:
        papermill.execute_notebook(str(inp), str(out), parameters=params, cwd=args.cwd or str(inp.parent),
                                   kernel_name=args.kernel, engine_name=args.engine, progress_bar=False,
                                   log_output=args.log_output,
                                   request_save_on_cell_execute=args.request_save_on_cell_execute)
    except Exception as e:  # noqa: BLE001 - PapermillExecutionError, or the kernel died
        status = "FAILED"
        print(f"notebook failed: {type(e).__name__}: {e}", file=sys.stderr)
    finally:
        if monitor is not None:
            monitor.finish()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    from .journal import commit_all

    commit_all()
    if out.exists():
        client.log_artifact(run_id, str(out), "output")
    inputs = input_fingerprints(kernel_inputs, config.project_dir)
    end_tags = {}
    if inputs is not None:
        listing = store / "inputs.json"
        listing.write_text(json.dumps(inputs, indent=1))
        client.log_artifact(run_id, str(listing))
        import hashlib

        end_tags["labyard.inputs.count"] = str(len(inputs["files"]))
        end_tags["labyard.inputs_sha256"] = hashlib.sha256(json.dumps(inputs["files"], sort_keys=True).encode()).hexdigest()
    end_tags["labyard.reproducible"] = reproduce.reproducible_tag({**tags, **end_tags})
    if repro:
        verdict, detail = reproduce.verdict(repro.get("metrics") or {}, latest_metrics(store, run_id),
                                            float(repro.get("tolerance") or 0), failed=status != "FINISHED")
        end_tags["labyard.verdict"] = verdict
        end_tags["labyard.verdict.detail"] = detail[:8000]
    for key, value in end_tags.items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id, status)
    sync.release(store)
    syncer.stop(flush_seconds=0)
    deadline = time.monotonic() + args.sync_timeout
    remote_id = None
    while True:  # we still own the store, so the syncer does not remove it under us
        # our own store only, waiting for another run's syncer that replays it right now: a
        # skipped pass would leave the output notebook behind when this process ends
        syncer.sync_all(deadline=deadline, only=store)
        rs = sync._read_json(store / "sync-state.json", {"runs": {}})["runs"].get(run_id, {})
        remote_id = rs.get("remote_id")
        if rs.get("done") or time.monotonic() > deadline:
            break
        time.sleep(1)
    owner.close()  # from now on any kernel of the user may replay (and then remove) this store
    if rs.get("done"):
        shutil.rmtree(store, ignore_errors=True)
    result = {"local_run_id": run_id, "run_id": remote_id, "experiment": experiment, "status": status}
    if env.get("LABYARD_RUN_RECORD"):  # the scheduler keeps the MLflow run id with its run
        Path(env["LABYARD_RUN_RECORD"]).write_text(json.dumps({"mlflow_run_id": remote_id, "mlflow_local_run_id": run_id}))
    print(json.dumps(result))
    return 0 if status == "FINISHED" else 1


if __name__ == "__main__":
    sys.exit(run())
