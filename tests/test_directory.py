"""The Directory against a real slapd shaped like Active Directory (tests/support/directory.py):
groupOfNames with nested groups, group names of every kind, 1,100 project groups behind a
1,000-entry size limit, a user in 300 groups that are not projects, a user without uidNumber,
two groups with the same name, a referral; and failover between two servers."""

from __future__ import annotations

import asyncio
import statistics
import time

import ldap3
import pytest

from jupyterhub.slugs import is_valid_safe_slug

from labyard_hub.directory import Directory, DirectoryError
from labyard_hub.kube import objects
from labyard_hub.ldap import LDAPAuthenticator, ldap_config
from labyard_hub.projects import PROJECT_NAME_RE, Identity, project_slug
from labyard_hub.slapd import free_port

from .support.directory import (
    AD_PROJECTS,
    BULK_GROUPS,
    LONG_NAME,
    OTHER_GROUPS,
    SERVICE_PASSWORD,
    ad_config,
    authenticator_config,
    entries_read,
    log_size,
)
from .support.net import BlackHole, DelayProxy

PASSWORD = "labyard-demo"
NAMED = ["Data Science", "ML_Research", "Équipe Vision", LONG_NAME, "vision"]


def directory(slapd, **overrides) -> Directory:
    return Directory(config=ldap_config({**ad_config(slapd), **overrides}))


async def login(slapd, username, password=PASSWORD, **overrides):
    auth = LDAPAuthenticator(config=ldap_config({**ad_config(slapd), **overrides}))
    return await auth.get_authenticated_user(None, {"username": username, "password": password})


def test_slugs_are_stable_valid_and_distinct():
    names = NAMED + ["data science", "Data_Science", "DATA SCIENCE", "Robotics", "robotics", "机器学习", "a" * 70, "a--b",
                     "3d-vision", "ml-team", "-x-", "x" * 30, "x" * 31]
    slugs = [project_slug(n) for n in names]
    # valid project names, which JupyterHub accepts as server names, and Kubernetes as namespaces
    assert all(PROJECT_NAME_RE.match(s) and is_valid_safe_slug(s) for s in slugs), slugs
    assert len(set(slugs)) == len(slugs)
    assert slugs == [project_slug(n) for n in names]  # the same name always gives the same slug
    assert [project_slug(n) for n in ("vision", "robotics", "ml-team", "x" * 30)] == ["vision", "robotics", "ml-team", "x" * 30]
    assert all(project_slug(s) == s for s in slugs)  # a slug is its own slug
    assert project_slug(LONG_NAME).startswith("computational-linguis")
    # the project name rule is JupyterHub's own for server names
    for name in names + slugs:
        assert bool(PROJECT_NAME_RE.match(name)) == is_valid_safe_slug(name), name
    # the namespace and the PVC names stay valid Kubernetes names
    for s in slugs:
        assert len(objects.namespace_for(s)) <= 63 and objects.namespace_for(s) == f"labyard-{s}"


async def test_ad_groups_are_projects_with_slugs_and_their_own_names(ldap_ad):
    model = await login(ldap_ad, "alice")
    # Data Science directly, ML_Research through Data Science (nested), vision
    assert sorted(model["groups"]) == sorted(project_slug(n) for n in ("Data Science", "ML_Research", "vision"))
    projects = {p["name"]: p for p in model["auth_state"]["projects"]}
    ds = projects[project_slug("Data Science")]
    assert (ds["display_name"], ds["description"], ds["gid"]) == ("Data Science", "Data science team", 30001)
    assert projects[project_slug("ML_Research")]["gid"] is None
    assert projects["vision"]["display_name"] == ""  # a valid name is its own slug and label
    carol = await login(ldap_ad, "carol")
    equipe = next(p for p in carol["auth_state"]["projects"] if p["display_name"] == "Équipe Vision")
    assert equipe["name"] == project_slug("Équipe Vision") and equipe["name"].startswith("equipe-vision-")


async def test_user_in_hundreds_of_groups_reads_only_project_groups(ldap_ad):
    since = log_size(ldap_ad)
    model = await login(ldap_ad, "erin")
    assert model["groups"] == [project_slug(LONG_NAME)]
    await asyncio.sleep(0.2)  # slapd writes its log line after answering
    read = entries_read(ldap_ad, since)
    # her entry, her one project group and its namesakes: not her 300 other groups
    assert sum(read) <= 4, read
    assert OTHER_GROUPS == 300


async def test_user_without_uid_number_logs_in_but_gets_no_pod(ldap_ad):
    model = await login(ldap_ad, "dave")
    assert model["name"] == "dave" and model["groups"] == [project_slug("Équipe Vision")]
    state = model["auth_state"]
    assert state["uid_number"] is None and state["gid_number"] is None
    identity = Identity.from_auth_state("dave", state)
    with pytest.raises(ValueError, match="dave has no uidNumber in the directory"):
        objects.make_pod_security_context(identity, identity.projects[0])


async def test_groups_sharing_a_slug_are_both_refused(ldap_ad, caplog):
    model = await login(ldap_ad, "frank")
    assert model["groups"] == ["vision"]
    assert f"all map to project name {project_slug('Robotics')!r}" in caplog.text
    assert "ou=lab,ou=projects" in caplog.text


async def test_admin_group_is_matched_without_case_and_is_no_project(ldap_ad):
    model = await login(ldap_ad, "admin")
    assert model["admin"] is True and model["groups"] == []


