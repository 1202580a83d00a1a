"""LDAPAuthenticator against real slapd instances (posixGroup, groupOfNames, TLS)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from labyard_hub.ldap import LDAPAuthenticator
from labyard_hub.slapd import free_port

from .support.directory import admin_connection, authenticator_config
from .support.net import DelayProxy

PASSWORD = "labyard-demo"


def make_auth(slapd=None, style="posixGroup", **overrides) -> LDAPAuthenticator:
    config = authenticator_config(slapd, style) if slapd else {}
    config.update(overrides)
    return LDAPAuthenticator(**config)


async def login(auth: LDAPAuthenticator, username: str, password: str = PASSWORD):
    return await auth.get_authenticated_user(None, {"username": username, "password": password})


async def test_good_password_gives_identity_and_projects(ldap_posix):
    model = await login(make_auth(ldap_posix), "alice")
    assert model["name"] == "alice"
    assert model["groups"] == ["nlp", "vision"]
    state = model["auth_state"]
    assert (state["uid_number"], state["gid_number"], state["home"]) == (10001, 10000, "/home/alice")
    assert {p["name"]: p["gid"] for p in state["projects"]} == {"nlp": 20002, "vision": 20001}
    assert {p["name"]: p["description"] for p in state["projects"]}["vision"] == "Computer vision"
    assert model["admin"] is False


async def test_username_is_normalised(ldap_posix):
    model = await login(make_auth(ldap_posix), "  Alice ")
    assert model["name"] == "alice"


async def test_admin_group_makes_admin_and_is_not_a_project(ldap_posix):
    model = await login(make_auth(ldap_posix), "admin")
    assert model["admin"] is True
    assert model["groups"] == []


@pytest.mark.parametrize("password", ["wrong", "labyard-demo ", "LABYARD-DEMO"])
async def test_bad_password_is_refused(ldap_posix, password):
    assert await login(make_auth(ldap_posix), "alice", password) is None


async def test_unknown_user_is_refused(ldap_posix, caplog):
    assert await login(make_auth(ldap_posix), "mallory") is None
    assert "user not found" in caplog.text


@pytest.mark.parametrize(
    "username, password",
    [
        ("*", PASSWORD),
        ("alice)(uid=*", PASSWORD),
        ("alice)(|(uid=*", PASSWORD),
        ("alice\x00", PASSWORD),
        ("al*", PASSWORD),
        ("a" * 5000, PASSWORD),
        ("ålice", PASSWORD),
        ("alice", ""),
        ("alice", "*"),
        ("alice", "x" * 100_000),
        ("alice", "labyard-demo\x00"),
        ("cn=admin,dc=labyard,dc=test", PASSWORD),
    ],
)
async def test_injection_and_odd_input_is_refused(ldap_posix, username, password):
    assert await login(make_auth(ldap_posix), username, password) is None


async def test_filter_escaping_keeps_special_characters_literal(ldap_posix):
    # a pattern that allows the characters: the filter must still match nobody but a literal name
    auth = make_auth(ldap_posix, username_pattern=r"^.{1,64}$")
    for username in ["*", "alice)(uid=*", "a*", "alice\\2a"]:
        assert await login(auth, username) is None, username


async def test_empty_password_never_reaches_ldap(ldap_posix):
    proxy_target = ldap_posix.port
    with DelayProxy(proxy_target) as proxy:
        auth = make_auth(ldap_posix, server_urls=[proxy.url])
        assert await login(auth, "alice", "") is None
        assert proxy.connections == 0


async def test_group_of_names_with_nested_groups(ldap_groupofnames):
    flat = await login(make_auth(ldap_groupofnames, "groupOfNames"), "bob")
    assert flat["groups"] == ["vision"]
    nested = await login(make_auth(ldap_groupofnames, "groupOfNames", nested_groups=True), "bob")
    assert nested["groups"] == ["ml-all", "vision"]
    assert {p["name"]: p["gid"] for p in nested["auth_state"]["projects"]} == {"ml-all": None, "vision": None}


async def test_invalid_group_names_are_not_projects(ldap_groupofnames, caplog):
    model = await login(make_auth(ldap_groupofnames, "groupOfNames"), "alice")
    assert "Bad Name" not in model["groups"]
    assert "not a valid project name" in caplog.text


async def test_direct_bind_without_service_account(ldap_posix):
    auth = make_auth(
        ldap_posix,
        lookup_bind_dn="",
        lookup_bind_password="",
        bind_dn_templates=["uid={username},ou=nobody,dc=labyard,dc=test", "uid={username},ou=people,dc=labyard,dc=test"],
    )
    model = await login(auth, "carol")
    assert model["groups"] == ["nlp"]
    assert model["auth_state"]["uid_number"] == 10003
    assert await login(auth, "carol", "nope") is None


async def test_ldaps_with_ca_file(ldap_tls, tls_files):
    auth = make_auth(ldap_tls, server_urls=[ldap_tls.ldaps_url], ca_file=str(tls_files.ca))
    assert (await login(auth, "alice"))["groups"] == ["nlp", "vision"]


async def test_starttls_with_ca_file(ldap_tls, tls_files):
    url = f"ldap://localhost:{ldap_tls.port}"
    auth = make_auth(ldap_tls, server_urls=[url], use_starttls=True, ca_file=str(tls_files.ca))
    assert (await login(auth, "bob"))["groups"] == ["vision"]


async def test_untrusted_certificate_is_refused(ldap_tls, caplog):
    auth = make_auth(ldap_tls, server_urls=[ldap_tls.ldaps_url])  # system CAs only
    assert await login(auth, "alice") is None
    assert "no LDAP server reachable" in caplog.text


async def test_failover_to_second_server(ldap_posix):
    dead = f"ldap://127.0.0.1:{free_port()}"
    auth = make_auth(ldap_posix, server_urls=[dead, ldap_posix.url])
    assert (await login(auth, "alice"))["name"] == "alice"
    # the failed server is now tried last
    assert [s.name for s in auth._servers()][0].endswith(str(ldap_posix.port))


async def test_server_down_fails_fast(caplog):
    auth = make_auth(server_urls=[f"ldap://127.0.0.1:{free_port()}"], lookup_bind_dn="cn=x", user_search_base="dc=x")
    start = time.monotonic()
    assert await login(auth, "alice") is None
    assert time.monotonic() - start < 1.0
    assert "directory unavailable" in caplog.text


async def _loop_lag_during(coro) -> tuple[object, float]:
    """Run ``coro`` while a ticker measures the worst event-loop delay."""
    worst = 0.0
    done = asyncio.Event()

    async def ticker():
        nonlocal worst
        while not done.is_set():
            t = time.monotonic()
            await asyncio.sleep(0.01)
            worst = max(worst, time.monotonic() - t - 0.01)

    tick = asyncio.create_task(ticker())
    try:
        return await coro, worst
    finally:
        done.set()
        await tick


async def test_hung_server_times_out_without_blocking_the_loop(ldap_posix, caplog):
    with DelayProxy(ldap_posix.port) as proxy:
        proxy.silent = True
        auth = make_auth(ldap_posix, server_urls=[proxy.url], connect_timeout=1.0, receive_timeout=1.0)
        start = time.monotonic()
        result, lag = await _loop_lag_during(login(auth, "alice"))
        elapsed = time.monotonic() - start
    assert result is None
    assert elapsed < 5, elapsed
    assert lag < 0.2, f"event loop blocked for {lag:.2f}s"


async def test_slow_server_logins_run_concurrently(ldap_posix):
    with DelayProxy(ldap_posix.port, delay=0.2) as proxy:
        auth = make_auth(ldap_posix, server_urls=[proxy.url])
        results, lag = await _loop_lag_during(asyncio.gather(*(login(auth, u) for u in ["alice", "bob", "carol"] * 3)))
    assert all(r and r["name"] for r in results)
    assert lag < 0.2, f"event loop blocked for {lag:.2f}s"


async def test_service_connection_is_reused(ldap_posix):
    with DelayProxy(ldap_posix.port) as proxy:
        auth = make_auth(ldap_posix, server_urls=[proxy.url])
        for _ in range(3):
            assert await login(auth, "bob")
        # one service connection, plus one bind connection per login
        assert proxy.connections == 1 + 3


async def test_service_connections_are_pooled_under_load(ldap_posix):
    with DelayProxy(ldap_posix.port, delay=0.02) as proxy:
        auth = make_auth(ldap_posix, server_urls=[proxy.url], lookup_pool_size=3)
        results = await asyncio.gather(*(login(auth, "carol") for _ in range(12)))
        assert all(results)
        # at most 3 service connections, plus one bind connection per login
        assert 12 + 1 <= proxy.connections <= 12 + 3


async def test_service_connection_recovers_after_server_restart(tmp_path):
    from .support.directory import start_directory

    slapd = start_directory(tmp_path / "d")
    try:
        auth = make_auth(slapd)
        assert await login(auth, "alice")
        slapd.stop()
        slapd.start()
        assert (await login(auth, "alice"))["name"] == "alice"
    finally:
        slapd.stop()


async def test_refresh_sees_group_removal_and_deleted_users(ldap_posix):
    auth = make_auth(ldap_posix)
    user = SimpleNamespace(name="carol")
    assert (await auth.refresh_user(user))["groups"] == ["nlp"]
    conn = admin_connection(ldap_posix)
    dn = "cn=nlp,ou=projects,dc=labyard,dc=test"
    conn.modify(dn, {"memberUid": [("MODIFY_DELETE", ["carol"])]})
    try:
        refreshed = await auth.refresh_user(user)
        assert refreshed["groups"] == []
        assert refreshed["auth_state"]["projects"] == []
    finally:
        conn.modify(dn, {"memberUid": [("MODIFY_ADD", ["carol"])]})
    assert await auth.refresh_user(SimpleNamespace(name="nobody")) is False


async def test_refresh_keeps_user_when_ldap_is_down():
    auth = make_auth(server_urls=[f"ldap://127.0.0.1:{free_port()}"], lookup_bind_dn="cn=x", user_search_base="dc=x")
    assert await auth.refresh_user(SimpleNamespace(name="alice")) is True


def test_bad_server_url_is_a_config_error():
    with pytest.raises(Exception, match="must look like"):
        LDAPAuthenticator(server_urls=["ldap.example.org"])


async def test_users_without_projects_are_not_allowed(ldap_posix):
    conn = admin_connection(ldap_posix)
    dn = "cn=vision,ou=projects,dc=labyard,dc=test"
    conn.modify(dn, {"memberUid": [("MODIFY_DELETE", ["bob"])]})
    try:
        assert await login(make_auth(ldap_posix), "bob") is None
    finally:
        conn.modify(dn, {"memberUid": [("MODIFY_ADD", ["bob"])]})


async def test_list_projects_for_the_controller(ldap_posix, ldap_groupofnames):
    projects = await make_auth(ldap_posix).list_projects()
    assert [(p.name, p.gid) for p in projects] == [("nlp", 20002), ("vision", 20001)]
    names = [p.name for p in await make_auth(ldap_groupofnames, "groupOfNames").list_projects()]
    assert names == ["ml-all", "nlp", "vision"]
