"""``labyard up``: starts every component, stops them all, leaves no process behind."""

from __future__ import annotations

import pytest

from .support.stack import Stack

pytestmark = pytest.mark.slow


def test_demo_stack_starts_and_stops_cleanly(tmp_path):
    stack = Stack(tmp_path / "data").start()
    try:
        running = {" ".join(p.cmdline()) for p in stack.processes()}
        for component in ("slapd", "mlflow", "configurable-http-proxy", "jupyterhub"):
            assert any(component in cmd for cmd in running), f"{component} not running: {running}"
        alice = stack.api("alice")
        assert alice.post(f"{alice.base}/users/alice/servers/nlp", json={}).status_code in (201, 202)
        stack.wait_ready(alice, "alice", "nlp")
        assert any("jupyterhub-singleuser" in " ".join(p.cmdline()) for p in stack.processes())
    finally:
        code = stack.stop()
    assert code == 0
    left = [" ".join(p.cmdline()) for p in stack.processes()]
    assert left == [], f"processes left behind: {left}"


def test_restart_keeps_the_directory_and_users(tmp_path):
    data = tmp_path / "data"
    first = Stack(data).start()
    try:
        assert first.login("carol").login_status == 302
    finally:
        first.stop()
    second = Stack(data).start()
    try:
        assert second.api("carol").get(f"{second.url}/hub/api/user").json()["groups"] == ["nlp"]
    finally:
        second.stop()


def test_without_ldap_config_it_says_what_is_missing(tmp_path, capsys):
    from labyard_hub.cli import main

    assert main(["up", "--data-dir", str(tmp_path), "--port", "0"]) == 2
    assert "no LDAP configured" in capsys.readouterr().err
