"""The chart's rights, tested as granted: real requests with each service account's own token.

* the project controller writes only inside ``labyard-*`` namespaces labelled as Labyard
  projects (its ClusterRole is cluster-wide; the chart's ValidatingAdmissionPolicy narrows it),
  and grants only the two per-project roles;
* the scheduler reads no pods, no pod logs and no secrets in a project namespace (a run's
  result comes from its Job alone);
* the hub writes server token Secrets but cannot read any Secret back.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from kubernetes_asyncio import client, config

from labyard_hub import demo
from labyard_hub.kube.controller import Grant, ProjectController
from labyard_hub.projects import Project

from labyard_testbed.testing import wait_for  # noqa: E402

pytestmark = [pytest.mark.k8s]

PROJECT = Project(name="rbactest", gid=20077)
NS = "labyard-rbactest"
MANIFEST_NS = {"apiVersion": "v1", "kind": "Namespace"}


def as_sa(tb, kubeconfig: str, *args: str, input: str | None = None):
    """kubectl with a service account's own token (never the admin's)."""
    return tb.kubectl("--kubeconfig", kubeconfig, *args, input=input, check=False)


def refused(result, by: str) -> bool:
    return result.returncode != 0 and by in result.stderr


async def _reconcile(kubeconfig: str) -> None:
    api = await config.new_client_from_config(config_file=kubeconfig)
    try:
        grants = [Grant("labyard-hub", "labyard-hub-project", "hub", "labyard"),
                  Grant("labyard-scheduler", "labyard-scheduler-project", "scheduler", "labyard")]

        async def projects():
            return [PROJECT]

        await ProjectController(api, projects, demo.policy(), "labyard", grants).reconcile(PROJECT)
    finally:
        await api.close()


@pytest.fixture(scope="module")
def project_ns(k8s_testbed, service_accounts):
    """A project namespace made by the real controller code, under the controller's account."""
    asyncio.run(_reconcile(service_accounts["project-controller"]))
    wait_for(lambda: k8s_testbed.api.get(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/rolebindings/labyard-scheduler"),
             30, "the scheduler's role binding")
    yield NS
    k8s_testbed.kubectl("delete", "namespace", NS, "--wait=false", check=False)


def test_the_controller_writes_only_in_labyard_project_namespaces(k8s_testbed, service_accounts, project_ns):
    tb, ctl = k8s_testbed, service_accounts["project-controller"]
    vap = "ValidatingAdmissionPolicy 'labyard-project-controller'"
    # its own namespace and what it keeps there: allowed (the fixture made them with this account)
    assert as_sa(tb, ctl, "create", "quota", "extra", "--hard=pods=5", "-n", project_ns).returncode == 0
    # anything outside: refused by the policy, although RBAC would allow it
    other = {**MANIFEST_NS, "metadata": {"name": "not-labyard", "labels": {"app.kubernetes.io/name": "labyard",
                                                                          "app.kubernetes.io/component": "project"}}}
    assert refused(as_sa(tb, ctl, "create", "-f", "-", input=json.dumps(other)), vap)
    unlabelled = {**MANIFEST_NS, "metadata": {"name": "labyard-unlabelled"}}
    assert refused(as_sa(tb, ctl, "create", "-f", "-", input=json.dumps(unlabelled)), vap)
    assert refused(as_sa(tb, ctl, "label", "namespace", "kube-system", "app.kubernetes.io/name=labyard",
                         "app.kubernetes.io/component=project"), vap)
    assert refused(as_sa(tb, ctl, "create", "rolebinding", "x", "--clusterrole=labyard-hub-project",
                         "--serviceaccount=labyard:hub", "-n", "kube-system"), vap)
    assert refused(as_sa(tb, ctl, "create", "quota", "q", "--hard=pods=1", "-n", "default"), vap)
    # inside its namespaces it grants the per-project roles and nothing else (RBAC alone would let it
    # bind its own ClusterRole, whose rights it holds)
    assert refused(as_sa(tb, ctl, "create", "rolebinding", "y", "--clusterrole=labyard-project-controller",
                         "--serviceaccount=labyard:hub", "-n", project_ns), vap)
    assert refused(as_sa(tb, ctl, "create", "rolebinding", "z", "--clusterrole=cluster-admin",
                         "--serviceaccount=labyard:hub", "-n", project_ns), "forbidden")  # RBAC's own escalation check
    # and no namespace it did not make may be turned into one of "its" namespaces
    assert refused(as_sa(tb, ctl, "label", "namespace", "default", "app.kubernetes.io/component=project",
                         "app.kubernetes.io/name=labyard"), vap)
    labels = tb.api.get("/api/v1/namespaces/default")["metadata"].get("labels", {})
    assert "app.kubernetes.io/component" not in labels


def test_the_scheduler_reads_no_pods_logs_or_secrets(k8s_testbed, service_accounts, project_ns):
    tb, sched = k8s_testbed, service_accounts["scheduler"]
    for args in (("get", "pods"), ("get", "secrets"), ("get", "pods/anything"), ("logs", "anything"),
                 ("get", "events")):
        r = as_sa(tb, sched, *args, "-n", project_ns)
        assert refused(r, "forbidden"), (args, r.stdout, r.stderr)
    # what it needs: Jobs, CronJobs (create, update for edit and resume, patch for suspend), ConfigMaps,
    # the quota (its sign that the controller has set the project up)
    for verb, what in (("list", "jobs.batch"), ("create", "jobs.batch"), ("patch", "jobs.batch"),
                       ("create", "cronjobs.batch"), ("update", "cronjobs.batch"), ("patch", "cronjobs.batch"),
                       ("delete", "cronjobs.batch"), ("list", "configmaps"), ("update", "configmaps"),
                       ("get", "resourcequotas")):
        assert as_sa(tb, sched, "auth", "can-i", verb, what, "-n", project_ns).stdout.strip() == "yes", (verb, what)
    for verb, what in (("get", "pods"), ("list", "pods"), ("get", "pods/log"), ("get", "secrets"), ("delete", "jobs.batch")):
        assert as_sa(tb, sched, "auth", "can-i", verb, what, "-n", project_ns).stdout.strip() == "no", (verb, what)
    # and nothing outside project namespaces
    assert as_sa(tb, sched, "auth", "can-i", "create", "jobs.batch", "-n", "default").stdout.strip() == "no"


def test_the_hub_writes_server_token_secrets_but_reads_none(k8s_testbed, service_accounts, project_ns):
    tb, hub = k8s_testbed, service_accounts["hub"]
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "jupyter-x-token", "namespace": project_ns},
              "stringData": {"JUPYTERHUB_API_TOKEN": "t"}}
    assert as_sa(tb, hub, "create", "-f", "-", input=json.dumps(secret)).returncode == 0
    assert refused(as_sa(tb, hub, "get", "secret", "jupyter-x-token", "-n", project_ns), "forbidden")
    assert refused(as_sa(tb, hub, "get", "secrets", "-n", project_ns), "forbidden")
    assert as_sa(tb, hub, "replace", "-f", "-", input=json.dumps(secret)).returncode == 0
    assert as_sa(tb, hub, "delete", "secret", "jupyter-x-token", "-n", project_ns).returncode == 0
    assert refused(as_sa(tb, hub, "create", "-f", "-", input=json.dumps({**secret, "metadata": {**secret["metadata"], "namespace": "default"}})),
                   "forbidden")


