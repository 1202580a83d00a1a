"""The durable local queue and its replay to the platform's MLflow server, exactly once.

Design: the kernel's MLflow client writes to a *local* store (a directory under the user's
volume, ``<queue>/stores/<id>``), which never blocks for long and never fails because the network
is down: MLflow's file store for experiments, runs and artifacts (``mlruns/``) and an
append-only journal per process for metrics, params and tags (``journal/``, see
:mod:`.journal`). A syncer thread copies every local run to the platform server:

- the remote run is created once: its tag ``labyard.local_run_id`` names the local run, and the
  syncer looks for that tag before creating (a crash between create and saving state is safe);
- journal records are sent in order in ``log_batch`` calls, and the byte offset reached in each
  journal is saved after every call, so a record is sent again only if the process died between
  the server's answer and saving the offset; params and tags are idempotent, and the server's
  SQL store ignores a metric point identical in key, value, timestamp and step, so even that
  replay stores everything once;
- a record the server refuses as invalid (HTTP 400) is isolated and skipped, with a count and a
  log line; any other failure (server down, 401/403 from the gate while a token is renewed,
  5xx, a server too busy to answer within ``MLFLOW_HTTP_REQUEST_TIMEOUT``) leaves the queue
  where it is, to be retried with backoff in batches half the size (doubled again after each
  call that works, so a slow server still gets everything): nothing is ever dropped for it;
- params and tags the run was created with (in the file store) are sent by key, artifacts by
  path (re-uploading a path overwrites it with the same bytes);
- the remote status is set last, when the local run is over, every journal has been read to
  its end after that was seen, and everything else has arrived.

The state of each store (``sync-state.json``) is written atomically. Several kernels of a user
share the queue root: each owns one store (``owner.lock`` held while it lives; each journal is
locked by its writer) and a pass over a store holds its ``sync.lock``; any kernel replays the
stores of kernels that are gone, and removes them once everything has arrived.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from . import journal

log = logging.getLogger("labyard.autolog")

TERMINAL = {"FINISHED", "FAILED", "KILLED"}
STATUS_FILE = "status.json"
#: in a store while its owner has more to attach to runs that may already look over (the
#: papermill wrapper: its kernel ends the run at exit, before the output notebook is logged);
#: no syncer of any process finishes a run of a held store while its owner lives
HOLD_FILE = "hold"


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def file_uri(store: Path) -> str:
    """The store's file-store part as a plain MLflow URI (runs, artifacts; read by the syncer)."""
    return (store / "mlruns").absolute().as_uri()


#: what MLflow's log_batch takes in one call
MAX_METRICS, MAX_PARAMS_TAGS, MAX_ENTITIES = 1000, 100, 1000
#: the smallest batch the sender shrinks to while the server fails or is too slow to answer
MIN_ENTITIES = 10


def _http_status(e: Exception) -> int | None:
    get = getattr(e, "get_http_status_code", None)
    try:
        return get() if get else None
    except Exception:  # noqa: BLE001
        return None


def rejected(e: Exception) -> bool:
    """The server refused the request as invalid (400): retrying it can never succeed.

    Everything else (unreachable, 401/403 while the hub token is renewed, 404 from a proxy,
    5xx) means "not now": the queue waits and retries, and drops nothing.
    """
    return _http_status(e) == 400


class _Batch:
    """Entities of one run waiting for one ``log_batch`` call."""

    def __init__(self):
        self.metrics: list = []
        self.params: dict[str, str] = {}
        self.tags: dict[str, str] = {}

    def fits(self, metrics: int, params: int, tags: int, entities: int) -> bool:
        return (len(self.metrics) + metrics <= MAX_METRICS and len(self.params) + params <= MAX_PARAMS_TAGS
                and len(self.tags) + tags <= MAX_PARAMS_TAGS
                and len(self.metrics) + len(self.params) + len(self.tags) + metrics + params + tags <= entities)


def allow_local_store() -> None:
    """MLflow 3 keeps its file store in maintenance mode behind this switch. The local store uses
    it for runs and artifacts only (metrics, params and tags go to the journal); it is a private
    buffer, not the system of record, so maintenance mode is fine for it."""
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def local_env(store: Path) -> dict[str, str]:
    """The MLflow environment of a process that records into ``store``: the journal as its
    tracking store; the model registry stays MLflow's file registry inside the store (naming it
    also spares MLflow a failed ``import pyspark`` on every call, ~2 ms here)."""
    return {"MLFLOW_TRACKING_URI": journal.store_uri(store), "MLFLOW_REGISTRY_URI": file_uri(store),
            "MLFLOW_ALLOW_FILE_STORE": "true"}


