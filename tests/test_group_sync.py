"""The group sync on a real Labyard (``labyard up --demo``): LDAP changes reach the hub's groups,
their properties and running servers, for users who do not log in again."""

from __future__ import annotations

import os

import time

import pytest

from labyard_hub import demo
from labyard_hub.projects import Project, project_slug
from labyard_hub.spawners.base import _templates

from .support.stack import Stack

pytestmark = pytest.mark.slow

INTERVAL = 2
DATA_SCIENCE = project_slug("Data Science")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    # logins re-read LDAP only after an hour: whatever changes sooner is the group sync's doing
    # users are found without asking for posixAccount, so that one without uidNumber can log in
    ldap = {"auth_refresh_age": 3600, "user_search_filter": "(&(objectClass=inetOrgPerson)(uid={username}))"}
    config = {"group_sync_interval": INTERVAL, "ldap": ldap, "cull": {"enabled": False}}
    s = Stack(tmp_path_factory.mktemp("labyard-sync"), config=config).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def admin(stack):
    return stack.api("admin")


def wait_until(check, what: str, timeout: float = 60):
    """Poll ``check`` until it returns something true; the seconds it took."""
    start = time.monotonic()
    while True:
        if value := check():
            return time.monotonic() - start, value
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{what} not within {timeout}s")
        time.sleep(0.2)


def group(admin, name: str) -> dict | None:
    r = admin.get(f"{admin.base}/groups/{name}", timeout=10)
    return r.json() if r.status_code == 200 else None


def test_project_groups_exist_with_their_properties_before_anyone_logs_in(stack, admin):
    _, vision = wait_until(lambda: (g := group(admin, "vision")) and g["properties"] and g, "vision's properties")
    assert vision["properties"] == {"gid": 20001, "display_name": "vision", "description": "Computer vision"}
    assert group(admin, "nlp")["properties"]["gid"] == 20002
    assert group(admin, demo.ADMIN_GROUP) is None  # an admin group is not a project


def test_removal_in_ldap_reaches_the_hub_and_stops_the_server_without_a_new_login(stack, admin):
    bob = stack.api("bob")
    stack.api("alice")  # alice is a hub user too: she stays in vision
    assert bob.post(f"{bob.base}/users/bob/servers/vision", json={}).status_code in (201, 202)
    stack.wait_ready(bob, "bob", "vision")
    assert "bob" in group(admin, "vision")["users"]
    conn = stack.demo_ldap()
    dn = f"cn=vision,ou=projects,{demo.SUFFIX}"
    conn.modify(dn, {"memberUid": [("MODIFY_DELETE", ["bob"])]})
    try:
        took, _ = wait_until(lambda: "bob" not in group(admin, "vision")["users"], "bob out of vision")
        # his running vision server is stopped, though he never logged in again
        wait_until(lambda: "vision" not in admin.get(f"{admin.base}/users/bob", timeout=10).json()["servers"],
                   "bob's vision server stopped")
        wait_until(lambda: "bob is no longer a member of project vision: stopping their server vision" in stack.hub_log(),
                   "the sync's log line")
        assert "alice" in group(admin, "vision")["users"]
        # and with his old token he cannot start it again
        r = bob.post(f"{bob.base}/users/bob/servers/vision", json={})
        assert r.status_code == 403, r.text
        print(f"bob left the hub group vision {took:.1f} s after his removal from LDAP (interval {INTERVAL} s)")
    finally:
        conn.modify(dn, {"memberUid": [("MODIFY_ADD", ["bob"])]})
    wait_until(lambda: "bob" in group(admin, "vision")["users"], "bob back in vision")


def test_users_who_never_logged_in_are_synced_too(stack, admin):
    # carol exists in the hub (made by an admin) but has never logged in
    r = admin.post(f"{admin.base}/users/carol", json={}, timeout=10)
    assert r.status_code in (201, 409), r.text
    wait_until(lambda: "carol" in group(admin, "nlp")["users"], "carol in nlp")
    assert "carol" not in group(admin, "vision")["users"]


