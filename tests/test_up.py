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


def test_a_bad_policy_stops_it_naming_the_file_and_the_field(tmp_path, capsys):
    """labyard up refuses before starting anything; the hub's config refuses the same file (it
    loads the policy once, at start, for every spawner)."""
    import os
    import subprocess
    import sys

    import yaml

    from labyard_hub import hub_config_file
    from labyard_hub.cli import main
    from labyard_hub.settings import Settings

    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({"flavors": {"gpu-1": {"gpus": -1}}}))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"ldap": {"server_urls": ["ldap://127.0.0.1:1"]}, "policy_file": str(policy)}))
    assert main(["up", "--data-dir", str(tmp_path / "data"), "--port", "0", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"project policy {policy}: flavors.gpu-1.gpus: Input should be greater than or equal to 0" in err
    assert not (tmp_path / "data" / "settings.yaml").exists()
    # the hub itself, started on such settings (say, the file changed since), stops at once
    settings = Settings.model_validate({"data_dir": str(tmp_path / "data"), "policy_file": str(policy)})
    settings.dump(tmp_path / "settings.yaml")
    probe = ("import runpy, traitlets.config as t\n"
             "runpy.run_path(%r, init_globals={'get_config': t.get_config})" % str(hub_config_file()))
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "LABYARD_SETTINGS": str(tmp_path / "settings.yaml")})
    assert r.returncode != 0
    assert f"Labyard cannot start: project policy {policy}: flavors.gpu-1.gpus" in r.stderr
