"""A real Labyard (``labyard up --demo``: slapd, MLflow, configurable-http-proxy, JupyterHub)."""

from __future__ import annotations

import re
import threading
import time

import pytest
import requests

from labyard_hub import demo

from .support.directory import authenticator_config
from .support.net import DelayProxy
from .support.stack import Stack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("labyard"), config={"ldap": {"auth_refresh_age": 2}}).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def alice(stack):
    return stack.api("alice")


@pytest.fixture(scope="module")
def bob(stack):
    return stack.api("bob")


def test_alice_is_in_vision_and_nlp(stack, alice):
    assert sorted(alice.get(f"{alice.base}/user").json()["groups"]) == ["nlp", "vision"]
    home = stack.login("alice").get(f"{stack.url}/hub/home").text
    assert 'data-server-name="vision"' in home and 'data-server-name="nlp"' in home


def test_bob_sees_only_vision(stack, bob):
    assert bob.get(f"{bob.base}/user").json()["groups"] == ["vision"]
    home = stack.login("bob").get(f"{stack.url}/hub/home").text
    assert 'data-server-name="vision"' in home and 'data-server-name="nlp"' not in home


def test_admin_group_member_is_hub_admin(stack):
    admin = stack.api("admin")
    assert admin.get(f"{admin.base}/user").json()["admin"] is True


def test_wrong_password_gets_generic_failure(stack):
    s = stack.login("alice", "not-her-password")
    assert s.login_status == 403
    assert stack.login("mallory").login_status == 403


def test_spawn_project_server_and_open_lab_through_proxy(stack, alice):
    r = alice.post(f"{alice.base}/users/alice/servers/vision", json={})
    assert r.status_code in (201, 202), r.text
    model = stack.wait_ready(alice, "alice", "vision")
    assert model["url"] == "/user/alice/vision/"
    browser = stack.login("alice")
    lab = browser.get(f"{stack.url}/user/alice/vision/lab")
    assert lab.status_code == 200 and "JupyterLab" in lab.text
    info = browser.get(f"{stack.url}/user/alice/vision/labyard/info").json()
    assert info == {"user": "alice", "project": "vision", "project_display_name": "vision", "flavor": "cpu",
                    "mlflow_url": info["mlflow_url"]}
    # the server works in the project's directory
    contents = browser.get(f"{stack.url}/user/alice/vision/api/contents/").json()
    assert contents["path"] == ""
    (stack.data_dir / "projects" / "vision" / "marker.txt").write_text("x")
    names = [c["name"] for c in browser.get(f"{stack.url}/user/alice/vision/api/contents/").json()["content"]]
    assert "marker.txt" in names
    # bob cannot reach alice's server
    other = stack.login("bob").get(f"{stack.url}/user/alice/vision/lab", allow_redirects=True)
    assert "JupyterLab" not in other.text or other.status_code == 403
    assert alice.delete(f"{alice.base}/users/alice/servers/vision").status_code in (202, 204)


def test_foreign_project_is_refused_with_403(bob):
    r = bob.post(f"{bob.base}/users/bob/servers/nlp", json={})
    assert r.status_code == 403
    assert r.json()["message"] == "bob is not a member of project 'nlp'"


def test_unknown_flavor_is_refused_with_400(alice):
    r = alice.post(f"{alice.base}/users/alice/servers/nlp", json={"flavor": "gpu-9"})
    assert r.status_code == 400
    assert "'gpu-9'" in r.json()["message"]


def test_gpu_flavor_is_not_offered_in_local_mode(alice):
    r = alice.post(f"{alice.base}/users/alice/servers/nlp", json={"flavor": "gpu-1"})
    assert r.status_code == 400
    assert "choose one of: cpu" in r.json()["message"]


def test_default_server_needs_a_project(alice):
    r = alice.post(f"{alice.base}/users/alice/server", json={})
    assert r.status_code == 400
    assert "belong to a project" in r.json()["message"]


