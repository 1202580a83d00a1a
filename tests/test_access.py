"""The one access decision (labyard_hub.access): membership, ownership, admins, flavours per mode."""

import pytest

from labyard_hub import demo
from labyard_hub.access import DEFAULT_POLICY, Access, AccessError, identity_from_hub, load_policy
from labyard_hub.projects import Identity, Project, ProjectPolicy

VISION, NLP = Project(name="vision", gid=20001), Project(name="nlp", gid=20002)
ALICE = Identity(username="alice", uid=10001, gid=10000, projects=(VISION, NLP))
BOB = Identity(username="bob", uid=10002, gid=10000, projects=(VISION,))
ADMIN = Identity(username="admin", uid=10009, gid=10000, admin=True)


@pytest.fixture
def access():
    return Access(demo.policy())


def test_member_gets_project_and_flavor(access):
    project, flavor = access.authorize(ALICE, "vision", "gpu-1")
    assert project.gid == 20001 and flavor.gpus == 1


def test_no_flavor_asked_takes_the_first_offered(access):
    assert access.authorize(ALICE, "vision")[1].name == "cpu"


def test_foreign_project_is_403_before_any_flavor_check(access):
    for flavor in ("cpu", "no-such-flavor", None):
        with pytest.raises(AccessError) as e:
            access.authorize(BOB, "nlp", flavor)
        assert e.value.status == 403 and "not a member of project 'nlp'" in e.value.message


@pytest.mark.parametrize("flavor", ["gpu-9", "", "../cpu"])
def test_unknown_flavor_is_400_naming_it(access, flavor):
    with pytest.raises(AccessError) as e:
        access.authorize(ALICE, "vision", flavor)
    assert e.value.status == 400 and repr(flavor) in e.value.message and "unknown flavor" in e.value.message


def test_flavor_the_project_may_not_use_is_400(access):
    with pytest.raises(AccessError) as e:
        access.authorize(ALICE, "robotics-is-not-hers", "cpu")
    assert e.value.status == 403
    alice_everywhere = Identity(username="alice", projects=(Project(name="robotics"),))
    with pytest.raises(AccessError) as e:
        access.authorize(alice_everywhere, "robotics", "gpu-1")
    assert e.value.status == 400 and "not available to this project" in e.value.message


def test_gpu_flavors_are_offered_only_where_the_mode_allows(access):
    local = Access(demo.policy(), gpus=False)
    assert [f.name for f in local.flavors("vision")] == ["cpu"]
    assert [f.name for f in access.flavors("vision")] == ["cpu", "gpu-1", "gpu-2"]
    with pytest.raises(AccessError) as e:
        local.authorize(ALICE, "vision", "gpu-1")
    assert e.value.status == 400 and "not offered in this mode" in e.value.message and "choose one of: cpu" in e.value.message


def test_a_project_offered_nothing_says_so():
    policy = ProjectPolicy.model_validate({"flavors": {"gpu": {"gpus": 1}}})
    with pytest.raises(AccessError) as e:
        Access(policy, gpus=False).authorize(ALICE, "vision")
    assert e.value.status == 400 and "no flavour is available to project 'vision'" in e.value.message


def test_members_and_admins_see_a_project(access):
    access.may_see(BOB, "vision")
    access.may_see(ADMIN, "nlp")
    with pytest.raises(AccessError) as e:
        access.may_see(BOB, "nlp")
    assert e.value.status == 403
    assert access.visible_projects(BOB) == {"vision"} and access.visible_projects(ADMIN) is None


def test_only_the_owner_still_a_member_or_an_admin_changes(access):
    access.may_change(BOB, "bob", "vision")
    access.may_change(ADMIN, "bob", "vision")
    with pytest.raises(AccessError, match="only alice"):
        access.may_change(BOB, "alice", "vision")
    bob_removed = Identity(username="bob", projects=())
    with pytest.raises(AccessError, match="not a member"):
        access.may_change(bob_removed, "bob", "vision")


def test_admins_start_nothing_outside_their_projects(access):
    with pytest.raises(AccessError) as e:
        access.authorize(ADMIN, "vision", "cpu")
    assert e.value.status == 403


def test_quota_covers_every_gpu_resource_of_the_projects_flavors():
    policy = ProjectPolicy.model_validate({
        "flavors": {"cpu": {}, "mig": {"gpus": 1, "gpu_resource": "nvidia.com/mig-1g.10gb"}, "a100": {"gpus": 1}},
        "projects": {"vision": {"flavors": ["cpu", "mig", "a100"]}, "nlp": {"flavors": ["cpu"]}},
    })
    access = Access(policy)
    assert access.gpu_resources("vision") == ["nvidia.com/gpu", "nvidia.com/mig-1g.10gb"]
    assert access.gpu_resources("nlp") == ["nvidia.com/gpu"]


def test_no_policy_file_means_the_default_policy_everywhere():
    assert load_policy(None) is DEFAULT_POLICY
    assert [f.name for f in Access(load_policy("")).flavors("anything")] == ["default"]


def test_identity_from_the_hub_uses_current_groups_and_their_gids():
    user = {
        "name": "bob", "admin": False, "groups": ["vision", "robotics"],
        "auth_state": {"uid_number": 10002, "gid_number": 10000, "home": "/home/bob",
                       "projects": [{"name": "vision", "gid": 20001}, {"name": "nlp", "gid": 20002}]},
    }
    identity = identity_from_hub(user, {"robotics": {"gid": 20005, "description": "Robots", "display_name": "Robotics Lab"}})
    # nlp was in the auth_state of his last login, but he is no longer in the hub group: gone
    assert identity.project_names == ["robotics", "vision"]
    assert identity.project("robotics").gid == 20005 and identity.project("vision").gid == 20001
    assert identity.project("robotics").label == "Robotics Lab"  # the group sync's display_name property
    assert identity.uid == 10002 and not identity.admin
    assert identity_from_hub({"name": "x"}).projects == ()


def test_why_not_names_what_changed_since_a_schedule_was_made(access):
    """Asked when a schedule acts on its own, with its owner's identity as it is now."""
    assert access.why_not(BOB, "vision", "cpu") is None
    bob_removed = Identity(username="bob", projects=())
    assert access.why_not(bob_removed, "vision", "cpu") == "bob is no longer a member of project 'vision'"
    gone = access.why_not(BOB, "vision", "gpu-9")
    assert gone.startswith("the schedule's flavour is gone: unknown flavor 'gpu-9'")
    local = Access(demo.policy(), gpus=False)
    assert "not offered in this mode" in local.why_not(BOB, "vision", "gpu-1")
    assert access.flavor_problem("vision", "gpu-1") is None and access.flavor("gpu-9") is None


async def test_static_identities_stand_in_for_the_hub():
    from labyard_hub.access import StaticIdentities

    people = StaticIdentities([ALICE, BOB])
    assert (await people.get("bob")).project_names == ["vision"]
    assert (await people.get("mallory")).projects == ()  # unknown: no projects
    assert await people.projects() == ["nlp", "vision"]
    people.set(Identity(username="bob", projects=()))
    assert (await people.get("bob", fresh=True)).projects == ()
