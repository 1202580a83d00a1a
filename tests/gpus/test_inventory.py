"""The GPU inventory from Kubernetes objects: pure functions, no cluster (tests/k8s/test_gpus.py
runs the same on the testbed)."""

from __future__ import annotations

from datetime import timedelta

from labyard_hub.gpus import inventory

from .pods import T0, node, pod, quota


def test_a_server_and_a_run_holding_gpus_are_allocations_with_their_owner():
    server = pod("jupyter-alice--vision", "labyard-vision")
    run = pod("run-abc", "labyard-nlp", gpus=2, component="scheduled-run", project="nlp", user="carol",
              extra_labels={"labyard.dev/schedule": "s1", "labyard.dev/run": "r1"}, node_name="gpu-node-2")
    a, b = inventory.allocation(server), inventory.allocation(run)
    assert (a.kind, a.project, a.user, a.server, a.gpus, a.node, a.since) == ("server", "vision", "alice", "vision", 1, "gpu-node-1", T0)
    assert (b.kind, b.project, b.user, b.schedule, b.run, b.gpus, b.resources) == (
        "run", "nlp", "carol", "s1", "r1", 2, {"nvidia.com/gpu": 2})


def test_cpu_pods_ended_pods_and_unbound_pods_hold_no_gpu():
    assert inventory.allocation(pod("cpu", "labyard-vision", gpus=0)) is None
    assert inventory.allocation(pod("done", "labyard-vision", phase="Succeeded", finished=T0 + timedelta(hours=1))) is None
    assert inventory.allocation(pod("going", "labyard-vision", deleting=T0 + timedelta(minutes=5))) is None
    assert inventory.allocation(pod("pending", "labyard-vision", node_name=None, phase="Pending")) is None


def test_bound_but_not_started_pod_holds_its_gpus_from_its_creation():
    p = pod("starting", "labyard-vision", phase="Pending", start=T0)
    p.status.start_time = None
    assert inventory.allocation(p).since == T0


def test_mig_slices_are_gpu_resources():
    p = pod("mig", "labyard-vision", gpus=3, resource="nvidia.com/mig-1g.10gb")
    assert inventory.allocation(p).resources == {"nvidia.com/mig-1g.10gb": 3}
    n = node("mig-node", gpus=0, **{"nvidia.com/mig-1g.10gb": "7"})
    nodes = inventory.gpu_nodes([n], [inventory.allocation(p)])
    assert [(g.name, g.resources) for g in nodes] == [("mig-node", {"nvidia.com/mig-1g.10gb": 7})]


def test_waiting_pod_carries_the_schedulers_reason():
    why = "0/3 nodes are available: 2 Insufficient nvidia.com/gpu, 1 node(s) didn't match Pod's node affinity/selector."
    w = inventory.waiting(pod("big", "labyard-nlp", gpus=8, node_name=None, phase="Pending", project="nlp",
                              user="carol", unschedulable=why))
    assert (w.project, w.user, w.resources, w.reason) == ("nlp", "carol", {"nvidia.com/gpu": 8}, why)
    assert inventory.waiting(pod("bound", "labyard-nlp")) is None


def test_nodes_list_their_gpus_and_what_is_allocated_on_them():
    held = [inventory.allocation(pod("a", "labyard-vision")),
            inventory.allocation(pod("b", "labyard-nlp", gpus=2, project="nlp"))]
    nodes = inventory.gpu_nodes([node("gpu-node-2"), node("gpu-node-1"), node("cpu-node", gpus=0)], held)
    assert [(n.name, n.product, n.gpus, n.allocated) for n in nodes] == [
        ("gpu-node-1", "NVIDIA-A100-SXM4-80GB", 4, {"nvidia.com/gpu": 3}), ("gpu-node-2", "NVIDIA-A100-SXM4-80GB", 4, {})]


def test_project_figures_quota_in_use_and_waiting():
    held = [inventory.allocation(pod("a", "labyard-vision")),
            inventory.allocation(pod("b", "labyard-nlp", gpus=2, project="nlp")),
            inventory.allocation(pod("c", "default", component=None, project=None, user=None))]
    pending = [inventory.waiting(pod("w", "labyard-vision", node_name=None, phase="Pending", unschedulable="quota"))]
    quotas = {"vision": inventory.quota_gpus(quota("vision", 1)), "nlp": inventory.quota_gpus(quota("nlp", 2)), "robotics": {}}
    rows = {p.project: p for p in inventory.project_figures(quotas, held, pending)}
    assert (rows["vision"].quota, rows["vision"].in_use, [w.pod for w in rows["vision"].waiting]) == ({"nvidia.com/gpu": 1}, 1, ["w"])
    assert (rows["nlp"].quota, rows["nlp"].in_use, rows["nlp"].waiting) == ({"nvidia.com/gpu": 2}, 2, [])
    assert rows["robotics"].in_use == 0
    assert held[2].kind == "other" and set(rows) == {"vision", "nlp", "robotics"}


def test_end_of_a_pod_as_the_api_reports_it():
    end = T0 + timedelta(minutes=42)
    assert inventory.ended_at(pod("done", "ns", phase="Succeeded", finished=end)) == end
    assert inventory.ended_at(pod("going", "ns", deleting=end)) == end
    assert inventory.ended_at(pod("running", "ns")) is None
