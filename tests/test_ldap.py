"""LDAPAuthenticator against real slapd instances (posixGroup, groupOfNames, TLS)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from labyard_hub.directory import Directory
from labyard_hub.ldap import LDAPAuthenticator, ldap_config
from labyard_hub.projects import project_slug
from labyard_hub.slapd import free_port

from .support.directory import admin_connection, authenticator_config
from .support.net import DelayProxy

PASSWORD = "labyard-demo"


def make_auth(slapd=None, style="posixGroup", **overrides) -> LDAPAuthenticator:
    config = authenticator_config(slapd, style) if slapd else {}
    config.update(overrides)
    return LDAPAuthenticator(config=ldap_config(config))


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


async def test_group_names_that_are_not_dns_labels_become_projects_with_slugs(ldap_groupofnames):
    model = await login(make_auth(ldap_groupofnames, "groupOfNames"), "alice")
    slug = project_slug("Bad Name")
    assert slug.startswith("bad-name-") and slug in model["groups"]
    project = next(p for p in model["auth_state"]["projects"] if p["name"] == slug)
    assert project["display_name"] == "Bad Name"


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
    assert (await login(auth, "bob"))["name"] == "bob"
    servers = {c.ldap.server.name for pool in (auth.directory._service, auth.directory._binds) for c in pool.connections}
    assert servers == {ldap_posix.url}


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


async def test_connections_are_reused(ldap_posix):
    with DelayProxy(ldap_posix.port) as proxy:
        auth = make_auth(ldap_posix, server_urls=[proxy.url])
        assert await login(auth, "bob")
        opened = proxy.connections
        for _ in range(5):
            assert await login(auth, "bob")
        # one service and one bind connection, kept: later logins open nothing
        assert proxy.connections == opened


async def test_connections_are_pooled_under_load(ldap_posix):
    with DelayProxy(ldap_posix.port, delay=0.02) as proxy:
        auth = make_auth(ldap_posix, server_urls=[proxy.url], max_bind_connections=3, operations_per_connection=4,
                         max_service_connections=2)
        results = await asyncio.gather(*(login(auth, "carol") for _ in range(12)))
        assert all(r and r["name"] == "carol" for r in results)
        d = auth.directory
        assert len(d._binds.connections) <= 3 and len(d._service.connections) <= 2
        # each connection is opened once (ldap3's ServerPool probes the server with a TCP connect first)
        assert proxy.connections <= 2 * (3 + 2)


async def test_many_operations_share_one_service_connection(ldap_posix):
    with DelayProxy(ldap_posix.port, delay=0.05) as proxy:
        auth = make_auth(ldap_posix, server_urls=[proxy.url])
        results = await asyncio.gather(*(login(auth, u) for u in ["alice", "bob", "carol"] * 10))
        assert all(results)
        assert len(auth.directory._service.connections) == 1


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
        Directory(server_urls=["ldap.example.org"])
    with pytest.raises(Exception, match="must look like"):
        LDAPAuthenticator(config=ldap_config({"server_urls": ["ldap.example.org/x"]}))


def test_unknown_option_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown LDAP option 'server_url'"):
        ldap_config({"server_url": "ldap://127.0.0.1"})


def test_options_moved_to_directory_keep_working(caplog):
    from traitlets.config import Config

    config = Config()
    config.LDAPAuthenticator.server_urls = ["ldaps://ldap.example.org"]
    auth = LDAPAuthenticator(config=config)
    assert auth.directory.server_urls == ["ldaps://ldap.example.org"]
    assert "c.LDAPAuthenticator.server_urls moved to c.Directory" in caplog.text


@pytest.mark.parametrize(
    "urls, starttls, warned",
    [
        (["ldap://ldap.example.org"], False, True),
        (["ldaps://ldap.example.org"], False, False),
        (["ldap://ldap.example.org"], True, False),
        (["ldap://127.0.0.1:389", "ldap://localhost", "ldap://[::1]:389"], False, False),
    ],
)
def test_clear_text_ldap_to_a_remote_server_is_warned_about_at_start(caplog, urls, starttls, warned):
    Directory(server_urls=urls, use_starttls=starttls)
    assert ("passwords cross the network in clear" in caplog.text) == warned


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
    assert names == [project_slug("Bad Name"), "ml-all", "nlp", "vision"]


# -- password guessing -------------------------------------------------------------------------


def _from(address: str):
    """What JupyterHub passes as the login handler: only the client address is read."""
    return SimpleNamespace(request=SimpleNamespace(remote_ip=address))


async def attempt(auth, username, password, address="10.0.0.1"):
    """'ok', 'refused' (checked with LDAP and wrong) or 'locked' (HTTP 429, LDAP not asked)."""
    from tornado.web import HTTPError

    try:
        model = await auth.get_authenticated_user(_from(address), {"username": username, "password": password})
    except HTTPError as e:
        assert e.status_code == 429 and "Too many failed logins" in e.log_message
        return "locked"
    return "ok" if model else "refused"


async def _wait_unlocked(auth, username, timeout=30):
    deadline = time.monotonic() + timeout
    while auth._names.locked_for(username):
        assert time.monotonic() < deadline, "lock never ended"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("name", ["bob", "mallory"])
async def test_wrong_passwords_lock_the_name_while_others_log_in(ldap_posix, caplog, name):
    auth = make_auth(ldap_posix, failed_login_limit=5, failed_login_lock_seconds=1.5)
    outcomes = [await attempt(auth, name, f"guess-{i}") for i in range(20)]
    # five guesses reach LDAP, the other fifteen are refused without asking it; unknown names alike
    assert outcomes == ["refused"] * 5 + ["locked"] * 15
    assert f"LDAP login {name!r} from 10.0.0.1: too many failed logins for this name; locked for 2 s" in caplog.text
    # other users log in normally, from the same address and from others
    assert await attempt(auth, "alice", PASSWORD) == "ok"
    assert await attempt(auth, "carol", PASSWORD, "10.9.9.9") == "ok"
    if name == "bob":
        assert await attempt(auth, "bob", PASSWORD) == "locked"  # even with the right password, until the lock ends
        await _wait_unlocked(auth, "bob")
        assert await attempt(auth, "bob", PASSWORD) == "ok"
        assert await attempt(auth, "bob", "wrong") == "refused"  # the success forgot the failures


async def test_lock_doubles_with_each_further_failure(ldap_posix):
    auth = make_auth(ldap_posix, failed_login_limit=2, failed_login_lock_seconds=0.2, failed_login_max_lock_seconds=0.8)
    locks = []
    for _ in range(5):
        assert await attempt(auth, "bob", "wrong") == "refused"
        locks.append(auth._names.locked_for("bob"))
        await _wait_unlocked(auth, "bob")
    assert locks[0] == 0 and 0 < locks[1] <= 0.2 and 0.2 < locks[2] <= 0.4 and 0.4 < locks[3] <= 0.8 and locks[4] <= 0.8


async def test_guesses_sent_at_once_are_not_all_checked(ldap_posix):
    with DelayProxy(ldap_posix.port, delay=0.05) as proxy:
        auth = make_auth(ldap_posix, server_urls=[proxy.url], failed_login_limit=5)
        outcomes = await asyncio.gather(*(attempt(auth, "bob", f"guess-{i}") for i in range(30)))
        assert sorted(outcomes).count("refused") == 5 and outcomes.count("locked") == 25
        # while one user's guesses are gated, the same user's right password sent at once still gets in
        auth2 = make_auth(ldap_posix, server_urls=[proxy.url], failed_login_limit=5)
        mixed = await asyncio.gather(*(attempt(auth2, "carol", PASSWORD if i % 2 else "wrong") for i in range(8)))
        assert "ok" in mixed


async def test_one_address_trying_many_names_is_locked(ldap_posix):
    auth = make_auth(ldap_posix, failed_login_address_limit=10, failed_login_limit=0)
    outcomes = [await attempt(auth, f"user{i}", "guess", "10.6.6.6") for i in range(12)]
    assert outcomes == ["refused"] * 10 + ["locked"] * 2
    assert await attempt(auth, "carol", PASSWORD, "10.6.6.6") == "locked"
    assert await attempt(auth, "carol", PASSWORD, "10.7.7.7") == "ok"


async def test_directory_outage_does_not_count_as_failed_logins(ldap_posix):
    with DelayProxy(ldap_posix.port) as proxy:
        auth = make_auth(ldap_posix, server_urls=[proxy.url], failed_login_limit=2, receive_timeout=0.5)
        proxy.silent = True
        for _ in range(3):
            assert await attempt(auth, "alice", PASSWORD) == "refused"  # LDAP did not answer
        proxy.silent = False
        assert await attempt(auth, "alice", PASSWORD) == "ok"


def _probability_of_superiority(xs: list[float], ys: list[float]) -> float:
    """P(x > y) + P(x = y)/2 for x from xs, y from ys (0.5: neither takes longer)."""
    wins = sum((x > y) + 0.5 * (x == y) for x in xs for y in ys)
    return wins / (len(xs) * len(ys))


async def test_known_and_unknown_names_take_the_same_time_to_refuse(ldap_posix):
    """50 wrong passwords for a known name and 50 for unknown names, interleaved (so a loaded
    machine slows both alike), through a proxy adding 10 ms per answer (a missing round trip
    would stand out). Compared as distributions: the chance that a known-name refusal takes
    longer than an unknown-name one must be near one half (it is ~1 when unknown names skip the
    bind, as they used to)."""
    with DelayProxy(ldap_posix.port, delay=0.01) as proxy:
        auth = make_auth(ldap_posix, server_urls=[proxy.url], failed_login_limit=0, failed_login_address_limit=0)
        assert await attempt(auth, "alice", PASSWORD) == "ok"  # connections open
        known, unknown = [], []
        for i in range(50):
            for name, times in (("alice", known), (f"nobody{i}", unknown)):
                start = time.perf_counter()
                assert await attempt(auth, name, "wrong") == "refused"
                times.append(time.perf_counter() - start)
    p = _probability_of_superiority(known, unknown)
    assert 0.25 < p < 0.75, f"P(known slower) = {p:.2f}; medians {sorted(known)[25]:.4f} s vs {sorted(unknown)[25]:.4f} s"
