"""Nothing outlives ``labyard up`` (issue 18): SIGTERM at many moments of start-up and work, and
SIGKILL of ``labyard up`` itself, leave no process, lock or port behind; the next start is clean.
``labyard status`` reports a killed component down, then restarted.

Moments are events seen in the logs (a component started, a service started, a server ready), never
delays. A process is "of the platform" when its environment carries the data dir's session mark, or
its command line or working directory names the data dir (Stack.processes)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from labyard_hub import lifecycle
from labyard_hub.status import running

from .support.stack import Stack

pytestmark = pytest.mark.slow


def leftovers(stack: Stack) -> list[str]:
    pids = set(lifecycle.marked(f"{stack.data_dir.absolute()}#")) | {p.pid for p in stack.processes()}
    out = []
    for pid in sorted(pids):
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{pid} {' '.join(p.cmdline())}")
        except psutil.NoSuchProcess:
            pass
    return out


def wait_gone(stack: Stack, timeout: float = 120) -> list[str]:
    """What is left of the platform once it had ``timeout`` seconds to go."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and leftovers(stack):
        time.sleep(0.5)
    return leftovers(stack)


def ports(data_dir: Path) -> dict[str, int]:
    """The loopback ports of the last start on ``data_dir`` (its settings.yaml)."""
    path = data_dir / "settings.yaml"
    if not path.exists():
        return {}
    s = yaml.safe_load(path.read_text())
    found = {k: s[k] for k in ("hub_port", "proxy_api_port", "scheduler_port") if s.get(k)}
    for name, url in (("mlflow", s.get("mlflow_url")), ("ldap", (s.get("ldap") or {}).get("server_urls", [None])[0])):
        if url and url.rsplit(":", 1)[-1].isdigit():
            found[name] = int(url.rsplit(":", 1)[-1])
    return found


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # only a listener makes bind fail
        try:
            sock.bind(("127.0.0.1", port))
            return False
        except OSError:
            return True


def lock_free(data_dir: Path) -> bool:
    return not running(data_dir)


def assert_nothing_left(stack: Stack, moment: str) -> None:
    left = wait_gone(stack)
    assert left == [], f"after {moment}, processes left behind: {left}"
    assert lock_free(stack.data_dir), f"after {moment}, the data dir is still locked"
    busy = {name: port for name, port in ports(stack.data_dir).items() | {("public", stack.port)} if listening(port)}
    assert busy == {}, f"after {moment}, ports still listening: {busy}"


def hub_log(stack: Stack) -> Path:
    return stack.data_dir / "logs" / "jupyterhub.log"


def test_sigterm_at_every_moment_of_start_up_leaves_nothing(tmp_path):
    """Ten moments of start-up and work, one data dir: each stop is complete, each next start clean."""
    data = tmp_path / "data"
    stack = Stack(data)
    moments = [
        ("right after exec", lambda: None),
        ("slapd started", lambda: stack.wait_log("started slapd")),
        ("mlflow started", lambda: stack.wait_log("started mlflow")),
        ("proxy started", lambda: stack.wait_log("started proxy")),
        ("hub started", lambda: stack.wait_log("started hub")),
        ("the hub starts its services", lambda: stack.wait_log("Starting service 'labyard-controller'", log=hub_log(stack))),
        ("the scheduler service starts", lambda: stack.wait_log("Starting service 'labyard-scheduler'", log=hub_log(stack))),
        ("the hub runs", lambda: stack.wait_log("JupyterHub is now running", log=hub_log(stack))),
        ("the platform is up", lambda: stack.wait_log("Labyard is up")),
        ("alice's server runs a kernel", lambda: _server_with_kernel(stack)),
    ]
    for moment, reach in moments:
        if hub_log(stack).exists():
            hub_log(stack).unlink()  # the moments in the hub's log are this run's
        stack.spawn()
        reach()
        stack.proc.send_signal(signal.SIGTERM)
        # before Python runs labyard's code (nothing started yet) SIGTERM ends it the default way
        accepted = (0, -signal.SIGTERM) if moment == "right after exec" else (0,)
        assert stack.proc.wait(120) in accepted, f"labyard up stopped at {moment!r} with {stack.proc.returncode}:\n{stack.log.read_text()}"
        assert_nothing_left(stack, moment)
    stack.start()
    try:
        assert stack.login("carol").login_status == 302
        assert "left running" not in stack.log.read_text(), "a stop left processes for the next start to sweep"
    finally:
        stack.stop()
    assert_nothing_left(stack, "the last stop")


