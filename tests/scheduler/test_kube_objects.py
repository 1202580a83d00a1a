"""Jobs and CronJobs of scheduled runs, built from the project model (no cluster needed)."""

from __future__ import annotations

import json

import pytest
from kubernetes_asyncio.client import ApiClient

from labyard_hub import demo
from labyard_hub.projects import Identity, Project, authorize
from labyard_hub.scheduler.kube import make_cronjob, make_job, make_notebook_configmap
from labyard_hub.scheduler.models import Run, Schedule, now

VISION = Project(name="vision", gid=20001)
ALICE = Identity(username="alice", uid=10001, gid=10000, projects=(VISION,))


def schedule(**kw) -> Schedule:
    t = now()
    return Schedule(**{"id": "s-0123456789ab", "name": "Résumé run", "owner": "alice", "project": "vision",
                       "notebook": "exp/train.ipynb", "notebook_sha256": "ab" * 32, "parameters": {"epochs": 3},
                       "flavor": "gpu-1", "cron": "0 3 * * *", "timezone": "Europe/Berlin", "timeout_seconds": 600,
                       "retries": 2, "created": t, "updated": t, **kw})


def models(s: Schedule):
    project, flavor = authorize(ALICE, demo.policy(), s.project, s.flavor)
    return project, flavor


@pytest.mark.asyncio(loop_scope="session")
async def test_cronjob_runs_as_alice_with_the_flavours_gpu_in_the_project_namespace():
    s = schedule()
    project, flavor = models(s)
    cj = make_cronjob(s, ALICE, project, flavor, image="labyard/singleuser:test", extra_labels={"labyard.dev/run-local": "true"})
    assert cj.metadata.namespace == "labyard-vision"
    # a name with spaces and non-ASCII characters becomes a valid DNS label (<= 52 for CronJobs)
    assert cj.metadata.name.startswith("resume-run-") and cj.metadata.name.endswith("s-0123456789ab")
    assert len(cj.metadata.name) <= 52
    assert cj.spec.schedule == "0 3 * * *" and cj.spec.time_zone == "Europe/Berlin"
    assert cj.spec.concurrency_policy == "Forbid" and cj.spec.starting_deadline_seconds == 24 * 3600
    assert cj.spec.suspend is False
    job = cj.spec.job_template.spec
    assert job.backoff_limit == 2 and job.active_deadline_seconds == 600
    pod = job.template.spec
    assert pod.security_context.run_as_user == 10001 and pod.security_context.run_as_group == 20001
    assert pod.security_context.fs_group == 20001 and pod.security_context.run_as_non_root
    c = pod.containers[0]
    assert c.resources.limits["nvidia.com/gpu"] == "1" and c.resources.requests["nvidia.com/gpu"] == "1"
    assert c.security_context.allow_privilege_escalation is False and c.security_context.capabilities.drop == ["ALL"]
    assert pod.node_selector == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert [t.key for t in pod.tolerations] == ["nvidia.com/gpu"]
    assert pod.restart_policy == "Never" and pod.automount_service_account_token is False
    env = {e.name: e for e in c.env}
    assert json.loads(env["LABYARD_PARAMETERS"].value) == {"epochs": 3}
    assert env["LABYARD_RUN_ID"].value_from.field_ref.field_path == "metadata.labels['job-name']"
    labels = job.template.metadata.labels
    assert labels["labyard.dev/schedule"] == "s-0123456789ab" and labels["labyard.dev/user"] == "alice"
    assert labels["labyard.dev/project"] == "vision" and labels["labyard.dev/run-local"] == "true"
    mounts = {m.mount_path for m in c.volume_mounts}
    assert mounts == {"/srv/project", "/etc/labyard/notebook"}
    # the schedule is recorded on the CronJob: the cluster is the source of truth
    assert json.loads(cj.metadata.annotations["labyard.dev/schedule"])["id"] == "s-0123456789ab"
    # serialises to a valid manifest
    async with ApiClient() as api:
        body = api.sanitize_for_serialization(cj)
    assert body["spec"]["jobTemplate"]["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001


@pytest.mark.parametrize(("field", "value", "attr", "expected"), [
    ("concurrency", "replace", "concurrency_policy", "Replace"),
    ("concurrency", "allow", "concurrency_policy", "Allow"),
    ("missed_runs", "skip", "starting_deadline_seconds", 120),
    ("paused", True, "suspend", True),
])
def test_policies_map_to_cronjob_fields(field, value, attr, expected):
    s = schedule(**{field: value})
    cj = make_cronjob(s, ALICE, *models(s), image="img")
    assert getattr(cj.spec, attr) == expected


def test_job_for_a_run_now_with_overrides():
    s = schedule(flavor="cpu")
    run = Run(id="r-aaaaaaaaaaaa", schedule_id=s.id, owner="alice", project="vision", notebook=s.notebook,
              notebook_sha256=s.notebook_sha256, parameters={"epochs": 5}, flavor="cpu", created=now(),
              timeout_seconds=60, retries=0)
    job = make_job(s, run, ALICE, *models(s), image="img")
    assert job.metadata.name.endswith("r-aaaaaaaaaaaa") and job.metadata.labels["labyard.dev/run"] == run.id
    c = job.spec.template.spec.containers[0]
    env = {e.name: e.value for e in c.env}
    assert env["LABYARD_RUN_ID"] == run.id and json.loads(env["LABYARD_PARAMETERS"]) == {"epochs": 5}
    assert "nvidia.com/gpu" not in c.resources.limits and job.spec.template.spec.node_selector is None
    assert job.spec.backoff_limit == 0 and job.spec.active_deadline_seconds == 60


def test_run_once_schedule_is_not_a_cronjob_and_big_notebooks_are_refused():
    s = schedule(cron=None)
    with pytest.raises(ValueError, match="run-once"):
        make_cronjob(s, ALICE, *models(s), image="img")
    cm = make_notebook_configmap("vision", "cd" * 32, b'{"cells": []}')
    assert cm.immutable and cm.metadata.namespace == "labyard-vision" and cm.data["notebook.ipynb"] == '{"cells": []}'
    with pytest.raises(ValueError, match="at most"):
        make_notebook_configmap("vision", "cd" * 32, b"x" * (2 * 1024 * 1024))
