"""Scheduled runs on the Kubernetes testbed: the scheduler's CronJob and Job objects, created in a
real API server with the scheduler's own service account, scheduled by the real scheduler and Job
controller, and run (papermill, as alice) by the testbed's pod runner.

Also the scheduler's KubernetesBackend end to end under the chart's `scheduler` service account
(the cluster as the source of truth, across a restart; pause, resume and edit; the reconcile
pass), and the service of `labyard up --kubernetes` answering REST requests. The project
namespace is made by the real project controller under its own service account. No test here
runs the scheduler or the controller as cluster admin; the admin kubeconfig only observes.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path

import pytest
import requests
from kubernetes_asyncio.client import ApiClient

from kubernetes_asyncio import config as kube_config

from labyard_hub import demo
from labyard_hub.access import Access, StaticIdentities
from labyard_hub.kube.controller import Grant, ProjectController
from labyard_hub.projects import Identity, Project
from labyard_hub.scheduler.kube import make_cronjob, make_job, make_notebook_configmap
from labyard_hub.scheduler.models import Run, Schedule, new_id, now
from labyard_hub.scheduler.podrun import parse_result

from tests.scheduler import notebooks  # noqa: E402
from labyard_testbed.kubeapi import ApiError  # noqa: E402
from labyard_testbed.testing import wait_for  # noqa: E402

pytestmark = [pytest.mark.k8s, pytest.mark.asyncio(loop_scope="session")]

VISION = Project(name="vision", gid=20001)
ALICE = Identity(username="alice", uid=10001, gid=10000, projects=(VISION,))
BOB = Identity(username="bob", uid=10002, gid=10000, projects=(VISION,))
CAROL = Identity(username="carol", uid=10003, gid=10000, projects=(Project(name="nlp", gid=20002),))
ADMIN = Identity(username="admin", uid=10009, gid=10000, admin=True)
NS = "labyard-vision"
RUN_LOCAL = {"labyard.dev/run-local": "true"}


async def manifest(obj) -> dict:
    async with ApiClient() as api:
        body = api.sanitize_for_serialization(obj)
    kind = type(obj).__name__.removeprefix("V1")
    body.setdefault("apiVersion", "batch/v1" if kind in ("Job", "CronJob") else "v1")
    body.setdefault("kind", kind)
    return body


@pytest.fixture(scope="module")
async def project(k8s_testbed, service_accounts):
    """labyard-vision as the project controller makes it (namespace, quota, volume, the role
    bindings of the hub and the scheduler), by the real controller under its service account."""
    tb = k8s_testbed
    api = await kube_config.new_client_from_config(config_file=service_accounts["project-controller"])
    try:
        grants = [Grant("labyard-hub", "labyard-hub-project", "hub", "labyard"),
                  Grant("labyard-scheduler", "labyard-scheduler-project", "scheduler", "labyard")]
        await ProjectController(api, None, demo.policy(), "labyard", grants).reconcile(VISION)
    finally:
        await api.close()
    wait_for(lambda: tb.api.get(f"/api/v1/namespaces/{NS}/serviceaccounts/default"), 30, "the default ServiceAccount")
    return tb


def as_scheduler(tb, service_accounts, obj: dict) -> None:
    """Create an object with the scheduler's own rights (it may create, not read back)."""
    tb.kubectl("--kubeconfig", service_accounts["scheduler"], "create", "-f", "-", input=json.dumps(obj))


async def notebook_configmap(tb, service_accounts, **kw) -> str:
    content = json.dumps(notebooks.training(**kw)).encode()
    import hashlib

    sha = hashlib.sha256(content).hexdigest()
    if not tb.api.get(f"/api/v1/namespaces/{NS}/configmaps", labelSelector=f"labyard.dev/sha256={sha[:40]}")["items"]:
        as_scheduler(tb, service_accounts, await manifest(make_notebook_configmap("vision", sha, content)))
    return sha


def project_volume(tb) -> str:
    """Where the testbed keeps labyard-vision's project volume (to read what runs wrote there)."""
    pvc = tb.api.get(f"/api/v1/namespaces/{NS}/persistentvolumeclaims/project-vision")
    return tb.api.get(f"/api/v1/persistentvolumes/{pvc['spec']['volumeName']}")["spec"]["hostPath"]["path"]


def schedule(sha: str, **kw) -> Schedule:
    t = now()
    return Schedule(**{"id": new_id("s"), "name": "Training run ü", "owner": "alice", "project": "vision",
                       "notebook": "train.ipynb", "notebook_sha256": sha, "parameters": {"epochs": 3}, "flavor": "cpu",
                       "cron": "0 3 * * *", "timezone": "Europe/Berlin", "timeout_seconds": 300, "retries": 0,
                       "created": t, "updated": t, **kw})


