"""The cluster's GPUs and who holds them, from Kubernetes objects (pure functions, no cluster).

A pod *holds* a GPU once it is bound to a node (``spec.nodeName`` set) and until it ends
(phase Succeeded or Failed, or deleted): that is when the scheduler counts its request against
the node. A pod asking for a GPU that no node took yet is *waiting*, with the scheduler's reason.
GPU resources are ``nvidia.com/gpu`` and the MIG slices ``nvidia.com/mig-<profile>``.
"""

from __future__ import annotations

from datetime import datetime, timezone

from pydantic import BaseModel

from ..kube.objects import GPU_PRODUCT_LABEL, LABEL_PREFIX, parse_quantity

GPU_RESOURCE = "nvidia.com/gpu"
MIG_PREFIX = "nvidia.com/mig-"
#: the components of the pods Labyard makes that may hold GPUs
SERVER_COMPONENT = "singleuser-server"
RUN_COMPONENT = "scheduled-run"
#: annotations KubeSpawner puts on server pods: the hub's own names (labels may be hashed)
USERNAME_ANNOTATION = "hub.jupyter.org/username"
SERVERNAME_ANNOTATION = "hub.jupyter.org/servername"
_ENDED = ("Succeeded", "Failed")


def is_gpu_resource(name: str) -> bool:
    return name == GPU_RESOURCE or name.startswith(MIG_PREFIX)


class GpuNode(BaseModel):
    """A node with GPUs: ``resources`` is allocatable count per GPU resource (MIG slices apart)."""

    name: str
    product: str | None = None
    resources: dict[str, int]
    allocated: dict[str, int] = {}
    unschedulable: bool = False

    @property
    def gpus(self) -> int:
        return self.resources.get(GPU_RESOURCE, 0)


class Allocation(BaseModel):
    """GPUs one pod holds. ``kind``: ``server`` (a user's server), ``run`` (a scheduled run) or
    ``other`` (a pod Labyard did not make)."""

    uid: str
    namespace: str
    pod: str
    node: str
    kind: str
    project: str | None = None
    user: str | None = None
    server: str | None = None
    schedule: str | None = None
    run: str | None = None
    resources: dict[str, int]
    gpus: int
    since: datetime
    phase: str
    #: seconds since the server's last activity the hub knows (servers only; None: unknown)
    idle_seconds: float | None = None
    #: utilisation per GPU (dcgm-exporter through Prometheus), when configured
    utilisation: list[dict] | None = None
    #: held at 0 % utilisation for longer than the threshold
    idle_gpu: bool | None = None


class Waiting(BaseModel):
    """A pod asking for GPUs that no node has taken yet, and why (the scheduler's message)."""

    namespace: str
    pod: str
    kind: str
    project: str | None = None
    user: str | None = None
    resources: dict[str, int]
    since: datetime
    reason: str


class ProjectGpus(BaseModel):
    """A project's GPU quota (per GPU resource; None: no quota), what it holds, what waits."""

    project: str
    quota: dict[str, int] | None = None
    in_use: int = 0
    in_use_by_resource: dict[str, int] = {}
    waiting: list[Waiting] = []


def _count(value) -> int:
    return int(parse_quantity(value))


def gpu_requests(pod) -> dict[str, int]:
    """GPU resources a pod asks for (limits, which GPUs require, else requests), all containers
    and the largest init container together, as the scheduler counts them."""
    total: dict[str, int] = {}

    def of(container) -> dict[str, int]:
        res = container.resources
        if res is None:
            return {}
        amounts = {**(res.requests or {}), **(res.limits or {})}
        return {k: _count(v) for k, v in amounts.items() if is_gpu_resource(k) and _count(v) > 0}

    for c in pod.spec.containers or []:
        for k, v in of(c).items():
            total[k] = total.get(k, 0) + v
    for c in pod.spec.init_containers or []:
        for k, v in of(c).items():
            total[k] = max(total.get(k, 0), v)
    return total


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _owner(pod) -> dict:
    """kind, project, user, server, schedule and run of a pod, from Labyard's labels."""
    meta = pod.metadata
    labels, annotations = meta.labels or {}, meta.annotations or {}
    # Labyard's pods carry its project label (server pods are named app.kubernetes.io/name=jupyterhub
    # by KubeSpawner, whose common labels win over the spawner's extra ones)
    component = labels.get("app.kubernetes.io/component") if LABEL_PREFIX + "project" in labels else None
    kind = {SERVER_COMPONENT: "server", RUN_COMPONENT: "run"}.get(component, "other")
    found = {"kind": kind, "project": labels.get(LABEL_PREFIX + "project"), "user": labels.get(LABEL_PREFIX + "user")}
    if kind == "server":
        found["user"] = annotations.get(USERNAME_ANNOTATION) or found["user"]
        found["server"] = annotations.get(SERVERNAME_ANNOTATION) or found["project"]
    elif kind == "run":
        found["schedule"] = labels.get(LABEL_PREFIX + "schedule")
        found["run"] = labels.get(LABEL_PREFIX + "run")
    return found


def started_at(pod) -> datetime:
    """When a pod began to hold its GPUs: its start time, else its creation (bound, not started yet)."""
    return _utc(pod.status.start_time if pod.status else None) or _utc(pod.metadata.creation_timestamp)


