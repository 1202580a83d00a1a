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


def test_left_out_fields_inherit_the_defaults(projects):
    """A project without flavors/quota/storage/image leaves them out of the policy, so the platform
    gives it the defaults' (not an empty flavour list)."""
    defaults = {"flavors": ["cpu"], "quota": {"gpus": 0}}
    pol = projects.project_policy([{"name": "nlp", "gid": 30005, "members": ["alice"]}], FLAVORS, PEOPLE, defaults)
    assert pol["projects"] == {"nlp": {}} and pol["defaults"] == defaults
    with pytest.raises(AnsibleFilterError, match="unknown flavors"):
        projects.project_policy([proj()], FLAVORS, PEOPLE, {"flavors": ["gpu-8"]})


def test_project_names_follow_the_platforms_schema(projects):
    """The same rule as the hub: a project name of at most 30 characters (from the shipped schema)."""
    assert projects.project_policy([proj(name="x" * 30)], FLAVORS, PEOPLE)["projects"]
    with pytest.raises(AnsibleFilterError, match="at most 30 characters"):
        projects.project_policy([proj(name="x" * 31)], FLAVORS, PEOPLE)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"quota": {"gpus": -1}}, r"projects\.vision\.quota\.gpus: -1 is less than the minimum of 0"),
        ({"storage": "lots"}, r"projects\.vision\.storage: 'lots' does not match"),
        ({"quota": {"gpu": 1}}, r"Additional properties are not allowed \('gpu' was unexpected\)"),
    ],
)
def test_the_policy_is_checked_against_the_platforms_schema(projects, bad, message):
    with pytest.raises(AnsibleFilterError, match=message):
        projects.project_policy([proj(**bad)], FLAVORS, PEOPLE)


def test_flavors_are_checked_against_the_schema_too(projects):
    with pytest.raises(AnsibleFilterError, match=r"flavors\.gpu-1\.gpus: 'one' is not of type 'integer'"):
        projects.project_policy([proj()], {**FLAVORS, "gpu-1": {"gpus": "one"}}, PEOPLE)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ([proj(name="Vision")], "is not valid"),
        ([proj(name="x" * 31)], "is not valid"),
        ([proj(name="ml--team")], "is not valid"),
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
