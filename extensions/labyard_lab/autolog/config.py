"""Whether autolog is on for this kernel, and where things are: read from the environment and files.

Everything here is cheap (no MLflow import) so that a kernel where autolog is off pays nothing.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

#: JupyterLab plugin whose user settings carry the per-user switch (``"autolog": false``)
SETTINGS_PLUGIN = ("labyard-lab", "runs.jupyterlab-settings")
OFF_VALUES = {"0", "false", "off", "no"}
ON_VALUES = {"1", "true", "on", "yes"}
#: MLflow's default sampling interval of system metrics, in seconds
SYSTEM_METRICS_INTERVAL = 10.0


@dataclass(frozen=True)
class AutologConfig:
    """What one kernel needs to know to record its work.

    Attributes:
        project: the Labyard project (``LABYARD_PROJECT``).
        user: the hub user (``JUPYTERHUB_USER``).
        remote_uri: the platform's MLflow server (``MLFLOW_TRACKING_URI`` as the spawner set it).
        project_dir: the project's working directory (notebook paths are relative to it).
        notebook_path: absolute path of the notebook this kernel belongs to, if known.
        queue_dir: durable local queue root (``$LABYARD_AUTOLOG_QUEUE`` or ``~/.labyard/mlflow-queue``).
        log_models: also let ``mlflow.autolog`` save fitted models (off by default: it is slow).
        system_metrics: sample CPU, memory, disk, network and (where NVML is present) GPU
            metrics into every run (see :func:`system_metrics`).
        system_metrics_interval: seconds between two samples.
    """

    project: str
    user: str
    remote_uri: str
    project_dir: Path
    notebook_path: Path | None
    queue_dir: Path
    log_models: bool = False
    system_metrics: bool = False
    system_metrics_interval: float = SYSTEM_METRICS_INTERVAL

    @property
    def notebook_relpath(self) -> str:
        """The notebook's path inside the project (``"analysis/fit.ipynb"``), or ``"console"``."""
        if self.notebook_path is None:
            return "console"
        try:
            return self.notebook_path.relative_to(self.project_dir).as_posix()
        except ValueError:
            return self.notebook_path.name

    @property
    def experiment_name(self) -> str:
        return experiment_name(self.project, self.notebook_relpath)


def experiment_name(project: str, notebook: str) -> str:
    """The one MLflow experiment of a notebook: ``<project>/<notebook path in the project>``."""
    return f"{project}/{notebook.lstrip('/')}"


def default_queue_dir(env: dict[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("LABYARD_AUTOLOG_QUEUE"):
        return Path(env["LABYARD_AUTOLOG_QUEUE"])
    return Path(env.get("HOME") or Path.home()) / ".labyard" / "mlflow-queue"


def system_metrics(env: dict[str, str] | None = None, *, scheduled: bool = False) -> tuple[bool, float]:
    """Whether runs get MLflow's ``system/`` metrics, and the sampling interval in seconds.

    ``LABYARD_SYSTEM_METRICS=on|off`` decides; unset, they are on for scheduled runs (one long
    run per notebook) and for interactive kernels of a GPU flavour (``LABYARD_GPUS`` > 0, set
    by the spawner), off for interactive CPU kernels, whose many short autologged runs would
    each get a sampling thread for nothing. ``LABYARD_SYSTEM_METRICS_INTERVAL`` (default 10).
    """
    env = os.environ if env is None else env
    switch = env.get("LABYARD_SYSTEM_METRICS", "").strip().lower()
    try:
        gpus = int(env.get("LABYARD_GPUS") or 0)
    except ValueError:
        gpus = 0
    on = switch in ON_VALUES or (switch not in OFF_VALUES and (scheduled or gpus > 0))
    try:
        interval = float(env.get("LABYARD_SYSTEM_METRICS_INTERVAL") or SYSTEM_METRICS_INTERVAL)
    except ValueError:
        interval = SYSTEM_METRICS_INTERVAL
    return on, max(interval, 0.1)


def _loads_lenient(text: str) -> dict:
    """JupyterLab settings files are JSON5-ish (comments, trailing commas); read the common cases."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"(^|\s)//[^\n]*", r"\1", text)
    text = re.sub(r",(\s*[}\]])", r"\1", text)
    try:
        return json.loads(text)
    except ValueError:
        return {}


def user_setting_enabled(env: dict[str, str] | None = None) -> bool:
    """The user's switch: JupyterLab setting ``autolog`` of plugin ``labyard-lab:runs`` (default on)."""
    env = os.environ if env is None else env
    root = Path(env["JUPYTERLAB_SETTINGS_DIR"]) if env.get("JUPYTERLAB_SETTINGS_DIR") else (
        Path(env.get("HOME") or Path.home()) / ".jupyter" / "lab" / "user-settings"
    )
    path = root.joinpath(*SETTINGS_PLUGIN)
    try:
        data = _loads_lenient(path.read_text())
    except OSError:
        return True
    return data.get("autolog", True) is not False


def notebook_enabled(notebook: Path | None) -> bool:
    """The notebook's switch: metadata ``{"labyard": {"autolog": false}}`` turns autolog off."""
    if notebook is None or notebook.suffix != ".ipynb":
        return True
    try:
        meta = json.loads(notebook.read_text()).get("metadata", {})
    except (OSError, ValueError, AttributeError):
        return True
    labyard = meta.get("labyard") if isinstance(meta, dict) else None
    return not (isinstance(labyard, dict) and labyard.get("autolog") is False)


def notebook_from_env(env: dict[str, str], project_dir: Path) -> Path | None:
    """The notebook of this kernel: jupyter_server (>= 2) puts its path in ``JPY_SESSION_NAME``
    (absolute when the session has a name, else the API path relative to the server root)."""
    name = env.get("JPY_SESSION_NAME")
    if not name:
        return None
    path = Path(name)
    return path if path.is_absolute() else project_dir / path


def from_env(env: dict[str, str] | None = None) -> tuple[AutologConfig | None, str]:
    """Return ``(config, "")`` when autolog should run in this process, else ``(None, reason)``."""
    env = dict(os.environ if env is None else env)
    project = env.get("LABYARD_PROJECT")
    if not project:
        return None, "not a Labyard project kernel (LABYARD_PROJECT is not set)"
    if env.get("LABYARD_AUTOLOG", "").strip().lower() in OFF_VALUES:
        return None, "turned off by LABYARD_AUTOLOG"
    remote = env.get("LABYARD_MLFLOW_URI") or env.get("MLFLOW_TRACKING_URI")
    if not remote:
        return None, "no MLflow server configured (MLFLOW_TRACKING_URI is not set)"
    if not user_setting_enabled(env):
        return None, "turned off in the user's settings (labyard-lab:runs, autolog)"
    project_dir = Path(env.get("LABYARD_PROJECT_DIR") or os.getcwd())
    notebook = notebook_from_env(env, project_dir)
    if not notebook_enabled(notebook):
        return None, f"turned off in the notebook's metadata ({notebook})"
    sysmetrics, interval = system_metrics(env)
    return AutologConfig(
        project=project,
        user=env.get("JUPYTERHUB_USER") or env.get("USER") or "unknown",
        remote_uri=remote,
        project_dir=project_dir,
        notebook_path=notebook,
        queue_dir=default_queue_dir(env),
        log_models=env.get("LABYARD_AUTOLOG_LOG_MODELS", "").lower() in ON_VALUES,
        system_metrics=sysmetrics,
        system_metrics_interval=interval,
    ), ""