async def test_the_size_limit_is_real_and_listing_pages_past_it(ldap_ad):
    # the service account really gets at most 1,000 entries from one plain search
    conn = ldap3.Connection(ldap_ad.url, ldap_ad.reader_dn, SERVICE_PASSWORD, auto_bind=True)
    conn.search(AD_PROJECTS, "(objectClass=groupOfNames)", attributes=["cn"])
    assert conn.result["result"] == 4 and len(conn.entries) == 1000  # sizeLimitExceeded
    conn.unbind()
    projects = await directory(ldap_ad).list_projects()
    slugs = {p.name for p in projects}
    assert len(projects) == BULK_GROUPS + len(NAMED)
    assert {project_slug(n) for n in NAMED} <= slugs and not any(s.startswith("robotics") for s in slugs)
    assert all(PROJECT_NAME_RE.match(s) for s in slugs)


async def test_memberships_in_bulk_with_nested_groups(ldap_ad):
    d = directory(ldap_ad)
    since = log_size(ldap_ad)
    found = await d.memberships(["alice", "bob", "carol", "dave", "erin", "frank", "ghost"])
    members = {found.projects[s].label: m for s, m in found.members.items() if m}
    assert members == {
        "Data Science": {"alice", "bob"},
        "ML_Research": {"alice", "bob", "carol"},
        "Équipe Vision": {"carol", "dave"},
        LONG_NAME: {"erin"},
        "vision": {"alice", "frank"},
    }
    assert found.projects[project_slug("Data Science")].group_properties() == {
        "gid": 30001, "display_name": "Data Science", "description": "Data science team"}
    await asyncio.sleep(0.2)
    # a few searches (pages of groups, one for the users), not one per user or per group
    assert len(entries_read(ldap_ad, since)) <= 6


async def test_referrals_are_not_followed_unless_configured(ldap_ad, ldap_groupofnames, caplog):
    partner = f"ou=partner,{AD_PROJECTS}"
    with pytest.raises(DirectoryError, match="was referred to"):
        await directory(ldap_ad, project_search_base=partner).list_projects()
    followed = await directory(ldap_ad, project_search_base=partner, follow_referrals=True).list_projects()
    # the partner directory's groups (its "admins" is a project here: our admin group is "Labyard Admins")
    assert {p.name for p in followed} == {"admins", "ml-all", "nlp", "vision", project_slug("Bad Name")}
    # the referral object inside the project base does not disturb ordinary logins
    assert (await login(ldap_ad, "alice"))["name"] == "alice"


# -- failover -----------------------------------------------------------------------------------


async def _median_login(auth, n=5) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        assert await auth.get_authenticated_user(None, {"username": "alice", "password": PASSWORD})
        times.append(time.perf_counter() - start)
    return statistics.median(times)


async def test_primary_down_the_second_answers_within_a_second_more(ldap_posix):
    with DelayProxy(ldap_posix.port) as primary:
        config = {**authenticator_config(ldap_posix), "server_urls": [primary.url, ldap_posix.url]}
        auth = LDAPAuthenticator(config=ldap_config(config))
        normal = await _median_login(auth)
        assert primary.connections > 0  # the primary answered so far
    # the primary is down now (its port refuses connections; its open connections were closed)
    start = time.perf_counter()
    assert (await auth.get_authenticated_user(None, {"username": "alice", "password": PASSWORD}))["name"] == "alice"
    first = time.perf_counter() - start
    assert first < normal + 1.0, (first, normal)
    assert await _median_login(auth) < normal + 1.0


async def test_primary_unreachable_the_second_answers(ldap_posix):
    """A host that is down: connecting hangs (no answer to SYN) until connect_timeout."""
    with BlackHole() as dead:
        config = {**authenticator_config(ldap_posix), "server_urls": [dead.url, ldap_posix.url], "connect_timeout": 0.5}
        auth = LDAPAuthenticator(config=ldap_config(config))
        start = time.perf_counter()
        assert await auth.get_authenticated_user(None, {"username": "bob", "password": PASSWORD})
        first = time.perf_counter() - start
        normal = await _median_login(auth)
        # the dead host cost one connect timeout once, then it is skipped
        assert first < normal + 1.0 + 0.5 * 2, (first, normal)
        assert normal < 0.5, normal


async def test_all_servers_down_fails_fast_and_recovers(tmp_path):
    from .support.directory import start_directory

    slapd = start_directory(tmp_path / "d")
    port = free_port()
    config = {**authenticator_config(slapd), "server_urls": [f"ldap://127.0.0.1:{port}", slapd.url]}
    auth = LDAPAuthenticator(config=ldap_config(config))
    try:
        assert await auth.get_authenticated_user(None, {"username": "alice", "password": PASSWORD})
        slapd.stop()
        start = time.perf_counter()
        assert await auth.get_authenticated_user(None, {"username": "alice", "password": PASSWORD}) is None
        assert time.perf_counter() - start < 2
        slapd.start()
        # every server was exhausted: the next login looks at them all again at once
        assert (await auth.get_authenticated_user(None, {"username": "alice", "password": PASSWORD}))["name"] == "alice"
    finally:
        slapd.stop()


async def test_primary_hangs_everything_moves_to_the_second_after_one_timeout(ldap_posix):
    with DelayProxy(ldap_posix.port) as primary:
        config = {**authenticator_config(ldap_posix), "server_urls": [primary.url, ldap_posix.url], "receive_timeout": 1.0}
        auth = LDAPAuthenticator(config=ldap_config(config))
        normal = await _median_login(auth)
        primary.silent = primary.frozen = True  # connections stay open, nothing is answered
        start = time.perf_counter()
        results = await asyncio.gather(*(auth.get_authenticated_user(None, {"username": u, "password": PASSWORD})
                                         for u in ("alice", "bob", "carol")))
        first = time.perf_counter() - start
        assert all(results)
        # one receive timeout (the hung server is found out once, for all waiting logins), then the second answers
        assert first < normal + 1.0 + 1.0, (first, normal)
        assert await _median_login(auth) < normal + 1.0
