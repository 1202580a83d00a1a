"""Scheduled runs on the Kubernetes testbed: the scheduler's CronJob and Job objects, applied to a
real API server, scheduled by the real scheduler and Job controller, and run (papermill, as alice)
by the testbed's pod runner.

Also the scheduler's KubernetesBackend end to end (the cluster as the source of truth, across a
restart of the backend), and the service of `labyard up --kubernetes` answering the REST request.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from kubernetes_asyncio.client import ApiClient

from labyard_hub import demo
from labyard_hub.kube.objects import make_namespace, make_project_pvc
from labyard_hub.projects import Identity, Project, authorize
from labyard_hub.scheduler.kube import make_cronjob, make_job, make_notebook_configmap
from labyard_hub.scheduler.models import Run, Schedule, new_id, now
from labyard_hub.scheduler.podrun import parse_result

from tests.scheduler import notebooks  # noqa: E402
from labyard_testbed.kubeapi import ApiError  # noqa: E402
from labyard_testbed.testing import wait_for  # noqa: E402

pytestmark = [pytest.mark.k8s, pytest.mark.asyncio(loop_scope="session")]

VISION = Project(name="vision", gid=20001)
ALICE = Identity(username="alice", uid=10001, gid=10000, projects=(VISION,))
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
async def project(k8s_testbed):
    """labyard-vision with its project volume (made here if the project controller has not)."""
    tb = k8s_testbed
    try:
        tb.api.get(f"/api/v1/namespaces/{NS}")
    except ApiError:
        tb.apply(await manifest(make_namespace(VISION)))
    wait_for(lambda: tb.api.get(f"/api/v1/namespaces/{NS}/serviceaccounts/default"), 30, "the default ServiceAccount")
    try:
        tb.api.get(f"/api/v1/namespaces/{NS}/persistentvolumeclaims/project-vision")
    except ApiError:
        tb.apply(await manifest(make_project_pvc("vision", "1Gi")))
    return tb


async def notebook_configmap(tb, **kw) -> str:
    content = json.dumps(notebooks.training(**kw)).encode()
    import hashlib

    sha = hashlib.sha256(content).hexdigest()
    tb.apply(await manifest(make_notebook_configmap("vision", sha, content)))
    return sha


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


async def test_cronjob_for_a_gpu_schedule_runs_as_alice_with_the_gpu_limit(project):
    tb = project
    sha = await notebook_configmap(tb)
    s = schedule(sha, flavor="gpu-1")
    proj, flavor = authorize(ALICE, demo.policy(), "vision", "gpu-1")
    cj = make_cronjob(s, ALICE, proj, flavor, image="labyard/singleuser:test", extra_labels=RUN_LOCAL)
    tb.apply(await manifest(cj))
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
        tb.apply(job)
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


async def test_failing_run_job_reports_the_failing_cell(project):
    tb = project
    sha = await notebook_configmap(tb, fail_at_epoch=5)
    s = schedule(sha, cron=None)
    run = Run(id=new_id("r"), schedule_id=s.id, owner="alice", project="vision", notebook=s.notebook,
              notebook_sha256=sha, parameters={"epochs": 5}, flavor="cpu", created=now(), timeout_seconds=300, retries=0)
    proj, flavor = authorize(ALICE, demo.policy(), "vision", "cpu")
    job = make_job(s, run, ALICE, proj, flavor, image="labyard/singleuser:test", extra_labels=RUN_LOCAL)
    tb.apply(await manifest(job))
    try:
        done = finished_job(tb, job.metadata.name)
        status = {c["type"]: c["status"] for c in done["status"]["conditions"]}
        assert status.get("Failed") == "True"
        p = job_pod(tb, job.metadata.name)
        assert p["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 1
        result = parse_result(tb.kubectl("logs", "-n", NS, p["metadata"]["name"]).stdout)
        assert result["failed_cell"] == 2 and result["error"] == "ValueError: diverged at epoch 5"
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


async def test_kubernetes_backend_end_to_end(project, kubeconfig, tmp_path):
    """The scheduler's Kubernetes backend against the testbed (as cluster admin here; the service
    account's narrower RBAC is the project controller's business)."""
    from labyard_hub.projects import AccessError
    from labyard_hub.scheduler.kube import KubernetesBackend, cronjob_name
    from labyard_hub.scheduler.models import RunCreate, ScheduleCreate, ScheduleUpdate

    def backend():
        return KubernetesBackend(demo.policy(), tmp_path / "scheduler", image="labyard/singleuser:test",
                                 kubeconfig=kubeconfig, extra_labels=RUN_LOCAL)

    carol = Identity(username="carol", uid=10003, gid=10000, projects=(Project(name="nlp", gid=20002),))
    nb = json.loads(json.dumps(notebooks.training(fail_at_epoch=5)))
    b = backend()
    await b.start()
    schedule_ids = []
    try:
        with pytest.raises(AccessError) as e:
            await b.create_schedule(carol, ScheduleCreate(project="vision", notebook="train.ipynb", notebook_content=nb))
        assert e.value.status == 403
        with pytest.raises(AccessError) as e:
            await b.create_schedule(ALICE, ScheduleCreate(project="vision", notebook="train.ipynb", notebook_content=nb,
                                                          flavor="gpu-9"))
        assert e.value.status == 400
        # run once, now: a Job; it succeeds
        s1, run = await b.create_schedule(ALICE, ScheduleCreate(project="vision", notebook="train.ipynb",
                                                                notebook_content=nb, parameters={"epochs": 3}))
        schedule_ids.append(s1.id)
        done = await _wait_run(b, ALICE, run.id)
        assert done.status.value == "succeeded" and done.exit_code == 0 and done.parameters == {"epochs": 3}
        assert "trained baseline 3 3" in await b.run_log(ALICE, run.id)
        # a cron schedule on a GPU flavour: a CronJob in labyard-vision, paused -> suspended
        s2, none = await b.create_schedule(ALICE, ScheduleCreate(project="vision", notebook="train.ipynb",
                                                                 notebook_content=nb, flavor="gpu-1", cron="0 3 * * *",
                                                                 timezone="Europe/Berlin"))
        schedule_ids.append(s2.id)
        assert none is None
        cj = project.api.get(f"/apis/batch/v1/namespaces/{NS}/cronjobs/{cronjob_name(s2)}")
        assert cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001
        assert cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        await b.set_paused(ALICE, s2.id, True)
        assert project.api.get(f"/apis/batch/v1/namespaces/{NS}/cronjobs/{cronjob_name(s2)}")["spec"]["suspend"] is True
    finally:
        await b.stop()
    # a new service instance finds everything in the cluster
    b = backend()
    await b.start()
    try:
        ids = [s.id for s in await b.list_schedules(ALICE, "vision")]
        assert s1.id in ids and s2.id in ids
        assert (await b.get_schedule(ALICE, s2.id)).paused is True
        assert [r.id for r in await b.list_runs(ALICE, schedule_id=s1.id)] == [run.id]
        # run now with other parameters (on CPU): fails in the third cell, reported
        s1 = await b.update_schedule(ALICE, s1.id, ScheduleUpdate(flavor="cpu"))
        bad = await b.run_now(ALICE, s1.id, RunCreate(parameters={"epochs": 5}))
        failed = await _wait_run(b, ALICE, bad.id)
        assert failed.status.value == "failed" and failed.failed_cell == 2 and failed.error == "ValueError: diverged at epoch 5"
        await b.delete_schedule(ALICE, s2.id)
        with pytest.raises(ApiError):
            project.api.get(f"/apis/batch/v1/namespaces/{NS}/cronjobs/{cronjob_name(s2)}")
    finally:
        for sid in schedule_ids:
            project.kubectl("delete", "job,cronjob,configmap", "-n", NS, "-l", f"labyard.dev/schedule={sid}", "--ignore-not-found")
        await b.stop()


def test_service_in_labyard_up_kubernetes_creates_the_cronjob(k8s_testbed, tmp_path_factory):
    """The REST request of the issue, to the hub service of `labyard up --kubernetes`: a CronJob in
    labyard-vision whose pods run as alice with the flavour's GPU limit; a foreign project is 403.

    The service uses the testbed's admin kubeconfig here (scheduler_kubeconfig): the chart's
    `scheduler` role lacks configmaps and pods/log, which this backend needs (reported)."""
    from tests.support.stack import Stack

    tb = k8s_testbed
    config = {"kubernetes": {"controller_interval": 2, "scheduler_kubeconfig": tb.kubeconfig, "pod_labels": RUN_LOCAL},
              "cull": {"enabled": False}}
    stack = Stack(tmp_path_factory.mktemp("labyard-k8s-scheduler"), config=config, kubeconfig=tb.kubeconfig).start()
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
        carol = stack.api("carol")
        r = carol.post(f"{base}/schedules", json={"project": "vision", "notebook": "train.ipynb", "notebook_content": nb})
        assert r.status_code == 403
        r = alice.post(f"{base}/schedules", json={"project": "vision", "notebook": "train.ipynb", "notebook_content": nb,
                                                   "cron": "61 * * * *"})
        assert r.status_code == 400 and "invalid cron expression" in r.json()["message"]
    finally:
        if sid:
            tb.kubectl("delete", "job,cronjob,configmap", "-n", NS, "-l", f"labyard.dev/schedule={sid}", "--ignore-not-found")
        stack.stop()
