"""Fault drills (issue 18): ``kill -9`` of one part of a real ``labyard up --demo`` at a chosen
moment of a user's work, and what the user sees and what is kept afterwards.

One platform is shared by the drills that leave it whole (MLflow, the proxy, slapd, the hub
services, the hub, in that order: each drill waits until the platform answers again before the
next one starts); the restart limit gives the platform up and comes last; the full disk runs on
its own platform, whose data dir is a small tmpfs. Moments are states seen through the platform's
APIs and logs (points arrived, a run running, a cron run recorded), never delays; every wait
polls with a deadline.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests

from labyard_hub import lifecycle
from labyard_hub.status import probe

from .scheduler import notebooks
from .mlflow.support import wait_for
from .support.kernel import Kernel
from .support.stack import Stack

pytestmark = pytest.mark.slow


# ---- helpers ---------------------------------------------------------------------------------

def status_file(stack: Stack) -> dict:
    return json.loads((stack.data_dir / "run" / "status.json").read_text())


def component(stack: Stack, name: str) -> dict:
    return next(c for c in status_file(stack)["components"] if c["name"] == name)


def labyard_status(stack: Stack) -> tuple[int, dict]:
    r = subprocess.run([sys.executable, "-m", "labyard_hub.cli", "status", "--json", "--data-dir", str(stack.data_dir)],
                       capture_output=True, text=True, timeout=60)
    return r.returncode, json.loads(r.stdout)


def kill_component(stack: Stack, name: str) -> dict:
    """SIGKILL of a component of ``labyard up``; returns its status row from before."""
    row = component(stack, name)
    assert row["pid"] and psutil.pid_exists(row["pid"]), row
    os.kill(row["pid"], signal.SIGKILL)
    return row


def wait_restarted(stack: Stack, name: str, before: dict, timeout: float = 240) -> dict:
    """Until ``labyard up`` has started ``name`` again and its port answers; its new status row."""
    def again():
        row = component(stack, name)
        return row["pid"] != before["pid"] and probe(name, row["port"]) is None and row
    row = wait_for(again, timeout, what=f"{name} restarted and answering")
    assert row["restarts"] == before["restarts"] + 1 and "exited with -9" in row["last_error"], row
    return row


def service_pids(stack: Stack, needle: str) -> set[int]:
    """Pids of this platform's processes (its session mark) whose command line contains ``needle``."""
    found = set()
    for pid in lifecycle.marked(f"{stack.data_dir.absolute()}#"):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        # the tie (python -m labyard_hub.lifecycle --parent ... --) execs the service: same pid
        if needle in cmd:
            found.add(pid)
    return found


def put_notebook(api: requests.Session, server: str, path: str, nb: dict) -> requests.Response:
    return api.put(f"{server}api/contents/{path}", json={"type": "notebook", "format": "json", "content": nb}, timeout=60)


def notebook(*sources: str) -> dict:
    return {"nbformat": 4, "nbformat_minor": 5,
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
            "cells": [{"cell_type": "code", "id": f"c{i}", "metadata": {}, "execution_count": None, "outputs": [], "source": s}
                      for i, s in enumerate(sources)]}


def session_kernel(api: requests.Session, server: str, token: str, path: str) -> Kernel:
    """The kernel of a notebook's session (as JupyterLab opens it: ``JPY_SESSION_NAME`` is its path)."""
    r = api.post(f"{server}api/sessions", json={"path": path, "name": path, "type": "notebook", "kernel": {"name": "python3"}},
                 timeout=120)
    assert r.status_code == 201, r.text
    k = Kernel.__new__(Kernel)
    k.server_url, k.token, k.headers, k.id = server, token, {"Authorization": f"token {token}"}, r.json()["kernel"]["id"]
    return k


def scheduler_base(stack: Stack) -> str:
    return f"{stack.url}/services/labyard-scheduler/api"


