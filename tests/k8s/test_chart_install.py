"""`helm install` and `helm upgrade` of helm/labyard against the testbed's real API server.

Real here: the API server's validation and admission of every object, Helm's release handling,
the post-install/post-upgrade hook, and the `lookup` that keeps the generated secrets across
upgrades. Simulated: the pods (kwok marks them running and their Jobs complete), so this test
proves what the chart asks of the cluster, not that the containers work; the images' smoke
tests (tests/images) and a real-node install prove that.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import yaml

from labyard_testbed.testing import wait_for  # noqa: E402

pytestmark = [pytest.mark.k8s, pytest.mark.slow]
CHART = Path(__file__).resolve().parents[2] / "helm" / "labyard"


def _deployments_available(tb, ns: str) -> dict[str, bool]:
    items = tb.api.get(f"/apis/apps/v1/namespaces/{ns}/deployments")["items"]
    return {d["metadata"]["name"]: any(c["type"] == "Available" and c["status"] == "True"
                                       for c in d.get("status", {}).get("conditions", [])) for d in items}


def _settings(tb, ns: str) -> dict:
    data = tb.api.get(f"/api/v1/namespaces/{ns}/secrets/labyard-settings")["data"]
    return yaml.safe_load(base64.b64decode(data["settings.yaml"]))


def test_install_upgrade_uninstall(k8s_testbed, k8s_namespace):
    tb, ns = k8s_testbed, k8s_namespace
    # cluster-wide RBAC objects have fixed names and other modules of this session create them
    common = ["labyard", str(CHART), "--namespace", ns, "--set", "rbac.create=false", "--wait", "--timeout", "8m"]
    for sa in ("hub", "scheduler", "project-controller", "gpus"):
        tb.kubectl("create", "serviceaccount", sa, "-n", ns)
    tb.helm("install", *common, timeout=600)
    available = wait_for(lambda: (a := _deployments_available(tb, ns)) and all(a.values()) and a, 120, "Deployments available")
    assert set(available) == {"hub", "proxy", "scheduler", "mlflow", "controller", "culler", "gpus"}
    secrets = tb.api.get(f"/api/v1/namespaces/{ns}/secrets/labyard-secrets")["data"]
    assert len(secrets) == 8  # cookie, crypt key, proxy token, and the tokens of scheduler, controller, culler, MLflow, gpus
    settings = _settings(tb, ns)
    assert settings["hub_connect_url"] == f"http://hub.{ns}.svc.cluster.local:8081"
    assert settings["cull"]["timeout"] == 3600
    hub = tb.api.get(f"/apis/apps/v1/namespaces/{ns}/deployments/hub")
    checksum = hub["spec"]["template"]["metadata"]["annotations"]["checksum/settings"]
    proxy_spec = tb.api.get(f"/apis/apps/v1/namespaces/{ns}/deployments/proxy")["spec"]["template"]

    # an upgrade with changed values and a new image tag keeps every generated secret
    tb.helm("upgrade", *common, "--set", "culler.timeout=7200", "--set", "singleuser.image.tag=0.1.1", timeout=600)
    assert tb.api.get(f"/api/v1/namespaces/{ns}/secrets/labyard-secrets")["data"] == secrets
    settings = _settings(tb, ns)
    assert settings["cull"]["timeout"] == 7200 and settings["kubernetes"]["image"] == "labyard/singleuser:0.1.1"
    hub = tb.api.get(f"/apis/apps/v1/namespaces/{ns}/deployments/hub")
    assert hub["spec"]["template"]["metadata"]["annotations"]["checksum/settings"] != checksum  # the hub restarts
    assert tb.api.get(f"/apis/apps/v1/namespaces/{ns}/deployments/proxy")["spec"]["template"] == proxy_spec  # the proxy does not
    history = tb.helm("history", "labyard", "--namespace", ns, "-o", "yaml").stdout
    assert [r["status"] for r in yaml.safe_load(history)] == ["superseded", "deployed"]

    # uninstall keeps the secrets and the databases' volumes
    tb.helm("uninstall", "labyard", "--namespace", ns, "--wait", timeout=300)
    assert tb.api.get(f"/api/v1/namespaces/{ns}/secrets/labyard-secrets")["data"] == secrets
    for pvc in ("hub-db", "mlflow-data", "gpus-data"):
        assert tb.api.get(f"/api/v1/namespaces/{ns}/persistentvolumeclaims/{pvc}")
    assert not _deployments_available(tb, ns)
