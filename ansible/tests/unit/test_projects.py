"""projects.yml -> project policy, and its consistency checks."""

from pathlib import Path

import pytest
import yaml
from ansible.errors import AnsibleFilterError

EXAMPLE = Path(__file__).resolve().parents[2] / "inventory/example/group_vars/all"

FLAVORS = {"cpu": {"cpu": 2, "memory": "8Gi"}, "gpu-1": {"cpu": 8, "memory": "64Gi", "gpus": 1}}
PEOPLE = [{"name": "alice", "uid": 20001}, {"name": "bob", "uid": 20002}]


def proj(**kw):
    p = {"name": "vision", "gid": 30001, "members": ["alice"], "flavors": ["cpu", "gpu-1"],
         "quota": {"gpus": 1, "cpu": 32, "memory": "256Gi"}, "storage": "500Gi", "image": "reg:5000/x:1"}
    p.update(kw)
    return p


def test_policy_shape(projects):
    pol = projects.project_policy([proj()], FLAVORS, PEOPLE)
    assert pol == {
        "flavors": FLAVORS,
        "projects": {"vision": {"flavors": ["cpu", "gpu-1"], "quota": {"gpus": 1, "cpu": 32, "memory": "256Gi"},
                                "storage": "500Gi", "image": "reg:5000/x:1"}},
    }


def test_policy_of_the_example_inventory(projects):
    platform = yaml.safe_load((EXAMPLE / "platform.yml").read_text())
    data = yaml.safe_load((EXAMPLE / "projects.yml").read_text())
    pol = projects.project_policy(data["labyard_projects"], platform["labyard_flavors"], data["labyard_people"])
    assert set(pol["projects"]) == {"vision", "speech"}
    assert pol["projects"]["vision"]["flavors"] == ["cpu", "gpu-1", "gpu-2"]
    assert pol["flavors"]["gpu-2"] == {"cpu": 16, "memory": "128Gi", "gpus": 2}


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ([proj(name="Vision")], "DNS label"),
        ([proj(name="x" * 56)], "DNS label"),
        ([proj(), proj(name="other")], "gid 30001 already used"),
        ([proj(members=["mallory"])], "member 'mallory' is not in labyard_people"),
        ([proj(flavors=["gpu-8"])], "unknown flavor 'gpu-8'"),
        ([proj(gid="30001")], "gid must be an integer"),
        ([proj(), proj(gid=30002)], "listed twice"),
    ],
)
def test_inconsistent_projects_fail(projects, bad, message):
    with pytest.raises(AnsibleFilterError, match=message):
        projects.project_policy(bad, FLAVORS, PEOPLE)


def test_duplicate_uid_fails(projects):
    with pytest.raises(AnsibleFilterError, match="uid 20001 used by both"):
        projects.validate_projects([proj()], PEOPLE + [{"name": "eve", "uid": 20001}])