def wait_scheduler(stack: Stack, api: requests.Session, timeout: float = 240) -> None:
    def answers():
        try:
            r = api.get(f"{scheduler_base(stack)}/whoami", timeout=10)
        except requests.RequestException:
            return False
        return r.status_code == 200 and r.headers.get("Content-Type", "").startswith("application/json")
    wait_for(answers, timeout, what="labyard-scheduler answering through the proxy")


def wait_run(api: requests.Session, base: str, run_id: str, timeout: float = 240) -> dict:
    def finished():
        run = api.get(f"{base}/runs/{run_id}", timeout=10).json()
        return run if run.get("status") in ("succeeded", "failed", "cancelled") else None
    return wait_for(finished, timeout, what=f"run {run_id} finished")


# ---- the shared platform ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("labyard-faults")).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def alice(stack):
    api = stack.api("alice")
    api.token = api.headers["Authorization"].split()[1]
    return api


@pytest.fixture(scope="module")
def server(stack, alice):
    """alice's running server in vision (its URL, with a trailing slash)."""
    r = alice.post(f"{alice.base}/users/alice/servers/vision", json={}, timeout=60)
    assert r.status_code in (201, 202), r.text
    stack.wait_ready(alice, "alice", "vision", timeout=240)
    return f"{stack.url}/user/alice/vision/"


def gate(stack: Stack, api: requests.Session, method: str, path: str, **kw) -> requests.Response:
    """The MLflow REST API through the proxy and the gate, as alice."""
    return api.request(method, f"{stack.url}/services/mlflow/api/2.0/mlflow/{path}", timeout=60, **kw)


def test_mlflow_dies_while_a_notebook_logs(stack, alice, server):
    """kill -9 of MLflow (and its gate) mid-loop: the cell completes without error, MLflow is
    restarted, every point arrives once, in one run."""
    points = 400
    assert put_notebook(alice, server, "mlflow-drill.ipynb", notebook("import mlflow")).status_code in (200, 201)
    kernel = session_kernel(alice, server, alice.token, "mlflow-drill.ipynb")
    cell = ("import time, mlflow\n"
            "mlflow.start_run(run_name='drill')\n"
            f"for i in range({points}):\n"
            "    mlflow.log_metric('loss', 1.0 / (i + 1), step=i)\n"
            "    time.sleep(0.05)\n"
            "mlflow.end_run()\nprint('logged')")
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(out=kernel.execute(cell, timeout=600)))
    thread.start()
    try:
        def run_with_points():
            r = gate(stack, alice, "GET", "experiments/get-by-name", params={"experiment_name": "vision/mlflow-drill.ipynb"})
            if r.status_code != 200:
                return None
            exp = r.json()["experiment"]["experiment_id"]
            runs = gate(stack, alice, "POST", "runs/search", json={"experiment_ids": [exp]}).json().get("runs", [])
            if not runs:
                return None
            history = gate(stack, alice, "GET", "metrics/get-history",
                           params={"run_id": runs[0]["info"]["run_id"], "metric_key": "loss", "max_results": 25000}).json()
            return len(history.get("metrics", [])) >= 20 and (exp, runs[0]["info"]["run_id"])

        # the moment: the loop runs and its first points are on the server
        exp_id, run_id = wait_for(run_with_points, 240, what="the first points of the loop on the server")
        assert thread.is_alive(), "the loop ended before MLflow was killed: nothing was drilled"
        before = kill_component(stack, "mlflow")
    finally:
        thread.join(600)
    out = result["out"]
    assert out["status"] == "ok" and out["error"] is None and out["stderr"] == "" and out["stdout"] == "logged\n", out
    wait_restarted(stack, "mlflow", before)

    def all_arrived():
        run = gate(stack, alice, "GET", "runs/get", params={"run_id": run_id})
        if run.status_code != 200 or run.json()["run"]["info"]["status"] != "FINISHED":
            return None
        history = gate(stack, alice, "GET", "metrics/get-history",
                       params={"run_id": run_id, "metric_key": "loss", "max_results": 25000}).json().get("metrics", [])
        return len(history) >= points and history

    history = wait_for(all_arrived, 300, what="every point after the restart")
    # the queue has nothing left to send: whatever it replays from here on would be a duplicate
    queue_status = stack.data_dir / "homes" / "alice" / ".labyard" / "mlflow-queue" / "status.json"
    wait_for(lambda: (s := json.loads(queue_status.read_text())).get("reachable") and s.get("pending_runs") == 0 and s,
             120, what="alice's MLflow queue drained")
    history = gate(stack, alice, "GET", "metrics/get-history",
                   params={"run_id": run_id, "metric_key": "loss", "max_results": 25000}).json()["metrics"]
    assert sorted(m["step"] for m in history) == list(range(points)), "points lost or sent twice"
    assert all(abs(m["value"] - 1.0 / (m["step"] + 1)) < 1e-12 for m in history)
    runs = gate(stack, alice, "POST", "runs/search", json={"experiment_ids": [exp_id]}).json()["runs"]
    assert [r["info"]["run_id"] for r in runs] == [run_id], "the replay made a second run"
    kernel.shutdown()


