"""Jobs and CronJobs of scheduled runs, built from the project model (no cluster needed)."""

from __future__ import annotations

import json

import pytest
from kubernetes_asyncio.client import ApiClient

from labyard_hub import demo
from labyard_hub.access import Access
from labyard_hub.projects import Identity, Project
from labyard_hub.scheduler.kube import make_cronjob, make_job, make_notebook_configmap
from labyard_hub.scheduler.models import Reproduction, Run, Schedule, now

VISION = Project(name="vision", gid=20001)
ALICE = Identity(username="alice", uid=10001, gid=10000, projects=(VISION,))


def schedule(**kw) -> Schedule:
    t = now()
    return Schedule(**{"id": "s-0123456789ab", "name": "Résumé run", "owner": "alice", "project": "vision",
                       "notebook": "exp/train.ipynb", "notebook_sha256": "ab" * 32, "parameters": {"epochs": 3},
                       "flavor": "gpu-1", "cron": "0 3 * * *", "timezone": "Europe/Berlin", "timeout_seconds": 600,
                       "retries": 2, "created": t, "updated": t, **kw})


def models(s: Schedule):
    project, flavor = Access(demo.policy()).authorize(ALICE, s.project, s.flavor)
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
    # the pod makes its own attempts (like a local run); the Job fails at its first non-zero exit,
    # naming the exit code; a pod lost to a disruption is replaced
    assert job.backoff_limit == 0 and job.active_deadline_seconds == 3 * 600 + 600
    rules = job.pod_failure_policy.rules
    assert [r.action for r in rules] == ["Ignore", "FailJob"]
    assert rules[0].on_pod_conditions[0].type == "DisruptionTarget"
    assert rules[1].on_exit_codes.operator == "NotIn" and rules[1].on_exit_codes.values == [0]
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
    assert env["LABYARD_TIMEOUT_SECONDS"].value == "600" and env["LABYARD_RETRIES"].value == "2"
    assert env["LABYARD_RUN_ID"].value_from.field_ref.field_path == "metadata.labels['job-name']"
    assert env["LABYARD_FLAVOR"].value == "gpu-1" and env["LABYARD_GPUS"].value == "1"  # for system metrics
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
    assert job.spec.backoff_limit == 0 and job.spec.active_deadline_seconds == 60 + 600


def test_a_reproductions_job_runs_the_recorded_image_by_digest():
    """Issue 15: the original's image pinned by digest (the tag may point elsewhere by now), the
    reproduction's record in the pod's environment, and read back from the Job as the run."""
    from labyard_hub.scheduler.kube import KubernetesBackend

    s = schedule(flavor="cpu", cron=None)
    digest = "sha256:" + "c0" * 32
    repro = Reproduction(of="f" * 32, changes=["use_current_data"], metrics={"rmse": 0.25},
                         image=f"registry.local/labyard/singleuser@{digest}")
    run = Run(id="r-bbbbbbbbbbbb", schedule_id=s.id, owner="alice", project="vision", notebook=s.notebook,
              notebook_sha256=s.notebook_sha256, flavor="cpu", created=now(), reproduce=repro)
    job = make_job(s, run, ALICE, *models(s), image="registry.local/labyard/singleuser:latest")
    c = job.spec.template.spec.containers[0]
    assert c.image == f"registry.local/labyard/singleuser@{digest}"
    env = {e.name: e.value for e in c.env}
    assert env["LABYARD_IMAGE_DIGEST"] == digest and Reproduction.model_validate_json(env["LABYARD_REPRODUCE"]) == repro
    job.status = type("Status", (), {"conditions": None, "active": 1, "failed": None, "succeeded": None,
                                     "start_time": None, "completion_time": None})()
    job.metadata.creation_timestamp = now()
    assert KubernetesBackend._run_from_job(job).reproduce == repro
    # an ordinary run keeps the project's image
    plain = make_job(s, run.model_copy(update={"reproduce": None}), ALICE, *models(s), image="img")
    assert plain.spec.template.spec.containers[0].image == "img"
    assert "LABYARD_REPRODUCE" not in {e.name for e in plain.spec.template.spec.containers[0].env}


def test_a_paused_schedule_carries_its_reason_on_the_cronjob():
    s = schedule(paused=True, paused_reason="bob is no longer a member of project 'vision'")
    cj = make_cronjob(s, ALICE, *models(s), image="img")
    assert cj.spec.suspend is True
    assert cj.metadata.annotations["labyard.dev/paused-reason"] == "bob is no longer a member of project 'vision'"
    assert "labyard.dev/paused-reason" not in make_cronjob(schedule(), ALICE, *models(s), image="img").metadata.annotations


