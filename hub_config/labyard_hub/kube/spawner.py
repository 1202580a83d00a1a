"""The Kubernetes project spawner: a KubeSpawner whose pods follow the project model.

One server per user and project, in the project's namespace ``labyard-<project>``, running as
the user's LDAP uidNumber with the project's gidNumber, the project's shared volume at
``/srv/project`` and a home volume per user, the flavour's resources and GPU placement. A
request that can never fit, or that the project's quota cannot hold, is refused at once.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from decimal import Decimal

from jupyterhub.spawner import SpawnException
from kubernetes_asyncio.client import ApiException
from kubespawner import KubeSpawner
from traitlets import Float, Unicode, default

from ..projects import Flavor, Identity
from ..spawners.base import ProjectSpawnerMixin
from . import objects

_LIVE = ("Pending", "Running", "Unknown")


def _tolerates(flavor: Flavor, taints) -> bool:
    """Whether the flavour's tolerations cover every NoSchedule/NoExecute taint of a node."""
    tolerations = objects.make_tolerations(flavor)
    for taint in taints or []:
        if taint.effect not in ("NoSchedule", "NoExecute"):
            continue
        if not any(
            (t.key == taint.key or (t.key is None and t.operator == "Exists"))
            and (t.operator == "Exists" or t.value == taint.value)
            and (t.effect in (None, taint.effect))
            for t in tolerations
        ):
            return False
    return True


def _requests(pod, resource: str) -> Decimal:
    total = Decimal(0)
    for c in pod.spec.containers or []:
        value = ((c.resources and c.resources.requests) or {}).get(resource)
        if value is not None:
            total += objects.parse_quantity(value)
    return total


