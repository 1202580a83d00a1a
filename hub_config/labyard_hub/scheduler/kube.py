"""The Kubernetes backend's objects: a schedule is a CronJob, a run is a Job, in the project namespace.

Pure functions (no cluster): :func:`make_notebook_configmap`, :func:`make_run_pod_template`,
:func:`make_job` and :func:`make_cronjob` build ``kubernetes_asyncio`` models from the same
project model and the same builders (:mod:`labyard_hub.kube.objects`) as the Kubernetes
spawner, so a scheduled run gets exactly the identity (the user's uid, the project's gid), the
GPU limit, the tolerations, the node selector and the project volume a notebook server would.

Mapping of the schedule's fields:

=====================  ==========================================================
timeout_seconds        each attempt's limit, kept by the run's pod (``$LABYARD_TIMEOUT_SECONDS``);
                       Job ``activeDeadlineSeconds`` is a backstop over all attempts
retries                attempts inside the run's pod, as in local mode (``$LABYARD_RETRIES``)
cron, timezone         CronJob ``schedule``, ``timeZone``
concurrency            CronJob ``concurrencyPolicy`` (Allow / Forbid / Replace)
missed_runs            CronJob ``startingDeadlineSeconds``: ``skip`` -> 120 s, ``run_once`` -> 1 day
                       (the CronJob controller starts the latest missed time once)
paused                 CronJob ``suspend``; ``paused_reason`` also in the annotation
                       ``labyard.dev/paused-reason``
=====================  ==========================================================

A run's result reaches the scheduler without reading pods (its role has no rights on pods or
their logs, which hold other users' servers): the pod's exit code encodes it
(:mod:`.podrun`), and a Job ``podFailurePolicy`` fails the Job at the pod's first non-zero
exit, so the Job's ``Failed`` condition names that exit code. The full result, the log and the
output notebook are in the project volume, next to each other.

Labels link every object to its schedule, run, user and project (``labyard.dev/...``).
"""

from __future__ import annotations

import json
import logging
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
    V1PodFailurePolicy,
    V1PodFailurePolicyOnExitCodesRequirement,
    V1PodFailurePolicyOnPodConditionsPattern,
    V1PodFailurePolicyRule,
    V1PodSpec,
    V1PodTemplateSpec,
    V1Secret,
    V1SecretKeySelector,
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
from .backend import Backend, BadRequest, Conflict, NotFound, Unavailable
from .models import Reproduction, Run, RunStatus, Schedule, now
from .podrun import result_of_exit_code
from .tokens import RunTokens, TokenError

COMPONENT = "scheduled-run"
NOTEBOOK_MOUNT = "/etc/labyard/notebook"
NOTEBOOK_KEY = "notebook.ipynb"
#: where runs leave their output notebook, log and result, inside the project (as users see it)
OUTPUT_FOLDER = "scheduled-runs"
OUTPUT_DIR = f"{PROJECT_MOUNT}/{OUTPUT_FOLDER}"
#: a ConfigMap holds at most 1 MiB
MAX_NOTEBOOK_BYTES = 1024 * 1024 - 4096
MISSED_DEADLINE = {"skip": 120, "run_once": 24 * 3600}
CONCURRENCY = {"allow": "Allow", "forbid": "Forbid", "replace": "Replace"}
ANNOTATION_SCHEDULE = LABEL_PREFIX + "schedule"
log = logging.getLogger("labyard.scheduler")
ANNOTATION_PAUSED = LABEL_PREFIX + "paused-reason"
#: seconds a run's pod may need beyond its attempts' time limits (start, image pull, writing results)
DEADLINE_SLACK = 600


#: the key of the schedule's MLflow token in its Secret, and the annotation with the token's hub id
MLFLOW_TOKEN_KEY = "token"
ANNOTATION_TOKEN_ID = LABEL_PREFIX + "hub-token-id"


