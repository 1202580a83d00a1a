"""Automatic MLflow tracking in the kernels the platform starts (``labyard_lab.autolog``).

Loaded as an IPython extension (the wheel installs ``etc/ipython/ipython_kernel_config.json``
with ``InteractiveShellApp.extra_extensions = ["labyard_lab.autolog"]``). It does nothing unless
``LABYARD_PROJECT`` is set and neither the user (JupyterLab setting ``labyard-lab:runs`` →
``autolog: false``, or ``LABYARD_AUTOLOG=off``) nor the notebook (metadata
``{"labyard": {"autolog": false}}``) turned it off.

When on:

- MLflow in this kernel writes to a local store in the user's volume (the durable queue), set
  before anything imports MLflow; a background thread replays it to the platform's server
  (see :mod:`.sync`). Cells never wait for the network and never see its errors.
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
        os.environ["MLFLOW_TRACKING_URI"] = sync.store_uri(self.store)
        os.environ["MLFLOW_EXPERIMENT_NAME"] = config.experiment_name
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        os.environ["LABYARD_MLFLOW_URI"] = config.remote_uri  # child processes find the server
        self.inputs = InputTracker(config.project_dir, exclude=(config.queue_dir,))
        self.inputs.install()
        self.provenance = Provenance(config, self.inputs)
        self.syncer = sync.Syncer(config.queue_dir, config.remote_uri, self.provenance.spool)
        self.ready = threading.Event()
        self.error: str | None = None
        self._autologged = False

    def start(self) -> None:
        _quiet_background_threads()
        threading.Thread(target=self._setup, name="labyard-autolog-setup", daemon=True).start()

    def _setup(self) -> None:
        """Import MLflow (seconds) and switch autolog on, off the kernel's main thread."""
        try:
            self.provenance.gather_kernel_facts()
            import mlflow
            from mlflow.tracking.context.registry import _run_context_provider_registry

            from .provenance import context_provider

            logging.getLogger("mlflow").setLevel(logging.WARNING)
            client = mlflow.MlflowClient()
            name = self.config.experiment_name
            exp = client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp else client.create_experiment(name)
            mlflow.set_experiment(experiment_id=exp_id)
            _run_context_provider_registry.register(context_provider(self.provenance))
            log.info("autolog on: experiment %s, store %s, server %s", name, self.store, self.config.remote_uri)
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
        cell waits for the background setup only if it runs within seconds of the kernel start.
        """
        if self._autologged:
            return
        self._autologged = True
        if not self.ready.wait(30) or self.error:
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
        self.syncer.stop(flush_seconds=3)


def load_ipython_extension(ipython) -> None:
    """IPython entry point; cheap and silent when autolog is off."""
    if "autolog" in _state:
        return
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
