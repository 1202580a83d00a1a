"""Pure Kubernetes object builders (no cluster needed)."""

import re

import pytest

from labyard_hub import demo
from labyard_hub.kube import objects
from labyard_hub.projects import Identity, Project

DNS = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
ALICE = Identity(username="alice", uid=10001, gid=10000, projects=(Project(name="vision", gid=20001),))
VISION = ALICE.projects[0]


@pytest.mark.parametrize("text", ["vision", "My Notebook.ipynb", "résumé run", "日本語", "-a-", "x" * 200, ""])
def test_safe_name_is_a_dns_label(text):
    name = objects.safe_name(text)
    assert DNS.match(name) and len(name) <= 63


def test_safe_name_keeps_valid_names_and_separates_similar_ones():
    assert objects.safe_name("vision") == "vision"
    assert objects.safe_name("a b") != objects.safe_name("a_b")
    assert objects.namespace_for("vision") == "labyard-vision"


def test_label_values():
    assert objects.label_value("alice") == "alice"
    odd = objects.label_value("ålice smith")
    assert DNS.match(odd) and odd != "alice-smith"
    labels = objects.labels_for("singleuser", "vision", "alice", schedule_id="S 1")
    assert labels["labyard.dev/project"] == "vision" and labels["labyard.dev/user"] == "alice"
    assert DNS.match(labels["labyard.dev/schedule-id"])


def test_security_context_uses_ldap_uid_and_project_gid():
    ctx = objects.make_pod_security_context(ALICE, VISION)
    assert (ctx.run_as_user, ctx.run_as_group, ctx.fs_group, ctx.supplemental_groups) == (10001, 20001, 20001, [20001])
    assert ctx.run_as_non_root and ctx.fs_group_change_policy == "OnRootMismatch"
    c = objects.make_container_security_context()
    assert c.allow_privilege_escalation is False and c.capabilities.drop == ["ALL"]


def test_security_context_refuses_missing_numbers():
    with pytest.raises(ValueError, match="gidNumber"):
        objects.make_pod_security_context(ALICE, Project(name="p"))
    with pytest.raises(ValueError, match="uidNumber"):
        objects.make_pod_security_context(Identity(username="x"), VISION)


def test_gpu_flavor_sets_limit_toleration_and_selector():
    flavor = demo.policy().flavors["gpu-2"]
    res = objects.make_resources(flavor)
    assert res.limits == {"cpu": "16", "memory": "128Gi", "nvidia.com/gpu": "2"} == res.requests
    assert [(t.key, t.operator, t.effect) for t in objects.make_tolerations(flavor)] == [("nvidia.com/gpu", "Exists", "NoSchedule")]
    assert objects.make_node_selector(flavor) == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}


def test_cpu_flavor_has_no_gpu():
    flavor = demo.policy().flavors["cpu"]
    assert "nvidia.com/gpu" not in objects.make_resources(flavor).limits
    assert objects.make_tolerations(flavor) == [] and objects.make_node_selector(flavor) == {}


def test_project_volume():
    volume, mount = objects.make_project_volume("vision")
    assert volume.persistent_volume_claim.claim_name == "project-vision"
    assert mount.mount_path == objects.PROJECT_MOUNT == "/srv/project"


async def test_project_network_policy_denies_both_ways_except_what_pods_need():
    from kubernetes_asyncio.client import ApiClient

    extra = {"to": [{"ipBlock": {"cidr": "10.20.0.5/32"}}], "ports": [{"port": 443}]}
    async with ApiClient() as api:
        policy = api.sanitize_for_serialization(objects.make_network_policy("vision", "labyard", extra_egress=[extra]))
    spec = policy["spec"]
    assert spec["podSelector"] == {} and spec["policyTypes"] == ["Ingress", "Egress"]
    hub_ns = {"kubernetes.io/metadata.name": "labyard"}
    (ingress,) = spec["ingress"]
    assert ingress["from"][0]["namespaceSelector"]["matchLabels"] == hub_ns
    assert ingress["from"][0]["podSelector"]["matchExpressions"][0]["values"] == ["hub", "proxy"]
    assert ingress["from"][1] == {"podSelector": {}}  # the project's own pods, no other namespace
    to_hub, dns, mirror = spec["egress"]
    assert to_hub["to"][0]["podSelector"]["matchExpressions"][0]["values"] == ["hub", "scheduler", "proxy"]  # MLflow only through the proxy
    assert to_hub["to"][1] == {"podSelector": {}} and "ports" not in to_hub
    assert dns == {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}
    assert mirror == extra
