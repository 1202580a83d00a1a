"""kubernetes_asyncio models of nodes, pods and quotas as the API server returns them, for the
pure inventory and usage tests (the Kubernetes testbed tests the same code on real objects)."""

from __future__ import annotations

from datetime import datetime, timezone

from kubernetes_asyncio.client import (
    V1Container, V1ContainerState, V1ContainerStateTerminated, V1ContainerStatus, V1Node, V1NodeSpec, V1NodeStatus,
    V1ObjectMeta, V1Pod, V1PodCondition, V1PodSpec, V1PodStatus, V1ResourceQuota, V1ResourceQuotaSpec,
    V1ResourceQuotaStatus, V1ResourceRequirements,
)

T0 = datetime(2026, 11, 30, 22, 0, tzinfo=timezone.utc)


def node(name: str, gpus: int = 4, product: str = "NVIDIA-A100-SXM4-80GB", **extra: str) -> V1Node:
    allocatable = {"cpu": "64", "memory": "512Gi", **({"nvidia.com/gpu": str(gpus)} if gpus else {}), **extra}
    return V1Node(metadata=V1ObjectMeta(name=name, labels={"nvidia.com/gpu.product": product} if gpus else {}),
                  spec=V1NodeSpec(), status=V1NodeStatus(allocatable=allocatable, capacity=allocatable))


def pod(name: str, namespace: str, *, gpus: int = 1, resource: str = "nvidia.com/gpu", node_name: str | None = "gpu-node-1",
        phase: str = "Running", start: datetime | None = T0, component: str = "singleuser-server",
        project: str | None = "vision", user: str | None = "alice", uid: str | None = None, finished: datetime | None = None,
        deleting: datetime | None = None, extra_labels: dict | None = None, unschedulable: str | None = None) -> V1Pod:
    # as the API server shows them: KubeSpawner's common labels name server pods "jupyterhub"
    app = "jupyterhub" if component == "singleuser-server" else "labyard"
    labels = {"app.kubernetes.io/name": app, "app.kubernetes.io/component": component} if component else {}
    if project:
        labels["labyard.dev/project"] = project
    if user:
        labels["labyard.dev/user"] = user
    labels.update(extra_labels or {})
    annotations = {"hub.jupyter.org/username": user, "hub.jupyter.org/servername": project} \
        if component == "singleuser-server" else {}
    limits = {"cpu": "8", "memory": "64Gi", **({resource: str(gpus)} if gpus else {})}
    statuses = None
    if finished:
        statuses = [V1ContainerStatus(name="notebook", image="x", image_id="", ready=False, restart_count=0,
                                      state=V1ContainerState(terminated=V1ContainerStateTerminated(
                                          exit_code=0, started_at=start, finished_at=finished)))]
    conditions = None
    if unschedulable:
        conditions = [V1PodCondition(type="PodScheduled", status="False", reason="Unschedulable", message=unschedulable)]
    return V1Pod(
        metadata=V1ObjectMeta(name=name, namespace=namespace, uid=uid or f"uid-{namespace}-{name}", labels=labels,
                              annotations=annotations, creation_timestamp=start or T0, deletion_timestamp=deleting),
        spec=V1PodSpec(containers=[V1Container(name="notebook", resources=V1ResourceRequirements(limits=limits, requests=limits))],
                       node_name=node_name),
        status=V1PodStatus(phase=phase, start_time=start if node_name else None, conditions=conditions,
                           container_statuses=statuses),
    )


def quota(project: str, gpus: int, resources=("nvidia.com/gpu",)) -> V1ResourceQuota:
    hard = {f"requests.{r}": str(gpus) for r in resources}
    return V1ResourceQuota(
        metadata=V1ObjectMeta(name="labyard-quota", namespace=f"labyard-{project}",
                              labels={"app.kubernetes.io/name": "labyard", "app.kubernetes.io/component": "quota",
                                      "labyard.dev/project": project}),
        spec=V1ResourceQuotaSpec(hard=hard), status=V1ResourceQuotaStatus(hard=hard, used={}))