def mlflow_secret_name(schedule_id: str) -> str:
    """The Secret with the MLflow token of a schedule's runs."""
    return safe_name(f"labyard-mlflow-{schedule_id}", 63)


def make_mlflow_token_secret(schedule: Schedule, token: str, token_id: str) -> V1Secret:
    """The owner's MLflow-only hub token (:mod:`.tokens`) that the schedule's run pods log with."""
    return V1Secret(
        api_version="v1", kind="Secret", type="Opaque",
        metadata=V1ObjectMeta(name=mlflow_secret_name(schedule.id), namespace=namespace_for(schedule.project),
                              labels=labels_for("mlflow-token", schedule.project, schedule.owner, schedule=schedule.id),
                              annotations={ANNOTATION_TOKEN_ID: token_id}),
        string_data={MLFLOW_TOKEN_KEY: token},
    )


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
    parameters: dict, labels: dict[str, str], timeout: int, retries: int, run_id: str | None = None,
    mlflow_url: str | None = None, image_pull_policy: str = "IfNotPresent",
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
        V1EnvVar(name="LABYARD_GPUS", value=str(flavor.gpus)),
        V1EnvVar(name="LABYARD_NOTEBOOK", value=notebook),
        V1EnvVar(name="LABYARD_NOTEBOOK_SHA256", value=sha256),
        # what the run records as its image (labyard.image; with a digest when given by one)
        V1EnvVar(name="LABYARD_IMAGE", value=image),
        V1EnvVar(name="LABYARD_NOTEBOOK_FILE", value=f"{NOTEBOOK_MOUNT}/{NOTEBOOK_KEY}"),
        V1EnvVar(name="LABYARD_OUTPUT_DIR", value=OUTPUT_DIR),
        V1EnvVar(name="LABYARD_PARAMETERS", value=json.dumps(parameters)),
        V1EnvVar(name="LABYARD_SCHEDULE_ID", value=labels.get(LABEL_PREFIX + "schedule", "")),
        V1EnvVar(name="LABYARD_TIMEOUT_SECONDS", value=str(timeout)),
        V1EnvVar(name="LABYARD_RETRIES", value=str(retries)),
        V1EnvVar(name="HOME", value=f"/tmp/home-{identity.username}"),
        V1EnvVar(name="TMPDIR", value="/tmp"),
        V1EnvVar(name="LABYARD_RUN_ID", value=run_id) if run_id else V1EnvVar(
            name="LABYARD_RUN_ID",
            value_from=V1EnvVarSource(field_ref=V1ObjectFieldSelector(field_path="metadata.labels['job-name']"))),
    ]
    if mlflow_url:
        # the run logs through the MLflow gate as its owner: the schedule's token (optional: without
        # it the run still runs, and its records wait in the queue)
        schedule_id = labels.get(LABEL_PREFIX + "schedule", "")
        env += [V1EnvVar(name="MLFLOW_TRACKING_URI", value=mlflow_url),
                V1EnvVar(name="MLFLOW_TRACKING_TOKEN", value_from=V1EnvVarSource(secret_key_ref=V1SecretKeySelector(
                    name=mlflow_secret_name(schedule_id), key=MLFLOW_TOKEN_KEY, optional=True)))]
    container = V1Container(
        name="notebook",
        image=image,
        image_pull_policy=image_pull_policy,
        # args, not command: the image's entry point (tini, and the start hook that gives the
        # LDAP uid a passwd entry) runs first
        args=["python3", "-m", "labyard_hub.scheduler.podrun"],
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


def _job_spec(template: V1PodTemplateSpec, timeout: int, retries: int) -> V1JobSpec:
    """One pod per run (its attempts run inside it); the first non-zero exit fails the Job with
    that exit code in the ``Failed`` condition's message; a pod lost to a node going away or a
    preemption is replaced without counting."""
    return V1JobSpec(
        template=template,
        backoff_limit=0,
        active_deadline_seconds=timeout * (retries + 1) + DEADLINE_SLACK,
        pod_failure_policy=V1PodFailurePolicy(rules=[
            V1PodFailurePolicyRule(action="Ignore", on_pod_conditions=[
                V1PodFailurePolicyOnPodConditionsPattern(type="DisruptionTarget", status="True")]),
            V1PodFailurePolicyRule(action="FailJob", on_exit_codes=V1PodFailurePolicyOnExitCodesRequirement(
                container_name="notebook", operator="NotIn", values=[0])),
        ]),
        ttl_seconds_after_finished=None,  # Jobs are the record of the runs; the service prunes them
    )


def make_job(schedule: Schedule, run: Run, identity: Identity, project: Project, flavor: Flavor, *, image: str,
             extra_labels: dict[str, str] | None = None, mlflow_url: str | None = None) -> V1Job:
    """One run (run now, run once, or a re-run with other parameters) as a Job."""
    labels = _labels(schedule, extra_labels, run)
    repro = run.reproduce
    # a reproduction runs the image the original ran, by digest (a tag may point elsewhere by now)
    template = make_run_pod_template(identity, project, flavor, image=repro.image if repro and repro.image else image,
                                     notebook=schedule.notebook,
                                     sha256=run.notebook_sha256, parameters=run.parameters, labels=labels,
                                     timeout=run.timeout_seconds, retries=run.retries, run_id=run.id,
                                     mlflow_url=mlflow_url)
    if repro is not None:
        env = template.spec.containers[0].env
        env.append(V1EnvVar(name="LABYARD_REPRODUCE", value=repro.model_dump_json()))
        if repro.image and "@sha256:" in repro.image:
            env.append(V1EnvVar(name="LABYARD_IMAGE_DIGEST", value=repro.image.split("@", 1)[1]))
    return V1Job(
        api_version="batch/v1", kind="Job",
        metadata=V1ObjectMeta(name=job_name(schedule, run), namespace=namespace_for(schedule.project), labels=labels,
                              annotations={LABEL_PREFIX + "notebook": schedule.notebook,
                                           LABEL_PREFIX + "trigger": run.trigger}),
        spec=_job_spec(template, run.timeout_seconds, run.retries),
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
                                     labels=labels, timeout=schedule.timeout_seconds, retries=schedule.retries,
                                     mlflow_url=mlflow_url)
    record = schedule.model_dump(mode="json", exclude={"next_run", "last_fire"})
    return V1CronJob(
        api_version="batch/v1", kind="CronJob",
        metadata=V1ObjectMeta(name=cronjob_name(schedule), namespace=namespace_for(schedule.project), labels=labels,
                              annotations={ANNOTATION_SCHEDULE: json.dumps(record),
                                           LABEL_PREFIX + "notebook": schedule.notebook,
                                           **({ANNOTATION_PAUSED: schedule.paused_reason} if schedule.paused_reason else {})}),
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
                spec=_job_spec(template, schedule.timeout_seconds, schedule.retries),
            ),
        ),
    )