def test_group_removal_applies_without_new_login(stack):
    bob = stack.api("bob")
    conn = stack.demo_ldap()
    dn = f"cn=vision,ou=projects,{demo.SUFFIX}"
    conn.modify(dn, {"memberUid": [("MODIFY_DELETE", ["bob"])]})
    try:
        time.sleep(2.5)  # auth_refresh_age of this stack
        assert bob.get(f"{bob.base}/user").json()["groups"] == []
        r = bob.post(f"{bob.base}/users/bob/servers/vision", json={})
        assert r.status_code == 403
    finally:
        conn.modify(dn, {"memberUid": [("MODIFY_ADD", ["bob"])]})
    time.sleep(2.5)
    assert bob.get(f"{bob.base}/user").json()["groups"] == ["vision"]


@pytest.fixture(scope="module")
def slow_ldap_stack(tmp_path_factory, ldap_posix):
    """A stack whose LDAP goes through a proxy the test can slow down or silence."""
    with DelayProxy(ldap_posix.port) as proxy:
        ldap = authenticator_config(ldap_posix)
        ldap.update(server_urls=[proxy.url], connect_timeout=1.0, receive_timeout=2.0)
        config = {"ldap": ldap, "policy_file": str(demo.POLICY_FILE), "mlflow_url": "http://127.0.0.1:9"}
        s = Stack(tmp_path_factory.mktemp("labyard-slow"), config=config, demo_mode=False).start()
        yield s, proxy
        s.stop()


def test_hub_answers_while_ldap_hangs(slow_ldap_stack):
    stack, proxy = slow_ldap_stack
    assert stack.login("carol").login_status == 302
    proxy.silent = proxy.frozen = True  # the open connections stay open and go quiet too
    try:
        result = {}
        thread = threading.Thread(target=lambda: result.update(s=stack.login("alice")))
        start = time.monotonic()
        thread.start()
        time.sleep(0.3)
        worst = 0.0
        while thread.is_alive() and time.monotonic() - start < 30:
            t = time.monotonic()
            assert requests.get(f"{stack.url}/hub/api/", timeout=5).status_code == 200
            worst = max(worst, time.monotonic() - t)
            time.sleep(0.1)
        thread.join(30)
        elapsed = time.monotonic() - start
    finally:
        proxy.silent = proxy.frozen = False
    assert result["s"].login_status == 503  # the form says the directory does not answer
    assert elapsed < 15, f"login against a hung LDAP took {elapsed:.1f}s"
    assert worst < 0.5, f"hub took {worst:.2f}s to answer while LDAP hung"
    assert "directory unavailable" in stack.hub_log()


def test_start_up_objects_are_frozen_out_of_the_garbage_collector(stack):
    """labyard_hub.hubgc: the hub's full garbage collections skip what it loaded at start (else each
    one pauses its event loop ~200 ms, docs/dev/benchmarks.md)."""
    deadline = time.monotonic() + 60
    while not (found := re.search(r"(\d+) objects alive at start-up are frozen", stack.hub_log())):
        assert time.monotonic() < deadline, "the hub never said it froze its start-up objects"
        time.sleep(1)
    assert int(found.group(1)) > 100_000


def test_a_deleted_user_logs_in_again_as_a_new_user(stack):
    """The login handler finds users in one query (labyard_hub.ldap.LoginHandler.find_user): one
    deleted through the API is gone for it too, and the next login creates her again."""
    admin = stack.api("admin")
    assert stack.login("carol").login_status == 302
    assert admin.delete(f"{admin.base}/users/carol", timeout=30).status_code == 204
    assert admin.get(f"{admin.base}/users/carol", timeout=10).status_code == 404
    assert stack.login("carol").login_status == 302
    assert admin.get(f"{admin.base}/users/carol", timeout=10).json()["groups"] == ["nlp"]