def test_new_group_with_any_name_becomes_a_project_shown_by_its_name(stack, admin, browser):
    alice = stack.api("alice")
    conn = stack.demo_ldap()
    dn = f"cn=Data Science,ou=projects,{demo.SUFFIX}"
    conn.add(dn, ["posixGroup"], {"cn": "Data Science", "gidNumber": 20005, "memberUid": ["alice"],
                                  "description": "Data science team"})
    try:
        _, made = wait_until(lambda: (g := group(admin, DATA_SCIENCE)) and g["properties"] and g["users"] and g,
                             "the Data Science group")
        assert made["properties"] == {"gid": 20005, "display_name": "Data Science", "description": "Data science team"}
        assert made["users"] == ["alice"]
        session = stack.login("alice")
        home = session.get(f"{stack.url}/hub/home", timeout=10).text
        assert f'data-server-name="{DATA_SCIENCE}"' in home
        assert ">Data Science</strong>" in home and "Data science team" in home
        r = alice.post(f"{alice.base}/users/alice/servers/{DATA_SCIENCE}", json={})
        assert r.status_code in (201, 202), r.text
        stack.wait_ready(alice, "alice", DATA_SCIENCE)
        browsing = stack.login("alice")
        assert browsing.get(f"{stack.url}/user/alice/{DATA_SCIENCE}/lab", timeout=60).status_code == 200  # OAuth to the server
        r = browsing.get(f"{stack.url}/user/alice/{DATA_SCIENCE}/labyard/info", timeout=30)
        assert r.status_code == 200, r.text[:500]
        info = r.json()
        assert (info["project"], info["project_display_name"]) == (DATA_SCIENCE, "Data Science"), info
        # the JupyterLab status bar shows the group's own name
        context = browser.new_context()
        try:
            page = context.new_page()
            page.goto(f"{stack.url}/hub/login")
            page.fill("#username_input", "alice")
            page.fill("#password_input", demo.PASSWORD)
            page.click("#login_submit")
            page.wait_for_url("**/hub/home")
            page.goto(f"{stack.url}/user/alice/{DATA_SCIENCE}/lab")
            status = page.locator(".labyard-status-project")
            status.wait_for(timeout=90_000)
            assert status.inner_text() == "Data Science"
            assert status.get_attribute("title") == DATA_SCIENCE
        finally:
            context.close()
    finally:
        conn.delete(dn)
    # the project is gone: the group goes, and so does alice's server of it
    wait_until(lambda: group(admin, DATA_SCIENCE) is None, "the Data Science group deleted")
    wait_until(lambda: DATA_SCIENCE not in admin.get(f"{admin.base}/users/alice", timeout=10).json()["servers"],
               "alice's Data Science server stopped")


def test_spawn_form_shows_the_project_by_its_name():
    html = _templates.get_template("spawn_form.html").render(
        project=Project(name=DATA_SCIENCE, display_name="Data Science", description="Team"), flavors=[], notes={})
    assert "<strong>Data Science</strong>: Team" in html


def test_user_without_uid_number_logs_in_and_gets_a_local_server(stack):
    conn = stack.demo_ldap()
    dn = f"uid=dave,ou=people,{demo.SUFFIX}"
    conn.add(dn, ["inetOrgPerson"], {"uid": "dave", "cn": "Dave Dunn", "sn": "Dunn", "userPassword": demo.PASSWORD})
    vision = f"cn=vision,ou=projects,{demo.SUFFIX}"
    conn.modify(vision, {"memberUid": [("MODIFY_ADD", ["dave"])]})
    try:
        dave = stack.api("dave")
        assert dave.get(f"{dave.base}/user", timeout=10).json()["groups"] == ["vision"]
        r = dave.post(f"{dave.base}/users/dave/servers/vision", json={})
        if os.geteuid() == 0:
            # local mode as root runs servers as the user's own uid (docs/admin/local.md): refused,
            # naming the attribute, as in Kubernetes mode (test_directory.py)
            assert r.status_code == 403 and "no uidNumber" in r.json()["message"], r.text
        else:
            # the single-person demo runs every server as its own system user: no uid needed
            assert r.status_code in (201, 202), r.text
            stack.wait_ready(dave, "dave", "vision")
            assert dave.delete(f"{dave.base}/users/dave/servers/vision").status_code in (202, 204)
    finally:
        conn.modify(vision, {"memberUid": [("MODIFY_DELETE", ["dave"])]})
        conn.delete(dn)


def test_hub_database_is_in_write_ahead_log_mode(stack):
    import sqlite3

    db = sqlite3.connect(stack.data_dir / "hub" / "jupyterhub.sqlite")
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()