class ProjectKubeSpawner(ProjectSpawnerMixin, KubeSpawner):
    """Per-project servers as pods, with LDAP identity, project volumes, quotas and GPU flavours."""

    home_mount_template = Unicode(
        "/home/{username}",
        help="Where the user's home volume is mounted; ``{username}`` is the hub username. Also $HOME.",
    ).tag(config=True)
    home_storage = Unicode(
        "10Gi", help="Size of the per-user home volume created (once) in each project namespace."
    ).tag(config=True)
    capacity_check_timeout = Float(
        2.0, help="Seconds for the Kubernetes reads that decide whether a request can fit (fail-fast check)."
    ).tag(config=True)
    project_ready_timeout = Float(
        90.0,
        help="""Seconds a spawn waits for the project controller to have set the project up in the
        cluster (namespace ``labyard-<project>``, quota, volume, the hub's role binding), as right
        after the platform starts or a group appears in LDAP. The controller does so within its
        interval (``controller_interval``, 60 s by default). After this the spawn is refused with
        503 and a message saying what is missing, instead of failing on a missing namespace.""",
    ).tag(config=True)

    @default("storage_pvc_ensure")
    def _storage_default(self) -> bool:
        return True

    @default("storage_access_modes")
    def _access_default(self) -> list[str]:
        return ["ReadWriteOnce"]

    @default("notebook_dir")
    def _notebook_dir_default(self) -> str:
        return objects.PROJECT_MOUNT

    @default("default_url")
    def _default_url_default(self) -> str:
        return "/lab"

    @default("cmd")
    def _cmd_default(self) -> list[str]:
        # Labyard's single-user images start the server explicitly (and the testbed's pod
        # runner needs a command: it cannot read an image's entrypoint)
        return ["jupyterhub-singleuser"]

    @default("events_enabled")
    def _events_default(self) -> bool:
        return True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.name:
            self.namespace = objects.namespace_for(self.name)
            self.dns_name = self.dns_name_template.format(namespace=self.namespace, name=self.pod_name)
            self.pvc_name = objects.home_claim_name(self.user.name)

    # -- identity, flavour and policy applied to the pod ---------------------------------------
    def authorize(self) -> None:
        """Also refuse at once, naming the attribute, a user or project without the LDAP numbers
        a pod runs as (uidNumber of the user, gidNumber of the project)."""
        super().authorize()
        try:
            objects.make_pod_security_context(self.identity or Identity(username=self.user.name), self.project)
        except ValueError as e:
            raise SpawnException(str(e), reason="identity", status_code=400) from e

    async def load_user_options(self):
        """Apply the authorized project and flavour (checked in the pre-spawn hook)."""
        assert self.project and self.flavor and self.identity
        settings = self.policy.settings(self.project.name)
        if settings.image:
            self.image = settings.image
        self.storage_capacity = self.home_storage
        self.extra_labels = {
            **self.extra_labels,
            **objects.labels_for("singleuser-server", self.project.name, self.user.name, flavor=self.flavor.name),
        }
        # make the pod reflector and the events follow this project's namespace
        self.namespace = objects.namespace_for(self.project.name)

    def get_env(self):
        env = super().get_env()
        env.update(self.project_environment())
        env["LABYARD_PROJECT_DIR"] = objects.PROJECT_MOUNT
        env["HOME"] = self.home_mount_template.format(username=self.user.name)
        return env

    async def get_pod_manifest(self):
        pod = await super().get_pod_manifest()
        identity, project, flavor = self.identity, self.project, self.flavor
        try:
            pod.spec.security_context = objects.make_pod_security_context(identity, project)
        except ValueError as e:
            raise SpawnException(str(e), reason="identity", status_code=400) from e
        container = pod.spec.containers[0]
        container.security_context = objects.make_container_security_context()
        container.resources = objects.make_resources(flavor)
        pod.spec.tolerations = [*(pod.spec.tolerations or []), *objects.make_tolerations(flavor)]
        pod.spec.node_selector = {**(pod.spec.node_selector or {}), **objects.make_node_selector(flavor)}
        volume, mount = objects.make_project_volume(project.name)
        home_volume, home_mount = objects.make_home_volume(self.user.name, self.home_mount_template.format(username=self.user.name))
        pod.spec.volumes = [*(pod.spec.volumes or []), volume, home_volume]
        container.volume_mounts = [*(container.volume_mounts or []), mount, home_mount]
        # the hub token is read from a Secret: not in the pod spec, which others may read
        secret = objects.server_secret_name(self.pod_name)
        self._secret_env = {e.name: e.value for e in container.env or [] if self.api_token and e.value == self.api_token}
        container.env = [objects.env_from_secret(e.name, secret) if e.name in self._secret_env else e
                         for e in container.env or []]
        return pod

    # -- the token's Secret: made before the pod, gone with the server --------------------------
    _secret_env: dict[str, str] = {}

    async def _make_create_pod_request(self, pod, request_timeout):
        if self._secret_env:
            manifest = objects.make_server_secret(self.pod_name, self.namespace, self._secret_env,
                                                  objects.labels_for("server-token", self.project.name, self.user.name))
            try:
                try:
                    await asyncio.wait_for(self.api.create_namespaced_secret(self.namespace, manifest), request_timeout)
                except ApiException as e:
                    if e.status != 409:
                        raise
                    await asyncio.wait_for(
                        self.api.replace_namespaced_secret(manifest.metadata.name, self.namespace, manifest), request_timeout)
            except asyncio.TimeoutError:
                return False  # exponential_backoff tries again
        return await super()._make_create_pod_request(pod, request_timeout)

    async def stop(self, now=False):
        await super().stop(now)
        try:
            await asyncio.wait_for(self.api.delete_namespaced_secret(objects.server_secret_name(self.pod_name), self.namespace),
                                   self.k8s_api_request_timeout)
        except ApiException as e:
            if e.status != 404:
                raise

    # -- fail fast -----------------------------------------------------------------------------
    async def _timed(self, coro):
        return await asyncio.wait_for(coro, self.capacity_check_timeout)

    async def gpu_nodes(self, flavor: Flavor) -> dict[str, int]:
        """Allocatable GPUs of ``flavor``'s resource per node the flavour may be placed on."""
        nodes = (await self._timed(self.api.list_node())).items
        selector = objects.make_node_selector(flavor)
        return {
            n.metadata.name: int(objects.parse_quantity((n.status.allocatable or {}).get(flavor.gpu_resource, 0)))
            for n in nodes
            if all((n.metadata.labels or {}).get(k) == v for k, v in selector.items())
            and _tolerates(flavor, n.spec.taints) and not n.spec.unschedulable
        }

    async def free_gpus(self, flavor: Flavor, allocatable: dict[str, int]) -> int:
        """GPUs not requested by any live pod on those nodes (reads every pod: for the form only)."""
        used: dict[str, Decimal] = defaultdict(Decimal)
        pods = (await self._timed(self.api.list_pod_for_all_namespaces(field_selector="status.phase!=Succeeded,status.phase!=Failed"))).items
        for pod in pods:
            if pod.spec.node_name in allocatable:
                used[pod.spec.node_name] += _requests(pod, flavor.gpu_resource)
        return sum(max(0, a - int(used[n])) for n, a in allocatable.items())

    async def quota_room(self, project: str, flavor: Flavor) -> list[tuple[str, Decimal, Decimal]]:
        """For each quota'd resource the flavour asks for: (resource, used, hard)."""
        try:
            quota = await self._timed(self.api.read_namespaced_resource_quota("labyard-quota", objects.namespace_for(project)))
        except ApiException as e:
            if e.status == 404:
                return []
            raise
        hard, used = quota.status.hard or quota.spec.hard or {}, quota.status.used or {}
        asks = objects.make_resources(flavor)
        rows = []
        for kind, amounts in (("requests", asks.requests), ("limits", asks.limits)):
            for resource in amounts:
                key = f"{kind}.{resource}"
                if key in hard:
                    rows.append((key, objects.parse_quantity(used.get(key, 0)), objects.parse_quantity(hard[key])))
        return rows

    async def check_fits(self) -> None:
        """Refuse, with a reason, a request that no node could ever hold or the project quota cannot.

        The node and quota reads run concurrently, each with ``capacity_check_timeout``; if the
        API does not answer in time the check is skipped and Kubernetes decides.
        """
        flavor, project = self.flavor, self.project
        skipped = None
        try:
            async with asyncio.TaskGroup() as tg:
                nodes = tg.create_task(self.gpu_nodes(flavor)) if flavor.gpus else None
                room = tg.create_task(self.quota_room(project.name, flavor))
        except* (ApiException, asyncio.TimeoutError) as group:
            skipped = group.exceptions[0]
        if skipped is not None:
            self.log.warning("capacity check for %s skipped: %s", self._log_name, getattr(skipped, "reason", skipped) or type(skipped).__name__)
            return
        if nodes is not None:
            allocatable = nodes.result()
            largest = max(allocatable.values(), default=0)
            if largest < flavor.gpus:
                where = f" ({flavor.gpu_product})" if flavor.gpu_product else ""
                raise SpawnException(
                    f"No node in the cluster has {flavor.gpus} × {flavor.gpu_resource}{where} for flavor {flavor.name!r}: "
                    f"the largest has {largest} (of {sum(allocatable.values())} in all).",
                    reason="capacity", status_code=409,
                )
        asks = objects.make_resources(flavor)
        for key, used, hard in room.result():
            kind, resource = key.split(".", 1)
            ask = objects.parse_quantity((asks.requests if kind == "requests" else asks.limits)[resource])
            if used + ask > hard:
                holders = await self._quota_holders(project.name)
                raise SpawnException(
                    f"Project {project.name!r} quota exceeded for {key}: {flavor.name!r} needs {ask}, "
                    f"{used} of {hard} already in use{holders}. Stop a server or choose a smaller flavor.",
                    reason="quota", status_code=403,
                )

    async def _quota_holders(self, project: str) -> str:
        pods = (await self._timed(self.api.list_namespaced_pod(objects.namespace_for(project), label_selector=f"{objects.LABEL_PREFIX}project={objects.label_value(project)}"))).items
        names = [
            f"{(p.metadata.labels or {}).get('labyard.dev/user', '?')} ({(p.metadata.labels or {}).get('labyard.dev/flavor', p.metadata.name)})"
            for p in pods if p.status.phase in _LIVE
        ]
        return f" by {', '.join(sorted(names))}" if names else ""

    async def project_missing(self, project: str) -> str | None:
        """What the cluster still lacks for ``project`` (None: set up). The hub may read the
        project's quota only once the controller has bound its role there, its last step."""
        ns = objects.namespace_for(project)
        try:
            await self._timed(self.api.read_namespaced_resource_quota("labyard-quota", ns))
            return None
        except ApiException as e:
            if e.status not in (403, 404):
                raise
            return (f"namespace {ns} (or its quota, or the hub's rights in it) does not exist yet "
                    f"(Kubernetes said {e.status} {e.reason})")
        except asyncio.TimeoutError:
            return f"the Kubernetes API did not answer within {self.capacity_check_timeout:g}s"

    async def wait_project_ready(self) -> None:
        """Wait up to ``project_ready_timeout`` for the project controller; raise 503 saying what is missing."""
        project = self.project.name
        deadline = asyncio.get_running_loop().time() + self.project_ready_timeout
        while (missing := await self.project_missing(project)) is not None:
            if asyncio.get_running_loop().time() > deadline:
                raise SpawnException(
                    f"Project {project!r} is not set up in the cluster yet: {missing}. The project controller "
                    f"creates it shortly after the group appears in LDAP; try again in a minute, and if this "
                    f"persists ask an admin to check the labyard-controller log.",
                    reason="project-not-ready", status_code=503,
                )
            self.log.info("waiting for the project controller to set up %s: %s", project, missing)
            await asyncio.sleep(2)

    async def _start(self):
        await self.wait_project_ready()
        await self.check_fits()
        return await super()._start()

    async def flavor_notes(self, project: str, flavors: list[Flavor]) -> dict[str, str]:
        """Free GPUs in the cluster and GPU quota left in the project, per GPU flavour."""
        notes = {}
        for flavor in flavors:
            if not flavor.gpus:
                continue
            try:
                allocatable = await self.gpu_nodes(flavor)
                free = await self.free_gpus(flavor, allocatable)
                note = f"{free} of {sum(allocatable.values())} GPUs free now"
                for key, used, hard in await self.quota_room(project, flavor):
                    if key == f"requests.{flavor.gpu_resource}":
                        note += f"; project quota: {hard - used} of {hard} left"
                notes[flavor.name] = note
            except (ApiException, asyncio.TimeoutError) as e:
                self.log.warning("GPU availability for the form: %s", getattr(e, "reason", e))
        return notes

    # -- progress ------------------------------------------------------------------------------
    _PHASES = {
        "Scheduled": "scheduling", "FailedScheduling": "scheduling", "Preempted": "scheduling",
        "Pulling": "image", "Pulled": "image", "Failed": "image", "BackOff": "image", "ErrImagePull": "image",
        "Created": "starting", "Started": "starting", "Killing": "starting",
    }

    async def progress(self):
        """KubeSpawner's events, labelled with the phase they belong to: scheduling, image, starting."""
        async for event in super().progress():
            raw = event.get("raw_event")
            if raw:
                phase = self._PHASES.get(raw.get("reason"), "other")
                event["message"] = f"[{phase}] {raw.get('reason')}: {raw.get('message')}"
            yield event
