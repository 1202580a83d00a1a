"""The labyard-scheduler hub service in a real ``labyard up --demo`` (slapd, proxy, hub, MLflow)."""

from __future__ import annotations

import time

import pytest
import requests

from ..support.stack import Stack
from . import notebooks

pytestmark = pytest.mark.slow


def wait_service(stack: Stack, api: requests.Session, timeout: float = 60) -> str:
    """The service's API URL once it answers (the hub starts it next to itself)."""
    base = f"{stack.url}/services/labyard-scheduler/api"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = api.get(f"{base}/whoami", timeout=10)
        if r.status_code == 200 and r.headers["Content-Type"].startswith("application/json"):
            return base
        time.sleep(0.3)
    raise TimeoutError(f"labyard-scheduler did not answer in {timeout}s:\n{stack.hub_log()[-3000:]}")


def wait_run(api: requests.Session, base: str, run_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = api.get(f"{base}/runs/{run_id}", timeout=10).json()
        if run["status"] in ("succeeded", "failed", "cancelled"):
            return run
        time.sleep(0.3)
    raise TimeoutError(f"run {run_id} still {run['status']} after {timeout}s")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("labyard-scheduler")).start()
    notebooks.write(s.data_dir / "projects" / "vision" / "train.ipynb", notebooks.training(fail_at_epoch=5))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def alice(stack):
    return stack.api("alice")


@pytest.fixture(scope="module")
def base(stack, alice):
    return wait_service(stack, alice)


def test_run_now_with_epochs_3_succeeds_and_keeps_its_output(stack, alice, base):
    t0 = time.monotonic()
    r = alice.post(f"{base}/schedules", json={"project": "vision", "notebook": "train.ipynb", "parameters": {"epochs": 3}})
    assert r.status_code == 201, r.text
    schedule = r.json()
    assert schedule["owner"] == "alice" and schedule["flavor"] == "cpu" and schedule["cron"] is None
    assert {p["name"]: p["type"] for p in schedule["parameter_specs"]}["epochs"] == "int"
    run = wait_run(alice, base, schedule["run"]["id"])
    elapsed = time.monotonic() - t0
    assert run["status"] == "succeeded" and run["exit_code"] == 0, alice.get(f"{base}/runs/{run['id']}/log").text
    print(f"run-now to succeeded: {elapsed:.1f}s")
    out = alice.get(f"{base}/runs/{run['id']}/output")
    assert out.status_code == 200 and '"epochs": 3' in out.text.replace('\\"', '"')
    assert "trained baseline 3 3" in alice.get(f"{base}/runs/{run['id']}/log").text
    assert run["id"] in [r["id"] for r in alice.get(f"{base}/schedules/{schedule['id']}/runs").json()]


def test_failing_run_reports_cell_and_error(alice, base):
    schedule = alice.post(f"{base}/schedules", json={"project": "vision", "notebook": "train.ipynb", "cron": "0 3 * * *"}).json()
    r = alice.post(f"{base}/schedules/{schedule['id']}/runs", json={"parameters": {"epochs": 5}})
    assert r.status_code == 201
    run = wait_run(alice, base, r.json()["id"])
    assert run["status"] == "failed" and run["failed_cell"] == 2 and run["error"] == "ValueError: diverged at epoch 5"


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"cron": "every day"}, 400, "cron: invalid cron expression 'every day'"),
    ({"timezone": "Mars/Olympus"}, 400, "unknown timezone 'Mars/Olympus'"),
    ({"parameters": {"epochs": "3"}}, 400, "parameter 'epochs' must be int, got str"),
    ({"parameters": {"epoch": 3}}, 400, "unknown parameter 'epoch'"),
    ({"flavor": "gpu-1"}, 400, "flavor not offered in this mode (GPU flavours need Kubernetes or local.allow_gpu_flavors) 'gpu-1'"),
    ({"project": "nlp"}, 400, "notebook 'train.ipynb' not found in project 'nlp'"),
    ({"project": "admins2"}, 403, "alice is not a member of project 'admins2'"),
    ({"notebook": "../nlp/x.ipynb"}, 400, "notebook must be a relative .ipynb path"),
    ({"retries": -1}, 400, "retries:"),
    ({"cron": "0 0 30 2 *"}, 400, "cron: cron expression '0 0 30 2 *' never fires"),
    ({"cron": "0 0 L * *"}, 400, "cron: invalid cron expression"),
    ({"flavor": "huge"}, 400, "unknown flavor 'huge'"),
    ({"project": "Not A Project"}, 400, "project: String should match pattern"),
    ({"name": 3}, 400, "name: Input should be a valid string"),
])
def test_bad_requests_say_what_is_wrong(alice, base, body, status, message):
    r = alice.post(f"{base}/schedules", json={"project": "vision", "notebook": "train.ipynb", **body})
    assert r.status_code == status, r.text
    assert message in r.json()["message"]


