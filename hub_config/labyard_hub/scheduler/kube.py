"""The Kubernetes backend's objects: a schedule is a CronJob, a run is a Job, in the project namespace.

Pure functions (no cluster): :func:`make_notebook_configmap`, :func:`make_run_pod_template`,
:func:`make_job` and :func:`make_cronjob` build ``kubernetes_asyncio`` models from the same
project model and the same builders (:mod:`labyard_hub.kube.objects`) as the Kubernetes
spawner, so a scheduled run gets exactly the identity (the user's uid, the project's gid), the
GPU limit, the tolerations, the node selector and the project volume a notebook server would.

Mapping of the schedule's fields:

=====================  ==========================================================
timeout_seconds        Job ``activeDeadlineSeconds``
retries                Job ``backoffLimit`` (a failed notebook is a failed pod)
cron, timezone         CronJob ``schedule``, ``timeZone``
concurrency            CronJob ``concurrencyPolicy`` (Allow / Forbid / Replace)
missed_runs            CronJob ``startingDeadlineSeconds``: ``skip`` -> 120 s, ``run_once`` -> 1 day
                       (the CronJob controller starts the latest missed time once)
paused                 CronJob ``suspend``
=====================  ==========================================================

Labels link every object to its schedule, run, user and project (``labyard.dev/...``).
"""

from __future__ import annotations

import json
from pathlib import PurePosixPath

from kubernetes_asyncio.client import (
    V1ConfigMap,
    V1ConfigMapVolumeSource,
    V1Container,
    V1CronJob,
    V1CronJobSpec,
    V1EnvVar,
    V1EnvVarSource,
    V1Job,
    V1JobSpec,
    V1JobTemplateSpec,
    V1ObjectFieldSelector,
    V1ObjectMeta,
    V1PodSpec,
    V1PodTemplateSpec,
    V1Volume,
    V1VolumeMount,
)

from ..kube.objects import (
    LABEL_PREFIX,
    PROJECT_MOUNT,
    labels_for,
    make_container_security_context,
    make_node_selector,
    make_pod_security_context,
    make_project_volume,
    make_resources,
    make_tolerations,
    namespace_for,
    safe_name,
)
from ..projects import Flavor, Identity, Project
from .backend import Backend, BadRequest, NotFound
from .models import Run, RunStatus, Schedule, now

COMPONENT = "scheduled-run"
NOTEBOOK_MOUNT = "/etc/labyard/notebook"
NOTEBOOK_KEY = "notebook.ipynb"
OUTPUT_DIR = f"{PROJECT_MOUNT}/scheduled-runs"
#: a ConfigMap holds at most 1 MiB
MAX_NOTEBOOK_BYTES = 1024 * 1024 - 4096
MISSED_DEADLINE = {"skip": 120, "run_once": 24 * 3600}
CONCURRENCY = {"allow": "Allow", "forbid": "Forbid", "replace": "Replace"}
ANNOTATION_SCHEDULE = LABEL_PREFIX + "schedule"


def cronjob_name(schedule: Schedule) -> str:
    """``<display name>-<schedule id>``, a DNS label of at most 52 characters (CronJob limit)."""
    return safe_name(f"{safe_name(schedule.name, 30)}-{schedule.id}", 52)


def job_name(schedule: Schedule, run: Run) -> str:
    return safe_name(f"{safe_name(schedule.name, 30)}-{run.id}", 63)


def configmap_name(sha256: str) -> str:
    return f"labyard-notebook-{sha256[:40]}"


def make_notebook_configmap(project: str, sha256: str, content: bytes) -> V1ConfigMap:
    """The notebook snapshot, by content hash, in the project namespace.

    Raises:
        ValueError: the notebook is larger than a ConfigMap may be.
    """
    if len(content) > MAX_NOTEBOOK_BYTES:
        raise ValueError(f"the notebook is {len(content)} bytes; scheduled notebooks may be at most "
                         f"{MAX_NOTEBOOK_BYTES} bytes (clear large outputs before scheduling)")
    return V1ConfigMap(
        api_version="v1", kind="ConfigMap",
        metadata=V1ObjectMeta(name=configmap_name(sha256), namespace=namespace_for(project),
                              labels=labels_for("notebook-snapshot", project, sha256=sha256[:40])),
        data={NOTEBOOK_KEY: content.decode()},
        immutable=True,
    )


