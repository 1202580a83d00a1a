"""How the hub declares labyard-gpus: in Kubernetes mode a managed service with its role and the
home page's share; in local mode (no GPU inventory) not at all. The chart's declaration (external
service) is checked in tests/helm/test_chart.py."""

from __future__ import annotations

from pathlib import Path

import yaml
from traitlets.config import Config

from ..support.hubconfig import hub_config as load


def hub_config(tmp_path: Path, **settings) -> Config:
    secrets = tmp_path / "secrets"
    secrets.mkdir(exist_ok=True)
    for name in ("proxy-token", "mlflow.api-token"):
        (secrets / name).write_text("x" * 64)
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump({"data_dir": str(tmp_path), "gpus_port": 18083, **settings}))
    return load(path)


def test_kubernetes_mode_runs_the_service_with_minimal_scopes(tmp_path):
    kubeconfig = tmp_path / "gpus.kubeconfig"
    c = hub_config(tmp_path, kubernetes={"gpus_kubeconfig": str(kubeconfig)})
    service = next(s for s in c.JupyterHub.services if s["name"] == "labyard-gpus")
    assert service["url"] == "http://127.0.0.1:18083" and service["oauth_no_confirm"] is True
    assert service["command"][-2:] == ["-m", "labyard_hub.gpus.app"]
    assert service["environment"]["KUBECONFIG"] == str(kubeconfig)
    role = next(r for r in c.JupyterHub.load_roles if r["name"] == "labyard-gpus")
    assert role["scopes"] == ["list:users", "read:users", "read:servers", "list:groups", "read:groups"]
    user = next(r for r in c.JupyterHub.load_roles if r["name"] == "user")
    assert "access:services!service=labyard-gpus" in user["scopes"]
    assert c.JupyterHub.template_vars == {"labyard_gpus_prefix": "/services/labyard-gpus/"}


def test_local_mode_has_no_gpu_service_and_no_share_on_the_home_page(tmp_path):
    c = hub_config(tmp_path)
    assert "labyard-gpus" not in {s["name"] for s in c.JupyterHub.services}
    assert "labyard-gpus" not in {r["name"] for r in c.JupyterHub.load_roles}
    assert not any("labyard-gpus" in s for r in c.JupyterHub.load_roles for s in r["scopes"])
    assert "labyard_gpus_prefix" not in c.JupyterHub.get("template_vars", {})
