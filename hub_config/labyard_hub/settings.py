"""Settings of one Labyard installation, as ``hub_config/jupyterhub_config.py`` reads them.

``labyard up`` writes them to ``<data dir>/settings.yaml`` and points the hub at that file with
``LABYARD_SETTINGS``; an admin's config file (``labyard up --config``) has the same shape, minus
what ``labyard up`` fills in (ports, paths, secrets). See docs/admin/configuration.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

SETTINGS_ENV = "LABYARD_SETTINGS"


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data_dir: Path = Field(description="Where the hub database, logs, secrets and (local mode) project directories live.")
    bind_url: str = Field("http://127.0.0.1:8000", description="Public address of the proxy.")
    hub_port: int = 8081
    proxy_api_port: int = 8001
    mlflow_url: str | None = Field(None, description="Internal URL of the MLflow tracking server.")
    spawner: Literal["local", "kubernetes"] = "local"
    policy_file: Path | None = Field(None, description="Project policy YAML (flavours, quotas, images).")
    ldap: dict[str, Any] = Field(
        default_factory=dict,
        description="LDAPAuthenticator settings by trait name, e.g. server_urls, lookup_bind_dn, user_search_base.",
    )
    admin_users: list[str] = []

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
