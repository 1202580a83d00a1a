"""Settings of one Labyard installation, as ``hub_config/jupyterhub_config.py`` reads them.

``labyard up`` writes them to ``<data dir>/settings.yaml`` and points the hub at that file with
``LABYARD_SETTINGS``; an admin's config file (``labyard up --config``) has the same shape, minus
what ``labyard up`` fills in (ports, paths, secrets). See docs/admin/configuration.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

SETTINGS_ENV = "LABYARD_SETTINGS"


class KubernetesSettings(BaseModel):
    """Kubernetes mode: servers are pods in project namespaces (docs/admin/kubernetes.md)."""

    model_config = ConfigDict(extra="forbid")

    kubeconfig: Path | None = Field(None, description="kubeconfig of the cluster; None: in-cluster service account.")
    hub_namespace: str = Field("labyard", description="Namespace of the hub and proxy (network policies let them in).")
    hub_connect_url: str | None = Field(None, description="How pods reach the hub API, e.g. http://hub.labyard:8081.")
    controller_kubeconfig: Path | None = Field(None, description="kubeconfig of the project controller; None: the same as kubeconfig.")
    hub_service_account: str = Field("hub", description="Service account of the hub (granted labyard-hub-project in each project namespace).")
    scheduler_service_account: str = Field("scheduler", description="Service account of the scheduler (granted labyard-scheduler-project).")
    scheduler_kubeconfig: Path | None = Field(None, description="kubeconfig of the labyard-scheduler service; None: the same as kubeconfig.")
    image: str = Field("labyard/singleuser:0.1.0", description="Default single-user image (a project's policy may set its own).")
    image_pull_policy: str = "IfNotPresent"
    pod_labels: dict[str, str] = Field(default_factory=dict, description="Extra labels on every server pod.")
    storage_class: str | None = Field(None, description="Storage class of project and home volumes (None: the cluster default).")
    home_storage: str = "10Gi"
    start_timeout: int = Field(300, description="Seconds a server may take to start (scheduling, image pull, start).")
    controller_interval: int = Field(60, description="Seconds between two passes of the project controller.")
    delete_orphaned_namespaces: bool = Field(False, description="Delete the namespace of a project gone from LDAP (data lost!).")


class CullSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    timeout: int = Field(3600, description="Seconds idle before a server is stopped.")
    gpu_timeout: int = Field(900, description="Seconds idle before a server holding GPUs is stopped.")
    every: int = Field(60, description="Seconds between two checks.")


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data_dir: Path = Field(description="Where the hub database, logs, secrets and (local mode) project directories live.")
    bind_url: str = Field("http://127.0.0.1:8000", description="Public address of the proxy.")
    hub_port: int = 8081
    proxy_api_port: int = 8001
    scheduler_port: int = Field(8082, description="Port of the labyard-scheduler hub service (on 127.0.0.1).")
    mlflow_url: str | None = Field(None, description="Internal URL of the MLflow tracking server.")
    mlflow_proxy_port: int = Field(8090, description="Loopback port of the hub service that serves MLflow at /services/mlflow/.")
    policy_file: Path | None = Field(None, description="Project policy YAML (flavours, quotas, images).")
    ldap: dict[str, Any] = Field(
        default_factory=dict,
        description="LDAPAuthenticator settings by trait name, e.g. server_urls, lookup_bind_dn, user_search_base.",
    )
    admin_users: list[str] = []
    kubernetes: KubernetesSettings | None = None
    cull: CullSettings = Field(default_factory=CullSettings)

    @property
    def proxy_token_file(self) -> Path:
        return self.data_dir / "secrets" / "proxy-token"

    @property
    def projects_dir(self) -> Path:
        return self.data_dir / "projects"

    @property
    def homes_dir(self) -> Path:
        return self.data_dir / "homes"

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