def output_path(notebook: str, run_id: str, suffix: str = ".ipynb") -> str:
    """Where a run's output notebook (``.ipynb``), log (``.log``) and result (``.result.json``)
    land, relative to the project (its volume is the servers' working directory)."""
    return f"{OUTPUT_FOLDER}/{PurePosixPath(notebook).stem}/{run_id}{suffix}"


# ---- the backend ------------------------------------------------------------------------------

SCHEDULE_COMPONENT = "schedule"
SCHEDULE_KEY = "schedule.json"


def schedule_configmap_name(schedule_id: str) -> str:
    return f"labyard-{schedule_id}"


class KubernetesBackend(Backend):
    """Schedules and runs kept in the cluster: nothing is lost or duplicated by a restart.

    * a schedule is a ConfigMap ``labyard-<schedule id>`` (its JSON) plus, for cron schedules,
      a CronJob (suspended while paused); the notebook snapshot is an immutable ConfigMap;
    * a run is a Job (run now / run once) or a Job the CronJob controller made; its status,
      failing cell and time-out come from the Job alone (conditions, and the exit code its
      ``Failed`` condition names); cancelling suspends the Job (its pod is stopped, the Job
      stays as the record) and marks it ``labyard.dev/cancelled``;
    * the CronJob controller starts cron runs by itself, so the reconcile pass (every
      ``reconcile_interval`` seconds) is what stops them: it suspends the CronJob of a schedule
      whose owner left the project or whose flavour is gone, with the reason in the annotation
      ``labyard.dev/paused-reason``, and resumes nothing.

    The service holds namespace-scoped rights only, in every project namespace: lookups search
    the caller's projects first, then the others (so that an id of another project is 403, as
    in local mode, and admins see every project). The projects are those of ``identities``.
    """

    def __init__(self, *args, image: str, kubeconfig: str | None = None, extra_labels: dict[str, str] | None = None,
                 project_ready_timeout: float = 10, run_tokens: RunTokens | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.run_tokens = run_tokens
        self.image = image
        self.kubeconfig = kubeconfig
        self.extra_labels = extra_labels or {}
        self.project_ready_timeout = project_ready_timeout
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
        await super().start()

    async def stop(self) -> None:
        await super().stop()
        if self._api is not None:
            await self._api.close()

    # ---- helpers ---------------------------------------------------------------------
    async def _project_missing(self, project: str) -> str | None:
        """What the cluster lacks for ``project`` (None: set up). The service may read the
        project's quota once the controller has bound its role there, its last step."""
        from kubernetes_asyncio.client.exceptions import ApiException

        ns = namespace_for(project)
        try:
            await self.core.read_namespaced_resource_quota("labyard-quota", ns, _request_timeout=5)
            return None
        except ApiException as e:
            if e.status not in (403, 404):
                raise
            return f"namespace {ns} (or the scheduler's rights in it) does not exist yet (Kubernetes said {e.status} {e.reason})"

    async def _require_project(self, project: str) -> None:
        """Wait up to ``project_ready_timeout`` for the project controller, else :class:`Unavailable`."""
        import asyncio

        deadline = asyncio.get_running_loop().time() + self.project_ready_timeout
        while (missing := await self._project_missing(project)) is not None:
            if asyncio.get_running_loop().time() > deadline:
                raise Unavailable(f"project {project!r} is not set up in the cluster yet: {missing}; the project "
                                  f"controller creates it shortly after the group appears in LDAP, try again in a minute")
            await asyncio.sleep(1)

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

    async def _projects(self, first: list[str] = ()) -> list[str]:
        """Every project (its namespace is where to look), ``first`` first."""
        rest = [p for p in await self.identities.projects() if p not in first]
        return [*first, *rest]

    @staticmethod
    def _token_note(s: Schedule) -> str:
        return f"labyard-scheduler schedule {s.id} (MLflow)"

    async def _ensure_mlflow_token(self, s: Schedule) -> None:
        """The schedule's MLflow token Secret, made once (see :mod:`.tokens`). The scheduler may
        create and delete Secrets but read none (they hold users' tokens): a Secret that exists
        answers 409, and the token just made for it is revoked again."""
        from kubernetes_asyncio.client.exceptions import ApiException

        if self.run_tokens is None or not self.mlflow_url:
            return
        try:
            token, token_id = await self.run_tokens.create(s.owner, self._token_note(s), None)
        except TokenError as e:
            log.warning("schedule %s: no MLflow token (%s); its runs' records wait in their queue", s.id, e)
            return
        try:
            await self.core.create_namespaced_secret(namespace_for(s.project), make_mlflow_token_secret(s, token, token_id))
        except ApiException as e:
            await self.run_tokens.revoke(s.owner, token_id)
            if e.status != 409:  # there already: keep that one
                raise

    async def _drop_mlflow_token(self, s: Schedule) -> None:
        from kubernetes_asyncio.client.exceptions import ApiException

        if self.run_tokens is not None:
            try:
                await self.run_tokens.revoke_noted(s.owner, self._token_note(s))
            except TokenError as e:
                log.warning("schedule %s: could not revoke its MLflow token: %s", s.id, e)
        try:
            await self.core.delete_namespaced_secret(mlflow_secret_name(s.id), namespace_for(s.project))
        except ApiException as e:
            if e.status != 404:
                raise

    # ---- schedules -------------------------------------------------------------------
    async def _save_schedule(self, s: Schedule) -> None:
        from kubernetes_asyncio.client import V1ConfigMap, V1ObjectMeta

        ns = namespace_for(s.project)
        await self._require_project(s.project)
        cm = V1ConfigMap(
            api_version="v1", kind="ConfigMap",
            metadata=V1ObjectMeta(name=schedule_configmap_name(s.id), namespace=ns,
                                  labels=labels_for(SCHEDULE_COMPONENT, s.project, s.owner, schedule=s.id)),
            data={SCHEDULE_KEY: s.model_dump_json()},
        )
        if s.cron and s.paused and self.access.flavor(s.flavor) is None:
            # its flavour is gone: the CronJob cannot be rebuilt, only suspended (before the record says so)
            await self._suspend_cronjob(s)
        elif s.cron:
            await self._ensure_snapshot(s.project, s.notebook_sha256)
            identity, project = self._identity_of(s)
            await self._ensure_mlflow_token(s)
            cj = make_cronjob(s, identity, project, self.access.flavor(s.flavor), image=self._image(s.project),
                              extra_labels=self.extra_labels, mlflow_url=self.mlflow_url)
            await self._create_or_replace(self.batch.create_namespaced_cron_job, self.batch.replace_namespaced_cron_job,
                                          cj.metadata.name, ns, cj)
        await self._create_or_replace(self.core.create_namespaced_config_map, self.core.replace_namespaced_config_map,
                                      cm.metadata.name, ns, cm)
        if not s.cron:
            await self._delete_cronjob(s)

    async def _suspend_cronjob(self, s: Schedule) -> None:
        from kubernetes_asyncio.client.exceptions import ApiException

        try:
            await self.batch.patch_namespaced_cron_job(cronjob_name(s), namespace_for(s.project), {
                "metadata": {"annotations": {ANNOTATION_PAUSED: s.paused_reason or "paused"}}, "spec": {"suspend": True}})
        except ApiException as e:
            if e.status != 404:
                raise

    async def _ensure_snapshot(self, project: str, sha256: str) -> None:
        """The notebook's ConfigMap in the project namespace, made from the local snapshot if missing."""
        from kubernetes_asyncio.client.exceptions import ApiException

        ns = namespace_for(project)
        if not await self._in_thread(self.snapshots.exists, sha256):
            try:  # made when the schedule was; the local copy may have been cleaned up since
                await self.core.read_namespaced_config_map(configmap_name(sha256), ns)
                return
            except ApiException as e:
                if e.status != 404:
                    raise
            raise Conflict(f"the notebook snapshot {sha256[:12]} is gone; schedule the notebook again")
        try:
            cm = make_notebook_configmap(project, sha256, await self._in_thread(self.snapshots.read, sha256))
        except ValueError as e:
            raise BadRequest(str(e)) from e
        try:
            await self.core.create_namespaced_config_map(ns, cm)
        except ApiException as e:
            if e.status != 409:  # immutable and named by its hash: already there is fine
                raise

    async def _labelled(self, list_in_namespace, project: str, component: str, schedule_id: str | None) -> list:
        """The objects of ``component`` (of one schedule) in a project's namespace; none where
        that namespace is not (or no longer, or not yet) one the service may read."""
        from kubernetes_asyncio.client.exceptions import ApiException

        selector = f"app.kubernetes.io/component={component}"
        if schedule_id:
            selector += f",{LABEL_PREFIX}schedule={schedule_id}"
        try:
            return (await list_in_namespace(namespace_for(project), label_selector=selector)).items
        except ApiException as e:
            if e.status not in (403, 404):
                raise
            log.warning("project %s: %s %s (namespace not set up yet?): listed as empty", project, e.status, e.reason)
            return []

    async def _schedules_in(self, project: str, schedule_id: str | None = None) -> list[Schedule]:
        items = await self._labelled(self.core.list_namespaced_config_map, project, SCHEDULE_COMPONENT, schedule_id)
        return [Schedule.model_validate_json(cm.data[SCHEDULE_KEY]) for cm in items if SCHEDULE_KEY in (cm.data or {})]

    async def _load_schedule(self, schedule_id: str, projects_first: list[str] = ()) -> Schedule | None:
        for project in await self._projects(projects_first):
            found = await self._schedules_in(project, schedule_id)
            if found:
                return self._with_next_run(found[0])
        return None

    def _with_next_run(self, s: Schedule) -> Schedule:
        if s.cron and not s.paused:
            s.next_run = s.next_fire(now())
        return s

    async def _list_schedules(self, projects: list[str] | None) -> list[Schedule]:
        out = []
        for project in projects if projects is not None else await self._projects():
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

        await self._drop_mlflow_token(s)
        ns = namespace_for(s.project)
        for delete, name in ((self.batch.delete_namespaced_cron_job, cronjob_name(s)),
                             (self.core.delete_namespaced_config_map, schedule_configmap_name(s.id))):
            try:
                await delete(name, ns)
            except ApiException as e:
                if e.status != 404:
                    raise

    # ---- reproductions --------------------------------------------------------------
    async def _reproduction_environment(self, gate, req, tags: dict[str, str], warnings: list[str]) -> str | None:
        """Kubernetes: the recorded image, pinned by its digest (``name@sha256:...``); without a
        recorded digest the project's image as it is now, if the user chose to be warned."""
        digest = tags.get("labyard.image_digest")
        image = tags.get("labyard.image", "")
        if tags.get("labyard.mode") == "kubernetes" and digest:
            return f"{image.split('@', 1)[0]}@{digest}"
        what = (f"MLflow run {req.reproduce} ran locally (its Python environment, not an image)"
                if tags.get("labyard.mode", "local") != "kubernetes"
                else f"MLflow run {req.reproduce} has no image digest recorded (image {image or '?'})")
        self._environment_differs(req, f"{what}; the reproduction would run {self._image(tags['labyard.project'])}",
                                  warnings)
        return None

    async def _changed_inputs(self, project: str, files: list[dict], warnings: list[str]) -> list[str]:
        # the service has no access to project volumes: not compared (docs/admin/scheduler.md)
        if files:
            warnings.append(f"{len(files)} input files not compared with the project volume (Kubernetes)")
        return []

    # ---- runs ------------------------------------------------------------------------
    async def _save_run(self, run: Run) -> None:
        pass  # a run is its Job: created by _start_run

    async def _start_run(self, schedule: Schedule, run: Run, flavor: Flavor) -> Run:
        await self._require_project(schedule.project)
        await self._ensure_snapshot(schedule.project, run.notebook_sha256)
        identity, project = self._identity_of(schedule)
        await self._ensure_mlflow_token(schedule)
        job = make_job(schedule, run, identity, project, flavor, image=self._image(schedule.project),
                       extra_labels=self.extra_labels, mlflow_url=self.mlflow_url)
        await self.batch.create_namespaced_job(namespace_for(schedule.project), job)
        return run

    async def _jobs(self, project: str, schedule_id: str | None = None, run_id: str | None = None) -> list:
        jobs = await self._labelled(self.batch.list_namespaced_job, project, COMPONENT, schedule_id)
        if run_id:
            jobs = [j for j in jobs if self._run_id(j) == run_id]
        return jobs

    @staticmethod
    def _run_id(job) -> str:
        return (job.metadata.labels or {}).get(LABEL_PREFIX + "run") or job.metadata.name

    @staticmethod
    def _run_from_job(job) -> Run:
        """A run as its Job says: status, time-out, and (from the exit code) the failing cell."""
        labels = job.metadata.labels or {}
        annotations = job.metadata.annotations or {}
        container = job.spec.template.spec.containers[0]
        env = {e.name: e.value for e in container.env or [] if e.value is not None}
        st = job.status
        conditions = {c.type: c for c in (st.conditions or []) if c.status == "True"}
        cancelled = annotations.get(LABEL_PREFIX + "cancelled") == "true"
        error = failed_cell = exit_code = None
        notebook = env.get("LABYARD_NOTEBOOK", "")
        run_id = KubernetesBackend._run_id(job)
        if "Complete" in conditions:
            status, finished, exit_code = RunStatus.succeeded, st.completion_time, 0
        elif cancelled:
            status, finished, error = RunStatus.cancelled, conditions.get("Suspended", None), "cancelled"
            finished = finished.last_transition_time if finished else None
        elif "Failed" in conditions:
            failed = conditions["Failed"]
            status, finished = RunStatus.failed, failed.last_transition_time
            if failed.reason == "DeadlineExceeded":
                error = f"timed out after {job.spec.active_deadline_seconds}s (all attempts together)"
            else:
                exit_code, failed_cell, error = result_of_exit_code(failed.message or "", output_path(notebook, run_id))
        elif st.active:
            status, finished = RunStatus.running, None
        else:
            status, finished = RunStatus.pending, None
        return Run(
            id=run_id, schedule_id=labels.get(LABEL_PREFIX + "schedule", ""),
            owner=env.get("LABYARD_USER", ""), project=env.get("LABYARD_PROJECT", ""),
            notebook=notebook, notebook_sha256=env.get("LABYARD_NOTEBOOK_SHA256", ""),
            parameters=json.loads(env.get("LABYARD_PARAMETERS", "{}")), flavor=env.get("LABYARD_FLAVOR", ""),
            trigger=annotations.get(LABEL_PREFIX + "trigger", "cron"), status=status,
            created=job.metadata.creation_timestamp, started=st.start_time, finished=finished, exit_code=exit_code,
            attempts=(st.failed or 0) + (st.succeeded or 0) + (st.active or 0),
            timeout_seconds=int(env.get("LABYARD_TIMEOUT_SECONDS", "0")), retries=int(env.get("LABYARD_RETRIES", "0")),
            failed_cell=failed_cell, error=error,
            reproduce=Reproduction.model_validate_json(env["LABYARD_REPRODUCE"]) if env.get("LABYARD_REPRODUCE") else None,
        )

    async def _load_run(self, run_id: str, projects_first: list[str] = ()) -> Run | None:
        for project in await self._projects(projects_first):
            jobs = await self._jobs(project, run_id=run_id)
            if jobs:
                return self._run_from_job(jobs[0])
        return None

    async def _list_runs(self, schedule_id: str | None = None, projects: list[str] | None = None) -> list[Run]:
        runs = []
        for project in projects if projects is not None else await self._projects():
            runs += [self._run_from_job(j) for j in await self._jobs(project, schedule_id)]
        return sorted(runs, key=lambda r: r.created, reverse=True)

    async def _cancel_run(self, run: Run) -> Run:
        ns = namespace_for(run.project)
        for job in await self._jobs(run.project, run_id=run.id):
            await self.batch.patch_namespaced_job(job.metadata.name, ns, {
                "metadata": {"annotations": {LABEL_PREFIX + "cancelled": "true"}}, "spec": {"suspend": True}})
        return run.model_copy(update={"status": RunStatus.cancelled, "error": "cancelled", "finished": now()})

    async def _output(self, run: Run) -> bytes | None:
        raise NotFound(f"in Kubernetes mode the output notebook is in the project volume: {output_path(run.notebook, run.id)}")

    async def _log(self, run: Run) -> str | None:
        raise NotFound(f"in Kubernetes mode the run's log is in the project volume: {output_path(run.notebook, run.id, '.log')}")