def test_the_proxy_dies(stack, alice, server):
    """kill -9 of configurable-http-proxy: restarted, the hub's routes are back, alice's server
    answers through the public URL again."""
    assert alice.get(f"{server}api/status", timeout=30).status_code == 200
    before = kill_component(stack, "proxy")
    wait_restarted(stack, "proxy", before)

    def reachable():
        try:
            r = alice.get(f"{server}api/status", timeout=10, allow_redirects=False)
        except requests.RequestException:
            return False
        return r.status_code == 200 and "last_activity" in r.json()
    wait_for(reachable, 60, what="alice's server through the restarted proxy")
    settings = stack.data_dir / "settings.yaml"
    port = int(re.search(r"proxy_api_port: (\d+)", settings.read_text()).group(1))
    token = (stack.data_dir / "secrets" / "proxy-token").read_text().strip()
    routes = requests.get(f"http://127.0.0.1:{port}/api/routes", headers={"Authorization": f"token {token}"}, timeout=10).json()
    assert "/user/alice/vision" in routes and "/services/mlflow" in routes, sorted(routes)
    assert "routes restored" in stack.log.read_text(), "labyard up did not say it restored the routes"


def test_slapd_dies(stack, alice, server):
    """kill -9 of slapd: a login fails fast with a clear message, logged-in users keep working;
    labyard up restarts slapd and logins work again.

    ``labyard up`` supervises slapd and restarts it at once; to look at the platform while slapd
    is down the drill holds the supervisor (SIGSTOP) until it has seen that moment."""
    browser = stack.login("alice")
    assert browser.login_status == 302
    stack.proc.send_signal(signal.SIGSTOP)
    try:
        before = kill_component(stack, "slapd")
        wait_for(lambda: probe("slapd", before["port"]) is not None, 30, what="slapd's port closed")
        form = requests.Session()
        form.get(f"{stack.url}/hub/login", timeout=10)
        t0 = time.monotonic()
        r = form.post(f"{stack.url}/hub/login", allow_redirects=False, timeout=30,
                      data={"username": "bob", "password": "labyard-demo", "_xsrf": form.cookies.get("_xsrf")})
        elapsed = time.monotonic() - t0
        assert r.status_code == 503, (r.status_code, r.text[-2000:])
        assert "does not answer just now" in r.text and "try again" in r.text, r.text[-2000:]
        assert "Invalid username or password" not in r.text
        assert elapsed < 10, f"a login with slapd dead took {elapsed:.1f}s"
        # logged-in users keep working: token, server, browser session
        assert alice.get(f"{alice.base}/user", timeout=30).json()["name"] == "alice"
        assert alice.get(f"{server}api/status", timeout=30).status_code == 200
        assert browser.get(f"{stack.url}/hub/home", timeout=30).status_code == 200
    finally:
        stack.proc.send_signal(signal.SIGCONT)
    wait_restarted(stack, "slapd", before)
    wait_for(lambda: stack.login("bob").login_status == 302, 60, what="bob logging in again")
    assert "directory unavailable" in stack.hub_log()


