"""The project controller: every LDAP project gets its namespace, quota, limits, network policy,
shared volume and role bindings, kept as the policy says (server-side apply, field manager
``labyard``). A project that leaves LDAP is retired: its role bindings go (nobody can start
anything there any more) and its namespace is labelled orphaned, its data kept, unless
``delete_orphaned_namespaces`` is set.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from kubernetes_asyncio.client import (
    ApiClient,
    ApiException,
    CoreV1Api,
    NetworkingV1Api,
    RbacAuthorizationV1Api,
    V1LimitRange,
    V1Namespace,
    V1NetworkPolicy,
    V1PersistentVolumeClaim,
    V1ResourceQuota,
    V1RoleBinding,
)

from ..access import Access
from ..projects import Project, ProjectPolicy
from . import objects

log = logging.getLogger("labyard.controller")

MANAGER = "labyard"
ORPHANED = objects.LABEL_PREFIX + "orphaned"

# model class -> (apiVersion, kind, api class, patch method, create method, namespaced)
_KINDS = {
    V1Namespace: ("v1", "Namespace", CoreV1Api, "patch_namespace", "create_namespace", False),
    V1ResourceQuota: ("v1", "ResourceQuota", CoreV1Api, "patch_namespaced_resource_quota", None, True),
    V1LimitRange: ("v1", "LimitRange", CoreV1Api, "patch_namespaced_limit_range", None, True),
    V1PersistentVolumeClaim: ("v1", "PersistentVolumeClaim", CoreV1Api, None, "create_namespaced_persistent_volume_claim", True),
    V1NetworkPolicy: ("networking.k8s.io/v1", "NetworkPolicy", NetworkingV1Api, "patch_namespaced_network_policy", None, True),
    V1RoleBinding: ("rbac.authorization.k8s.io/v1", "RoleBinding", RbacAuthorizationV1Api, "patch_namespaced_role_binding", None, True),
}


@dataclass
class Grant:
    """A platform service account that gets a ClusterRole inside every project namespace."""

    name: str
    cluster_role: str
    service_account: str
    namespace: str


class ProjectController:
    """Reconciles project namespaces against LDAP projects and the project policy.

    Args:
        api: a kubernetes_asyncio ApiClient.
        list_projects: coroutine function returning every project in LDAP.
        policy: the project policy (quota, storage).
        hub_namespace: where the hub and proxy run (network policy lets them in).
        grants: role bindings to create in every project namespace.
        project_egress: extra egress rules of the project namespaces' network policy.
    """

    def __init__(
        self,
        api: ApiClient,
        list_projects: Callable[[], Awaitable[list[Project]]],
        policy: ProjectPolicy,
        hub_namespace: str,
        grants: list[Grant],
        storage_class: str | None = None,
        delete_orphaned_namespaces: bool = False,
        request_timeout: float = 10,
        project_egress: list[dict] | None = None,
    ):
        self.api = api
        self.list_projects = list_projects
        self.policy = policy
        self.access = Access(policy)
        self.hub_namespace = hub_namespace
        self.grants = grants
        self.storage_class = storage_class
        self.delete_orphaned = delete_orphaned_namespaces
        self.timeout = request_timeout
        self.project_egress = list(project_egress or [])
        self.core = CoreV1Api(api)
        self.rbac = RbacAuthorizationV1Api(api)

    def desired(self, project: Project) -> list:
        """Every object a project should have, in the order to apply them."""
        settings = self.policy.settings(project.name)
        return [
            objects.make_namespace(project),
            objects.make_resource_quota(project.name, settings.quota, self.access.gpu_resources(project.name)),
            objects.make_limit_range(project.name),
            objects.make_network_policy(project.name, self.hub_namespace, extra_egress=self.project_egress),
            objects.make_project_pvc(project.name, settings.storage or "10Gi", self.storage_class),
            *(objects.make_role_binding(project.name, g.name, g.cluster_role, g.service_account, g.namespace) for g in self.grants),
        ]

    async def _apply(self, obj) -> None:
        api_version, kind, api_cls, patch, create, namespaced = _KINDS[type(obj)]
        api = api_cls(self.api)
        body = self.api.sanitize_for_serialization(obj)
        body.update(apiVersion=api_version, kind=kind)
        name, ns = obj.metadata.name, obj.metadata.namespace
        args = (name, ns) if namespaced else (name,)
        if patch is None:
            # create-only objects (a PVC's spec cannot change): keep what exists
            try:
                await getattr(api, create)(*((ns,) if namespaced else ()), body, _request_timeout=self.timeout)
                log.info("created %s %s/%s", kind, ns or "", name)
            except ApiException as e:
                if e.status != 409:
                    raise
            return
        await getattr(api, patch)(
            *args, body, field_manager=MANAGER, force=True,
            _content_type="application/apply-patch+yaml", _request_timeout=self.timeout,
        )

    async def reconcile(self, project: Project) -> None:
        for obj in self.desired(project):
            await self._apply(obj)

    async def retire(self, namespace: V1Namespace) -> None:
        name = namespace.metadata.name
        if self.delete_orphaned:
            log.warning("project namespace %s has no LDAP project: deleting it", name)
            await self.core.delete_namespace(name, _request_timeout=self.timeout)
            return
        log.warning("project namespace %s has no LDAP project: retiring it (data kept)", name)
        for grant in self.grants:
            try:
                await self.rbac.delete_namespaced_role_binding(grant.name, name, _request_timeout=self.timeout)
            except ApiException as e:
                if e.status != 404:
                    raise
        await self.core.patch_namespace(name, {"metadata": {"labels": {ORPHANED: "true"}}}, _request_timeout=self.timeout)

    async def reconcile_all(self) -> dict[str, list[str]]:
        """One pass: reconcile every LDAP project, retire namespaces whose project is gone."""
        projects = await self.list_projects()
        wanted = {objects.namespace_for(p.name): p for p in projects}
        done: dict[str, list[str]] = {"reconciled": [], "retired": [], "failed": []}
        for ns, project in wanted.items():
            try:
                await self.reconcile(project)
                done["reconciled"].append(project.name)
            except (ApiException, asyncio.TimeoutError, OSError) as e:
                log.error("project %s: reconcile failed: %s", project.name, getattr(e, "reason", e))
                done["failed"].append(project.name)
        existing = await self.core.list_namespace(
            label_selector="app.kubernetes.io/name=labyard,app.kubernetes.io/component=project", _request_timeout=self.timeout
        )
        for ns in existing.items:
            orphaned = (ns.metadata.labels or {}).get(ORPHANED) == "true"
            if ns.metadata.name not in wanted and not orphaned and ns.status.phase != "Terminating":
                await self.retire(ns)
                done["retired"].append(ns.metadata.name)
            elif ns.metadata.name in wanted and orphaned:
                # the project came back: it is a normal project again
                await self.core.patch_namespace(
                    ns.metadata.name, {"metadata": {"labels": {ORPHANED: None}}}, _request_timeout=self.timeout
                )
        return done