def quiet_client_env() -> None:
    """Defaults for every MLflow client of ours: an unreachable server fails fast instead of
    retrying for minutes (the queue retries), and no usage telemetry leaves the premises. Behind
    the platform's authorizing gate the sender authenticates with ``MLFLOW_TRACKING_TOKEN`` if
    the spawner gave one, else with the server's own hub token (``JUPYTERHUB_API_TOKEN``, which
    jupyter_server passes to its kernels), sent by MLflow's client as ``Authorization: Bearer``."""
    hub_token = os.environ.get("JUPYTERHUB_API_TOKEN")
    if hub_token:
        os.environ.setdefault("MLFLOW_TRACKING_TOKEN", hub_token)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def new_store(queue_dir: Path, hold: bool = False) -> tuple[Path, Any]:
    """Create this process's own store; return it and the held owner lock (keep it open).
    ``hold``: no run of the store is finished on the server until :func:`release` (or until
    this process is gone)."""
    store = queue_dir / "stores" / f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    store.mkdir(parents=True)
    lock = open(store / "owner.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    if hold:
        (store / HOLD_FILE).touch()
    # only now does the store become visible to syncers (Syncer.stores lists stores with mlruns/):
    # one that saw it unowned would take it for a dead kernel's empty store and remove it
    (store / "mlruns").mkdir()
    return store, lock


def release(store: Path) -> None:
    """Everything of the held store's runs is recorded locally: syncers may finish them now."""
    (store / HOLD_FILE).unlink(missing_ok=True)


def _try_lock(path: Path):
    try:
        f = open(path, "a")
    except OSError:  # the store was removed meanwhile (another kernel replayed it to its end)
        return None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return f
    except OSError:
        f.close()
        return None


class Syncer:
    """Replays the local stores under ``queue_dir`` to the MLflow server at ``remote_uri``."""

    def __init__(self, queue_dir: Path, remote_uri: str, provenance_spool: Path | None = None):
        self.queue_dir = queue_dir
        self.remote_uri = remote_uri
        allow_local_store()
        quiet_client_env()
        self.spool = provenance_spool or queue_dir / "provenance"
        self._remote = None
        self._experiments: dict[str, str] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pass_lock = threading.Lock()
        #: entities per log_batch call: MLflow's limit, halved after every call that failed
        #: (a server too slow to answer a full batch in MLFLOW_HTTP_REQUEST_TIMEOUT still gets
        #: the queue in smaller pieces, each saved as sent), doubled after every one that worked
        self.batch_entities = MAX_ENTITIES
        self.status: dict[str, Any] = {"reachable": None, "pending_runs": 0, "last_error": None, "last_sync": None}

    # ---- thread -------------------------------------------------------------------------
    def start(self, interval: float = 1.0) -> None:
        self._thread = threading.Thread(target=self._loop, args=(interval,), name="labyard-autolog-sync", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        self._wake.set()

    def stop(self, flush_seconds: float = 3.0) -> None:
        """Stop the thread; try a last pass for at most ``flush_seconds`` (what is left stays queued)."""
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(flush_seconds)
        if not (self._thread and self._thread.is_alive()):
            self.sync_all(deadline=time.monotonic() + flush_seconds)

    def _loop(self, interval: float) -> None:
        delay = interval
        while not self._stop.is_set():
            ok = self.sync_all()
            delay = interval if ok else min(max(delay * 2, 2.0), 30.0)
            self._wake.wait(delay)
            self._wake.clear()

    # ---- one pass -----------------------------------------------------------------------
    @property
    def remote(self):
        if self._remote is None:
            from mlflow.tracking import MlflowClient

            self._remote = MlflowClient(tracking_uri=self.remote_uri)
        return self._remote

    def stores(self) -> list[Path]:
        root = self.queue_dir / "stores"
        return sorted(p for p in root.iterdir() if (p / "mlruns").is_dir()) if root.is_dir() else []

    def sync_all(self, deadline: float | None = None, only: Path | None = None) -> bool:
        """One pass over every store (``only``: over that one, waiting until the deadline for
        another process that is syncing it); True when nothing failed. Never raises."""
        with self._pass_lock:
            pending = 0
            ok = True
            for store in [only] if only is not None else self.stores():
                if deadline and time.monotonic() > deadline:
                    break
                lock = _try_lock(store / "sync.lock")
                while lock is None and only is not None and (not deadline or time.monotonic() < deadline):
                    time.sleep(0.2)  # a process run alongside replays our store right now
                    lock = _try_lock(store / "sync.lock")
                if lock is None:
                    continue  # another kernel is syncing it right now
                try:
                    pending += self._sync_store(store, deadline)
                except Exception as e:  # noqa: BLE001 - the server is down, or answered an error
                    ok = False
                    self.status["last_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    log.info("sync of %s failed: %s", store.name, e)
                    pending += 1
                finally:
                    lock.close()
            self.status.update(reachable=ok, pending_runs=pending, updated=time.time())
            if ok:
                self.status.update(last_sync=time.time(), last_error=None)
            try:
                _write_json(self.queue_dir / STATUS_FILE, self.status)
            except OSError:
                pass
            return ok

    def _sync_store(self, store: Path, deadline: float | None) -> int:
        from mlflow.tracking import MlflowClient

        local = MlflowClient(tracking_uri=file_uri(store))
        state_file = store / "sync-state.json"
        state = _read_json(state_file, {"runs": {}})
        state.setdefault("journals", {})

        def save():
            _write_json(state_file, state)

        names: dict[str, str] = {}
        metas = {m.parent.name: m for m in (store / "mlruns").glob("*/*/meta.yaml") if not m.parent.parent.name.startswith(".")}

        def remote_id(run_id: str) -> str:
            rs = state["runs"].setdefault(run_id, {})
            if not rs.get("remote_id"):
                meta = metas.get(run_id) or next((store / "mlruns").glob(f"*/{run_id}/meta.yaml"))
                exp_id = meta.parent.parent.name
                if exp_id not in names:
                    names[exp_id] = local.get_experiment(exp_id).name
                self._create_remote(local.get_run(run_id), names[exp_id], rs)
                save()
            return rs["remote_id"]

        owner = _try_lock(store / "owner.lock")  # taken: the process that owned the store is gone
        try:
            # read before any run's status: a store released after this point may have had
            # artifacts attached after this pass listed them, so this pass finishes nothing
            held = owner is None and (store / HOLD_FILE).exists()
            writers = owner is None or any(journal.writer_alive(p) for p in (store / journal.JOURNAL_DIR).glob("*.jsonl"))
            # runs first: remote run, provenance, params/tags it was created with, artifacts; their
            # status is read *before* the journals, so a run seen over has all its records in them
            over = []
            for run_id, meta in sorted(metas.items(), key=lambda kv: kv[1].stat().st_mtime):
                rs = state["runs"].setdefault(run_id, {})
                if rs.get("done"):
                    continue
                if deadline and time.monotonic() > deadline:
                    return len(metas)
                remote_id(run_id)
                run = local.get_run(run_id)
                if run.info.status not in TERMINAL and not writers:
                    # nothing can log to it any more (its kernel was killed): what MLflow calls KILLED
                    local.set_terminated(run_id, "KILLED")
                    run = local.get_run(run_id)
                if self._sync_run(local, run, rs, save):
                    over.append(run_id)
            at_end = self._sync_journals(store, state, remote_id, save, deadline)
            if at_end and not held:
                for run_id in over:
                    run = local.get_run(run_id)
                    self.remote.set_terminated(state["runs"][run_id]["remote_id"], status=run.info.status,
                                               end_time=run.info.end_time)
                    state["runs"][run_id]["done"] = True
                    save()
            pending = sum(1 for run_id in metas if not state["runs"].get(run_id, {}).get("done"))
            if owner is not None and pending == 0 and not writers and all(
                    state["journals"].get(p.name, {}).get("closed") for p in (store / journal.JOURNAL_DIR).glob("*.jsonl")):
                shutil.rmtree(store, ignore_errors=True)  # its kernel is gone and everything arrived
            return pending
        finally:
            if owner is not None:
                owner.close()

    def _experiment_id(self, name: str) -> str:
        if name not in self._experiments:
            from mlflow.exceptions import MlflowException

            exp = self.remote.get_experiment_by_name(name)
            if exp is None:
                try:
                    self._experiments[name] = self.remote.create_experiment(name)
                except MlflowException:  # created by another kernel meanwhile
                    exp = self.remote.get_experiment_by_name(name)
                    self._experiments[name] = exp.experiment_id
            else:
                self._experiments[name] = exp.experiment_id
        return self._experiments[name]

    def _create_remote(self, run, experiment: str, rs: dict) -> None:
        local_id = run.info.run_id
        exp_id = self._experiment_id(experiment)
        found = self.remote.search_runs([exp_id], filter_string=f"tags.`labyard.local_run_id` = '{local_id}'", run_view_type=3, max_results=1)
        if found:
            rs["remote_id"] = found[0].info.run_id
        else:
            r = self.remote.create_run(exp_id, start_time=run.info.start_time, run_name=run.info.run_name,
                                       tags={"labyard.local_run_id": local_id})
            rs["remote_id"] = r.info.run_id

    def _sync_run(self, local, run, rs: dict, save) -> bool:
        """Provenance, file-store params and tags, artifacts of one run; True when it is over."""
        from mlflow.entities import Param, RunTag

        remote = self.remote
        local_id = run.info.run_id
        rid = rs["remote_id"]
        over = run.info.status in TERMINAL

        # provenance spooled when the run started: notebook, packages, input fingerprints
        pid = run.data.tags.get("labyard.provenance_id")
        if pid and not rs.get("provenance"):
            self._attach_provenance(local, local_id, self.spool / pid)
            rs["provenance"] = True
            save()
            run = local.get_run(local_id)

        params_sent = rs.setdefault("params", [])
        params = [Param(k, v) for k, v in run.data.params.items() if k not in params_sent]
        tags_sent = rs.setdefault("tags", {})
        tags = [RunTag(k, v) for k, v in run.data.tags.items() if tags_sent.get(k) != v and k != "mlflow.runName"]
        for i in range(0, max(len(params), len(tags)), MAX_PARAMS_TAGS):
            remote.log_batch(rid, params=params[i:i + MAX_PARAMS_TAGS], tags=tags[i:i + MAX_PARAMS_TAGS])
        if params or tags:
            params_sent.extend(p.key for p in params)
            tags_sent.update({t.key: t.value for t in tags})
            save()

        art_root = Path(run.info.artifact_uri.removeprefix("file://"))
        sent = rs.setdefault("artifacts", {})
        if art_root.is_dir():
            for f in sorted(art_root.rglob("*")):
                if not f.is_file():
                    continue
                rel = f.relative_to(art_root).as_posix()
                st = f.stat()
                sig = f"{st.st_size}:{st.st_mtime_ns}"
                if sent.get(rel) == sig:
                    continue
                parent = str(Path(rel).parent)
                remote.log_artifact(rid, str(f), None if parent == "." else parent)
                sent[rel] = sig
                save()
        return over

    # ---- journals -----------------------------------------------------------------------
    def _sync_journals(self, store: Path, state: dict, remote_id, save, deadline: float | None) -> bool:
        """Send every journal of the store from its saved offset; True when all were read to
        their end (False: the deadline came first). A journal whose writer is gone is then
        closed for good. A record still being written (a partial last line) belongs to no run
        that was seen over: those records were all written before the run ended."""
        for path in sorted((store / journal.JOURNAL_DIR).glob("*.jsonl")):
            js = state["journals"].setdefault(path.name, {"offset": 0})
            if js.get("closed"):
                continue
            alive = journal.writer_alive(path)  # before reading: a writer gone now wrote everything
            while True:
                if deadline and time.monotonic() > deadline:
                    return False
                records, offset, stopped = journal.read_records(path, js["offset"])
                if records:
                    self._send_records(records, remote_id, js, save)
                if not records or stopped:
                    break
            if not alive:
                size = path.stat().st_size
                if js["offset"] < size:
                    log.warning("journal %s: %d bytes after offset %d are not a whole record (torn by a crash); "
                                "they were never committed", path.name, size - js["offset"], js["offset"])
                js["closed"] = True
                save()
        return True

    def _send_records(self, records: list, remote_id, js: dict, save) -> None:
        """Replay records in ``log_batch`` calls; ``js["offset"]`` moves past what the server has."""
        batches: dict[str, _Batch] = {}
        last = js["offset"]

        def flush(upto: int) -> None:
            for run_id, b in batches.items():
                self._log_batch(remote_id(run_id), b, js)
            batches.clear()
            js["offset"] = upto
            save()

        for end, r in records:
            kind, run_id = r[0], r[1]
            if kind == "d":
                flush(last)
                self._delete_tag(remote_id(run_id), r[2])
                flush(end)
                last = end
                continue
            if kind == "m":
                metrics, params, tags = [r[2:6]], [], []
            elif kind == "p":
                metrics, params, tags = [], [r[2:4]], []
            elif kind == "t":
                metrics, params, tags = [], [], [r[2:4]]
            else:  # "b"
                metrics, params, tags = r[2], r[3], r[4]
            b = batches.get(run_id)
            if b is not None and not b.fits(len(metrics), len(params), len(tags), self.batch_entities):
                flush(last)
                b = None
            if b is None:
                b = batches[run_id] = _Batch()
            b.metrics.extend(metrics)
            b.params.update((k, v) for k, v in params if k not in b.params)
            b.tags.update((k, v) for k, v in tags)
            last = end
            if sum(len(x.metrics) + len(x.params) + len(x.tags) for x in batches.values()) >= self.batch_entities:
                flush(last)
        flush(last)

    def _log_batch(self, rid: str, b: _Batch, js: dict) -> None:
        from mlflow.entities import Metric, Param, RunTag

        metrics = [Metric(m[0], m[1], m[2], m[3]) if len(m) == 4 else
                   Metric(m[0], m[1], m[2], m[3], model_id=m[4], dataset_name=m[5], dataset_digest=m[6]) for m in b.metrics]
        params = [Param(k, v) for k, v in b.params.items()]
        tags = [RunTag(k, v) for k, v in b.tags.items()]
        n = min(MAX_METRICS, self.batch_entities)  # a single record may hold a full batch
        for i in range(0, len(metrics), n):
            self._send_or_isolate(rid, metrics[i:i + n], params if i == 0 else [], tags if i == 0 else [], js)
        if not metrics:
            self._send_or_isolate(rid, [], params, tags, js)

    def _send_or_isolate(self, rid: str, metrics: list, params: list, tags: list, js: dict) -> None:
        """Send one batch; if the server refuses it as invalid, find the refused entities by
        halving the batch, skip them (counted in ``js["rejected"]``) and send the rest."""
        try:
            self.remote.log_batch(rid, metrics=metrics, params=params, tags=tags)
            self.batch_entities = min(MAX_ENTITIES, self.batch_entities * 2)
            return
        except Exception as e:
            if not rejected(e):
                self.batch_entities = max(MIN_ENTITIES, self.batch_entities // 2)
                raise
            entities = [("m", m) for m in metrics] + [("p", p) for p in params] + [("t", t) for t in tags]
            if len(entities) == 1:
                js["rejected"] = js.get("rejected", 0) + 1
                log.warning("the server refused %s %r for run %s; skipped: %s", *entities[0], rid, str(e)[:300])
                return
        half = len(entities) // 2
        for part in (entities[:half], entities[half:]):
            self._send_or_isolate(rid, [x for k, x in part if k == "m"], [x for k, x in part if k == "p"],
                                  [x for k, x in part if k == "t"], js)

    def _delete_tag(self, rid: str, key: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.remote.delete_tag(rid, key)
        except MlflowException as e:
            if _http_status(e) not in (400, 404):  # already gone (a replay), or never arrived
                raise

    def _attach_provenance(self, local, run_id: str, spool: Path) -> None:
        """Move the spooled provenance into the local run's artifacts (the artifact pass uploads
        it), fingerprinting the input files now, off the user's thread."""
        from .provenance import fingerprint_file

        if not spool.is_dir():
            return
        pending = spool / "inputs.pending.json"
        if pending.exists():
            data = _read_json(pending, {"root": "", "files": []})
            root = Path(data["root"])
            for entry in data["files"]:
                entry.update(fingerprint_file(root / entry["path"], entry["size"], entry["mtime_ns"]))
            import hashlib

            digest = hashlib.sha256(json.dumps(data["files"], sort_keys=True).encode()).hexdigest()
            (spool / "inputs.json").write_text(json.dumps(data, indent=1))
            pending.unlink()
            local.set_tag(run_id, "labyard.inputs_sha256", digest)
        for f in sorted(spool.rglob("*")):
            if f.is_file():
                parent = f.parent.relative_to(spool).as_posix()
                local.log_artifact(run_id, str(f), None if parent == "." else parent)
        shutil.rmtree(spool, ignore_errors=True)


def read_status(queue_dir: Path) -> dict:
    """What the last pass of any kernel of this user found (for the Runs panel)."""
    status = _read_json(queue_dir / STATUS_FILE, {})
    queued = 0
    root = queue_dir / "stores"
    if root.is_dir():
        for store in root.iterdir():
            state = _read_json(store / "sync-state.json", {"runs": {}})
            runs = [m for m in (store / "mlruns").glob("*/*/meta.yaml") if not m.parent.parent.name.startswith(".")]
            done = sum(1 for r in state["runs"].values() if r.get("done"))
            queued += max(0, len(runs) - done)
    status["queued_runs"] = queued
    return status