def _server_with_kernel(stack: Stack) -> None:
    stack.wait_log("Labyard is up")
    alice = stack.api("alice")
    assert alice.post(f"{alice.base}/users/alice/servers/nlp", json={}).status_code in (201, 202)
    stack.wait_ready(alice, "alice", "nlp")
    r = alice.post(f"{stack.url}/user/alice/nlp/api/kernels", json={"name": "python3"}, timeout=60)
    assert r.status_code == 201, r.text
    assert any("ipykernel" in " ".join(p.cmdline()) for p in map(psutil.Process, lifecycle.marked(f"{stack.data_dir.absolute()}#")))


def test_sigkill_of_labyard_up_leaves_nothing_and_the_next_start_is_clean(tmp_path):
    stack = Stack(tmp_path / "data").spawn()
    _server_with_kernel(stack)
    marked = leftovers(stack)
    for component in ("slapd", "mlflow", "configurable-http-proxy", "jupyterhub",
                      "labyard_hub.scheduler.app", "jupyterhub-singleuser", "ipykernel"):
        assert any(component in cmd for cmd in marked), f"{component} not marked with the session: {marked}"
    stack.proc.kill()
    stack.proc.wait(30)
    assert_nothing_left(stack, "SIGKILL of labyard up")
    stack.start()
    try:
        assert stack.login("carol").login_status == 302
    finally:
        assert stack.stop() == 0
    assert_nothing_left(stack, "the stop after SIGKILL")


def test_a_killed_hub_takes_its_services_along_and_the_restarted_hub_starts_them_again(tmp_path):
    """The parent-death tie of hub services: kill -9 of the hub leaves no old service on its port."""
    stack = Stack(tmp_path / "data").start()
    try:
        def service_pids() -> set[int]:
            return {p for p in lifecycle.marked(f"{stack.data_dir.absolute()}#") if "labyard_hub.scheduler.app" in _cmdline(p)}

        before = service_pids()
        assert before
        hub = psutil.Process(next(c for c in _status(stack)[1]["components"] if c["name"] == "hub")["pid"])
        hub.kill()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and service_pids() & before:
            time.sleep(0.5)
        assert not service_pids() & before, "the scheduler service outlived the killed hub"
        code, body = _status(stack)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and code != 0:
            time.sleep(1)
            code, body = _status(stack)
        assert code == 0, body
        hub_row = next(c for c in body["components"] if c["name"] == "hub")
        assert hub_row["restarts"] == 1 and "exited with -9" in hub_row["last_error"], hub_row
    finally:
        stack.stop()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:  # ended while we looked
        return ""


def _status(stack: Stack) -> tuple[int, dict]:
    r = subprocess.run([sys.executable, "-m", "labyard_hub.cli", "status", "--json", "--data-dir", str(stack.data_dir)],
                       capture_output=True, text=True, timeout=60)
    return r.returncode, json.loads(r.stdout)


def test_status_reports_a_killed_component_down_then_restarted(tmp_path):
    stack = Stack(tmp_path / "data").start()
    try:
        code, body = _status(stack)
        assert code == 0, body
        names = {c["name"] for c in body["components"]}
        assert {"slapd", "mlflow", "proxy", "hub", "labyard-scheduler"} <= names
        mlflow = next(c for c in body["components"] if c["name"] == "mlflow")
        assert mlflow["answers"] and mlflow["restarts"] == 0 and mlflow["port"]
        victim = psutil.Process(mlflow["pid"])
        victim.kill()
        victim.wait(30)
        # mlflow needs seconds to boot again: the first look after the kill finds it down
        code, body = _status(stack)
        assert code == 1, body
        assert not next(c for c in body["components"] if c["name"] == "mlflow")["answers"]
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and code != 0:
            time.sleep(1)
            code, body = _status(stack)
        assert code == 0, body
        mlflow = next(c for c in body["components"] if c["name"] == "mlflow")
        assert mlflow["restarts"] == 1 and mlflow["pid"] != victim.pid and "exited with -9" in mlflow["last_error"], mlflow
    finally:
        stack.stop()
    code, body = _status(stack)
    assert code == 3 and body["state"] == "not running"


def test_a_second_labyard_up_on_the_same_data_dir_is_refused(tmp_path):
    stack = Stack(tmp_path / "data").start()
    try:
        r = subprocess.run([sys.executable, "-m", "labyard_hub.cli", "up", "--demo", "--port", "0", "--data-dir", str(stack.data_dir)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "another labyard up runs on" in r.stderr, r.stderr
        assert stack.login("carol").login_status == 302
    finally:
        stack.stop()