@pytest.mark.parametrize(("body", "message"), [
    (b"[" * 100_000 + b"]" * 100_000, "body is nested deeper than 100 levels"),
    (b'{"project": "vision", "notebook": "train.ipynb", "parameters": {"epochs": ' + b"[" * 500 + b"]" * 500 + b"}}",
     "body is nested deeper than 100 levels"),
    (b"{not json", "body is not JSON"),
    (b"\xff\xfe", "body is not JSON"),
    (b"[1, 2]", "Input should be a valid dictionary"),
])
def test_malformed_bodies_are_400_with_a_message(alice, base, body, message):
    for path in ("schedules", "inspect"):
        r = alice.post(f"{base}/{path}", data=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, r.text
        assert message in r.json()["message"]


def test_a_body_over_the_limit_is_413_after_it_was_read(alice, base):
    """16 MiB by default (settings: scheduler.max_body_bytes); the service reads the rest without
    keeping it, so the proxy in front passes the 413 on instead of a broken connection."""
    notebook = {"cells": [], "nbformat": 4, "nbformat_minor": 5, "metadata": {"pad": "x" * (17 * 1024 * 1024)}}
    r = alice.post(f"{base}/inspect", json={"project": "vision", "notebook": "big.ipynb", "notebook_content": notebook})
    assert r.status_code == 413 and "larger than 16777216 bytes" in r.json()["message"]
    # the service is still there and answers the next request on a fresh connection
    assert alice.get(f"{base}/whoami").status_code == 200


def _scheduler_pid(stack: Stack) -> int:
    return next(p.pid for p in stack.processes() if "labyard_hub.scheduler.app" in " ".join(p.cmdline()))


def _open_files(pid: int) -> list[str]:
    """The service's descriptors that are files (not sockets, pipes or event fds, whose number
    follows the connections the proxy keeps open)."""
    import os

    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/"):
            out.append(target)
    return sorted(out)


def test_runs_leave_no_descriptor_open_in_the_service(stack, alice, base):
    schedule = alice.post(f"{base}/schedules", json={"project": "vision", "notebook": "train.ipynb", "cron": "0 5 * * *"}).json()
    pid = _scheduler_pid(stack)

    def runs(n):
        for _ in range(n):
            r = alice.post(f"{base}/schedules/{schedule['id']}/runs", json={"parameters": {"epochs": 1}})
            assert r.status_code == 201, r.text
            assert wait_run(alice, base, r.json()["id"])["status"] == "succeeded"

    runs(1)
    before = _open_files(pid)
    runs(4)
    after = _open_files(pid)
    assert len(after) <= len(before), sorted(set(after) - set(before))
    alice.delete(f"{base}/schedules/{schedule['id']}")


def test_other_users(stack, alice, base):
    schedule = alice.post(f"{base}/schedules", json={"project": "vision", "notebook": "train.ipynb", "cron": "0 4 * * *"}).json()
    bob, carol = stack.api("bob"), stack.api("carol")
    # bob shares vision: he sees alice's schedule but may not change it; carol sees nothing
    assert bob.get(f"{base}/schedules/{schedule['id']}").status_code == 200
    r = bob.post(f"{base}/schedules/{schedule['id']}/pause")
    assert r.status_code == 403 and "only alice" in r.json()["message"]
    assert carol.get(f"{base}/schedules/{schedule['id']}").status_code == 403
    assert schedule["id"] not in [s["id"] for s in carol.get(f"{base}/schedules").json()]
    assert carol.post(f"{base}/schedules", json={"project": "vision", "notebook": "train.ipynb"}).status_code == 403
    assert alice.get(f"{base}/schedules/s-000000000000").status_code == 404
    assert alice.get(f"{base}/runs/r-000000000000").json()["message"] == "no run 'r-000000000000'"
    anonymous = requests.get(f"{base}/schedules", headers={"Accept": "application/json"})
    assert anonymous.status_code == 403
    # pause / resume / patch / delete by the owner
    assert alice.post(f"{base}/schedules/{schedule['id']}/pause").json()["next_run"] is None
    assert alice.post(f"{base}/schedules/{schedule['id']}/resume").json()["next_run"]
    assert alice.patch(f"{base}/schedules/{schedule['id']}", json={"cron": "15 5 * * *"}).json()["cron"] == "15 5 * * *"
    assert alice.delete(f"{base}/schedules/{schedule['id']}").status_code == 204
    assert alice.get(f"{base}/schedules/{schedule['id']}").status_code == 404


def test_through_her_server_and_cron_keeps_firing_after_it_stops(stack, alice, base):
    """Schedule from JupyterLab's server extension, open the output, stop the server: cron goes on."""
    r = alice.post(f"{alice.base}/users/alice/servers/vision", json={})
    assert r.status_code in (201, 202), r.text
    stack.wait_ready(alice, "alice", "vision", timeout=180)
    browser = stack.login("alice")
    lab = f"{stack.url}/user/alice/vision"
    assert browser.get(f"{lab}/lab").status_code == 200
    xsrf = {"X-XSRFToken": browser.cookies.get("_xsrf", path="/user/alice/vision/")}
    # the server extension adds the project and the notebook as saved on the server
    inspect = browser.post(f"{lab}/labyard/scheduler/inspect", json={"notebook": "train.ipynb"}, headers=xsrf)
    assert inspect.status_code == 200, inspect.text
    assert [p["name"] for p in inspect.json()["parameters"]][:2] == ["epochs", "lr"]
    assert [f["name"] for f in inspect.json()["flavors"]] == ["cpu"]
    created = browser.post(f"{lab}/labyard/scheduler/schedules", headers=xsrf,
                           json={"notebook": "train.ipynb", "cron": "* * * * *", "parameters": {"epochs": 2}})
    assert created.status_code == 201, created.text
    schedule = created.json()
    now_run = browser.post(f"{lab}/labyard/scheduler/schedules/{schedule['id']}/runs", json={}, headers=xsrf).json()
    assert wait_run(alice, base, now_run["id"])["status"] == "succeeded"
    opened = browser.post(f"{lab}/labyard/scheduler/runs/{now_run['id']}/open", headers=xsrf)
    assert opened.status_code == 200, opened.text
    path = opened.json()["path"]
    assert path == f"scheduled-runs/train/{now_run['id']}.ipynb"
    assert (stack.data_dir / "projects" / "vision" / path).is_file()
    # her vision server acts for vision only, though she is in nlp too: nothing of nlp lands in vision
    notebooks.write(stack.data_dir / "projects" / "nlp" / "train.ipynb", notebooks.training())
    nlp = alice.post(f"{base}/schedules", json={"project": "nlp", "notebook": "train.ipynb", "parameters": {"epochs": 1}}).json()
    assert wait_run(alice, base, nlp["run"]["id"])["status"] == "succeeded"
    r = browser.post(f"{lab}/labyard/scheduler/schedules", headers=xsrf, json={"project": "nlp", "notebook": "train.ipynb"})
    assert r.status_code == 400 and "this server is for project 'vision'" in r.json()["message"]
    r = browser.post(f"{lab}/labyard/scheduler/runs/{nlp['run']['id']}/open", headers=xsrf)
    assert r.status_code == 403 and not (stack.data_dir / "projects" / "vision" / "scheduled-runs" / "train" /
                                         f"{nlp['run']['id']}.ipynb").exists()
    r = browser.post(f"{lab}/labyard/scheduler/schedules/{nlp['id']}/runs", headers=xsrf, json={})
    assert r.status_code == 403 and "not of project 'vision'" in r.json()["message"]
    listed = browser.get(f"{lab}/labyard/scheduler/schedules", headers=xsrf).json()
    assert listed and {s["project"] for s in listed} == {"vision"}
    assert browser.get(f"{lab}/labyard/scheduler/runs", params={"project": "nlp"}, headers=xsrf).status_code == 400
    # her server stops; the next cron time still runs
    r = alice.delete(f"{alice.base}/users/alice/servers/vision")
    assert r.status_code in (202, 204)
    deadline = time.monotonic() + 90
    cron_runs = []
    while time.monotonic() < deadline and not cron_runs:
        runs = alice.get(f"{base}/schedules/{schedule['id']}/runs").json()
        cron_runs = [r for r in runs if r["trigger"] == "cron"]
        time.sleep(1)
    assert cron_runs, "the cron schedule did not fire within 90 s"
    assert not alice.get(f"{alice.base}/users/alice").json()["servers"]
    assert wait_run(alice, base, cron_runs[0]["id"])["status"] == "succeeded"
    alice.post(f"{base}/schedules/{schedule['id']}/pause")


def test_state_survives_a_restart_of_labyard_up(stack, alice, base):
    notebooks.write(stack.data_dir / "projects" / "vision" / "slow.ipynb", notebooks.training(sleep=15))
    r = alice.post(f"{base}/schedules", json={"project": "vision", "notebook": "slow.ipynb", "parameters": {"epochs": 4}})
    in_flight = r.json()["run"]["id"]
    before = {s["id"]: s for s in alice.get(f"{base}/schedules").json()}
    runs = {r["id"]: r for r in alice.get(f"{base}/runs").json()}
    assert before and runs and runs[in_flight]["status"] == "running"
    stack.stop()
    again = Stack(stack.data_dir).start()
    try:
        api = again.api("alice")
        base2 = wait_service(again, api)
        after = {s["id"]: s for s in api.get(f"{base2}/schedules").json()}
        assert after.keys() == before.keys()
        # the run that was in flight finished on its own and was collected: once, succeeded
        assert wait_run(api, base2, in_flight)["status"] == "succeeded"
        after_runs = {r["id"]: r["status"] for r in api.get(f"{base2}/runs").json()}
        assert after_runs == {i: r["status"] for i, r in runs.items()} | {in_flight: "succeeded"}
        assert '"epochs": 4' in api.get(f"{base2}/runs/{in_flight}/output").text.replace('\\"', '"')
        done = next(i for i, r in runs.items() if r["status"] == "succeeded")
        assert api.get(f"{base2}/runs/{done}/output").status_code == 200
    finally:
        again.stop()