def test_the_controller_cannot_touch_servers_or_runs(k8s_testbed, service_accounts, project_ns):
    tb, ctl = k8s_testbed, service_accounts["project-controller"]
    for verb, what in (("get", "pods"), ("create", "pods"), ("get", "secrets"), ("create", "jobs.batch"),
                       ("delete", "namespaces")):
        assert as_sa(tb, ctl, "auth", "can-i", verb, what, "-n", project_ns).stdout.strip() == "no", (verb, what)


def test_the_quota_covers_a_mig_flavour(k8s_testbed, service_accounts, project_ns):
    """The controller's quota names every GPU resource of the project's flavours (a MIG slice too)."""
    from labyard_hub.projects import ProjectPolicy

    policy = ProjectPolicy.model_validate({
        "flavors": {"cpu": {}, "mig": {"gpus": 1, "gpu_resource": "nvidia.com/mig-1g.10gb"}, "a100": {"gpus": 1}},
        "projects": {"rbactest": {"flavors": ["cpu", "mig", "a100"], "quota": {"gpus": 1}}},
    })

    async def go():
        api = await config.new_client_from_config(config_file=service_accounts["project-controller"])
        try:
            controller = ProjectController(api, None, policy, "labyard", [])
            await controller.reconcile(PROJECT)
            quota = await client.CoreV1Api(api).read_namespaced_resource_quota("labyard-quota", NS)
        finally:
            await api.close()
        return quota.spec.hard

    hard = asyncio.run(go())
    assert hard["requests.nvidia.com/gpu"] == "1" and hard["requests.nvidia.com/mig-1g.10gb"] == "1"