def make_run_pod_template(
    identity: Identity, project: Project, flavor: Flavor, *, image: str, notebook: str, sha256: str,
    parameters: dict, labels: dict[str, str], run_id: str | None = None, mlflow_url: str | None = None,
    image_pull_policy: str = "IfNotPresent",
) -> V1PodTemplateSpec:
    """The pod of one run: papermill (``python -m labyard_hub.scheduler.podrun``) as the user.

    ``run_id`` None (a CronJob's runs): the run id is the Job's name, from the pod's
    ``job-name`` label.
    """
    volume, mount = make_project_volume(project.name)
    nb_volume = V1Volume(name="notebook", config_map=V1ConfigMapVolumeSource(name=configmap_name(sha256)))
    env = [
        V1EnvVar(name="LABYARD_USER", value=identity.username),
        V1EnvVar(name="LABYARD_PROJECT", value=project.name),
        V1EnvVar(name="LABYARD_PROJECT_DIR", value=PROJECT_MOUNT),
        V1EnvVar(name="LABYARD_FLAVOR", value=flavor.name),
        V1EnvVar(name="LABYARD_NOTEBOOK", value=notebook),
        V1EnvVar(name="LABYARD_NOTEBOOK_SHA256", value=sha256),
        V1EnvVar(name="LABYARD_NOTEBOOK_FILE", value=f"{NOTEBOOK_MOUNT}/{NOTEBOOK_KEY}"),
        V1EnvVar(name="LABYARD_OUTPUT_DIR", value=OUTPUT_DIR),
        V1EnvVar(name="LABYARD_PARAMETERS", value=json.dumps(parameters)),
        V1EnvVar(name="LABYARD_SCHEDULE_ID", value=labels.get(LABEL_PREFIX + "schedule", "")),
        V1EnvVar(name="HOME", value=f"/tmp/home-{identity.username}"),
        V1EnvVar(name="TMPDIR", value="/tmp"),
        V1EnvVar(name="LABYARD_RUN_ID", value=run_id) if run_id else V1EnvVar(
            name="LABYARD_RUN_ID",
            value_from=V1EnvVarSource(field_ref=V1ObjectFieldSelector(field_path="metadata.labels['job-name']"))),
    ]
    if mlflow_url:
        env.append(V1EnvVar(name="MLFLOW_TRACKING_URI", value=mlflow_url))
    container = V1Container(
        name="notebook",
        image=image,
        image_pull_policy=image_pull_policy,
        command=["python3", "-m", "labyard_hub.scheduler.podrun"],
        working_dir=PROJECT_MOUNT,
        env=env,
        resources=make_resources(flavor),
        security_context=make_container_security_context(),
        volume_mounts=[mount, V1VolumeMount(name="notebook", mount_path=NOTEBOOK_MOUNT, read_only=True)],
    )
    return V1PodTemplateSpec(
        metadata=V1ObjectMeta(labels=dict(labels)),
        spec=V1PodSpec(
            restart_policy="Never",
            containers=[container],
            volumes=[volume, nb_volume],
            security_context=make_pod_security_context(identity, project),
            tolerations=make_tolerations(flavor) or None,
            node_selector=make_node_selector(flavor) or None,
            automount_service_account_token=False,
            enable_service_links=False,
        ),
    )


def _labels(schedule: Schedule, extra_labels: dict[str, str] | None, run: Run | None = None) -> dict[str, str]:
    labels = labels_for(COMPONENT, schedule.project, schedule.owner, schedule=schedule.id,
                        **({"run": run.id} if run else {}))
    labels.update(extra_labels or {})
    return labels


