"""Kubernetes decisions of the kubernetes and add/remove-node playbooks.

Inputs are ``kubectl get node(s) -o json`` documents (recorded ones are in
ansible/tests/recorded/); outputs are plain data the playbooks act on.
"""

from __future__ import annotations

from ansible.errors import AnsibleFilterError

GPU_RESOURCE = "nvidia.com/gpu"


def _items(nodes):
    if isinstance(nodes, dict):
        if nodes.get("kind") == "NodeList" or "items" in nodes:
            return nodes.get("items") or []
        if nodes.get("kind") == "Node":
            return [nodes]
    if isinstance(nodes, list):
        return nodes
    raise AnsibleFilterError("expected a Node, a NodeList or a list of Nodes")


def k8s_node_summary(node, resource=GPU_RESOURCE):
    """Summarise one Node: name, ready, unschedulable, GPUs, labels, taints, versions."""
    if not isinstance(node, dict) or node.get("kind", "Node") != "Node":
        raise AnsibleFilterError("k8s_node_summary expects one Node object")
    status = node.get("status") or {}
    conds = {c.get("type"): c for c in status.get("conditions") or []}
    ready = conds.get("Ready", {}).get("status") == "True"
    info = status.get("nodeInfo") or {}

    def count(section):
        value = (status.get(section) or {}).get(resource, "0")
        return int(str(value))

    return {
        "name": (node.get("metadata") or {}).get("name"),
        "ready": ready,
        "ready_reason": conds.get("Ready", {}).get("reason", ""),
        "unschedulable": bool((node.get("spec") or {}).get("unschedulable", False)),
        "gpu_capacity": count("capacity"),
        "gpu_allocatable": count("allocatable"),
        "labels": (node.get("metadata") or {}).get("labels") or {},
        "taints": (node.get("spec") or {}).get("taints") or [],
        "kubelet_version": info.get("kubeletVersion", ""),
        "container_runtime": info.get("containerRuntimeVersion", ""),
    }


def kubeadm_node_action(node_name, nodes, kubelet_conf_exists):
    """What to do for ``node_name`` so that it ends up joined exactly once.

    Args:
        node_name: the node's Kubernetes name (its hostname).
        nodes: ``kubectl get nodes -o json`` from a control-plane host.
        kubelet_conf_exists: ``/etc/kubernetes/kubelet.conf`` exists on the node.

    Returns:
        ``none`` (member and configured), ``join`` (fresh machine), ``reset_and_join``
        (machine still configured but its Node object is gone, e.g. after
        remove-node), ``delete_and_join`` (a rebuilt machine whose old Node object
        is still registered).
    """
    names = {((n.get("metadata") or {}).get("name")) for n in _items(nodes)}
    member = node_name in names
    if member and kubelet_conf_exists:
        return "none"
    if member:
        return "delete_and_join"
    if kubelet_conf_exists:
        return "reset_and_join"
    return "join"


def k8s_version_skew_ok(kubelet_version, control_plane_version, max_minor_skew=3):
    """Kubelet may be up to ``max_minor_skew`` minors older, never newer, than the API server."""

    def minor(v):
        parts = str(v).lstrip("v").split(".")
        if len(parts) < 2:
            raise AnsibleFilterError(f"not a Kubernetes version: {v!r}")
        return int(parts[0]), int(parts[1])

    k, c = minor(kubelet_version), minor(control_plane_version)
    return k[0] == c[0] and 0 <= c[1] - k[1] <= int(max_minor_skew)


class FilterModule:
    """labyard.cluster Kubernetes filters."""

    def filters(self):
        return {
            "k8s_node_summary": k8s_node_summary,
            "kubeadm_node_action": kubeadm_node_action,
            "k8s_version_skew_ok": k8s_version_skew_ok,
        }
