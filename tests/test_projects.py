"""The project model: policy files, flavours, identities (decisions: tests/test_access.py)."""

import pytest

from labyard_hub import demo
from labyard_hub.projects import Identity, PolicyError, Project, ProjectPolicy

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
        ({"projects": {"Data Science": {}, "data-science-f25168f3": {}}}, "listed twice"),
        ({"flavors": {"gpu-1": {"gpus": -1}}}, "flavors.gpu-1.gpus: Input should be greater than or equal to 0"),
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


def test_identity_round_trips_through_auth_state():
    again = Identity.from_auth_state("alice", ALICE.to_auth_state())
    assert again == ALICE


def test_policy_may_name_a_project_by_its_group_name_or_its_slug():
    policy = ProjectPolicy.model_validate({"flavors": {"cpu": {}}, "projects": {"Data Science": {"storage": "5Gi"}}})
    assert policy.settings("data-science-f25168f3").storage == "5Gi"
    assert list(policy.projects) == ["data-science-f25168f3"]


def test_the_committed_policy_schema_is_current():
    """Ansible validates projects.yml against this file: it must be what the model generates
    (regenerate with `labyard policy-schema --output <the file>`)."""
    from pathlib import Path

    from labyard_hub.cli import POLICY_SCHEMA, policy_schema_text

    committed = Path(__file__).resolve().parents[1] / POLICY_SCHEMA
    assert committed.read_text() == policy_schema_text(), f"regenerate: labyard policy-schema --output {POLICY_SCHEMA}"


def test_the_schema_refuses_what_the_model_refuses():
    import jsonschema

    from labyard_hub.projects import ProjectPolicy

    validator = jsonschema.Draft202012Validator(ProjectPolicy.json_schema())
    assert not list(validator.iter_errors(demo.policy().model_dump(mode="json", exclude_defaults=True)))
    for bad in ({"flavors": {"c": {"gpus": -1}}}, {"projects": {"p": {"quota": {"gpus": 1.5}}}},
                {"defaults": {"storage": "big"}}, {"flavours": {}}):
        assert list(validator.iter_errors(bad)), bad
        with pytest.raises(Exception):
            ProjectPolicy.model_validate(bad)
    # the hub takes a directory group's own name as a key (and slugs it); the groups Ansible
    # creates are named by project names, so its schema refuses the rest
    for group_name in ("Vision", "x" * 31, "ml--team"):
        assert list(validator.iter_errors({"projects": {group_name: {}}})), group_name
        assert ProjectPolicy.model_validate({"projects": {group_name: {}}}).projects