def ended_at(pod) -> datetime | None:
    """When a pod let go of its GPUs, if the API says: the last container's finish time of an
    ended pod, else the start of its deletion; None while it still holds them."""
    status = pod.status
    if status is not None and status.phase in _ENDED:
        finished = [_utc(s.state.terminated.finished_at) for s in status.container_statuses or []
                    if s.state and s.state.terminated and s.state.terminated.finished_at]
        if finished:
            return max(finished)
    if pod.metadata.deletion_timestamp is not None:
        return _utc(pod.metadata.deletion_timestamp)
    if status is not None and status.phase in _ENDED:
        # ended without a container's finish time (e.g. never started): no GPU time at all
        return started_at(pod)
    return None


def holds_gpus(pod) -> bool:
    return bool(pod.spec.node_name) and (pod.status is None or pod.status.phase not in _ENDED) \
        and pod.metadata.deletion_timestamp is None


def allocation(pod) -> Allocation | None:
    """The GPUs ``pod`` holds now (None: it holds none)."""
    asks = gpu_requests(pod)
    if not asks or not holds_gpus(pod):
        return None
    return Allocation(uid=pod.metadata.uid, namespace=pod.metadata.namespace, pod=pod.metadata.name,
                      node=pod.spec.node_name, resources=asks, gpus=sum(asks.values()), since=started_at(pod),
                      phase=(pod.status.phase if pod.status else None) or "Pending", **_owner(pod))


def ended_allocation(pod) -> tuple[Allocation, datetime] | None:
    """The GPUs ``pod`` held and when it let go of them, for a pod that was bound to a node and
    has ended or is being deleted (None otherwise): what the GPU-hours record closes, or records
    whole when the service never saw the pod running (it was down)."""
    asks = gpu_requests(pod)
    end = ended_at(pod) if asks and pod.spec.node_name else None
    if end is None:
        return None
    held = Allocation(uid=pod.metadata.uid, namespace=pod.metadata.namespace, pod=pod.metadata.name,
                      node=pod.spec.node_name, resources=asks, gpus=sum(asks.values()), since=started_at(pod),
                      phase=(pod.status.phase if pod.status else None) or "Pending", **_owner(pod))
    return held, max(end, held.since)


def waiting(pod) -> Waiting | None:
    """``pod``, if it asks for GPUs and no node took it yet, with the scheduler's reason."""
    asks = gpu_requests(pod)
    if not asks or pod.spec.node_name or pod.metadata.deletion_timestamp is not None \
            or (pod.status and pod.status.phase in _ENDED):
        return None
    reason = "not scheduled yet"
    for cond in (pod.status.conditions if pod.status else None) or []:
        if cond.type == "PodScheduled" and cond.status == "False":
            reason = cond.message or cond.reason or reason
    owner = _owner(pod)
    return Waiting(namespace=pod.metadata.namespace, pod=pod.metadata.name, kind=owner["kind"],
                   project=owner["project"], user=owner["user"], resources=asks,
                   since=_utc(pod.metadata.creation_timestamp), reason=reason)


def gpu_nodes(nodes, allocations: list[Allocation]) -> list[GpuNode]:
    """Every node with an allocatable GPU resource, with what is allocated on it, by name."""
    used: dict[str, dict[str, int]] = {}
    for a in allocations:
        for k, v in a.resources.items():
            used.setdefault(a.node, {})[k] = used.setdefault(a.node, {}).get(k, 0) + v
    found = []
    for n in nodes:
        amounts = {k: _count(v) for k, v in ((n.status.allocatable if n.status else None) or {}).items()
                   if is_gpu_resource(k) and _count(v) > 0}
        if not amounts:
            continue
        found.append(GpuNode(name=n.metadata.name, product=(n.metadata.labels or {}).get(GPU_PRODUCT_LABEL),
                             resources=amounts, allocated=used.get(n.metadata.name, {}),
                             unschedulable=bool(n.spec and n.spec.unschedulable)))
    return sorted(found, key=lambda g: g.name)


def quota_gpus(quota) -> dict[str, int]:
    """The GPU limits of a ResourceQuota (``requests.<gpu resource>`` -> count)."""
    hard = (quota.status.hard if quota.status and quota.status.hard else None) or (quota.spec.hard if quota.spec else None) or {}
    found = {}
    for key, value in hard.items():
        resource = key.removeprefix("requests.")
        if key.startswith("requests.") and is_gpu_resource(resource):
            found[resource] = _count(value)
    return found


def project_figures(projects: dict[str, dict[str, int] | None], allocations: list[Allocation],
                    pending: list[Waiting]) -> list[ProjectGpus]:
    """Per project: its GPU quota (``projects``: project -> :func:`quota_gpus`, None if it has no
    quota object), GPUs in use (by resource) and the pods waiting for GPUs."""
    names = set(projects) | {a.project for a in allocations if a.project} | {w.project for w in pending if w.project}
    rows = []
    for name in sorted(names):
        held = [a for a in allocations if a.project == name]
        by_resource: dict[str, int] = {}
        for a in held:
            for k, v in a.resources.items():
                by_resource[k] = by_resource.get(k, 0) + v
        rows.append(ProjectGpus(project=name, quota=projects.get(name), in_use=sum(by_resource.values()),
                                in_use_by_resource=by_resource, waiting=[w for w in pending if w.project == name]))
    return rows
