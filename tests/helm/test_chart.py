"""The chart without a cluster: lint, template, schema, manifest validation, and what it wires.

helm is the testbed's (tests/k8s/build/build.sh builds and caches it); manifests are validated
with kubernetes-validate against the Kubernetes version the testbed runs. The values files:
the defaults, and tests/helm/values-everything.yaml, which turns every option on.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from traitlets.config import Config

from labyard_hub.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "labyard"
EVERYTHING = Path(__file__).with_name("values-everything.yaml")
sys.path.insert(0, str(ROOT / "helm" / "tools"))
sys.path.insert(0, str(ROOT / "tests" / "k8s"))
import schema as chart_schema  # noqa: E402

from labyard_testbed.control import build as build_testbed  # noqa: E402
from ..support.hubconfig import hub_config  # noqa: E402

#: the Kubernetes version of the testbed (tests/k8s/build/build.sh), which we target
K8S_VERSION = re.search(r'KUBE_VERSION="?v?([0-9.]+)', (ROOT / "tests" / "k8s" / "build" / "build.sh").read_text()).group(1)
SCHEMA = json.loads((CHART / "values.schema.json").read_text())


@pytest.fixture(scope="session")
def helm() -> str:
    """The testbed's helm (built and cached by tests/k8s/build/build.sh), or $LABYARD_HELM."""
    import os

    return os.environ.get("LABYARD_HELM") or str(Path(build_testbed()) / "helm")


