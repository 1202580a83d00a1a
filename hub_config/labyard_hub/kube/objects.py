"""Kubernetes objects for Labyard, built by pure functions from the project model.

The Kubernetes spawner, the scheduler's Jobs and the project controller all build their pods and
namespaces here, so a notebook server and a scheduled run of the same project get the same
identity, volumes, GPU placement and labels. Nothing here talks to a cluster.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

from kubernetes_asyncio.client import (
    V1Capabilities,
    V1PersistentVolumeClaimVolumeSource,
    V1PodSecurityContext,
    V1ResourceRequirements,
    V1SeccompProfile,
    V1SecurityContext,
    V1Toleration,
    V1Volume,
    V1VolumeMount,
)

from ..projects import Flavor, Identity, Project

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
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    slug = re.sub(r"[^a-z0-9]+", "-", folded).strip("-")
    if slug == text and _DNS_LABEL.match(slug) and len(slug) <= max_length:
        return slug
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
        raise ValueError(f"{identity.username} has no uidNumber in the directory")
    if project.gid is None:
        raise ValueError(f"project {project.name} has no gidNumber in the directory")
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
