"""Settings of one Labyard installation, as ``hub_config/jupyterhub_config.py`` reads them.

``labyard up`` writes them to ``<data dir>/settings.yaml`` and points the hub at that file with
``LABYARD_SETTINGS``; an admin's config file (``labyard up --config``) has the same shape, minus
what ``labyard up`` fills in (ports, paths, secrets). See docs/admin/configuration.md.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SETTINGS_ENV = "LABYARD_SETTINGS"
log = logging.getLogger("labyard.settings")
#: where the hub's proxy routes the hub service `mlflow` (the gate serves MLflow under it)
MLFLOW_PREFIX = "/services/mlflow/"


class KubernetesSettings(BaseModel):
    """Kubernetes mode: servers are pods in project namespaces (docs/admin/kubernetes.md)."""

    model_config = ConfigDict(extra="forbid")

    kubeconfig: Path | None = Field(None, description="kubeconfig of the cluster; None: in-cluster service account.")
    hub_namespace: str = Field("labyard", description="Namespace of the hub and proxy (network policies let them in).")
    controller_kubeconfig: Path | None = Field(None, description="kubeconfig of the project controller; None: the same as kubeconfig.")
    hub_service_account: str = Field("hub", description="Service account of the hub (granted labyard-hub-project in each project namespace).")
    scheduler_service_account: str = Field("scheduler", description="Service account of the scheduler (granted labyard-scheduler-project).")
    scheduler_kubeconfig: Path | None = Field(None, description="kubeconfig of the labyard-scheduler service; None: the same as kubeconfig.")
    gpus_kubeconfig: Path | None = Field(None, description="kubeconfig of the labyard-gpus service (reads nodes, pods and quotas); None: the same as kubeconfig.")
    image: str = Field("labyard/singleuser:0.1.0", description="Default single-user image (a project's policy may set its own).")
    image_pull_policy: str = "IfNotPresent"
    pod_labels: dict[str, str] = Field(default_factory=dict, description="Extra labels on every server pod.")
    storage_class: str | None = Field(None, description="Storage class of project and home volumes (None: the cluster default).")
    home_storage: str = "10Gi"
    start_timeout: int = Field(300, description="Seconds a server may take to start (scheduling, image pull, start).")
    controller_interval: int = Field(60, description="Seconds between two passes of the project controller.")
    delete_orphaned_namespaces: bool = Field(False, description="Delete the namespace of a project gone from LDAP (data lost!).")
    project_egress: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Extra egress rules (Kubernetes NetworkPolicy egress rules) for the pods of every project namespace, "
        "e.g. a package mirror; DNS, the hub, the scheduler, MLflow and the project's own pods are always allowed.",
    )


class LocalSettings(BaseModel):
    """Local mode (no ``kubernetes:``): servers and runs are processes on this machine."""

    model_config = ConfigDict(extra="forbid")

    allow_gpu_flavors: bool = Field(
        False, description="Offer flavours with GPUs to local servers and runs (local processes get no GPU isolation).")


class SchedulerSettings(BaseModel):
    """Limits and timings of the labyard-scheduler service (docs/admin/scheduler.md)."""

    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="Largest request body the API accepts (a notebook with its outputs); larger: 413.")
    snapshot_ttl: int = Field(
        900, ge=60, description="Seconds a notebook snapshot that no schedule uses (POST inspect) is kept before it is deleted.")
    snapshots_per_user: int = Field(
        20, ge=1, description="Snapshots no schedule uses that one user may have at a time; the oldest go first.")
    reconcile_interval: int = Field(
        10, ge=1, description="Seconds between two checks of every active cron schedule against its owner's current "
                              "membership and the policy (a schedule that fails one is paused with the reason).")


class GpuSettings(BaseModel):
    """The labyard-gpus service: the admin's GPU view, GPU-hours, utilisation (docs/admin/gpus.md)."""

    model_config = ConfigDict(extra="forbid")

    poll_interval: int = Field(
        15, ge=1, description="Seconds between two reads of the cluster (nodes, pods, quotas). A pod that vanishes between "
                              "two reads without being seen ending is counted until the last read that saw it.")
    kube_timeout: float = Field(10, gt=0, description="Seconds each Kubernetes API call of a read may take; beyond, the "
                                                      "page and API answer 503 saying so until a read succeeds.")
    prometheus_url: str | None = Field(
        None, description="A Prometheus scraping NVIDIA's dcgm-exporter (with its Kubernetes pod attribution), e.g. "
                          "http://prometheus.monitoring.svc:9090: utilisation and memory per allocated GPU. None: the page "
                          "says utilisation is not configured.")
    prometheus_timeout: float = Field(5, gt=0, description="Seconds each Prometheus query may take.")
    idle_threshold: int = Field(
        1800, ge=60, description="Seconds a pod may hold its GPUs at 0 % utilisation before the page flags it "
                                 "(needs prometheus_url).")


class CullSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    timeout: int = Field(3600, ge=1, description="Seconds idle before a server is stopped.")
    gpu_timeout: int = Field(900, ge=1, description="Seconds idle before a server holding GPUs is stopped.")
    every: int = Field(60, ge=1, description="Seconds between two checks.")
    activity_interval: int = Field(
        300, ge=1,
        description="Seconds between two activity reports of a server to the hub (its JUPYTERHUB_ACTIVITY_INTERVAL; "
                    "also how often the hub reads the proxy's activity). A server's activity reaches the culler up to "
                    "this late: it must be shorter than timeout and gpu_timeout.")

    @model_validator(mode="after")
    def _reports_in_time(self) -> CullSettings:
        """A busy server whose reports come less often than its timeout would be stopped between two."""
        if self.enabled and self.activity_interval >= min(self.timeout, self.gpu_timeout):
            raise ValueError(f"cull.activity_interval ({self.activity_interval} s) must be shorter than cull.timeout "
                             f"({self.timeout} s) and cull.gpu_timeout ({self.gpu_timeout} s): busy servers would be "
                             "stopped between two activity reports")
        return self


class Settings(BaseModel):
    """One installation. Every address a component is reached at comes from here: ``labyard up``
    fills in loopback ports, the Helm chart the Services' DNS names."""

    model_config = ConfigDict(extra="forbid")

    data_dir: Path = Field(description="Where the hub database, logs, secrets and (local mode) project directories live.")
    bind_url: str = Field("http://127.0.0.1:8000", description="Public address of the proxy.")
    hub_ip: str = Field("127.0.0.1", description="Address the hub listens on; 0.0.0.0 in a pod, where the proxy and the servers reach it through its Service.")
    hub_port: int = 8081
    hub_connect_url: str | None = Field(
        None,
        description="How the proxy, the services and the servers reach the hub, e.g. http://hub.labyard.svc:8081 "
        "(None: http://127.0.0.1:<hub_port>). Replaces kubernetes.hub_connect_url.",
    )
    db_url: str | None = Field(
        None, description="The hub database (None: sqlite in <data_dir>/hub), e.g. postgresql://hub@db.example.org/jupyterhub."
    )
    secrets_dir: Path | None = Field(
        None,
        description="Directory holding the installation's secrets, one file each: proxy-token, cookie-secret, and "
        "<service>.api-token for external services (None: <data_dir>/secrets; labyard up writes them there).",
    )
    proxy_api_port: int = 8001
    proxy_api_url: str | None = Field(None, description="The proxy's REST API as the hub reaches it (None: http://127.0.0.1:<proxy_api_port>).")
    scheduler_port: int = Field(8082, description="Port of the labyard-scheduler hub service when the hub starts it (on 127.0.0.1).")
    scheduler_url: str | None = Field(
        None,
        description="The labyard-scheduler service as the hub, the proxy and the servers reach it, e.g. "
        "http://scheduler.labyard.svc:8082 (None: http://127.0.0.1:<scheduler_port>).",
    )
    gpus_port: int = Field(8083, description="Port of the labyard-gpus hub service when the hub starts it (on 127.0.0.1; Kubernetes mode).")
    gpus_url: str | None = Field(
        None, description="The labyard-gpus service as the hub and the proxy reach it, e.g. http://gpus.labyard.svc:8083 "
                          "(None: http://127.0.0.1:<gpus_port>).")
    mlflow_url: str | None = Field(None, description=(
        "Where the MLflow server (`mlflow server --app-name labyard`, the gate in front of every request) listens, "
        "as the hub's proxy reaches it, e.g. http://mlflow.labyard.svc:5000; the proxy routes /services/mlflow/ to it. "
        "Its hub API token is <secrets_dir>/mlflow.api-token."))
    mlflow_tracking_uri: str | None = Field(None, description=(
        "MLFLOW_TRACKING_URI of user servers and scheduled runs; default: mlflow_url + /services/mlflow "
        "(it must end in the service prefix: the gate serves MLflow there only)."))
    external_services: bool = Field(
        False,
        description="False: the hub starts the scheduler, the project controller and the idle culler itself "
        "(labyard up; MLflow is always its own process). True: they run on their own (the Helm chart's Deployments) and "
        "the hub only declares the ones it routes to or that call its API, with their API tokens from "
        "<secrets_dir>/<name>.api-token.",
    )
    policy_file: Path | None = Field(None, description="Project policy YAML (flavours, quotas, images).")
    ldap: dict[str, Any] = Field(
        default_factory=dict,
        description="Directory and LDAPAuthenticator settings by trait name, e.g. server_urls, lookup_bind_dn, "
                    "user_search_base, failed_login_limit (docs/admin/reference.md).",
    )
    group_sync_interval: int = Field(
        30, ge=1,
        description="Seconds between two passes of the group sync: hub groups follow LDAP projects for every hub user, "
                    "logged in or not, and servers of removed members are stopped (docs/admin/projects.md).",
    )
    admin_users: list[str] = []
    server_environment: dict[str, str] = Field(
        default_factory=dict,
        description="Extra environment variables of every user server (both modes; not of scheduled runs), e.g. "
                    "{PIP_INDEX_URL: https://pypi.example.org/simple}. Labyard's and JupyterHub's own variables "
                    "(LABYARD_*, JUPYTERHUB_*, MLFLOW_TRACKING_*) are set after these and win.",
    )
    kubernetes: KubernetesSettings | None = None
    local: LocalSettings = Field(default_factory=LocalSettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    cull: CullSettings = Field(default_factory=CullSettings)
    gpus: GpuSettings = Field(default_factory=GpuSettings)

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        """``kubernetes.hub_connect_url`` became ``hub_connect_url`` (it is not about pods only)."""
        if isinstance(data, dict) and isinstance(data.get("kubernetes"), dict) and "hub_connect_url" in data["kubernetes"]:
            data = {**data, "kubernetes": dict(data["kubernetes"])}
            old = data["kubernetes"].pop("hub_connect_url")
            log.warning("settings: kubernetes.hub_connect_url is now hub_connect_url (top level); using it from there")
            data.setdefault("hub_connect_url", old)
        return data

    @model_validator(mode="after")
    def _defaults(self) -> Settings:
        """Addresses left out are the loopback ones of a single machine."""
        self.hub_connect_url = self.hub_connect_url or f"http://127.0.0.1:{self.hub_port}"
        self.proxy_api_url = self.proxy_api_url or f"http://127.0.0.1:{self.proxy_api_port}"
        self.scheduler_url = self.scheduler_url or f"http://127.0.0.1:{self.scheduler_port}"
        self.gpus_url = self.gpus_url or f"http://127.0.0.1:{self.gpus_port}"
        self.secrets_dir = self.secrets_dir or self.data_dir / "secrets"
        self.db_url = self.db_url or f"sqlite:///{self.hub_dir / 'jupyterhub.sqlite'}"
        return self

    def secret(self, name: str) -> str:
        """The secret ``<secrets_dir>/<name>``, stripped; ValueError naming the file if it is missing."""
        path = self.secrets_dir / name
        try:
            return path.read_text().strip()
        except OSError as e:
            raise ValueError(f"Labyard secret {name!r} is missing: {path} ({e.strerror})") from e

    @property
    def proxy_token_file(self) -> Path:
        return self.secrets_dir / "proxy-token"

    @property
    def mlflow_gated_uri(self) -> str | None:
        """The tracking URI of servers and runs: the gate, under /services/mlflow."""
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri.rstrip("/")
        return f"{self.mlflow_url.rstrip('/')}{MLFLOW_PREFIX.rstrip('/')}" if self.mlflow_url else None

    @property
    def projects_dir(self) -> Path:
        return self.data_dir / "projects"

    @property
    def homes_dir(self) -> Path:
        return self.data_dir / "homes"

    @property
    def run_files_dir(self) -> Path:
        """Each local scheduled run's notebooks (input, parameters, output), its owner's alone."""
        return self.data_dir / "run-files"

    @property
    def hub_dir(self) -> Path:
        return self.data_dir / "hub"

    @classmethod
    def load(cls, path: str | Path | None = None) -> Settings:
        """Read settings from ``path`` or ``$LABYARD_SETTINGS``; raise ValueError naming the problem."""
        path = Path(path or os.environ.get(SETTINGS_ENV, ""))
        if not str(path) or not path.is_file():
            raise ValueError(f"Labyard settings file not found: {path!s} (set {SETTINGS_ENV})")
        try:
            return cls.model_validate(yaml.safe_load(path.read_text()) or {})
        except (yaml.YAMLError, ValidationError) as e:
            raise ValueError(f"invalid Labyard settings in {path}: {e}") from e

    def dump(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False))
        path.chmod(0o600)
