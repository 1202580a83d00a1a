"""Kubernetes decisions on recorded kubectl outputs."""

import pytest
from ansible.errors import AnsibleFilterError


def test_ready_gpu_node(k8s, recorded):
    s = k8s.k8s_node_summary(recorded("kubectl-node-gpu01-ready.json"))
    assert s["name"] == "gpu01"
    assert s["ready"] is True
    assert s["gpu_capacity"] == 4 and s["gpu_allocatable"] == 4
    assert s["labels"]["labyard.io/gpu-model"] == "NVIDIA-A100-SXM4-80GB"
    assert s["taints"] == [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
    assert s["kubelet_version"] == "v1.33.5"
    assert s["unschedulable"] is False


def test_node_without_device_plugin_has_no_gpus(k8s, recorded):
    s = k8s.k8s_node_summary(recorded("kubectl-node-gpu01-no-plugin.json"))
    assert s["ready"] and s["gpu_allocatable"] == 0 and s["gpu_capacity"] == 0


def test_unhealthy_gpu_reduces_allocatable(k8s, recorded):
    s = k8s.k8s_node_summary(recorded("kubectl-node-gpu01-one-unhealthy.json"))
    assert (s["gpu_capacity"], s["gpu_allocatable"]) == (4, 3)


def test_dead_node_is_not_ready(k8s, recorded):
    s = k8s.k8s_node_summary(recorded("kubectl-node-gpu02-notready.json"))
    assert s["ready"] is False
    assert s["ready_reason"] == "NodeStatusUnknown"


def test_summary_wants_one_node(k8s, recorded):
    with pytest.raises(AnsibleFilterError):
        k8s.k8s_node_summary(recorded("kubectl-nodes.json"))


@pytest.mark.parametrize(
    ("name", "kubelet_conf", "action"),
    [
        ("gpu01", True, "none"),  # member and configured: rerun does nothing
        ("gpu03", False, "join"),  # new machine
        ("gpu03", True, "reset_and_join"),  # removed with remove-node, machine kept its state
        ("gpu01", False, "delete_and_join"),  # reinstalled machine, old Node object still there
    ],
)
def test_join_decision(k8s, recorded, name, kubelet_conf, action):
    assert k8s.kubeadm_node_action(name, recorded("kubectl-nodes.json"), kubelet_conf) == action


def test_join_decision_accepts_item_list(k8s, recorded):
    items = recorded("kubectl-nodes.json")["items"]
    assert k8s.kubeadm_node_action("cpu01", items, True) == "none"


@pytest.mark.parametrize(
    ("kubelet", "server", "ok"),
    [("v1.33.5", "v1.33.5", True), ("v1.30.2", "v1.33.5", True), ("v1.29.0", "v1.33.5", False), ("v1.34.0", "v1.33.5", False)],
)
def test_version_skew(k8s, kubelet, server, ok):
    assert k8s.k8s_version_skew_ok(kubelet, server) is ok
