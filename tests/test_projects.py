"""The project model: policy files, flavours, and the one authorization decision."""

import pytest

from labyard_hub import demo
from labyard_hub.projects import AccessError, Identity, PolicyError, Project, ProjectPolicy, authorize

ALICE = Identity(username="alice", uid=10001, gid=10000, projects=(Project(name="vision", gid=20001), Project(name="nlp", gid=20002)))
BOB = Identity(username="bob", uid=10002, gid=10000, projects=(Project(name="vision", gid=20001),))


def test_demo_policy_loads_with_named_flavors():
    policy = demo.policy()
    assert set(policy.flavors) == {"cpu", "gpu-1", "gpu-2"}
    assert policy.flavors["gpu-2"].name == "gpu-2" and policy.flavors["gpu-2"].gpus == 2
    assert policy.settings("vision").quota.gpus == 1
    assert policy.settings("nlp").quota.gpus == 2


def test_unlisted_project_inherits_defaults():
    policy = demo.policy()
    assert [f.name for f in policy.allowed_flavors("robotics")] == ["cpu"]
    assert policy.settings("robotics").storage == "10Gi"


def test_project_setting_overrides_default_field_by_field():
    policy = ProjectPolicy.model_validate(
        {"flavors": {"cpu": {}}, "defaults": {"image": "lab:1", "storage": "1Gi"}, "projects": {"p": {"storage": "5Gi"}}}
    )
    assert policy.settings("p").image == "lab:1"
    assert policy.settings("p").storage == "5Gi"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"flavors": {"cpu": {}}, "projects": {"p": {"flavors": ["gpu"]}}}, "unknown flavors ['gpu']"),
        ({"flavors": {"cpu": {"memory": "lots"}}}, "memory"),
        ({"flavors": {"cpu": {"cpu": 0}}}, "greater than 0"),
        ({"projects": {"Not Valid": {}}}, "not a valid project name"),
        ({"flavours": {}}, "Extra inputs"),
    ],
)
def test_bad_policy_is_refused_with_a_reason(data, message, tmp_path):
    path = tmp_path / "policy.yaml"
    import yaml

    path.write_text(yaml.safe_dump(data))
    with pytest.raises(PolicyError, match="policy.yaml") as e:
        ProjectPolicy.from_yaml(path)
    assert message in str(e.value)


def test_member_gets_project_and_flavor():
    project, flavor = authorize(ALICE, demo.policy(), "vision", "gpu-1")
    assert project.gid == 20001 and flavor.gpus == 1


def test_foreign_project_is_403():
    with pytest.raises(AccessError) as e:
        authorize(BOB, demo.policy(), "nlp", "cpu")
    assert e.value.status == 403 and "not a member of project 'nlp'" in e.value.message


@pytest.mark.parametrize("flavor", ["gpu-9", "", "../cpu"])
def test_unknown_flavor_is_400_naming_it(flavor):
    with pytest.raises(AccessError) as e:
        authorize(ALICE, demo.policy(), "vision", flavor)
    assert e.value.status == 400 and repr(flavor) in e.value.message


def test_flavor_outside_what_is_available_is_400():
    policy = demo.policy()
    cpu_only = [policy.flavors["cpu"]]
    with pytest.raises(AccessError) as e:
        authorize(ALICE, policy, "vision", "gpu-1", available=cpu_only)
    assert e.value.status == 400 and "choose one of: cpu" in e.value.message


def test_identity_round_trips_through_auth_state():
    again = Identity.from_auth_state("alice", ALICE.to_auth_state())
    assert again == ALICE
