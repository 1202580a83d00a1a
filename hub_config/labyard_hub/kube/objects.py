"""Kubernetes objects for Labyard, built by pure functions from the project model.

The Kubernetes spawner, the scheduler's Jobs and the project controller all build their pods and
namespaces here, so a notebook server and a scheduled run of the same project get the same
identity, volumes, GPU placement and labels. Nothing here talks to a cluster.
"""

from __future__ import annotations

import hashlib
import re
from decimal import Decimal

from kubernetes_asyncio.client import (
    RbacV1Subject,
    V1EnvVar,
    V1EnvVarSource,
    V1Secret,
    V1SecretKeySelector,
    V1Capabilities,
    V1LabelSelector,
    V1LabelSelectorRequirement,
    V1LimitRange,
    V1LimitRangeItem,
    V1LimitRangeSpec,
    V1Namespace,
    V1NetworkPolicy,
    V1NetworkPolicyEgressRule,
    V1NetworkPolicyIngressRule,
    V1NetworkPolicyPeer,
    V1NetworkPolicyPort,
    V1NetworkPolicySpec,
    V1ObjectMeta,
    V1PersistentVolumeClaim,
    V1PersistentVolumeClaimSpec,
    V1PersistentVolumeClaimVolumeSource,
    V1ResourceQuota,
    V1ResourceQuotaSpec,
    V1RoleBinding,
    V1RoleRef,
    V1PodSecurityContext,
    V1ResourceRequirements,
    V1SeccompProfile,
    V1SecurityContext,
    V1Toleration,
    V1Volume,
    V1VolumeMount,
    V1VolumeResourceRequirements,
)

from ..projects import Flavor, Identity, Project, Quota, ascii_fold