def test_the_scheduler_and_the_controller_die(stack, alice, server):
    """kill -9 of labyard-scheduler right after a cron run is recorded, then of the controller:
    the hub restarts both, no schedule is lost, no cron time runs twice."""
    wait_scheduler(stack, alice)
    base = scheduler_base(stack)
    assert put_notebook(alice, server, "cron.ipynb", notebooks.training()).status_code in (200, 201)
    keep = alice.post(f"{base}/schedules", json={"project": "vision", "notebook": "cron.ipynb", "cron": "0 3 * * *"}, timeout=60)
    assert keep.status_code == 201, keep.text
    r = alice.post(f"{base}/schedules", json={"project": "vision", "notebook": "cron.ipynb", "cron": "* * * * *"}, timeout=60)
    assert r.status_code == 201, r.text
    every = r.json()
    try:
        def cron_runs(n):
            runs = alice.get(f"{base}/schedules/{every['id']}/runs", timeout=30).json()
            return len(runs) >= n and runs

        # the moment: the first cron time has fired and its run is recorded
        first = wait_for(lambda: cron_runs(1), 150, what="the first cron run")
        old = service_pids(stack, "labyard_hub.scheduler.app")
        assert len(old) == 1, old
        os.kill(old.pop(), signal.SIGKILL)
        wait_for(lambda: service_pids(stack, "labyard_hub.scheduler.app"), 240, what="the scheduler started again")
        wait_scheduler(stack, alice)
        assert "Service labyard-scheduler exited with status -9" in stack.hub_log()
        ids = {s["id"] for s in alice.get(f"{base}/schedules", timeout=30).json()}
        assert {every["id"], keep.json()["id"]} <= ids, "a schedule was lost"
        # the next minute fires once, and the run in flight at the kill is collected
        runs = wait_for(lambda: (runs := cron_runs(2)) and all(r["status"] in ("succeeded", "failed") for r in runs) and runs,
                        200, what="the next cron run, finished")
        assert first[-1]["id"] in {r["id"] for r in runs}
        assert all(r["status"] == "succeeded" and r["trigger"] == "cron" for r in runs), runs
    finally:
        alice.post(f"{base}/schedules/{every['id']}/pause", timeout=30)
    fired = re.findall(rf"schedule {every['id']}: firing for (\S+ \S+)", stack.hub_log())
    runs = alice.get(f"{base}/schedules/{every['id']}/runs", timeout=30).json()
    assert len(fired) == len(set(fired)), f"a cron time fired twice: {fired}"
    assert len(runs) == len(fired), (fired, [(r["id"], r["created"]) for r in runs])
    minutes = [r["created"][:16] for r in runs]
    assert len(minutes) == len(set(minutes)), f"two runs in one minute: {minutes}"

    controller = service_pids(stack, "labyard_hub.cli controller")
    assert len(controller) == 1, controller
    os.kill(next(iter(controller)), signal.SIGKILL)
    wait_for(lambda: service_pids(stack, "labyard_hub.cli controller") - controller, 240, what="the controller started again")
    assert "Service labyard-controller exited with status -9" in stack.hub_log()