def finished_job(tb, name: str, timeout: float = 240) -> dict:
    def done():
        job = tb.api.get(f"/apis/batch/v1/namespaces/{NS}/jobs/{name}")
        conds = {c["type"]: c["status"] for c in job.get("status", {}).get("conditions", [])}
        return job if conds.get("Complete") == "True" or conds.get("Failed") == "True" else None

    return wait_for(done, timeout, f"job {name} to finish", interval=1)


def job_pod(tb, name: str) -> dict:
    pods = tb.api.get(f"/api/v1/namespaces/{NS}/pods", labelSelector=f"job-name={name}")["items"]
    assert pods, f"no pod of job {name}"
    return pods[-1]


async def test_cronjob_for_a_gpu_schedule_runs_as_alice_with_the_gpu_limit(project, service_accounts):
    tb = project
    sha = await notebook_configmap(tb, service_accounts)
    s = schedule(sha, flavor="gpu-1")
    proj, flavor = Access(demo.policy()).authorize(ALICE, "vision", "gpu-1")
    cj = make_cronjob(s, ALICE, proj, flavor, image="labyard/singleuser:test", extra_labels=RUN_LOCAL)
    as_scheduler(tb, service_accounts, await manifest(cj))
    try:
        stored = tb.api.get(f"/apis/batch/v1/namespaces/{NS}/cronjobs/{cj.metadata.name}")
        assert stored["spec"]["schedule"] == "0 3 * * *" and stored["spec"]["timeZone"] == "Europe/Berlin"
        pod = stored["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == 10001 and pod["securityContext"]["runAsGroup"] == 20001
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        # a Job made from the CronJob's template (as `kubectl create job --from=cronjob/...` does)
        job_name = f"{cj.metadata.name[:40]}-manual"
        job = {"apiVersion": "batch/v1", "kind": "Job",
               "metadata": {"name": job_name, "namespace": NS, "labels": stored["metadata"]["labels"]},
               "spec": stored["spec"]["jobTemplate"]["spec"]}
        as_scheduler(tb, service_accounts, job)
        done = finished_job(tb, job_name)
        p = job_pod(tb, job_name)
        assert p["spec"]["nodeName"].startswith("gpu-node")  # the real scheduler put it on a GPU node
        status = {c["type"]: c["status"] for c in done["status"]["conditions"]}
        log = tb.kubectl("logs", "-n", NS, p["metadata"]["name"]).stdout
        assert status.get("Complete") == "True", log[-3000:]
        result = parse_result(log)
        assert result["exit_code"] == 0 and result["output"].endswith(f"/scheduled-runs/train/{job_name}.ipynb")
        printed = json.loads(next(line for line in log.splitlines() if line.startswith('{"epochs"')))
        # the notebook ran with its parameters, as alice with the project's group, in the project volume
        assert printed["epochs"] == 3 and printed["uid"] == 10001 and printed["gid"] == 20001
        assert printed["cwd"] == "/srv/project" and printed["token"] is None
        assert "trained baseline 3 3" in log
    finally:
        tb.kubectl("delete", "cronjob", cj.metadata.name, "-n", NS, "--ignore-not-found")
        tb.kubectl("delete", "job", "-n", NS, "-l", f"labyard.dev/schedule={s.id}", "--ignore-not-found")


async def test_failing_run_job_reports_the_failing_cell(project, service_accounts):
    """The Job fails at the pod's first non-zero exit; its Failed condition names the exit code,
    which says the cell (the scheduler reads nothing else); the full result is in the volume."""
    tb = project
    sha = await notebook_configmap(tb, service_accounts, fail_at_epoch=5)
    s = schedule(sha, cron=None)
    run = Run(id=new_id("r"), schedule_id=s.id, owner="alice", project="vision", notebook=s.notebook,
              notebook_sha256=sha, parameters={"epochs": 5}, flavor="cpu", created=now(), timeout_seconds=300, retries=0)
    proj, flavor = Access(demo.policy()).authorize(ALICE, "vision", "cpu")
    job = make_job(s, run, ALICE, proj, flavor, image="labyard/singleuser:test", extra_labels=RUN_LOCAL)
    as_scheduler(tb, service_accounts, await manifest(job))
    try:
        done = finished_job(tb, job.metadata.name)
        failed = next(c for c in done["status"]["conditions"] if c["type"] == "Failed" and c["status"] == "True")
        assert failed["reason"] == "PodFailurePolicy" and "exit code 12" in failed["message"]
        p = job_pod(tb, job.metadata.name)
        assert p["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 12
        assert len(tb.api.get(f"/api/v1/namespaces/{NS}/pods", labelSelector=f"job-name={job.metadata.name}")["items"]) == 1
        result = parse_result(tb.kubectl("logs", "-n", NS, p["metadata"]["name"]).stdout)
        assert result["failed_cell"] == 2 and result["error"] == "ValueError: diverged at epoch 5"
        saved = json.loads((Path(project_volume(tb)) / f"scheduled-runs/train/{run.id}.result.json").read_text())
        assert saved["failed_cell"] == 2 and saved["error"] == "ValueError: diverged at epoch 5"
    finally:
        tb.kubectl("delete", "job", job.metadata.name, "-n", NS, "--ignore-not-found")


async def _wait_run(backend, identity, run_id, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = await backend.get_run(identity, run_id)
        if run.status.finished:
            return run
        await asyncio.sleep(1)
    raise TimeoutError(f"run {run_id} still {run.status} after {timeout}s")


def cronjob(tb, s) -> dict:
    from labyard_hub.scheduler.kube import cronjob_name

    return tb.api.get(f"/apis/batch/v1/namespaces/{NS}/cronjobs/{cronjob_name(s)}")


async def test_kubernetes_backend_end_to_end(project, service_accounts, tmp_path):
    """The scheduler's Kubernetes backend under the chart's `scheduler` service account."""
    from labyard_hub.access import AccessError
    from labyard_hub.scheduler.backend import NotFound
    from labyard_hub.scheduler.kube import KubernetesBackend
    from labyard_hub.scheduler.models import RunCreate, ScheduleCreate, ScheduleUpdate

    people = StaticIdentities([ALICE, BOB, CAROL, ADMIN])

    def backend(data: str = "scheduler"):
        return KubernetesBackend(Access(demo.policy()), tmp_path / data, image="labyard/singleuser:test",
                                 kubeconfig=service_accounts["scheduler"], extra_labels=RUN_LOCAL, identities=people)

    nb = json.loads(json.dumps(notebooks.training(fail_at_epoch=5)))
    b = backend()
    await b.start()
    schedule_ids = []
    try:
        with pytest.raises(AccessError) as e:
            await b.create_schedule(CAROL, ScheduleCreate(project="vision", notebook="train.ipynb", notebook_content=nb))
        assert e.value.status == 403
        with pytest.raises(AccessError) as e:
            await b.create_schedule(ALICE, ScheduleCreate(project="vision", notebook="train.ipynb", notebook_content=nb,
                                                          flavor="gpu-9"))
        assert e.value.status == 400
        # run once, now: a Job; it succeeds; its result comes from the Job alone
        s1, run = await b.create_schedule(ALICE, ScheduleCreate(project="vision", notebook="train.ipynb",
                                                                notebook_content=nb, parameters={"epochs": 3}))
        schedule_ids.append(s1.id)
        done = await _wait_run(b, ALICE, run.id)
        assert done.status.value == "succeeded" and done.exit_code == 0 and done.parameters == {"epochs": 3}
        with pytest.raises(NotFound, match=f"scheduled-runs/train/{run.id}.log"):
            await b.run_log(ALICE, run.id)
        log = (Path(project_volume(project)) / f"scheduled-runs/train/{run.id}.log").read_text()
        assert "trained baseline 3 3" in log
        # same answers as local mode: another project's id is 403 (not 404), an unknown one 404
        with pytest.raises(AccessError) as e:
            await b.get_run(CAROL, run.id)
        assert e.value.status == 403
        with pytest.raises(AccessError) as e:
            await b.get_schedule(CAROL, s1.id)
        assert e.value.status == 403
        with pytest.raises(NotFound):
            await b.get_schedule(ALICE, "s-000000000000")
        # a cron schedule on a GPU flavour: a CronJob in labyard-vision; pause, resume, edit work
        s2, none = await b.create_schedule(ALICE, ScheduleCreate(project="vision", notebook="train.ipynb",
                                                                 notebook_content=nb, flavor="gpu-1", cron="0 3 * * *",
                                                                 timezone="Europe/Berlin"))
        schedule_ids.append(s2.id)
        assert none is None
        cj = cronjob(project, s2)
        assert cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001
        assert cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        await b.set_paused(ALICE, s2.id, True)
        assert cronjob(project, s2)["spec"]["suspend"] is True
        await b.set_paused(ALICE, s2.id, False)
        assert cronjob(project, s2)["spec"]["suspend"] is False
        edited = await b.update_schedule(ALICE, s2.id, ScheduleUpdate(cron="15 4 * * *", parameters={"epochs": 2}))
        assert edited.cron == "15 4 * * *" and cronjob(project, s2)["spec"]["schedule"] == "15 4 * * *"
        # admins see every project, members only theirs
        assert {s1.id, s2.id} <= {s.id for s in await b.list_schedules(ADMIN)}
        assert await b.list_schedules(CAROL) == []
        assert run.id in {r.id for r in await b.list_runs(ADMIN)}
    finally:
        await b.stop()
    # a new service instance, without the old one's files (the chart gives it no volume), finds
    # everything in the cluster, the notebook snapshots included
    b = backend("scheduler-after-restart")
    await b.start()
    try:
        ids = [s.id for s in await b.list_schedules(ALICE, "vision")]
        assert s1.id in ids and s2.id in ids
        assert [r.id for r in await b.list_runs(ALICE, schedule_id=s1.id)] == [run.id]
        # run now with other parameters (on CPU): fails in the third cell, said by the Job alone
        s1 = await b.update_schedule(ALICE, s1.id, ScheduleUpdate(flavor="cpu"))
        bad = await b.run_now(ALICE, s1.id, RunCreate(parameters={"epochs": 5}))
        failed = await _wait_run(b, ALICE, bad.id)
        assert failed.status.value == "failed" and failed.failed_cell == 2
        assert failed.error == f"the notebook failed in cell 2; see scheduled-runs/train/{bad.id}.ipynb in the project"
        await b.delete_schedule(ALICE, s2.id)
        with pytest.raises(ApiError):
            cronjob(project, s2)
    finally:
        for sid in schedule_ids:
            project.kubectl("delete", "job,cronjob,configmap", "-n", NS, "-l", f"labyard.dev/schedule={sid}", "--ignore-not-found")
        await b.stop()


async def test_the_reconcile_pass_suspends_the_cronjob_of_a_member_who_left(project, service_accounts, tmp_path):
    """bob leaves vision: the scheduler's reconcile pass suspends his CronJob with the reason
    (the CronJob controller would otherwise go on starting runs as bob); alice's stays; nothing
    resumes his. A flavour gone from the policy suspends the CronJobs that use it the same way."""
    from labyard_hub.projects import ProjectPolicy
    from labyard_hub.scheduler.backend import Conflict
    from labyard_hub.scheduler.kube import KubernetesBackend
    from labyard_hub.scheduler.models import ScheduleCreate

    people = StaticIdentities([ALICE, BOB])
    nb = json.loads(json.dumps(notebooks.training()))

    def backend(policy=None):
        return KubernetesBackend(Access(policy or demo.policy()), tmp_path / "scheduler", image="labyard/singleuser:test",
                                 kubeconfig=service_accounts["scheduler"], extra_labels=RUN_LOCAL, identities=people)

    b = backend()
    await b.start()
    ids = []
    try:
        bobs, _ = await b.create_schedule(BOB, ScheduleCreate(project="vision", notebook="train.ipynb", notebook_content=nb,
                                                              cron="0 3 * * *"))
        alices, _ = await b.create_schedule(ALICE, ScheduleCreate(project="vision", notebook="train.ipynb",
                                                                  notebook_content=nb, cron="0 3 * * *", flavor="gpu-1"))
        ids += [bobs.id, alices.id]
        people.set(BOB.model_copy(update={"projects": ()}))
        assert [s.id for s in await b.reconcile()] == [bobs.id]
        cj = cronjob(project, bobs)
        assert cj["spec"]["suspend"] is True
        assert cj["metadata"]["annotations"]["labyard.dev/paused-reason"] == "bob is no longer a member of project 'vision'"
        seen = await b.get_schedule(ALICE, bobs.id)
        assert seen.paused and seen.paused_reason == "bob is no longer a member of project 'vision'"
        assert cronjob(project, alices)["spec"]["suspend"] is False
        people.set(BOB)  # back in vision: still paused until he resumes it himself
        assert await b.reconcile() == [] and cronjob(project, bobs)["spec"]["suspend"] is True
    finally:
        await b.stop()
    # the admin removes gpu-1 from the policy: alice's CronJob is suspended, not rebuilt (it cannot be)
    without_gpu1 = demo.policy().model_dump(mode="json", exclude_defaults=True)
    del without_gpu1["flavors"]["gpu-1"]
    for settings in [without_gpu1.get("defaults", {}), *without_gpu1["projects"].values()]:
        if settings.get("flavors"):
            settings["flavors"] = [f for f in settings["flavors"] if f != "gpu-1"]
    b = backend(ProjectPolicy.model_validate(without_gpu1))
    await b.start()
    try:
        assert [s.id for s in await b.reconcile()] == [alices.id]
        cj = cronjob(project, alices)
        assert cj["spec"]["suspend"] is True and "gpu-1" in cj["metadata"]["annotations"]["labyard.dev/paused-reason"]
        with pytest.raises(Conflict, match="stays paused: the schedule's flavour is gone"):
            await b.set_paused(ALICE, alices.id, False)
    finally:
        for sid in ids:
            project.kubectl("delete", "job,cronjob,configmap", "-n", NS, "-l", f"labyard.dev/schedule={sid}", "--ignore-not-found")
        await b.stop()


def test_service_in_labyard_up_kubernetes_creates_the_cronjob(k8s_testbed, service_accounts, tmp_path_factory):
    """The REST requests of the issue, to the hub service of `labyard up --kubernetes`, with the hub,
    the controller and the scheduler on the chart's service accounts: a CronJob in labyard-vision
    whose pods run as alice with the flavour's GPU limit; pause, resume and edit; a foreign
    project is 403; malformed requests 400."""
    from tests.support.stack import Stack

    tb = k8s_testbed
    config = {"kubernetes": {"controller_interval": 2, "pod_labels": RUN_LOCAL,
                             "controller_kubeconfig": service_accounts["project-controller"],
                             "scheduler_kubeconfig": service_accounts["scheduler"]},
              "cull": {"enabled": False}}
    stack = Stack(tmp_path_factory.mktemp("labyard-k8s-scheduler"), config=config, kubeconfig=service_accounts["hub"]).start()
    sid = None
    try:
        wait_for(lambda: tb.api.get(f"/api/v1/namespaces/{NS}"), 60, "labyard-vision")
        alice = stack.api("alice")
        base = f"{stack.url}/services/labyard-scheduler/api"
        wait_for(lambda: alice.get(f"{base}/whoami", timeout=10).status_code == 200, 90, "the scheduler service")
        nb = json.loads(json.dumps(notebooks.training()))
        r = alice.post(f"{base}/schedules", json={"project": "vision", "notebook": "train.ipynb", "notebook_content": nb,
                                                   "flavor": "gpu-1", "cron": "0 3 * * *", "timezone": "Europe/Berlin",
                                                   "parameters": {"epochs": 3}})
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        cjs = tb.api.get(f"/apis/batch/v1/namespaces/{NS}/cronjobs", labelSelector=f"labyard.dev/schedule={sid}")["items"]
        assert len(cjs) == 1
        spec = cjs[0]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsUser"] == 10001 and spec["securityContext"]["runAsGroup"] == 20001
        assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert cjs[0]["metadata"]["labels"]["labyard.dev/user"] == "alice"
        # its pods log to MLflow through the gate as alice, with the schedule's MLflow-only token
        env = {e["name"]: e for e in spec["containers"][0]["env"]}
        ref = env["MLFLOW_TRACKING_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert env["MLFLOW_TRACKING_URI"]["value"].endswith("/services/mlflow") and ref["optional"] is True
        secret = tb.api.get(f"/api/v1/namespaces/{NS}/secrets/{ref['name']}")
        token = base64.b64decode(secret["data"][ref["key"]]).decode()
        me = requests.get(f"{stack.url}/hub/api/user", headers={"Authorization": f"token {token}"}, timeout=30).json()
        assert me["name"] == "alice" and "access:services!service=mlflow" in me["scopes"], me
        assert not [sc for sc in me["scopes"] if sc.split("!")[0] in ("self", "admin:users", "servers", "access:servers", "tokens")]
        mlflow = f"{env['MLFLOW_TRACKING_URI']['value']}/api/2.0/mlflow/experiments/search"
        assert requests.post(mlflow, json={"max_results": 10}, headers={"Authorization": f"Bearer {token}"}, timeout=60).status_code == 200
        carol = stack.api("carol")
        r = carol.post(f"{base}/schedules", json={"project": "vision", "notebook": "train.ipynb", "notebook_content": nb})
        assert r.status_code == 403
        r = alice.post(f"{base}/schedules", json={"project": "vision", "notebook": "train.ipynb", "notebook_content": nb,
                                                   "cron": "61 * * * *"})
        assert r.status_code == 400 and "invalid cron expression" in r.json()["message"]
        r = alice.post(f"{base}/schedules", json={"project": "vision", "notebook": "train.ipynb", "notebook_content": nb,
                                                   "cron": "0 0 30 2 *"})
        assert r.status_code == 400 and "never fires" in r.json()["message"]
        # pause, resume, edit: under the scheduler's own role
        r = alice.post(f"{base}/schedules/{sid}/pause")
        assert r.status_code == 200 and r.json()["paused_reason"] == "paused by alice", r.text
        assert tb.api.get(f"/apis/batch/v1/namespaces/{NS}/cronjobs/{cjs[0]['metadata']['name']}")["spec"]["suspend"] is True
        assert alice.post(f"{base}/schedules/{sid}/resume").status_code == 200
        r = alice.patch(f"{base}/schedules/{sid}", json={"cron": "30 5 * * *"})
        assert r.status_code == 200 and r.json()["cron"] == "30 5 * * *", r.text
        cj = tb.api.get(f"/apis/batch/v1/namespaces/{NS}/cronjobs/{cjs[0]['metadata']['name']}")
        assert cj["spec"]["schedule"] == "30 5 * * *" and cj["spec"]["suspend"] is False
        # carol (nlp) gets the same answer as in local mode for alice's schedule: 403
        assert carol.get(f"{base}/schedules/{sid}").status_code == 403
        # deleting the schedule revokes its token and removes the Secret
        assert alice.delete(f"{base}/schedules/{sid}", timeout=60).status_code in (200, 204)
        # revoked at the hub at once; the gate honours a token it has seen for up to its
        # identity_max_age (10 s, docs/admin/mlflow.md)
        assert requests.get(f"{stack.url}/hub/api/user", headers={"Authorization": f"token {token}"}, timeout=30).status_code in (401, 403)
        wait_for(lambda: requests.post(mlflow, json={"max_results": 10}, headers={"Authorization": f"Bearer {token}"},
                                       timeout=60).status_code == 401, 30, "the revoked token refused by MLflow's gate", interval=1)
        assert not tb.api.get(f"/api/v1/namespaces/{NS}/secrets", labelSelector=f"labyard.dev/schedule={sid}")["items"]
    finally:
        if sid:
            tb.kubectl("delete", "job,cronjob,configmap", "-n", NS, "-l", f"labyard.dev/schedule={sid}", "--ignore-not-found")
        stack.stop()


async def test_a_project_the_controller_has_not_set_up_answers_503_and_lists_nothing(service_accounts, tmp_path):
    """No namespace labyard-robotics (yet): no 500 and no hanging request, but a bounded wait and a reason."""
    from labyard_hub.scheduler.backend import Unavailable
    from labyard_hub.scheduler.kube import KubernetesBackend
    from labyard_hub.scheduler.models import ScheduleCreate

    alice = Identity(username="alice", uid=10001, gid=10000, projects=(Project(name="robotics", gid=20009),))
    b = KubernetesBackend(Access(demo.policy()), tmp_path / "scheduler", image="labyard/singleuser:test",
                          kubeconfig=service_accounts["scheduler"], project_ready_timeout=2,
                          identities=StaticIdentities([alice]))
    await b.start()
    try:
        assert await b.list_schedules(alice, "robotics") == []
        assert await b.list_runs(alice, project="robotics") == []
        with pytest.raises(Unavailable, match="project 'robotics' is not set up in the cluster yet: namespace labyard-robotics"):
            await b.create_schedule(alice, ScheduleCreate(project="robotics", notebook="train.ipynb",
                                                          notebook_content=notebooks.training()))
    finally:
        await b.stop()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    from tests.mlflow.support import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-k8s")).start()
    yield server
    server.stop()


@pytest.mark.parametrize("flavor", ["gpu-1", "cpu"])
async def test_scheduled_run_records_system_metrics(project, service_accounts, mlflow_server, flavor):
    """A scheduled run on a GPU flavour, bound by the real scheduler to a (kwok) GPU node and run
    by the pod runner, records ``system/gpu_*`` metrics in MLflow. No GPU or driver exists here:
    the pod gets the fake NVML of tests/mlflow/fake_nvml (pynvml's API shape, replaying
    readings written in NVML's shape, not recorded on a GPU) first on its PYTHONPATH, with
    ``NVIDIA_VISIBLE_DEVICES=0`` as the device plugin would set for one GPU. The CPU run gets
    neither, and shows CPU and memory only."""
    from kubernetes_asyncio.client import V1EnvVar

    from tests.mlflow.support import tags_of

    tb = project
    sha = await notebook_configmap(tb, service_accounts, sleep=3)
    s = schedule(sha, cron=None, flavor=flavor)
    run = Run(id=new_id("r"), schedule_id=s.id, owner="alice", project="vision", notebook=s.notebook,
              notebook_sha256=sha, parameters={"epochs": 2}, flavor=flavor, created=now(), timeout_seconds=300, retries=0)
    proj, fl = Access(demo.policy()).authorize(ALICE, "vision", flavor)
    job = make_job(s, run, ALICE, proj, fl, image="labyard/singleuser:test", extra_labels=RUN_LOCAL, mlflow_url=mlflow_server.url)
    container = job.spec.template.spec.containers[0]
    container.env.append(V1EnvVar(name="LABYARD_SYSTEM_METRICS_INTERVAL", value="0.5"))
    if flavor != "cpu":
        from pathlib import Path

        fake = Path(__file__).resolve().parents[1] / "mlflow" / "fake_nvml"
        container.env += [V1EnvVar(name="PYTHONPATH", value=str(fake)), V1EnvVar(name="NVIDIA_VISIBLE_DEVICES", value="0")]
    tb.apply(await manifest(job))
    try:
        done = finished_job(tb, job.metadata.name)
        p = job_pod(tb, job.metadata.name)
        log = tb.kubectl("logs", "-n", NS, p["metadata"]["name"]).stdout
        assert {c["type"]: c["status"] for c in done["status"]["conditions"]}.get("Complete") == "True", log[-3000:]
        assert p["spec"]["nodeName"].startswith("gpu-node" if flavor != "cpu" else "cpu-node")
        result = json.loads(next(line for line in reversed(log.splitlines()) if line.startswith('{"local_run_id"')))
        mrun = mlflow_server.api("GET", "runs/get", params={"run_id": result["run_id"]})["run"]
        assert mrun["info"]["status"] == "FINISHED" and tags_of(mrun)["labyard.run_kind"] == "scheduled"
        keys = {m["key"] for m in mrun["data"]["metrics"]}
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= keys, keys
        if flavor == "cpu":
            assert not any(k.startswith("system/gpu") for k in keys), keys
        else:
            readings = json.loads((fake / "readings.json").read_text())["devices"][0]["samples"]
            util = {m["value"] for m in mlflow_server.metric_history(result["run_id"], "system/gpu_0_utilization_percentage")}
            assert util and util <= {s["gpu_util"] for s in readings}, util
            assert "system/gpu_0_memory_usage_megabytes" in keys and "system/gpu_1_utilization_percentage" not in keys
    finally:
        tb.kubectl("delete", "job", job.metadata.name, "-n", NS, "--ignore-not-found")


def test_removal_in_ldap_suspends_the_leavers_cronjob(k8s_testbed, service_accounts, tmp_path_factory):
    """bob leaves vision in LDAP: within 60 s (group sync, then the scheduler's reconcile pass) his
    CronJob is suspended with the reason, without him logging in again; alice's is not. Needs the
    group sync (the controller service's, branch ldap)."""
    from labyard_hub import demo as demo_data
    from tests.support.stack import Stack

    tb = k8s_testbed
    config = {"kubernetes": {"controller_interval": 5, "pod_labels": RUN_LOCAL,
                             "controller_kubeconfig": service_accounts["project-controller"],
                             "scheduler_kubeconfig": service_accounts["scheduler"]},
              "ldap": {"auth_refresh_age": 3600}, "cull": {"enabled": False}}
    stack = Stack(tmp_path_factory.mktemp("labyard-k8s-removal"), config=config, kubeconfig=service_accounts["hub"]).start()
    sids = []
    try:
        wait_for(lambda: tb.api.get(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/rolebindings/labyard-scheduler"),
                 60, "labyard-vision")
        bob, alice = stack.api("bob"), stack.api("alice")
        base = f"{stack.url}/services/labyard-scheduler/api"
        wait_for(lambda: bob.get(f"{base}/whoami", timeout=10).status_code == 200, 90, "the scheduler service")
        nb = json.loads(json.dumps(notebooks.training()))
        body = {"project": "vision", "notebook": "train.ipynb", "notebook_content": nb, "cron": "0 3 * * *"}
        for who in (bob, alice):
            r = who.post(f"{base}/schedules", json=body)
            assert r.status_code == 201, r.text
            sids.append(r.json()["id"])

        def cronjob_of(sid):
            return tb.api.get(f"/apis/batch/v1/namespaces/{NS}/cronjobs", labelSelector=f"labyard.dev/schedule={sid}")["items"][0]

        stack.demo_ldap().modify(f"cn=vision,ou=projects,{demo_data.SUFFIX}", {"memberUid": [("MODIFY_DELETE", ["bob"])]})
        removed = time.monotonic()
        wait_for(lambda: cronjob_of(sids[0])["spec"]["suspend"], 60, "bob's CronJob suspended", interval=1)
        took = time.monotonic() - removed
        cj = cronjob_of(sids[0])
        assert cj["metadata"]["annotations"]["labyard.dev/paused-reason"] == "bob is no longer a member of project 'vision'"
        assert cronjob_of(sids[1])["spec"]["suspend"] is False
        print(f"bob's CronJob suspended {took:.1f} s after his removal from vision in LDAP")
    finally:
        for sid in sids:
            tb.kubectl("delete", "job,cronjob,configmap", "-n", NS, "-l", f"labyard.dev/schedule={sid}", "--ignore-not-found")
        stack.stop()


class _TokensWithoutHub:
    """The hub's token API (``RunTokens``) for a backend without a hub: this test's MLflow server
    has no gate, so no token is checked (the gate and the hub's tokens are exercised in local
    mode by tests/reproduce). A stand-in, not a mock of behaviour under test."""

    async def create(self, owner, note, seconds):
        return "no-gate-here", f"{owner}-{note}"

    async def revoke(self, owner, token_id):
        return None

    async def revoke_noted(self, owner, note):
        return 0


async def test_a_reproduction_runs_the_recorded_image_by_digest(project, service_accounts, mlflow_server, tmp_path):
    """Issue 15 on the testbed: a run recorded on Kubernetes with its image's digest is reproduced,
    a week later, when the project's image is a tag: the service creates a Job whose container is
    the recorded image by digest, as the user who asked (alice; bob made the original), and the
    pod runner runs it to success.

    The original is written into the real MLflow server with the tags a run pod of this version
    records (tests/reproduce shows them recorded for real, in local mode): the shared testbed's
    pod runner runs pods with the Python of whichever worktree started the testbed
    (``path_prefix`` in its config), so what the pod itself records here may be older code; the
    verdict is therefore checked in local mode, and here what the service decides."""
    import hashlib

    from mlflow.tracking import MlflowClient

    from labyard_hub.scheduler.kube import KubernetesBackend
    from labyard_hub.scheduler.models import ReproduceCreate

    digest = "sha256:" + "5e" * 32
    nb = json.loads(json.dumps(notebooks.training()))
    raw = json.dumps(nb).encode()
    client = MlflowClient(mlflow_server.url)
    exp = client.get_experiment_by_name("vision/score.ipynb")
    exp_id = exp.experiment_id if exp else client.create_experiment("vision/score.ipynb")
    original = client.create_run(exp_id, tags={
        "labyard.project": "vision", "labyard.user": "bob", "labyard.notebook": "score.ipynb",
        "labyard.notebook_sha256": hashlib.sha256(raw).hexdigest(), "labyard.parameters": '{"epochs": 3}',
        "labyard.flavor": "cpu", "labyard.mode": "kubernetes", "labyard.image": f"labyard/singleuser@{digest}",
        "labyard.image_digest": digest, "labyard.requirements": "environment/requirements.txt",
        "labyard.run_kind": "scheduled", "labyard.inputs.count": "0"}).info.run_id
    (tmp_path / "notebook").mkdir()
    (tmp_path / "notebook" / "score.ipynb").write_bytes(raw)
    client.log_artifact(original, str(tmp_path / "notebook" / "score.ipynb"), "notebook")
    client.log_metric(original, "score", 0.75)
    client.set_terminated(original)

    b = KubernetesBackend(Access(demo.policy()), tmp_path / "scheduler", image="labyard/singleuser:latest",
                          mlflow_url=mlflow_server.url, run_tokens=_TokensWithoutHub(),
                          kubeconfig=service_accounts["scheduler"], extra_labels=RUN_LOCAL,
                          identities=StaticIdentities([ALICE, BOB, CAROL, ADMIN]))
    await b.start()
    again = None
    try:
        again = await b.reproduce(ALICE, ReproduceCreate(reproduce=original))
        assert again.owner == "alice" and again.parameters == {"epochs": 3}  # as who asked, not as bob
        assert again.reproduce.image == f"labyard/singleuser@{digest}" and again.reproduce.metrics == {"score": 0.75}
        job = project.api.get(f"/apis/batch/v1/namespaces/{NS}/jobs", labelSelector=f"labyard.dev/run={again.id}")["items"][0]
        container = job["spec"]["template"]["spec"]["containers"][0]
        assert container["image"] == f"labyard/singleuser@{digest}"
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["LABYARD_IMAGE_DIGEST"] == digest and json.loads(env["LABYARD_REPRODUCE"])["of"] == original
        assert job["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == ALICE.uid
        done = await _wait_run(b, ALICE, again.id)
        pod = job_pod(project, job["metadata"]["name"])["metadata"]["name"]
        assert done.status.value == "succeeded", (done.error, project.kubectl("logs", "-n", NS, pod).stdout[-3000:])
        assert done.reproduce.of == original  # read back from the Job
        # carol is not in vision: refused before anything is made
        from labyard_hub.access import AccessError

        with pytest.raises(AccessError) as e:
            await b.reproduce(CAROL, ReproduceCreate(reproduce=original))
        assert e.value.status == 403
    finally:
        await b.stop()
        if again is not None:
            project.kubectl("delete", "job,cronjob,configmap,secret", "-n", NS, "-l",
                            f"labyard.dev/schedule={again.schedule_id}", "--ignore-not-found")