def render(helm: str, *values: Path, namespace: str = "labyard", extra: tuple[str, ...] = ()) -> list[dict]:
    args = [helm, "template", "labyard", str(CHART), "--namespace", namespace, *extra]
    for v in values:
        args += ["-f", str(v)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def test_schema_and_reference_are_current():
    assert chart_schema.main(["--check"]) == 0, "run: .venv/bin/python helm/tools/schema.py"


def test_schema_is_strict_draft07_and_describes_every_key():
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"] == "http://json-schema.org/draft-07/schema#"

    def walk(node: dict, where: str) -> None:
        node = chart_schema._resolve(SCHEMA, node)
        if node.get("properties") is not None:
            assert node.get("additionalProperties") is False, f"{where} accepts unknown keys"
            for key, child in node["properties"].items():
                assert chart_schema._resolve(SCHEMA, child).get("description"), f"{where}.{key} has no description"
                walk(child, f"{where}.{key}")

    walk(SCHEMA, "values")


def test_ldap_keys_are_the_directory_and_authenticator_traits():
    from labyard_hub.directory import Directory
    from labyard_hub.ldap import LDAPAuthenticator, ldap_config
    from labyard_hub.reference import _own_traits

    ldap = SCHEMA["properties"]["hub"]["properties"]["ldap"]["properties"]
    assert set(ldap) == set(_own_traits(Directory)) | set(_own_traits(LDAPAuthenticator))
    # each key reaches the class that has it (the hub and the controller read them so)
    config = ldap_config({name: prop["default"] for name, prop in ldap.items()})
    assert set(config.Directory) | set(config.LDAPAuthenticator) == set(ldap)
    bad = {"hub": {"ldap": {"server_url": "ldap://typo"}}}  # singular: not a trait
    with pytest.raises(jsonschema.ValidationError, match="server_url"):
        jsonschema.validate(bad, SCHEMA)


def test_project_policy_schema_is_the_policy_model():
    """The projectPolicy part of the schema and ProjectPolicy have the same fields, and both take the demo policy."""
    from labyard_hub import demo
    from labyard_hub.projects import Flavor, ProjectPolicy, ProjectSettings, Quota

    defs = SCHEMA["definitions"]
    assert set(defs["flavor"]["properties"]) == set(Flavor.model_fields)
    assert set(defs["projectSettings"]["properties"]) == set(ProjectSettings.model_fields)
    assert set(defs["projectSettings"]["properties"]["quota"]["properties"]) == set(Quota.model_fields)
    assert set(SCHEMA["properties"]["projectPolicy"]["properties"]) == set(ProjectPolicy.model_fields)
    policy = yaml.safe_load(demo.POLICY_FILE.read_text())
    ProjectPolicy.model_validate(policy)
    jsonschema.validate({"projectPolicy": policy}, SCHEMA)


@pytest.mark.parametrize("values", [CHART / "values.yaml", EVERYTHING], ids=["defaults", "everything"])
def test_values_validate(values):
    jsonschema.validate(yaml.safe_load(values.read_text()), SCHEMA)


def test_schema_refuses_what_it_does_not_describe():
    for bad, what in [
        ({"hub": {"db": {"type": "mysql-on-a-floppy"}}}, "mysql-on-a-floppy"),
        ({"proxy": {"service": {"tpye": "NodePort"}}}, "tpye"),
        ({"image": {"name": "x", "digest": "latest"}}, "latest"),
        ({"projectPolicy": {"flavors": {"cpu": {"cpus": 2}}}}, "cpus"),
    ]:
        with pytest.raises(jsonschema.ValidationError, match=what):
            jsonschema.validate(bad, SCHEMA)


@pytest.mark.parametrize("values", [(), (EVERYTHING,)], ids=["defaults", "everything"])
def test_helm_lint_strict(helm, values):
    args = [helm, "lint", "--strict", str(CHART), "--namespace", "labyard"]
    for v in values:
        args += ["-f", str(v)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_helm_refuses_values_outside_the_schema(helm, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("hub:\n  adminUser: [alice]\n")
    out = subprocess.run([helm, "template", "labyard", str(CHART), "-f", str(bad)], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "adminUser" in out.stderr


@pytest.mark.parametrize("values", [(), (EVERYTHING,)], ids=["defaults", "everything"])
def test_manifests_are_valid_kubernetes(helm, values):
    docs = render(helm, *values)
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {e.message} at {'.'.join(map(str, e.path))}")
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for name in ("hub", "proxy", "scheduler", "mlflow", "controller", "culler", "gpus"):
        assert ("Deployment", name) in kinds
        assert ("NetworkPolicy", name) in kinds
    if values:
        assert {("PodDisruptionBudget", n) for n in ("hub", "proxy", "scheduler", "mlflow")} <= kinds
        assert ("Ingress", "labyard") in kinds
    else:
        assert not any(k == "PodDisruptionBudget" for k, _ in kinds)
    # the gate is MLflow's own app plugin: no second Deployment or Service in front of MLflow
    assert not any("gate" in name for _, name in kinds), kinds


def _containers(docs: list[dict]):
    for d in docs:
        spec = d.get("spec", {})
        pod = spec.get("template", {}).get("spec")
        if pod:
            yield d, pod, pod["containers"]


@pytest.mark.parametrize("values", [(), (EVERYTHING,)], ids=["defaults", "everything"])
def test_pods_are_non_root_and_point_at_no_loopback(helm, values):
    docs = render(helm, *values)
    loopback = re.compile(r"127\.0\.0\.1|localhost|\[::1\]")
    for doc, pod, containers in _containers(docs):
        assert pod["securityContext"]["runAsNonRoot"] is True, doc["metadata"]["name"]
        for c in containers:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert "command" not in c, f"{doc['metadata']['name']}: set args, so that tini (the image's entry point) is PID 1"
            text = json.dumps([c.get("args", []), c.get("env", [])])
            assert not loopback.search(text), f"{doc['metadata']['name']} points at loopback: {text}"
    settings = _settings(docs)
    assert not loopback.search(json.dumps(settings)), settings


def _settings(docs: list[dict]) -> dict:
    secret = by_kind(docs, "Secret")["labyard-settings"]
    return yaml.safe_load(secret["stringData"]["settings.yaml"])


def _hub_config(settings_file: Path) -> Config:
    """Run jupyterhub_config.py as the hub would, on the chart's settings."""
    return hub_config(settings_file)


@pytest.mark.parametrize("values", [(), (EVERYTHING,)], ids=["defaults", "everything"])
def test_hub_config_from_the_rendered_settings(helm, values, tmp_path):
    """The settings the chart renders are valid Settings, and jupyterhub_config.py turns them into
    a hub that declares its external services by Service DNS name, with tokens and no command."""
    docs = render(helm, *values, namespace="labyard-test")
    raw = _settings(docs)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for key in by_kind(docs, "Secret")["labyard-secrets"]["data"]:
        (secrets / key).write_text(f"secret-of-{key}")
    raw["secrets_dir"] = str(secrets)
    # the policy ConfigMap as the hub's pod mounts it (the hub config loads it and stops on a bad one)
    assert raw["policy_file"] == "/etc/labyard/policy/policy.yaml"
    policy = tmp_path / "policy.yaml"
    policy.write_text(by_kind(docs, "ConfigMap")["labyard-policy"]["data"]["policy.yaml"])
    raw["policy_file"] = str(policy)
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump(raw))
    s = Settings.load(path)
    domain = "cluster.example" if values else "cluster.local"
    svc = f"labyard-test.svc.{domain}"
    assert s.hub_connect_url == f"http://hub.{svc}:8081"
    assert s.external_services and s.kubernetes.hub_namespace == "labyard-test"
    c = _hub_config(path)
    # bound on every address of the pod, reached by its Service name
    assert c.JupyterHub.hub_bind_url == "http://0.0.0.0:8081" and c.JupyterHub.hub_connect_url == f"http://hub.{svc}:8081"
    assert c.ConfigurableHTTPProxy.api_url == f"http://proxy-api.{svc}:8001"
    assert c.ConfigurableHTTPProxy.auth_token == "secret-of-proxy-token"
    services = {x["name"]: x for x in c.JupyterHub.services}
    assert set(services) == {"labyard-scheduler", "labyard-controller", "mlflow", "idle-culler", "labyard-gpus"}
    for name, service in services.items():
        assert "command" not in service and service["api_token"] == f"secret-of-{name}.api-token"
    assert services["labyard-scheduler"]["url"] == f"http://scheduler.{svc}:8082"
    assert services["labyard-gpus"]["url"] == s.gpus_url == f"http://gpus.{svc}:8083"
    assert s.gpus.prometheus_url == ("http://prometheus.monitoring.svc:9090" if values else None)
    assert c.JupyterHub.template_vars == {"labyard_gpus_prefix": "/services/labyard-gpus/"}
    # the proxy routes /services/mlflow/ to MLflow itself (the gate is in its process); servers and
    # runs log through the proxy (MLflow's port is closed to the project namespaces) with their own token
    assert services["mlflow"]["url"] == f"http://mlflow.{svc}:5000"
    env = c.Spawner.environment
    assert env["LABYARD_SCHEDULER_URL"] == f"http://scheduler.{svc}:8082/services/labyard-scheduler/api/"
    port = yaml.safe_load(EVERYTHING.read_text())["proxy"]["service"]["port"] if values else 80
    assert env["MLFLOW_TRACKING_URI"] == f"http://proxy-public.{svc}:{port}/services/mlflow"
    assert s.mlflow_gated_uri == env["MLFLOW_TRACKING_URI"]  # what the scheduler gives scheduled runs
    assert callable(env["MLFLOW_TRACKING_TOKEN"])  # the server's own API token
    # every service's Deployment sends the token the hub expects, from the generated Secret
    deployments = by_kind(docs, "Deployment")
    assert s.group_sync_interval == (10 if values else 30)
    # servers report their activity (busy kernels included) as often as the culler's values say
    assert s.cull.activity_interval == (240 if values else 300)
    assert env["JUPYTERHUB_ACTIVITY_INTERVAL"] == str(s.cull.activity_interval)
    assert c.JupyterHub.last_activity_interval == s.cull.activity_interval
    assert s.server_environment == ({"PIP_INDEX_URL": "https://pypi.example.org/simple"} if values else {})
    assert env.get("PIP_INDEX_URL") == s.server_environment.get("PIP_INDEX_URL")
    controller_role = next(r for r in c.JupyterHub.load_roles if r["name"] == "labyard-controller")
    assert controller_role["services"] == ["labyard-controller"] and "admin:groups" in controller_role["scopes"]
    for deployment, service in (("scheduler", "labyard-scheduler"), ("controller", "labyard-controller"), ("culler", "idle-culler"),
                                ("mlflow", "mlflow"), ("gpus", "labyard-gpus")):
        env = {e["name"]: e for e in deployments[deployment]["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["JUPYTERHUB_API_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "labyard-secrets", "key": f"{service}.api-token"}
        assert env["JUPYTERHUB_API_URL"]["value"] == f"http://hub.{svc}:8081/hub/api"
    # MLflow runs as the gate: the labyard mlflow.app of the hub image, under the service's prefix, and
    # accepts the Host the proxy passes on (the pods' proxy-public, the public host name)
    mlflow = deployments["mlflow"]["spec"]["template"]["spec"]["containers"][0]
    assert mlflow["args"][:3] == ["mlflow", "server", "--app-name=labyard"] and "--uvicorn-opts=--no-proxy-headers" in mlflow["args"]
    env = {e["name"]: e.get("value") for e in mlflow["env"]}
    assert env["JUPYTERHUB_SERVICE_PREFIX"] == "/services/mlflow/" and env["JUPYTERHUB_API_URL"] == f"http://hub.{svc}:8081/hub/api"
    hosts = env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert f"proxy-public.{svc}" in hosts and f"mlflow.{svc}:*" in hosts
    assert ("labyard.example.org" in hosts) == bool(values)


def test_secrets_are_generated_once(helm):
    docs = render(helm)
    secret = by_kind(docs, "Secret")["labyard-secrets"]
    assert set(secret["data"]) == {"cookie-secret", "crypt-key", "proxy-token", "labyard-scheduler.api-token",
                                   "labyard-controller.api-token", "idle-culler.api-token", "mlflow.api-token",
                                   "labyard-gpus.api-token"}
    import base64

    values = [base64.b64decode(v).decode() for v in secret["data"].values()]
    assert all(re.fullmatch(r"[0-9a-f]{64}", v) for v in values) and len(set(values)) == len(values)
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    template = (CHART / "templates" / "hub" / "secret.yaml").read_text()
    assert 'lookup "v1" "Secret" .Release.Namespace "labyard-secrets"' in template


def test_network_policies_let_in_only_who_needs_it(helm):
    docs = render(helm)
    netpols = by_kind(docs, "NetworkPolicy")

    def components(policy: str, port: int) -> set[str]:
        found = set()
        for rule in netpols[policy]["spec"]["ingress"]:
            if any(p["port"] == port for p in rule.get("ports", [])):
                for peer in rule.get("from", []):
                    for expr in peer.get("podSelector", {}).get("matchExpressions", []):
                        if expr["key"] == "app.kubernetes.io/component":
                            found |= set(expr["values"])
                    if "namespaceSelector" in peer:
                        found.add("projects")
        return found

    assert components("mlflow", 5000) == {"proxy", "hub", "ready"}  # not the project namespaces
    assert components("scheduler", 8082) == {"proxy", "hub", "ready", "projects"}
    assert components("proxy", 8001) == {"hub", "ready"}
    assert components("gpus", 8083) == {"proxy", "hub", "ready"}  # not the project namespaces
    assert {"proxy", "projects", "controller", "scheduler", "culler"} <= components("hub", 8081)
    assert netpols["controller"]["spec"]["ingress"] == [] and netpols["culler"]["spec"]["ingress"] == []
    # the project namespaces the controller makes carry the labels the policies select on
    from labyard_hub.kube.objects import make_namespace
    from labyard_hub.projects import Project

    labels = make_namespace(Project(name="vision", gid=20001)).metadata.labels
    selector = netpols["scheduler"]["spec"]["ingress"][0]["from"][-1]["namespaceSelector"]["matchLabels"]
    assert selector.items() <= labels.items()


def _verbs(role: dict) -> dict[str, set[str]]:
    """resource -> verbs granted by a ClusterRole (every rule, every API group)."""
    out: dict[str, set[str]] = {}
    for rule in role["rules"]:
        for resource in rule["resources"]:
            out.setdefault(resource, set()).update(rule["verbs"])
    return out


def test_rbac_is_least_privilege(helm):
    """The rules as docs/admin/kubernetes.md lists them (tests/k8s/test_rbac.py tries them with
    each service account's token): no pods or logs for the scheduler, and the schedules' MLflow
    token Secrets written, never read, by it; server token
    Secrets written, never read, by the hub; the controller held inside project namespaces by
    an admission policy."""
    docs = render(helm)
    roles = by_kind(docs, "ClusterRole")
    assert set(roles) == {"labyard-hub", "labyard-hub-project", "labyard-scheduler-project", "labyard-project-controller",
                          "labyard-gpus"}
    assert set(by_kind(docs, "ServiceAccount")) == {"hub", "scheduler", "project-controller", "gpus"}
    # labyard-gpus reads nodes, pods and quotas, nothing else (no logs, exec, Secrets, writes)
    assert _verbs(roles["labyard-gpus"]) == {"nodes": {"list"}, "pods": {"list"}, "resourcequotas": {"list"}}
    scheduler = _verbs(roles["labyard-scheduler-project"])
    assert scheduler == {"jobs": {"list", "create", "patch"}, "cronjobs": {"create", "update", "patch", "delete"},
                         "configmaps": {"get", "list", "create", "update", "delete"}, "resourcequotas": {"get"},
                         "secrets": {"create", "delete"}}
    hub = _verbs(roles["labyard-hub-project"])
    assert hub["secrets"] == {"create", "update", "delete"}
    policy = by_kind(docs, "ValidatingAdmissionPolicy")["labyard-project-controller"]
    assert "system:serviceaccount:labyard:project-controller" in policy["spec"]["matchConditions"][0]["expression"]
    assert policy["spec"]["failurePolicy"] == "Fail"
    binding = by_kind(docs, "ValidatingAdmissionPolicyBinding")["labyard-project-controller"]
    assert binding["spec"] == {"policyName": "labyard-project-controller", "validationActions": ["Deny"]}
    # with rbac.create off, none of it
    off = render(helm, extra=("--set", "rbac.create=false"))
    assert not {"ClusterRole", "ValidatingAdmissionPolicy", "ServiceAccount"} & {d["kind"] for d in off}