def test_the_hub_dies(stack, alice, server):
    """kill -9 of the hub while alice's server runs a kernel and a scheduled run is in flight:
    restarted, the server re-attached with its kernel, the run finished and recorded once, her
    browser session still works (or asks her to log in)."""
    wait_scheduler(stack, alice)
    base = scheduler_base(stack)
    browser = stack.login("alice")
    assert browser.login_status == 302
    assert browser.get(f"{stack.url}/hub/home", timeout=30).status_code == 200
    kernel = Kernel(server, alice.token)
    assert kernel.execute("drill_value = 6 * 7")["status"] == "ok"
    server_pid = _server_pid(stack)
    assert put_notebook(alice, server, "slow.ipynb", notebooks.training(sleep=20)).status_code in (200, 201)
    r = alice.post(f"{base}/schedules", json={"project": "vision", "notebook": "slow.ipynb"}, timeout=60)
    assert r.status_code == 201, r.text
    schedule, run = r.json(), r.json()["run"]
    # the moment: the run's runner is executing the notebook
    wait_for(lambda: alice.get(f"{base}/runs/{run['id']}", timeout=10).json()["status"] == "running", 120, what="the run running")
    wait_for(lambda: "Executing" in alice.get(f"{base}/runs/{run['id']}/log", timeout=10).text, 120, what="papermill executing")

    before = kill_component(stack, "hub")
    wait_restarted(stack, "hub", before)
    wait_scheduler(stack, alice)

    model = stack.wait_ready(alice, "alice", "vision", timeout=120)
    assert model["ready"], model
    assert _server_pid(stack) == server_pid, "alice's server was started again, not re-attached"
    kernels = alice.get(f"{server}api/kernels", timeout=30).json()
    assert kernel.id in {k["id"] for k in kernels}, kernels
    out = kernel.execute("print(drill_value)")
    assert out["status"] == "ok" and out["stdout"] == "42\n", out

    done = wait_run(alice, base, run["id"])
    assert done["status"] == "succeeded", alice.get(f"{base}/runs/{run['id']}/log", timeout=10).text
    runs = alice.get(f"{base}/schedules/{schedule['id']}/runs", timeout=30).json()
    assert [r["id"] for r in runs] == [run["id"]], runs

    home = browser.get(f"{stack.url}/hub/home", timeout=30, allow_redirects=False)
    print(f"after the hub restart alice's browser session got {home.status_code} for /hub/home")
    assert home.status_code == 200 or (home.status_code == 302 and "/hub/login" in home.headers["Location"]), home.status_code
    lab = browser.get(f"{server}api/status", timeout=30, allow_redirects=False)
    assert lab.status_code < 500, lab.status_code
    kernel.shutdown()


def _server_pid(stack: Stack) -> int:
    """The pid of alice's vision server (whatever uid it runs as)."""
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "jupyterhub-singleuser" in " ".join(p.info["cmdline"] or []) and p.environ().get("JUPYTERHUB_USER") == "alice" \
                    and p.environ().get("JUPYTERHUB_SERVER_NAME") == "vision" \
                    and p.environ().get("LABYARD_PROJECT_DIR", "").startswith(str(stack.data_dir) + "/"):
                return p.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    raise LookupError("alice's vision server is not running")


def test_restart_limit_gives_a_component_up_and_says_why(stack):
    """Last on the shared platform: slapd killed until labyard up gives it up (four exits in five
    minutes); the log and ``labyard status`` say which component and why."""
    for kill in range(1, 5):
        before = kill_component(stack, "slapd")

        def restarted_or_given_up():
            if stack.proc.poll() is not None:
                return "given up"
            row = component(stack, "slapd")
            return row["pid"] != before["pid"] and probe("slapd", row["port"]) is None and "restarted"

        if wait_for(restarted_or_given_up, 120, what="slapd restarted or given up", interval=0.2) == "given up":
            break
    assert stack.proc.wait(120) == 1, stack.log.read_text()[-3000:]
    assert "slapd exited 4 times in 5 minutes" in stack.log.read_text()
    code, body = labyard_status(stack)
    assert code == 3 and body["given_up"] and "slapd exited 4 times in 5 minutes" in body["given_up"], body
    out = subprocess.run([sys.executable, "-m", "labyard_hub.cli", "status", "--data-dir", str(stack.data_dir)],
                         capture_output=True, text=True, timeout=60).stdout
    assert "given up: slapd exited 4 times" in out, out