def _job_spec(schedule: Schedule, template: V1PodTemplateSpec, timeout: int, retries: int) -> V1JobSpec:
    return V1JobSpec(
        template=template,
        backoff_limit=retries,
        active_deadline_seconds=timeout,
        ttl_seconds_after_finished=None,  # Jobs are the record of the runs; the service prunes them
    )


def make_job(schedule: Schedule, run: Run, identity: Identity, project: Project, flavor: Flavor, *, image: str,
             extra_labels: dict[str, str] | None = None, mlflow_url: str | None = None) -> V1Job:
    """One run (run now, run once, or a re-run with other parameters) as a Job."""
    labels = _labels(schedule, extra_labels, run)
    template = make_run_pod_template(identity, project, flavor, image=image, notebook=schedule.notebook,
                                     sha256=run.notebook_sha256, parameters=run.parameters, labels=labels,
                                     run_id=run.id, mlflow_url=mlflow_url)
    return V1Job(
        api_version="batch/v1", kind="Job",
        metadata=V1ObjectMeta(name=job_name(schedule, run), namespace=namespace_for(schedule.project), labels=labels,
                              annotations={LABEL_PREFIX + "notebook": schedule.notebook,
                                           LABEL_PREFIX + "trigger": run.trigger}),
        spec=_job_spec(schedule, template, run.timeout_seconds, run.retries),
    )


def make_cronjob(schedule: Schedule, identity: Identity, project: Project, flavor: Flavor, *, image: str,
                 extra_labels: dict[str, str] | None = None, mlflow_url: str | None = None) -> V1CronJob:
    """A cron schedule as a CronJob; the schedule itself is kept in an annotation (the cluster is the source of truth).

    Raises:
        ValueError: the schedule has no cron expression (run-once schedules are Jobs).
    """
    if not schedule.cron:
        raise ValueError("a run-once schedule is a Job, not a CronJob")
    labels = _labels(schedule, extra_labels)
    template = make_run_pod_template(identity, project, flavor, image=image, notebook=schedule.notebook,
                                     sha256=schedule.notebook_sha256, parameters=schedule.parameters,
                                     labels=labels, mlflow_url=mlflow_url)
    record = schedule.model_dump(mode="json", exclude={"next_run", "last_fire"})
    return V1CronJob(
        api_version="batch/v1", kind="CronJob",
        metadata=V1ObjectMeta(name=cronjob_name(schedule), namespace=namespace_for(schedule.project), labels=labels,
                              annotations={ANNOTATION_SCHEDULE: json.dumps(record),
                                           LABEL_PREFIX + "notebook": schedule.notebook}),
        spec=V1CronJobSpec(
            schedule=schedule.cron,
            time_zone=schedule.timezone,
            concurrency_policy=CONCURRENCY[schedule.concurrency],
            starting_deadline_seconds=MISSED_DEADLINE[schedule.missed_runs],
            suspend=schedule.paused,
            successful_jobs_history_limit=20,
            failed_jobs_history_limit=20,
            job_template=V1JobTemplateSpec(
                metadata=V1ObjectMeta(labels=labels),
                spec=_job_spec(schedule, template, schedule.timeout_seconds, schedule.retries),
            ),
        ),
    )


def output_path(notebook: str, run_id: str) -> str:
    """Where a run's output notebook lands in the project volume."""
    return f"{OUTPUT_DIR}/{PurePosixPath(notebook).stem}/{run_id}.ipynb"


# ---- the backend ------------------------------------------------------------------------------

SCHEDULE_COMPONENT = "schedule"
SCHEDULE_KEY = "schedule.json"


def schedule_configmap_name(schedule_id: str) -> str:
    return f"labyard-{schedule_id}"