NAMESPACE_PREFIX = "labyard-"
#: where every server and run of a project sees the project's shared volume
PROJECT_MOUNT = "/srv/project"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
LABEL_PREFIX = "labyard.dev/"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def _digest(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def safe_name(text: str, max_length: int = 63) -> str:
    """A DNS-1123 label for any text: ASCII-folded, lower case, ``-`` for the rest.

    When the text had to be changed (or shortened), a short hash of the original is appended so
    that two different texts never share a name: ``"Résumé run"`` -> ``"resume-run-3f2a9c1e"``.
    """
    if _DNS_LABEL.match(text) and len(text) <= max_length:
        return text
    slug = ascii_fold(text)
    suffix = _digest(text)
    slug = slug[: max_length - len(suffix) - 1].strip("-")
    return f"{slug}-{suffix}" if slug else f"x-{suffix}"


def label_value(text: str) -> str:
    """A valid label value for any text (usernames, notebook names), hashed when it must change."""
    if len(text) <= 63 and _LABEL_VALUE.match(text):
        return text
    return safe_name(text)


def namespace_for(project: str) -> str:
    """The namespace of a project: ``labyard-<project>`` (project names are valid DNS labels)."""
    return safe_name(NAMESPACE_PREFIX + project)


def project_claim_name(project: str) -> str:
    """The PVC holding a project's shared files (RWX; NFS on real clusters)."""
    return safe_name(f"project-{project}")


def home_claim_name(username: str) -> str:
    """The PVC holding a user's home inside one project namespace."""
    return safe_name(f"home-{username}")


def labels_for(component: str, project: str | None = None, username: str | None = None, **extra: str) -> dict[str, str]:
    """Labels every Labyard object carries: who made it, for which project and user."""
    labels = {"app.kubernetes.io/name": "labyard", "app.kubernetes.io/component": component}
    if project:
        labels[LABEL_PREFIX + "project"] = label_value(project)
    if username:
        labels[LABEL_PREFIX + "user"] = label_value(username)
    labels.update({LABEL_PREFIX + k.replace("_", "-"): label_value(v) for k, v in extra.items()})
    return labels


def make_pod_security_context(identity: Identity, project: Project) -> V1PodSecurityContext:
    """Run as the user's LDAP uidNumber, with the project's gidNumber as group and fsGroup.

    Raises:
        ValueError: the user has no uidNumber or the project no gidNumber (nothing would be safe to run as).
    """
    if identity.uid is None:
        raise ValueError(f"{identity.username} has no uidNumber in the directory: servers run as the user's LDAP uid "
                         "in Kubernetes mode; ask an administrator to give the account a uidNumber")
    if project.gid is None:
        raise ValueError(f"project {project.label} has no gidNumber in the directory: servers run with the project's "
                         "LDAP gid in Kubernetes mode; ask an administrator to give the group a gidNumber")
    return V1PodSecurityContext(
        run_as_user=identity.uid,
        run_as_group=project.gid,
        run_as_non_root=True,
        supplemental_groups=[project.gid],
        fs_group=project.gid,
        fs_group_change_policy="OnRootMismatch",
        seccomp_profile=V1SeccompProfile(type="RuntimeDefault"),
    )


def make_container_security_context() -> V1SecurityContext:
    return V1SecurityContext(
        allow_privilege_escalation=False,
        capabilities=V1Capabilities(drop=["ALL"]),
        run_as_non_root=True,
    )


def _cpu(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{int(value * 1000)}m"


def make_resources(flavor: Flavor) -> V1ResourceRequirements:
    """Requests equal limits: a flavour is a guaranteed shape, GPUs included."""
    amounts = {"cpu": _cpu(flavor.cpu), "memory": flavor.memory}
    if flavor.gpus:
        amounts[flavor.gpu_resource] = str(flavor.gpus)
    return V1ResourceRequirements(requests=dict(amounts), limits=dict(amounts))


def make_tolerations(flavor: Flavor) -> list[V1Toleration]:
    tolerations = [V1Toleration(key=t.key, operator=t.operator, value=t.value, effect=t.effect) for t in flavor.tolerations]
    if flavor.gpus and not any(t.key == flavor.gpu_resource for t in flavor.tolerations):
        tolerations.append(V1Toleration(key=flavor.gpu_resource, operator="Exists", effect="NoSchedule"))
    return tolerations


def make_node_selector(flavor: Flavor) -> dict[str, str]:
    selector = dict(flavor.node_selector)
    if flavor.gpus and flavor.gpu_product:
        selector[GPU_PRODUCT_LABEL] = flavor.gpu_product
    return selector


def make_project_volume(project: str) -> tuple[V1Volume, V1VolumeMount]:
    """The project's shared volume, mounted at :data:`PROJECT_MOUNT`."""
    volume = V1Volume(
        name="project",
        persistent_volume_claim=V1PersistentVolumeClaimVolumeSource(claim_name=project_claim_name(project)),
    )
    return volume, V1VolumeMount(name="project", mount_path=PROJECT_MOUNT)


# -- a project's namespace and what the project controller keeps in it -----------------------


def make_namespace(project: Project) -> V1Namespace:
    labels = labels_for("project", project.name)
    # Pod Security admission: project pods must meet the "restricted" profile
    labels["pod-security.kubernetes.io/enforce"] = "restricted"
    return V1Namespace(
        metadata=V1ObjectMeta(
            name=namespace_for(project.name),
            labels=labels,
            annotations={LABEL_PREFIX + "gid": str(project.gid) if project.gid is not None else "",
                         LABEL_PREFIX + "display-name": project.label,
                         LABEL_PREFIX + "description": project.description},
        )
    )


def make_resource_quota(project: str, quota: Quota | None,
                        gpu_resources: list[str] | tuple[str, ...] = ("nvidia.com/gpu",)) -> V1ResourceQuota:
    """The project's quota: GPUs, CPU and memory of all its servers and runs together.

    Args:
        gpu_resources: every GPU resource the project's flavours ask for
            (:meth:`labyard_hub.access.Access.gpu_resources`: ``nvidia.com/gpu``, MIG slices
            such as ``nvidia.com/mig-1g.10gb``); ``quota.gpus`` limits each of them, so a
            flavour on another resource cannot escape the quota.
    """
    hard: dict[str, str] = {}
    if quota is not None:
        if quota.gpus is not None:
            for resource in gpu_resources:
                hard[f"requests.{resource}"] = str(quota.gpus)
        if quota.cpu is not None:
            hard["requests.cpu"] = hard["limits.cpu"] = _cpu(quota.cpu)
        if quota.memory is not None:
            hard["requests.memory"] = hard["limits.memory"] = quota.memory
    return V1ResourceQuota(
        metadata=V1ObjectMeta(name="labyard-quota", namespace=namespace_for(project), labels=labels_for("quota", project)),
        spec=V1ResourceQuotaSpec(hard=hard),
    )


def make_limit_range(project: str, default_cpu: str = "500m", default_memory: str = "1Gi") -> V1LimitRange:
    """Defaults for containers that name no resources (a quota makes every pod name them)."""
    return V1LimitRange(
        metadata=V1ObjectMeta(name="labyard-defaults", namespace=namespace_for(project), labels=labels_for("limits", project)),
        spec=V1LimitRangeSpec(
            limits=[
                V1LimitRangeItem(
                    type="Container",
                    default={"cpu": default_cpu, "memory": default_memory},
                    default_request={"cpu": default_cpu, "memory": default_memory},
                )
            ]
        ),
    )


def make_network_policy(
    project: str,
    hub_namespace: str,
    allowed_components: tuple[str, ...] = ("hub", "proxy"),
    egress_components: tuple[str, ...] = ("hub", "scheduler", "proxy"),
    extra_egress: tuple[dict, ...] | list[dict] = (),
) -> V1NetworkPolicy:
    """Default deny for the project's pods, both ways, with exactly the openings they need.

    In: the hub and the proxy (``allowed_components`` in the hub namespace), and the project's
    own pods (a notebook and its dask workers, say). Out: the project's own pods, the hub API,
    the scheduler and the proxy (``egress_components`` in the hub namespace: kernels and runs log
    to MLflow through the proxy at /services/mlflow/, never to MLflow's own port), DNS, and
    ``extra_egress``: NetworkPolicy egress rules as the admin wrote them (Kubernetes field
    names, e.g. a package mirror ``{"to": [{"ipBlock": {"cidr": "10.20.0.5/32"}}], "ports":
    [{"port": 443}]}``), passed through unchanged. Pods of other projects are neither reachable
    nor able to reach in.
    """

    def hub_side(components: tuple[str, ...]) -> V1NetworkPolicyPeer:
        return V1NetworkPolicyPeer(
            namespace_selector=V1LabelSelector(match_labels={"kubernetes.io/metadata.name": hub_namespace}),
            pod_selector=V1LabelSelector(
                match_expressions=[V1LabelSelectorRequirement(key="app.kubernetes.io/component", operator="In", values=list(components))]
            ),
        )

    own = V1NetworkPolicyPeer(pod_selector=V1LabelSelector())
    dns = [V1NetworkPolicyPort(port=53, protocol="UDP"), V1NetworkPolicyPort(port=53, protocol="TCP")]
    return V1NetworkPolicy(
        metadata=V1ObjectMeta(name="labyard-default-deny", namespace=namespace_for(project), labels=labels_for("netpol", project)),
        spec=V1NetworkPolicySpec(
            pod_selector=V1LabelSelector(),
            policy_types=["Ingress", "Egress"],
            ingress=[V1NetworkPolicyIngressRule(_from=[hub_side(allowed_components), own])],
            egress=[
                V1NetworkPolicyEgressRule(to=[hub_side(egress_components), own]),
                V1NetworkPolicyEgressRule(ports=dns),
                *extra_egress,
            ],
        ),
    )


def make_project_pvc(project: str, size: str, storage_class: str | None = None,
                     access_modes: tuple[str, ...] = ("ReadWriteMany",)) -> V1PersistentVolumeClaim:
    """The project's shared volume (RWX; NFS on real clusters). Never deleted by Labyard."""
    return V1PersistentVolumeClaim(
        metadata=V1ObjectMeta(name=project_claim_name(project), namespace=namespace_for(project), labels=labels_for("project-volume", project)),
        spec=V1PersistentVolumeClaimSpec(
            access_modes=list(access_modes),
            storage_class_name=storage_class,
            resources=V1VolumeResourceRequirements(requests={"storage": size}),
        ),
    )


def make_role_binding(project: str, name: str, cluster_role: str, service_account: str, sa_namespace: str) -> V1RoleBinding:
    """Grant a platform service account a (cluster-defined) role inside one project namespace only."""
    return V1RoleBinding(
        metadata=V1ObjectMeta(name=name, namespace=namespace_for(project), labels=labels_for("rbac", project)),
        role_ref=V1RoleRef(api_group="rbac.authorization.k8s.io", kind="ClusterRole", name=cluster_role),
        subjects=[RbacV1Subject(kind="ServiceAccount", name=service_account, namespace=sa_namespace)],
    )


_SUFFIXES = {"": 1, "m": Decimal("0.001"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}


def parse_quantity(quantity: str | int | float) -> Decimal:
    """A Kubernetes quantity (``500m``, ``8Gi``, ``2``) as a number (cores, bytes, count)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(quantity))
    if not match or match.group(2) not in _SUFFIXES:
        raise ValueError(f"not a Kubernetes quantity: {quantity!r}")
    return Decimal(match.group(1)) * _SUFFIXES[match.group(2)]


def server_secret_name(pod_name: str) -> str:
    """The Secret holding a server pod's hub token (``<pod name>-token``: a pod name is a DNS
    label, so this is a valid Secret name)."""
    return f"{pod_name}-token"


def make_server_secret(pod_name: str, namespace: str, values: dict[str, str], labels: dict[str, str]) -> V1Secret:
    """The Secret that carries a server's hub token, so that the token is not in the pod spec.

    Anyone who may read pods in the namespace (the scheduler may not, nor may users) would
    otherwise read every server's token there; only the hub may read or write this Secret
    (it creates it before the pod and deletes it when the server stops).

    Args:
        values: environment variable name -> value (the token, under each name the server reads it by).
    """
    return V1Secret(
        api_version="v1", kind="Secret", type="Opaque",
        metadata=V1ObjectMeta(name=server_secret_name(pod_name), namespace=namespace, labels=dict(labels)),
        string_data=dict(values),
    )


def env_from_secret(name: str, secret: str) -> V1EnvVar:
    """An environment variable read from key ``name`` of Secret ``secret``."""
    return V1EnvVar(name=name, value_from=V1EnvVarSource(secret_key_ref=V1SecretKeySelector(name=secret, key=name)))


def make_home_volume(username: str, mount_path: str) -> tuple[V1Volume, V1VolumeMount]:
    """The user's home volume in a project namespace (created by the spawner on first start)."""
    volume = V1Volume(
        name="home",
        persistent_volume_claim=V1PersistentVolumeClaimVolumeSource(claim_name=home_claim_name(username)),
    )
    return volume, V1VolumeMount(name="home", mount_path=mount_path)