@pytest.mark.parametrize(("result", "code", "cell"), [
    ({"status": "succeeded"}, 0, None),
    ({"status": "failed", "failed_cell": 2, "error": "ValueError: diverged"}, 12, 2),
    ({"status": "failed", "failed_cell": None, "error": "papermill exited with 1"}, 1, None),
    ({"status": "failed", "failed_cell": 400, "error": "x"}, 1, None),
    ({"status": "failed", "failed_cell": 3, "error": "timed out after 20s (in cell 3)"}, 2, None),
    ({"status": "cancelled", "error": "cancelled"}, 3, None),
])
def test_a_runs_result_travels_in_its_exit_code(result, code, cell):
    """The scheduler reads no pods: what a Run shows comes back through the exit code in the Job's
    Failed condition (the Job controller's message)."""
    from labyard_hub.scheduler.podrun import exit_code, result_of_exit_code

    assert exit_code(result) == code
    if code:
        message = f"Container notebook for pod labyard-vision/x-abcde failed with exit code {code} matching FailJob rule at index 1"
        got_code, got_cell, error = result_of_exit_code(message, "scheduled-runs/train/r-1.ipynb")
        assert got_code == code and got_cell == cell
        assert error == "cancelled" if code == 3 else "scheduled-runs/train/r-1.ipynb" in error


def test_run_once_schedule_is_not_a_cronjob_and_big_notebooks_are_refused():
    s = schedule(cron=None)
    with pytest.raises(ValueError, match="run-once"):
        make_cronjob(s, ALICE, *models(s), image="img")
    cm = make_notebook_configmap("vision", "cd" * 32, b'{"cells": []}')
    assert cm.immutable and cm.metadata.namespace == "labyard-vision" and cm.data["notebook.ipynb"] == '{"cells": []}'
    with pytest.raises(ValueError, match="at most"):
        make_notebook_configmap("vision", "cd" * 32, b"x" * (2 * 1024 * 1024))


def test_run_pods_log_to_mlflow_with_the_schedules_token():
    """Through the gate as the owner: the token comes from the schedule's Secret (optional, so a
    missing token never stops the run; its records then wait in the queue)."""
    from labyard_hub.scheduler.kube import make_mlflow_token_secret, mlflow_secret_name

    s = schedule()
    project, flavor = models(s)
    for obj in (make_cronjob(s, ALICE, project, flavor, image="i", mlflow_url="http://mlflow:5000/services/mlflow"),
                make_job(s, Run(id="r-0123456789ab", schedule_id=s.id, owner="alice", project="vision", flavor="gpu-1",
                                notebook=s.notebook, notebook_sha256=s.notebook_sha256, trigger="manual", created=now()),
                         ALICE, project, flavor, image="i", mlflow_url="http://mlflow:5000/services/mlflow")):
        spec = obj.spec.job_template.spec if hasattr(obj.spec, "job_template") else obj.spec
        env = {e.name: e for e in spec.template.spec.containers[0].env}
        assert env["MLFLOW_TRACKING_URI"].value == "http://mlflow:5000/services/mlflow"
        ref = env["MLFLOW_TRACKING_TOKEN"].value_from.secret_key_ref
        assert ref.name == mlflow_secret_name(s.id) == "labyard-mlflow-s-0123456789ab" and ref.key == "token" and ref.optional
    secret = make_mlflow_token_secret(s, "tok", "a12")
    assert secret.metadata.namespace == "labyard-vision" and secret.metadata.name == mlflow_secret_name(s.id)
    assert secret.string_data == {"token": "tok"} and secret.metadata.annotations["labyard.dev/hub-token-id"] == "a12"
    assert secret.metadata.labels["labyard.dev/schedule"] == s.id and secret.metadata.labels["labyard.dev/user"] == "alice"
    # without MLflow, no token
    env = {e.name for e in make_cronjob(s, ALICE, project, flavor, image="i").spec.job_template.spec.template.spec.containers[0].env}
    assert "MLFLOW_TRACKING_TOKEN" not in env


def test_run_output_directories_are_the_projects(tmp_path):
    """scheduled-runs/<notebook>/ in the project volume is shared by the project's members (the
    pod's group): a directory one member's run made 0755 (the default umask) is made
    group-writable by the next run of that member, and new ones are made so; else another member's
    run (a reproduction of it, say) fails with 'Permission denied'."""
    import os
    import stat

    from labyard_hub.scheduler.podrun import shared_dir

    (tmp_path / "scheduled-runs").mkdir(mode=0o755)
    os.chmod(tmp_path / "scheduled-runs", 0o755)
    shared_dir(tmp_path / "scheduled-runs" / "train")
    for d in (tmp_path / "scheduled-runs", tmp_path / "scheduled-runs" / "train"):
        assert stat.S_IMODE(d.stat().st_mode) & 0o070 == 0o070, oct(d.stat().st_mode)
