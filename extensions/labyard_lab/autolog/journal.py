"""The kernel's durable journal: an MLflow tracking store for the ``labyard-queue`` URI scheme.

Registered through MLflow's own plugin mechanism (entry point ``mlflow.tracking_store``, name
``labyard-queue``), so ``mlflow.log_metric``, ``log_params``, ``set_tag``, ``log_batch`` and every
autolog integration reach it through MLflow's client, unchanged. A store URI is
``labyard-queue:///<queue>/stores/<id>/mlruns``.

It is MLflow's file store (experiments, runs, their status, artifacts, logged models, traces: all
as MLflow keeps them) except for the hot path: metrics, params and tags are appended as one
line each to a journal file of this process (``<store>/journal/<time>-<pid>-<rand>.jsonl``)
instead of one small file write plus a ``meta.yaml`` read per point. The syncer
(:mod:`.sync`) replays the journals to the server in ``log_batch`` calls.

Durability (the *commit boundary*, also in docs/admin/mlflow.md):

- every record is written to the journal file (one ``write(2)``) before the MLflow call
  returns, so a crash of the kernel (``kill -9``, the OOM killer, a segfault) loses nothing
  that was logged;
- the group commit makes records durable against a power cut or an OS crash: ``fdatasync``
  at most ``LABYARD_AUTOLOG_COMMIT_MS`` (default 10) milliseconds after the first uncommitted
  record, or as soon as ``LABYARD_AUTOLOG_COMMIT_RECORDS`` (default 1000) are pending, in a
  background thread; a commit also starts at the end of every cell and runs, waited for, at
  exit and in :func:`commit_all`. ``LABYARD_AUTOLOG_COMMIT_MS=0`` syncs before every call
  returns (each point then costs an ``fdatasync``).

Each line is ``<crc32 of the JSON, 8 hex digits> <JSON array>\\n``. A reader stops at the
first line that is incomplete or fails its checksum (a write torn by a power cut); nothing
after it was committed.

Reads (``get_run``, ``search_runs``, ``get_metric_history``) see what this process logged:
the file store's data with the journal's on top (latest metric values, params and tags are
kept in memory; a metric history is read back from the journal).
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import threading
import time
import uuid
import weakref
import zlib
from concurrent.futures import Future
from pathlib import Path
from urllib.parse import unquote, urlparse

SCHEME = "labyard-queue"
JOURNAL_DIR = "journal"
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_stores: weakref.WeakSet = weakref.WeakSet()


def store_uri(store: Path) -> str:
    """The tracking URI of a local store directory (``labyard-queue:///.../mlruns``)."""
    return f"{SCHEME}://{(Path(store) / 'mlruns').absolute()}"


def commit_all() -> None:
    """Commit (fsync, waited for) every journal of this process."""
    for store in list(_stores):
        store.commit()


def _env_number(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


# ---- the journal file -----------------------------------------------------------------
class Journal:
    """One append-only journal file with group commit.

    ``append`` writes the record before returning (it survives the process); the committer
    thread ``fdatasync``s within ``commit_ms`` of the first uncommitted record or when
    ``commit_records`` are pending; ``commit()`` syncs now and waits.
    """

    def __init__(self, directory: Path, commit_ms: float = 10, commit_records: int = 1000):
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        self.path = directory / name
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held while we live: the syncer sees a live writer
        self.commit_ms = commit_ms
        self.commit_records = max(1, int(commit_records))
        self.written = 0  # bytes in the file
        self.records = 0
        self.synced_records = 0
        self.fsyncs = 0
        self._lock = threading.Lock()  # append order and counters
        self._sync_lock = threading.Lock()  # one fdatasync at a time
        self._cond = threading.Condition(threading.Lock())
        self._requested = False
        self._closed = False
        if commit_ms > 0:
            threading.Thread(target=self._committer, name="labyard-autolog-commit", daemon=True).start()

    def append(self, line: bytes) -> None:
        with self._lock:
            try:
                view = memoryview(line)
                while view:
                    n = os.write(self.fd, view)
                    view = view[n:]
            except OSError:
                os.ftruncate(self.fd, self.written)  # never leave a torn record before later ones
                raise
            self.written += len(line)
            self.records += 1
            pending = self.records - self.synced_records
        if self.commit_ms <= 0:
            self.commit()
        elif pending == 1 or pending == self.commit_records:
            with self._cond:
                self._cond.notify()

    def commit(self) -> None:
        """fdatasync now (if anything is pending) and return when it is done."""
        with self._sync_lock:
            with self._lock:
                target = self.records
            if target == self.synced_records or self._closed:
                return
            os.fdatasync(self.fd)
            self.synced_records = target
            self.fsyncs += 1

    def commit_soon(self) -> None:
        """Start a commit now without waiting for it (the end of a cell)."""
        with self._cond:
            self._requested = True
            self._cond.notify()

    def _committer(self) -> None:
        while True:
            with self._cond:
                while self.records == self.synced_records and not self._closed:
                    self._requested = False
                    self._cond.wait()
                if self._closed:
                    return
                deadline = time.monotonic() + self.commit_ms / 1000
                while not self._requested and self.records - self.synced_records < self.commit_records:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                self._requested = False
            try:
                self.commit()
            except OSError:
                time.sleep(self.commit_ms / 1000)

    def close(self) -> None:
        self.commit()
        with self._cond:
            self._closed = True
            self._cond.notify()
        os.close(self.fd)


def encode(record: list) -> bytes:
    payload = _encode(record).encode()
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def read_records(path: Path, offset: int = 0, max_bytes: int = 8 << 20) -> tuple[list[tuple[int, list]], int, bool]:
    """Records of a journal from ``offset``: ``([(end_offset, record), ...], next_offset, stopped)``.

    ``stopped`` is True when reading ended at an incomplete or corrupt line before the end of
    the file (a record still being written, or one torn by a crash).
    """
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(max_bytes)
    out: list[tuple[int, list]] = []
    pos = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl < 0:
            break
        line = data[pos:nl]
        try:
            if len(line) < 10 or line[8:9] != b" " or int(line[:8], 16) != zlib.crc32(line[9:]):
                raise ValueError("checksum")
            record = json.loads(line[9:])
        except ValueError:
            return out, offset + pos, True
        pos = nl + 1
        out.append((offset + pos, record))
    stopped = pos < len(data) and len(data) < max_bytes
    return out, offset + pos, stopped


def writer_alive(path: Path) -> bool:
    """Whether the process that writes this journal still lives (it holds a lock on the file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


# ---- the MLflow store -------------------------------------------------------------------
def _file_store_class():
    from mlflow.store.tracking.file_store import FileStore

    return FileStore


class _RunView:
    """What the journal holds for one run (for reads), and whether it can be logged to."""

    __slots__ = ("active", "metrics", "params", "tags", "file_params")

    def __init__(self, active: bool, file_params: dict[str, str]):
        self.active = active
        self.metrics: dict[str, tuple] = {}  # key -> (step, timestamp, value), the latest as MLflow picks it
        self.params: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.file_params = file_params

    def metric(self, key: str, point: tuple) -> None:
        cur = self.metrics.get(key)
        if cur is None or point > cur:
            self.metrics[key] = point


def _done(error: Exception | None = None):
    from mlflow.utils.async_logging.run_operations import RunOperations

    f: Future = Future()
    if error is None:
        f.set_result(None)
    else:
        f.set_exception(error)
    return RunOperations([f])


_store_cls = None


def _store_class():
    global _store_cls
    if _store_cls is None:  # it needs MLflow: defined on first use so that importing this module stays cheap
        _store_cls = _define_store()
    return _store_cls


def make_store(store_uri: str, artifact_uri: str | None = None):
    """Entry point (``mlflow.tracking_store``: ``labyard-queue``): MLflow calls it with the URI."""
    return _store_class()(store_uri, artifact_uri)


def _define_store():
    FileStore = _file_store_class()
    from mlflow.entities import LifecycleStage, Metric, Param, RunData, RunTag
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST, ErrorCode
    from mlflow.store.entities.paged_list import PagedList
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME
    from mlflow.utils.search_utils import SearchUtils
    from mlflow.utils.validation import (
        _validate_batch_log_data,
        _validate_batch_log_limits,
        _validate_metric,
        _validate_param,
        _validate_param_keys_unique,
        _validate_run_id,
        _validate_tag_name,
    )

    class JournalStore(FileStore):
        """MLflow's file store with metrics, params and tags going to a journal (see module doc)."""

        def __init__(self, store_uri: str, artifact_uri: str | None = None):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # see sync.allow_local_store
            root = Path(unquote(urlparse(store_uri).path))
            super().__init__(str(root), artifact_uri or root.absolute().as_uri())
            self.journal_dir = root.parent / JOURNAL_DIR
            self._journal: Journal | None = None
            self._views: dict[str, _RunView] = {}
            self._open_lock = threading.Lock()
            self._creating = threading.local()
            _stores.add(self)
            os.register_at_fork(after_in_child=self._forget_journal)

        # ---- journal ------------------------------------------------------------------
        def _append(self, record: list) -> None:
            line = encode(record)
            journal = self._journal or self._open()
            journal.append(line)

        def _open(self) -> Journal:
            with self._open_lock:
                if self._journal is None:
                    self._journal = Journal(self.journal_dir, _env_number("LABYARD_AUTOLOG_COMMIT_MS", 10),
                                            int(_env_number("LABYARD_AUTOLOG_COMMIT_RECORDS", 1000)))
                    atexit.register(self.commit)
                    self._commit_at_cell_end()
                return self._journal

        def _commit_at_cell_end(self) -> None:
            import sys

            ipython = sys.modules.get("IPython")
            shell = ipython.get_ipython() if ipython else None
            if shell is not None:
                shell.events.register("post_run_cell", lambda *_: self._journal and self._journal.commit_soon())

        def _forget_journal(self) -> None:
            # a forked child (a DataLoader worker...) writes a journal of its own
            if self._journal is not None:
                try:
                    os.close(self._journal.fd)
                except OSError:
                    pass
            self._journal = None
            self._open_lock = threading.Lock()

        def commit(self) -> None:
            if self._journal is not None:
                self._journal.commit()

        @property
        def journal(self) -> Journal | None:
            return self._journal

        # ---- runs ---------------------------------------------------------------------
        def _view(self, run_id: str) -> _RunView:
            view = self._views.get(run_id)
            if view is None:
                _validate_run_id(run_id)
                info = self._get_run_info(run_id)
                view = _RunView(info.lifecycle_stage == LifecycleStage.ACTIVE,
                                {p.key: p.value for p in self._get_all_params(info)})
                self._views[run_id] = view
            if not view.active:
                raise MlflowException(f"The run {run_id} must be in 'active' lifecycle_stage.",
                                      error_code=INVALID_PARAMETER_VALUE)
            return view

        def _refresh(self, run_id: str) -> None:
            view = self._views.get(run_id)
            if view is not None:
                view.active = self._get_run_info(run_id).lifecycle_stage == LifecycleStage.ACTIVE

        def create_run(self, experiment_id, user_id, start_time, tags, run_name):
            # the tags a run is created with (provenance, source, run name) stay in the file
            # store, as MLflow keeps them: the syncer sends them with the run
            self._creating.on = True
            try:
                return super().create_run(experiment_id, user_id, start_time, tags, run_name)
            finally:
                self._creating.on = False

        def delete_run(self, run_id):
            super().delete_run(run_id)
            self._refresh(run_id)

        def restore_run(self, run_id):
            super().restore_run(run_id)
            self._refresh(run_id)

        def _check_params(self, run_id: str, view: _RunView, params) -> list[Param]:
            new = []
            for p in params:
                value = self._writeable_value(p.value)
                current = view.params.get(p.key, view.file_params.get(p.key))
                if current is not None and current != value:
                    raise MlflowException(
                        f"Changing param values is not allowed. Param with key='{p.key}' was already"
                        f" logged with value='{current}' for run ID='{run_id}'. Attempted logging"
                        f" new value '{value}'.", INVALID_PARAMETER_VALUE)
                new.append(Param(p.key, value))
            return new

        # ---- the hot path -------------------------------------------------------------
        def log_metric(self, run_id, metric):
            view = self._view(run_id)
            if metric.model_id is not None or metric.dataset_name is not None:
                self.log_batch(run_id, [metric], [], [])
                return
            _validate_metric(metric.key, metric.value, metric.timestamp, metric.step)
            self._append(["m", run_id, metric.key, metric.value, metric.timestamp, metric.step])
            view.metric(metric.key, (metric.step, metric.timestamp, metric.value))

        def log_param(self, run_id, param):
            view = self._view(run_id)
            param = _validate_param(param.key, param.value)
            (param,) = self._check_params(run_id, view, [param])
            self._append(["p", run_id, param.key, param.value])
            view.params[param.key] = param.value

        def set_tag(self, run_id, tag):
            if getattr(self._creating, "on", False):
                return super().set_tag(run_id, tag)
            view = self._view(run_id)
            _validate_tag_name(tag.key)
            value = self._writeable_value(tag.value)
            if tag.key == MLFLOW_RUN_NAME:  # the file store keeps the run name in meta.yaml too
                super().set_tag(run_id, RunTag(tag.key, value))
            else:
                view.tags[tag.key] = value
            self._append(["t", run_id, tag.key, value])

        def log_batch(self, run_id, metrics, params, tags):
            view = self._view(run_id)
            metrics, params, tags = _validate_batch_log_data(metrics, params, tags)
            _validate_batch_log_limits(metrics, params, tags)
            _validate_param_keys_unique(params)
            params = self._check_params(run_id, view, params)
            tags = [RunTag(t.key, self._writeable_value(t.value)) for t in tags]
            # what the file store must know itself: metrics of logged models, the run name
            through_m = [m for m in metrics if m.model_id is not None or m.dataset_name is not None]
            through_t = [t for t in tags if t.key == MLFLOW_RUN_NAME]
            if through_m or through_t:
                super().log_batch(run_id, through_m, [], through_t)
            ms = []
            for m in metrics:
                if m.model_id is None and m.dataset_name is None:
                    ms.append([m.key, m.value, m.timestamp, m.step])
                else:
                    ms.append([m.key, m.value, m.timestamp, m.step, m.model_id, m.dataset_name, m.dataset_digest])
            self._append(["b", run_id, ms, [[p.key, p.value] for p in params], [[t.key, t.value] for t in tags]])
            for m in metrics:
                if m.model_id is None and m.dataset_name is None:
                    view.metric(m.key, (m.step, m.timestamp, m.value))
            view.params.update((p.key, p.value) for p in params)
            view.tags.update((t.key, t.value) for t in tags if t.key != MLFLOW_RUN_NAME)

        def delete_tag(self, run_id, key):
            view = self._view(run_id)
            in_journal = view.tags.pop(key, None) is not None
            try:
                super().delete_tag(run_id, key)
            except MlflowException as e:
                if not (in_journal and e.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)):
                    raise
            self._append(["d", run_id, key])

        # MLflow's asynchronous calls: the journal is already asynchronous with respect to the
        # server, so they are the synchronous ones, with their errors in the returned future
        def log_batch_async(self, run_id, metrics, params, tags):
            try:
                self.log_batch(run_id, metrics, params, tags)
            except MlflowException as e:
                return _done(e)
            return _done()

        def log_metric_async(self, run_id, metric):
            try:
                self.log_metric(run_id, metric)
            except MlflowException as e:
                return _done(e)
            return _done()

        def flush_async_logging(self):
            super().flush_async_logging()
            self.commit()

        # ---- reads: the file store's data with the journal's on top ----------------------
        def _get_run_from_info(self, run_info):
            run = super()._get_run_from_info(run_info)
            view = self._views.get(run_info.run_id)
            if view is None or not (view.metrics or view.params or view.tags):
                return run
            rid = run_info.run_id
            latest = {m.key: m for m in run.data._metric_objs}
            for key, (step, ts, value) in view.metrics.items():
                cur = latest.get(key)
                if cur is None or (step, ts, value) > (cur.step, cur.timestamp, cur.value):
                    latest[key] = Metric(key, value, ts, step, run_id=rid)
            params = {**run.data.params, **view.params}
            tags = {**run.data.tags, **view.tags}
            data = RunData(metrics=list(latest.values()), params=[Param(k, v) for k, v in params.items()],
                           tags=[RunTag(k, v) for k, v in tags.items()])
            return type(run)(run.info, data, run.inputs, run.outputs)

        def get_metric_history(self, run_id, metric_key, max_results=None, page_token=None):
            points = list(super().get_metric_history(run_id, metric_key))
            view = self._views.get(run_id)
            if view is not None and metric_key in view.metrics and self._journal is not None:
                points += self._journal_history(run_id, metric_key)
            if max_results is None:
                return PagedList(points[SearchUtils.parse_start_offset_from_page_token(page_token):], None)
            page, token = SearchUtils.paginate(points, page_token, max_results)
            return PagedList(page, token)

        def _journal_history(self, run_id: str, key: str) -> list:
            out = []
            offset = 0
            while True:
                records, offset, _ = read_records(self._journal.path, offset)
                if not records:
                    return out
                for _, r in records:
                    if r[1] != run_id:
                        continue
                    if r[0] == "m" and r[2] == key:
                        out.append(Metric(key, r[3], r[4], r[5], run_id=run_id))
                    elif r[0] == "b":
                        out += [Metric(key, m[1], m[2], m[3], run_id=run_id) for m in r[2] if m[0] == key and len(m) == 4]

    return JournalStore


def __getattr__(name: str):
    if name == "JournalStore":
        return _store_class()
    raise AttributeError(name)