# ---- the full disk -------------------------------------------------------------------------------

def _fill(path: Path, leave: int = 0) -> None:
    """Write ``path`` until the filesystem has at most ``leave`` bytes free."""
    with open(path, "ab", buffering=0) as f:
        for size in (1 << 20, 1 << 16, 1 << 12, 1 << 9):
            block = b"\0" * size
            while os.statvfs(path).f_bavail * os.statvfs(path).f_frsize - size >= leave:
                try:
                    f.write(block)
                except OSError:
                    break
        if leave == 0:
            try:
                while f.write(b"\0"):
                    pass
            except OSError:
                pass


def integrity(data_dir: Path) -> dict[str, str]:
    out = {}
    for path in sorted(data_dir.rglob("*")):
        if path.is_file() and not path.is_symlink() and path.suffix in (".sqlite", ".db", ".sqlite3"):
            with open(path, "rb") as f:
                if f.read(16) != b"SQLite format 3\0":
                    continue
            db = sqlite3.connect(path, timeout=30)
            try:
                out[str(path.relative_to(data_dir))] = db.execute("PRAGMA integrity_check").fetchone()[0]
            finally:
                db.close()
    return out


@pytest.fixture(scope="module")
def disk_stack(tmp_path_factory):
    """A platform whose data dir is a 256 MiB tmpfs of its own."""
    if os.geteuid() != 0:
        pytest.fail("the full-disk drill mounts a tmpfs: run it as root")
    mount = Path(tempfile.mkdtemp(prefix="labyard-disk-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m,mode=0755", "tmpfs", str(mount)], check=True)
    try:
        link = tmp_path_factory.mktemp("labyard-disk") / "data"
        link.symlink_to(mount, target_is_directory=True)
        s = Stack(link)
        s.log = link.parent / "labyard-up.log"  # what the test reads stays off the full disk
        s.start()
        try:
            yield s
        finally:
            (mount / "fill.bin").unlink(missing_ok=True)
            s.stop()
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
        os.rmdir(mount)


def test_the_data_dirs_disk_fills(disk_stack):
    """The data dir's disk fills up: saving a notebook and creating a schedule fail with a message
    that says so (and the logs say it), the hub keeps answering; once space is freed everything
    works again and no sqlite database of the data dir is corrupted."""
    stack = disk_stack
    alice = stack.api("alice")
    r = alice.post(f"{alice.base}/users/alice/servers/vision", json={}, timeout=60)
    assert r.status_code in (201, 202), r.text
    stack.wait_ready(alice, "alice", "vision", timeout=240)
    server = f"{stack.url}/user/alice/vision/"
    wait_scheduler(stack, alice)
    base = scheduler_base(stack)
    big = notebook("x = 1")
    big["cells"].append({"cell_type": "markdown", "id": "big", "metadata": {}, "source": "data " * (800 * 1024)})  # ~4 MiB
    assert put_notebook(alice, server, "big.ipynb", big).status_code in (200, 201)
    filler = stack.data_dir / "fill.bin"

    # nearly full: less free than a notebook needs, enough for the logs to say what happened
    _fill(filler, leave=512 * 1024)
    r = put_notebook(alice, server, "big-copy.ipynb", big)
    assert r.status_code >= 400 and "No space left on device" in r.json()["message"], (r.status_code, r.text[:500])
    project = stack.data_dir / "projects" / "vision"
    assert not (project / "big-copy.ipynb").exists(), "the failed save left a partial file"
    # an existing notebook: its copy aside does not fit, the notebook keeps its content
    r = put_notebook(alice, server, "big.ipynb", notebook("x = 2"))
    assert r.status_code >= 400 and "No space left on device" in r.json()["message"], (r.status_code, r.text[:500])
    kept = alice.get(f"{server}api/contents/big.ipynb", timeout=60).json()["content"]
    assert len(kept["cells"]) == 2 and kept["cells"][0]["source"] == "x = 1"
    assert not (project / ".~big.ipynb").exists(), "the failed save left its partial copy"
    r = alice.post(f"{base}/schedules", json={"project": "vision", "notebook": "big.ipynb"}, timeout=60)
    assert r.status_code == 507 and "no space left" in r.json()["message"].lower(), (r.status_code, r.text[:500])
    assert "No space left on device" in (stack.data_dir / "logs" / "servers" / "alice.vision.log").read_text()
    assert "no space left" in stack.hub_log().lower()

    # quite full: the hub keeps answering (no hang), whatever it can no longer write
    _fill(filler)
    t0 = time.monotonic()
    r = alice.get(f"{alice.base}/user", timeout=30)
    assert r.status_code == 200 and time.monotonic() - t0 < 10, r.status_code
    failed = stack.login("bob")
    assert failed.login_status in (302, 500, 503, 507), failed.login_status
    print(f"disk full: a login got {failed.login_status}")
    r = alice.post(f"{base}/schedules", json={"project": "vision", "notebook": "big.ipynb"}, timeout=60)
    assert r.status_code == 507, (r.status_code, r.text[:500])

    filler.unlink()
    # freed: everything works again
    assert put_notebook(alice, server, "big-copy.ipynb", big).status_code in (200, 201)
    assert stack.login("bob").login_status == 302
    r = alice.post(f"{base}/schedules", json={"project": "vision", "notebook": "big.ipynb"}, timeout=60)
    assert r.status_code == 201, r.text
    assert wait_run(alice, base, r.json()["run"]["id"])["status"] == "succeeded"
    checks = integrity(stack.data_dir)
    assert {"hub/jupyterhub.sqlite", "scheduler/scheduler.sqlite", "mlflow/mlflow.db"} <= set(checks), checks
    assert all(v == "ok" for v in checks.values()), checks