class KubernetesBackend(Backend):
    """Schedules and runs kept in the cluster: nothing is lost or duplicated by a restart.

    * a schedule is a ConfigMap ``labyard-<schedule id>`` (its JSON) plus, for cron schedules,
      a CronJob (suspended while paused); the notebook snapshot is an immutable ConfigMap;
    * a run is a Job (run now / run once) or a Job the CronJob controller made; its status comes
      from the Job (Complete / Failed / DeadlineExceeded / active) and its failing cell from the
      ``LABYARD-RESULT`` line of its pod's log; cancelling suspends the Job (its pod is stopped,
      the Job stays as the record) and marks it ``labyard.dev/cancelled``.

    Lookups search the namespaces of the caller's projects (the service holds namespace-scoped
    rights only), so an id from another project answers 404.
    """

    def __init__(self, *args, image: str, kubeconfig: str | None = None, extra_labels: dict[str, str] | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.image = image
        self.kubeconfig = kubeconfig
        self.extra_labels = extra_labels or {}
        self._api = None

    async def start(self) -> None:
        from kubernetes_asyncio import client, config

        if self.kubeconfig:
            await config.load_kube_config(config_file=self.kubeconfig)
        else:
            config.load_incluster_config()
        self._api = client.ApiClient()
        self.core = client.CoreV1Api(self._api)
        self.batch = client.BatchV1Api(self._api)

    async def stop(self) -> None:
        if self._api is not None:
            await self._api.close()

    # ---- helpers ---------------------------------------------------------------------
    async def _create_or_replace(self, create, replace, name: str, namespace: str, body) -> None:
        from kubernetes_asyncio.client.exceptions import ApiException

        try:
            await create(namespace, body)
        except ApiException as e:
            if e.status != 409:
                raise
            await replace(name, namespace, body)

    def _identity_of(self, schedule: Schedule) -> tuple[Identity, Project]:
        project = Project(name=schedule.project, gid=schedule.run_as_gid)
        return Identity(username=schedule.owner, uid=schedule.run_as_uid, projects=(project,)), project

    def _image(self, project: str) -> str:
        """The project's image from the policy, else the installation's default."""
        return self.policy.settings(project).image or self.image

    def _flavor(self, name: str) -> Flavor:
        return self.policy.flavors[name]

    # ---- schedules -------------------------------------------------------------------
    async def _save_schedule(self, s: Schedule) -> None:
        from kubernetes_asyncio.client import V1ConfigMap, V1ObjectMeta

        ns = namespace_for(s.project)
        cm = V1ConfigMap(
            api_version="v1", kind="ConfigMap",
            metadata=V1ObjectMeta(name=schedule_configmap_name(s.id), namespace=ns,
                                  labels=labels_for(SCHEDULE_COMPONENT, s.project, s.owner, schedule=s.id)),
            data={SCHEDULE_KEY: s.model_dump_json()},
        )
        await self._create_or_replace(self.core.create_namespaced_config_map, self.core.replace_namespaced_config_map,
                                      cm.metadata.name, ns, cm)
        if not s.cron:
            await self._delete_cronjob(s)
        else:
            content = self.snapshots.read(s.notebook_sha256)
            await self._ensure_snapshot(s.project, s.notebook_sha256, content)
            identity, project = self._identity_of(s)
            cj = make_cronjob(s, identity, project, self._flavor(s.flavor), image=self._image(s.project),
                              extra_labels=self.extra_labels, mlflow_url=self.mlflow_url)
            await self._create_or_replace(self.batch.create_namespaced_cron_job, self.batch.replace_namespaced_cron_job,
                                          cj.metadata.name, ns, cj)

    async def _ensure_snapshot(self, project: str, sha256: str, content: bytes) -> None:
        from kubernetes_asyncio.client.exceptions import ApiException

        try:
            cm = make_notebook_configmap(project, sha256, content)
        except ValueError as e:
            raise BadRequest(str(e)) from e
        try:
            await self.core.create_namespaced_config_map(namespace_for(project), cm)
        except ApiException as e:
            if e.status != 409:  # immutable and named by its hash: already there is fine
                raise

    async def _schedules_in(self, project: str, schedule_id: str | None = None) -> list[Schedule]:
        selector = f"app.kubernetes.io/component={SCHEDULE_COMPONENT}"
        if schedule_id:
            selector += f",{LABEL_PREFIX}schedule={schedule_id}"
        items = (await self.core.list_namespaced_config_map(namespace_for(project), label_selector=selector)).items
        return [Schedule.model_validate_json(cm.data[SCHEDULE_KEY]) for cm in items if SCHEDULE_KEY in (cm.data or {})]

    async def get_schedule(self, identity: Identity, schedule_id: str) -> Schedule:
        for project in identity.project_names:
            found = await self._schedules_in(project, schedule_id)
            if found:
                return self._with_next_run(found[0])
        raise NotFound(f"no schedule {schedule_id!r}")

    def _with_next_run(self, s: Schedule) -> Schedule:
        if s.cron and not s.paused:
            s.next_run = s.next_fire(now())
        return s

    async def _list_schedules(self, projects: list[str] | None) -> list[Schedule]:
        out = []
        for project in projects or []:
            out += [self._with_next_run(s) for s in await self._schedules_in(project)]
        return sorted(out, key=lambda s: s.created)

    async def _delete_cronjob(self, s: Schedule) -> None:
        from kubernetes_asyncio.client.exceptions import ApiException

        try:
            await self.batch.delete_namespaced_cron_job(cronjob_name(s), namespace_for(s.project))
        except ApiException as e:
            if e.status != 404:
                raise

    async def _delete_schedule(self, s: Schedule) -> None:
        from kubernetes_asyncio.client.exceptions import ApiException

        ns = namespace_for(s.project)
        for delete, name in ((self.batch.delete_namespaced_cron_job, cronjob_name(s)),
                             (self.core.delete_namespaced_config_map, schedule_configmap_name(s.id))):
            try:
                await delete(name, ns)
            except ApiException as e:
                if e.status != 404:
                    raise

    # ---- runs ------------------------------------------------------------------------
    async def _save_run(self, run: Run) -> None:
        pass  # a run is its Job: created by _start_run

    async def _start_run(self, schedule: Schedule, run: Run) -> Run:
        await self._ensure_snapshot(schedule.project, run.notebook_sha256, self.snapshots.read(run.notebook_sha256))
        identity, project = self._identity_of(schedule)
        job = make_job(schedule, run, identity, project, self._flavor(run.flavor), image=self._image(schedule.project),
                       extra_labels=self.extra_labels, mlflow_url=self.mlflow_url)
        await self.batch.create_namespaced_job(namespace_for(schedule.project), job)
        return run

    async def _jobs(self, project: str, schedule_id: str | None = None, run_id: str | None = None) -> list:
        selector = f"app.kubernetes.io/component={COMPONENT}"
        if schedule_id:
            selector += f",{LABEL_PREFIX}schedule={schedule_id}"
        jobs = (await self.batch.list_namespaced_job(namespace_for(project), label_selector=selector)).items
        if run_id:
            jobs = [j for j in jobs if self._run_id(j) == run_id]
        return jobs

    @staticmethod
    def _run_id(job) -> str:
        return (job.metadata.labels or {}).get(LABEL_PREFIX + "run") or job.metadata.name

    async def _run_from_job(self, job, with_result: bool = True) -> Run:
        from .podrun import parse_result

        labels = job.metadata.labels or {}
        annotations = job.metadata.annotations or {}
        container = job.spec.template.spec.containers[0]
        env = {e.name: e.value for e in container.env or [] if e.value is not None}
        st = job.status
        conditions = {c.type: c for c in (st.conditions or []) if c.status == "True"}
        cancelled = annotations.get(LABEL_PREFIX + "cancelled") == "true"
        error = failed_cell = exit_code = None
        if "Complete" in conditions:
            status, finished = RunStatus.succeeded, st.completion_time
        elif cancelled:
            status, finished, error = RunStatus.cancelled, conditions.get("Suspended", None), "cancelled"
            finished = finished.last_transition_time if finished else None
        elif "Failed" in conditions:
            status, finished = RunStatus.failed, conditions["Failed"].last_transition_time
            if conditions["Failed"].reason == "DeadlineExceeded":
                error = f"timed out after {job.spec.active_deadline_seconds}s"
        elif st.active:
            status, finished = RunStatus.running, None
        else:
            status, finished = RunStatus.pending, None
        if with_result and status in (RunStatus.succeeded, RunStatus.failed):
            result = parse_result(await self._pod_log(job)) or {}
            exit_code = result.get("exit_code")
            if status == RunStatus.failed:
                failed_cell = result.get("failed_cell")
                error = error or result.get("error") or "the run's pod failed; see the log"
        return Run(
            id=self._run_id(job), schedule_id=labels.get(LABEL_PREFIX + "schedule", ""),
            owner=env.get("LABYARD_USER", ""), project=env.get("LABYARD_PROJECT", ""),
            notebook=env.get("LABYARD_NOTEBOOK", ""), notebook_sha256=env.get("LABYARD_NOTEBOOK_SHA256", ""),
            parameters=json.loads(env.get("LABYARD_PARAMETERS", "{}")), flavor=env.get("LABYARD_FLAVOR", ""),
            trigger=annotations.get(LABEL_PREFIX + "trigger", "cron"), status=status,
            created=job.metadata.creation_timestamp, started=st.start_time, finished=finished, exit_code=exit_code,
            attempts=(st.failed or 0) + (st.succeeded or 0) + (st.active or 0),
            timeout_seconds=job.spec.active_deadline_seconds or 0, retries=job.spec.backoff_limit or 0,
            failed_cell=failed_cell, error=error,
        )

    async def _pods(self, job) -> list:
        pods = (await self.core.list_namespaced_pod(job.metadata.namespace, label_selector=f"job-name={job.metadata.name}")).items
        return sorted(pods, key=lambda p: p.metadata.creation_timestamp)

    async def _pod_log(self, job) -> str:
        from kubernetes_asyncio.client.exceptions import ApiException

        logs = []
        for pod in await self._pods(job):
            try:
                logs.append(await self.core.read_namespaced_pod_log(pod.metadata.name, job.metadata.namespace))
            except ApiException:
                continue
        return "\n".join(logs)

    async def get_run(self, identity: Identity, run_id: str) -> Run:
        job = await self._find_job(identity, run_id)
        return await self._run_from_job(job)

    async def _find_job(self, identity: Identity, run_id: str):
        for project in identity.project_names:
            jobs = await self._jobs(project, run_id=run_id)
            if jobs:
                return jobs[0]
        raise NotFound(f"no run {run_id!r}")

    async def _list_runs(self, schedule_id: str | None = None, projects: list[str] | None = None) -> list[Run]:
        runs = []
        for project in projects or []:
            runs += [await self._run_from_job(j, with_result=False) for j in await self._jobs(project, schedule_id)]
        return sorted(runs, key=lambda r: r.created, reverse=True)

    async def list_runs(self, identity: Identity, schedule_id: str | None = None, project: str | None = None) -> list[Run]:
        if project:
            self._visible(identity, project)
        projects = [project] if project else identity.project_names
        return await self._list_runs(schedule_id=schedule_id, projects=projects)

    async def _cancel_run(self, run: Run) -> Run:
        ns = namespace_for(run.project)
        for job in await self._jobs(run.project, run_id=run.id):
            await self.batch.patch_namespaced_job(job.metadata.name, ns, {
                "metadata": {"annotations": {LABEL_PREFIX + "cancelled": "true"}}, "spec": {"suspend": True}})
        return run.model_copy(update={"status": RunStatus.cancelled, "error": "cancelled", "finished": now()})

    async def _output(self, run: Run) -> bytes | None:
        raise NotFound(f"in Kubernetes mode the output notebook is in the project volume: {output_path(run.notebook, run.id)}")

    async def _log(self, run: Run) -> str | None:
        for job in await self._jobs(run.project, run_id=run.id):
            return await self._pod_log(job)
        return None
