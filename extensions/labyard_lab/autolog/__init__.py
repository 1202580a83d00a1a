"""Automatic MLflow tracking in the kernels the platform starts (``labyard_lab.autolog``).

Loaded as an IPython extension (the wheel installs ``etc/ipython/ipython_kernel_config.json``
with ``InteractiveShellApp.extra_extensions = ["labyard_lab.autolog"]``). It does nothing unless
``LABYARD_PROJECT`` is set and neither the user (JupyterLab setting ``labyard-lab:runs`` →
``autolog: false``, or ``LABYARD_AUTOLOG=off``) nor the notebook (metadata
``{"labyard": {"autolog": false}}``) turned it off.

When on:

- MLflow in this kernel writes to a local store in the user's volume (the durable queue), set
  before anything imports MLflow: metrics, params and tags go to an append-only journal with
  group commit (:mod:`.journal`, an MLflow tracking-store plugin), runs and artifacts to
  MLflow's file store; a background thread replays it to the platform's server (see
  :mod:`.sync`). Cells never wait for the network and never see its errors.
- on GPU flavours (or when ``LABYARD_SYSTEM_METRICS=on``) every run gets MLflow's ``system/``
  metrics (CPU, memory, GPU utilisation and memory per device through NVML).
- the experiment is ``<project>/<notebook path>``; ``mlflow.autolog()`` is on for the installed
  libraries (models are not saved unless ``LABYARD_AUTOLOG_LOG_MODELS=1``: saving them is slow);
- every run gets the ``labyard.*`` provenance tags and artifacts (see :mod:`.provenance`).

Diagnostics go to ``<queue>/autolog.log``, never to a cell.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from pathlib import Path

from .config import AutologConfig, experiment_name, from_env

log = logging.getLogger("labyard.autolog")
_state: dict = {}


def _log_to_file(queue_dir: Path) -> None:
    handler = logging.FileHandler(queue_dir / "autolog.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(threadName)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


class _QuietThreads:
    """Wraps ``sys.stdout``/``sys.stderr``: what autolog's own threads write (MLflow prints
    "View run ... at", progress bars, warnings) goes to the log file, never into a cell."""

    def __init__(self, stream, name: str):
        self._stream = stream
        self._name = name

    def write(self, text):
        if threading.current_thread().name.startswith("labyard-autolog"):
            if str(text).strip():
                log.info("%s: %s", self._name, str(text).rstrip())
            return len(text)
        return self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _quiet_background_threads() -> None:
    import sys

    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _QuietThreads):
            setattr(sys, name, _QuietThreads(stream, name))


class Autolog:
    """Autolog of one kernel process."""

    def __init__(self, config: AutologConfig):
        from . import sync
        from .provenance import InputTracker, Provenance

        self.config = config
        config.queue_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        _log_to_file(config.queue_dir)
        sync.allow_local_store()
        self.store, self._owner_lock = sync.new_store(config.queue_dir)
        # before anything imports MLflow: this process logs locally, and never retries for long
        os.environ.update(sync.local_env(self.store))
        os.environ["MLFLOW_EXPERIMENT_NAME"] = config.experiment_name
        sync.quiet_client_env()
        os.environ["LABYARD_MLFLOW_URI"] = config.remote_uri  # child processes find the server
        if config.system_metrics:  # MLflow's own monitor, started by every mlflow.start_run
            os.environ["MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"] = "true"
            os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = str(config.system_metrics_interval)
        self.inputs = InputTracker(config.project_dir, exclude=(config.queue_dir,))
        self.inputs.install()
        self.provenance = Provenance(config, self.inputs)
        self.syncer = sync.Syncer(config.queue_dir, config.remote_uri, self.provenance.spool)
        self.ready = threading.Event()
        self.error: str | None = None
        self._autologged = False
        self._first_cell = True

    def start(self) -> None:
        _quiet_background_threads()
        threading.Thread(target=self._setup, name="labyard-autolog-setup", daemon=True).start()

    def _setup(self) -> None:
        """Import MLflow (seconds) off the kernel's main thread, then start the syncer.

        It creates nothing in MLflow: the experiment is made from ``MLFLOW_EXPERIMENT_NAME`` by
        MLflow itself where it is first used, and the provenance tags come from an entry point
        (:mod:`.context`). A cell may use MLflow before this thread is done (on a busy node the
        import takes longer than the first cell waits); a second creator here would race it
        (get-or-create is not atomic: one of the two would fail with "already exists")."""
        try:
            self.provenance.gather_kernel_facts()
            import mlflow  # noqa: F401

            logging.getLogger("mlflow").setLevel(logging.WARNING)
            log.info("autolog on: experiment %s, store %s, server %s", self.config.experiment_name, self.store,
                     self.config.remote_uri)
        except Exception as e:  # noqa: BLE001 - recording must never break the kernel
            self.error = f"{type(e).__name__}: {e}"
            log.exception("autolog setup failed")
        finally:
            self.ready.set()
        self.syncer.start()

    def pre_run_cell(self, *_args) -> None:
        """Switch ``mlflow.autolog()`` on, on the main thread, before the first cell runs.

        It must not run in a background thread: it registers import hooks under a lock while
        the main thread may be importing the very library it patches (a deadlock). The first
        cell waits up to 30 s for the background setup (importing MLflow takes seconds, more on
        a busy node); if that was not enough, a later cell switches it on once the setup is
        done, without waiting.
        """
        if self._autologged:
            return
        first, self._first_cell = self._first_cell, False
        if not self.ready.wait(30 if first else 0):
            return
        self._autologged = True
        if self.error:
            return
        try:
            import warnings

            import mlflow

            with warnings.catch_warnings():  # e.g. tqdm's IProgress warning: not the user's business
                warnings.simplefilter("ignore")
                mlflow.autolog(log_models=self.config.log_models, silent=True)
                try:  # autologging imports it lazily inside the user's cell, where it would warn
                    import tqdm.auto  # noqa: F401
                except ImportError:
                    pass
            # MLflow 3.17's sklearn metrics call sklearn >= 1.9 with a renamed argument
            warnings.filterwarnings("ignore", message="`y_pred` was renamed to `y_proba`", category=FutureWarning)
        except Exception as e:  # noqa: BLE001
            self.error = f"{type(e).__name__}: {e}"
            log.exception("mlflow.autolog failed")

    def post_run_cell(self, *_args) -> None:
        self.syncer.poke()

    def shutdown(self) -> None:
        try:
            import sys

            if "mlflow" in sys.modules:
                import mlflow

                if mlflow.active_run():
                    mlflow.end_run()
        except Exception:  # noqa: BLE001
            log.exception("ending the active run at exit failed")
        from .journal import commit_all

        commit_all()
        self.syncer.stop(flush_seconds=3)


class ScheduledKernel:
    """The kernel of a scheduled run (``python -m labyard_lab.autolog.papermill`` records the run;
    its kernel has ``LABYARD_AUTOLOG=off``): notes the input files the notebook reads, written
    after every cell to ``$LABYARD_KERNEL_INPUTS`` for the wrapper to fingerprint, and, with
    ``LABYARD_AUTOLOG_LIBRARIES=1`` (a reproduction of an interactive run, which had it),
    switches ``mlflow.autolog()`` on as an interactive kernel does."""

    def __init__(self, out: Path, project_dir: Path, libraries: bool):
        from .provenance import InputTracker

        self.out = out
        self.inputs = InputTracker(project_dir, exclude=(out.parent,))
        self.inputs.install()
        self.libraries = libraries

    def pre_run_cell(self, *_args) -> None:
        if not self.libraries:
            return
        self.libraries = False
        try:
            import warnings

            import mlflow

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mlflow.autolog(log_models=False, silent=True)
            warnings.filterwarnings("ignore", message="`y_pred` was renamed to `y_proba`", category=FutureWarning)
        except Exception:  # noqa: BLE001 - recording must never break the run
            log.exception("mlflow.autolog failed in a scheduled kernel")

    def post_run_cell(self, *_args) -> None:
        import json

        try:
            tmp = self.out.with_name(self.out.name + ".tmp")
            tmp.write_text(json.dumps(self.inputs.snapshot()))
            os.replace(tmp, self.out)
        except OSError:
            log.exception("cannot write the list of input files")


def load_ipython_extension(ipython) -> None:
    """IPython entry point; cheap and silent when autolog is off."""
    if "autolog" in _state:
        return
    inputs_file = os.environ.get("LABYARD_KERNEL_INPUTS")
    if inputs_file and os.environ.get("LABYARD_PROJECT_DIR"):
        kernel = ScheduledKernel(Path(inputs_file), Path(os.environ["LABYARD_PROJECT_DIR"]),
                                 os.environ.get("LABYARD_AUTOLOG_LIBRARIES") == "1")
        ipython.events.register("pre_run_cell", kernel.pre_run_cell)
        ipython.events.register("post_run_cell", kernel.post_run_cell)
        _state["scheduled"] = kernel
    config, reason = from_env()
    if config is None:
        _state["autolog"] = None
        _state["reason"] = reason
        return
    try:
        autolog = Autolog(config)
    except Exception as e:  # noqa: BLE001 - e.g. a read-only home: run without autolog
        _state["autolog"] = None
        _state["reason"] = f"could not start: {e}"
        return
    _state["autolog"] = autolog
    autolog.start()
    ipython.events.register("pre_run_cell", autolog.pre_run_cell)
    ipython.events.register("post_run_cell", autolog.post_run_cell)
    atexit.register(autolog.shutdown)


def current() -> Autolog | None:
    """The running autolog of this kernel (None when off; see :func:`why_off`)."""
    return _state.get("autolog")


def why_off() -> str:
    return _state.get("reason", "not loaded")


__all__ = ["Autolog", "AutologConfig", "current", "experiment_name", "load_ipython_extension", "why_off"]