# ---- the scheduler killed between starting a run and recording it --------------------------------

async def test_a_run_started_just_before_the_scheduler_died_runs_once(tmp_path):
    """The one moment of the scheduler drill a kill from outside cannot hit on purpose: after a
    run's runner was started and before its pid was recorded (the database still says ``pending``,
    no pid). The next scheduler must adopt the running runner, not start the run a second time.
    Real runner and papermill; the database is left as that kill leaves it."""
    from labyard_hub.scheduler.models import ScheduleCreate

    from .scheduler.conftest import DEMO_IDENTITIES, make_backend, wait_finished

    notebooks.write(tmp_path / "projects" / "vision" / "slow.ipynb", notebooks.training(sleep=6))
    first = make_backend(tmp_path)
    await first.start()
    alice = DEMO_IDENTITIES["alice"]
    _, run = await first.create_schedule(alice, ScheduleCreate(project="vision", notebook="slow.ipynb"))
    assert run.pid and psutil.pid_exists(run.pid)
    await first.stop()  # the runner goes on, as after a kill -9 of the service
    db = sqlite3.connect(tmp_path / "scheduler" / "scheduler.sqlite")
    body = json.loads(db.execute("SELECT body FROM runs WHERE id = ?", (run.id,)).fetchone()[0])
    body.update(status="pending", pid=None, pid_started=None, started=None)
    with db:
        db.execute("UPDATE runs SET status = 'pending', body = ? WHERE id = ?", (json.dumps(body), run.id))
    db.close()
    assert psutil.pid_exists(run.pid) and not (tmp_path / "scheduler" / "runs" / run.id / "result.json").exists(), \
        "the run ended before the next scheduler started: nothing was drilled"
    second = make_backend(tmp_path)
    await second.start()
    try:
        done = await wait_finished(second, alice, run.id, timeout=180)
    finally:
        await second.stop()
    log = (tmp_path / "scheduler" / "runs" / run.id / "log.txt").read_text()
    assert log.count("--- attempt 1 at") == 1, f"the run was started twice:\n{log}"
    assert done.status.value == "succeeded", (done.error, log[-1500:])
