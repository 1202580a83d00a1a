"""labyard-gpus on the Kubernetes testbed, through a real `labyard up --kubernetes --demo`.

Servers and a scheduled run hold GPUs of the testbed's kwok GPU nodes in two projects made for
this module (A and B, LDAP groups with unique names: other sessions share the testbed): alice's
servers in A and B (gpu-1 each) and carol's run in B (gpu-1, kept running until the test lets
it finish). The service runs under the chart's `gpus` service account. The test compares what
the API lists with the pods it lists itself from the API server (this stack's pods only),
checks that only hub admins see the page and the API, and that GPU-hours match the pods' start
and end times as the API server reports them, across a restart of the service.
"""

from __future__ import annotations

import json
import sys
import uuid
from datetime import datetime
from pathlib import Path

import psutil
import pytest
import requests
import yaml
from nbformat.v4 import new_code_cell, new_notebook

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.support.stack import Stack  # noqa: E402

from labyard_hub import demo  # noqa: E402
from labyard_testbed.testing import exists as _exists, wait_for  # noqa: E402

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

#: the two projects of this module: LDAP groups made for it, with unique names (other sessions
#: share the testbed): A (alice; quota 1 GPU) and B (alice and carol; quota 2 GPUs)
_SUFFIX = uuid.uuid4().hex[:6]
A, B = f"gpua-{_SUFFIX}", f"gpub-{_SUFFIX}"
PROJECTS = (A, B)
NAMESPACES = tuple(f"labyard-{p}" for p in PROJECTS)
PREFIX = "/services/labyard-gpus"


def _ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory) -> Path:
    policy = yaml.safe_load(demo.POLICY_FILE.read_text())
    policy["projects"][A] = {"flavors": ["cpu", "gpu-1"], "quota": {"gpus": 1, "cpu": 32, "memory": "256Gi"}}
    policy["projects"][B] = {"flavors": ["cpu", "gpu-1"], "quota": {"gpus": 2, "cpu": 32, "memory": "256Gi"}}
    path = tmp_path_factory.mktemp("policy") / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory, k8s_testbed, service_accounts, policy_file):
    tb = k8s_testbed
    config = {
        "policy_file": str(policy_file),
        "group_sync_interval": 2,
        "kubernetes": {"controller_interval": 2, "controller_kubeconfig": service_accounts["project-controller"],
                       "scheduler_kubeconfig": service_accounts["scheduler"], "gpus_kubeconfig": service_accounts["gpus"]},
        "cull": {"enabled": False},
        "gpus": {"poll_interval": 2},
    }
    s = Stack(tmp_path_factory.mktemp("labyard-k8s-gpus"), config=config, kubeconfig=service_accounts["hub"]).start()
    try:
        conn = s.demo_ldap()
        for project, gid, members in ((A, 20081, ["alice"]), (B, 20082, ["alice", "carol"])):
            conn.add(f"cn={project},ou=projects,{demo.SUFFIX}", ["posixGroup"],
                     {"cn": project, "gidNumber": gid, "memberUid": members})
        wait_for(lambda: all(_exists(tb, f"/api/v1/namespaces/{ns}/resourcequotas/labyard-quota") for ns in NAMESPACES),
                 120, "the project namespaces")
        yield s
    finally:
        s.stop()
        for ns in NAMESPACES:
            try:
                tb.api.delete(f"/api/v1/namespaces/{ns}")
            except Exception:
                pass


def _release_file(tb, project: str, name: str) -> Path:
    pvc = tb.api.get(f"/api/v1/namespaces/labyard-{project}/persistentvolumeclaims/project-{project}")
    return Path(tb.api.get(f"/api/v1/persistentvolumes/{pvc['spec']['volumeName']}")["spec"]["hostPath"]["path"]) / name


@pytest.fixture(scope="module")
def holders(stack, k8s_testbed):
    """alice's servers in A and B, and carol's run in B, each holding one GPU; the run
    waits for a file in the project volume (``release``) before it ends."""
    tb = k8s_testbed
    alice, carol = stack.api("alice"), stack.api("carol")
    for project in PROJECTS:
        r = alice.post(f"{alice.base}/users/alice/servers/{project}", json={"flavor": "gpu-1"})
        assert r.status_code in (201, 202), r.text
    for project in PROJECTS:
        stack.wait_ready(alice, "alice", project, timeout=180)
    release = f"release-{uuid.uuid4().hex[:8]}"
    nb = new_notebook(cells=[new_code_cell("import os, time"),
                             new_code_cell(f"while not os.path.exists('/srv/project/{release}'):\n    time.sleep(0.5)")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    base = f"{stack.url}/services/labyard-scheduler/api"
    wait_for(lambda: carol.get(f"{base}/whoami", timeout=10).status_code == 200, 90, "the scheduler service")
    r = carol.post(f"{base}/schedules", json={"project": B, "notebook": "hold.ipynb", "notebook_content": json.loads(json.dumps(nb)),
                                              "flavor": "gpu-1", "timeout_seconds": 900})
    assert r.status_code == 201, r.text
    run = r.json()["run"]["id"]

    def run_pod():
        pods = tb.api.get(f"/api/v1/namespaces/labyard-{B}/pods", labelSelector=f"labyard.dev/run={run}")["items"]
        return pods[0] if pods and pods[0]["status"].get("phase") == "Running" else None

    wait_for(run_pod, 180, "carol's run pod running")
    yield {"run": run, "release": _release_file(tb, B, release)}
    for project in PROJECTS:  # the hub leaves pods running when it stops (they outlive its restarts)
        alice.delete(f"{alice.base}/users/alice/servers/{project}", timeout=60)
    wait_for(lambda: not any(_exists(tb, f"/api/v1/namespaces/labyard-{p}/pods/jupyter-alice--{p}") for p in PROJECTS),
             120, "alice's server pods gone")


def _ours(stack, holders, pod: dict) -> bool:
    """Whether ``pod`` is one of this stack's: a server that calls back our hub, or our run."""
    if pod["metadata"].get("labels", {}).get("labyard.dev/run") == holders["run"]:
        return True
    env = {e["name"]: e.get("value") for c in pod["spec"]["containers"] for e in c.get("env") or []}
    hub_port = yaml.safe_load((stack.data_dir / "settings.yaml").read_text())["hub_port"]
    return f":{hub_port}/" in (env.get("JUPYTERHUB_API_URL") or "")


def _gpu_pods(tb, stack, holders) -> dict[str, dict]:
    """Every pod of this stack holding GPUs now, as the API server says: bound to a node, not
    ended, not being deleted, asking for a GPU resource."""
    found = {}
    for ns in NAMESPACES:
        for pod in tb.api.get(f"/api/v1/namespaces/{ns}/pods")["items"]:
            if not _ours(stack, holders, pod):
                continue
            limits = {k: int(v) for c in pod["spec"]["containers"] for k, v in (c.get("resources", {}).get("limits") or {}).items()
                      if k == "nvidia.com/gpu" or k.startswith("nvidia.com/mig-")}
            if limits and pod["spec"].get("nodeName") and pod["status"].get("phase") not in ("Succeeded", "Failed") \
                    and not pod["metadata"].get("deletionTimestamp"):
                found[pod["metadata"]["uid"]] = pod
    return found


def _admin(stack) -> requests.Session:
    s = stack.api("admin")
    s.base = f"{stack.url}{PREFIX}"
    return s


def test_the_api_lists_exactly_the_pods_holding_gpus(stack, k8s_testbed, holders):
    tb, admin = k8s_testbed, _admin(stack)

    def ours():
        r = admin.get(f"{admin.base}/api/allocations", timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    def agree():
        # other sessions may run pods in the same namespaces: only this stack's count here
        data, theirs = ours(), _gpu_pods(tb, stack, holders)
        pods = {p["metadata"]["uid"]: p for ns in NAMESPACES for p in tb.api.get(f"/api/v1/namespaces/{ns}/pods")["items"]}
        mine = {a["uid"]: a for a in data["allocations"] if a["uid"] in pods and _ours(stack, holders, pods[a["uid"]])}
        return (data, mine, theirs) if set(mine) == set(theirs) and len(theirs) == 3 else None

    data, mine, theirs = wait_for(agree, 60, "the API and the API server to agree", interval=1)
    for uid, pod in theirs.items():
        a = mine[uid]
        labels = pod["metadata"]["labels"]
        assert (a["namespace"], a["pod"], a["node"]) == (pod["metadata"]["namespace"], pod["metadata"]["name"], pod["spec"]["nodeName"])
        assert a["gpus"] == 1 and a["resources"] == {"nvidia.com/gpu": 1}
        assert a["project"] == labels["labyard.dev/project"] and a["user"] == labels["labyard.dev/user"]
        assert _ts(a["since"]) == _ts(pod["status"]["startTime"])
    servers = sorted((a["project"], a["user"], a["server"]) for a in mine.values() if a["kind"] == "server")
    assert servers == [(A, "alice", A), (B, "alice", B)]
    assert all(a["idle_seconds"] is not None and a["idle_seconds"] >= 0 for a in mine.values() if a["kind"] == "server")
    (run,) = [a for a in mine.values() if a["kind"] == "run"]
    assert (run["project"], run["user"], run["run"]) == (B, "carol", holders["run"]) and run["schedule"]
    # the two GPU nodes of the testbed with their product, and per project the quota and what is in use
    nodes = {n["name"]: n for n in data["nodes"]}
    assert {"gpu-node-1", "gpu-node-2"} <= set(nodes) and all(nodes[n]["resources"]["nvidia.com/gpu"] == 4 for n in ("gpu-node-1", "gpu-node-2"))
    assert nodes["gpu-node-1"]["product"] == "NVIDIA-A100-SXM4-80GB"
    projects = {p["project"]: p for p in data["projects"]}
    assert (projects[A]["quota"], projects[A]["in_use"]) == ({"nvidia.com/gpu": 1}, 1)
    assert (projects[B]["quota"], projects[B]["in_use"]) == ({"nvidia.com/gpu": 2}, 2)
    assert data["utilisation"]["configured"] is False and "gpus.prometheus_url" in data["utilisation"]["message"]
    # the page shows the same, and says how to enable utilisation
    page = admin.get(f"{admin.base}/", timeout=30)
    assert page.status_code == 200 and "text/html" in page.headers["Content-Type"]
    assert run["pod"] in page.text and "gpus.prometheusUrl" in page.text


def test_only_admins_see_the_page_and_the_api(stack, holders):
    alice = stack.api("alice")
    for path in ("/", "/api/allocations", "/api/usage?by=project&period=month"):
        r = alice.get(f"{stack.url}{PREFIX}{path}", timeout=30)
        assert r.status_code == 403, (path, r.status_code, r.text)
        assert "not a hub admin" in r.json()["message"]
        # no login: sent to the hub's login (OAuth); a token the hub refuses: 401
        r = requests.get(f"{stack.url}{PREFIX}{path}", allow_redirects=False, timeout=30)
        assert r.status_code == 302 and "/hub/api/oauth2/authorize" in r.headers["Location"], (path, r.status_code)
        r = requests.get(f"{stack.url}{PREFIX}{path}", headers={"Authorization": "token not-a-token"}, timeout=30)
        assert r.status_code == 401, (path, r.status_code)
    admin = _admin(stack)
    for query, name in (("by=node", "by"), ("period=year", "period"), ("since=yesterday", "since"), ("format=xls", "format")):
        r = admin.get(f"{admin.base}/api/usage?{query}", timeout=30)
        assert r.status_code == 400 and r.json()["message"].startswith(name), (query, r.text)


def test_members_see_their_projects_share_on_the_home_page(stack, holders):
    browser = stack.login("alice")
    home = browser.get(f"{stack.url}/hub/home", timeout=30)
    assert home.status_code == 200
    for project in PROJECTS:
        assert f'<iframe data-src="{PREFIX}/projects/{project}/share"' in home.text
    # what each iframe loads, with alice's browser session (the service logs her in through the
    # hub's OAuth, redirects followed as a browser follows them)
    line = browser.get(f"{stack.url}{PREFIX}/projects/{B}/share", timeout=30)
    assert line.status_code == 200 and "2 in use of 2 · you: " in line.text, line.text
    # the same as JSON for scripts, with a token
    share = stack.api("alice").get(f"{stack.url}{PREFIX}/api/projects/{B}/share", timeout=30)
    assert share.status_code == 200, share.text
    data = share.json()
    assert (data["project"], data["gpu_quota"], data["in_use"], data["user"]) == (B, 2, 2, "alice")
    assert data["gpu_hours_this_month"] > 0
    carol = stack.api("carol")  # not a member of A
    for path in (f"/api/projects/{A}/share", f"/projects/{A}/share"):
        r = carol.get(f"{stack.url}{PREFIX}{path}", timeout=30)
        assert r.status_code == 403 and "not a member" in (r.json()["message"] if "api" in path else r.text)


@pytest.mark.browser
def test_the_home_page_shows_the_share_in_a_real_browser(browser, stack, holders):
    """Chromium loads the home page: each project's iframe logs alice in to the service through
    the hub's OAuth and shows the project's GPUs and her GPU-hours."""
    page = browser.new_page()
    responses = []
    page.on("response", lambda r: responses.append(f"{r.status} {r.url}"))
    try:
        stack.browser_login(page, "alice")
        text = {}
        for project in PROJECTS:
            frame = page.frame_locator(f'td.labyard-gpu-share[data-project="{project}"] iframe')
            try:
                frame.locator("#share, #share-error").wait_for(state="attached", timeout=60_000)
            except Exception:
                frames = [(f.url, f.content()[:300]) for f in page.frames]
                pytest.fail(f"no share line for {project}: frames {frames}; responses {responses[-30:]}")
            text[project] = frame.locator("body").inner_html()
        assert ">1 in use of 1 · you: " in text[A] and ">2 in use of 2 · you: " in text[B], text
        assert all(" GPU-hours this month<" in t for t in text.values()), text
    finally:
        page.close()


def _service_process(stack) -> psutil.Process | None:
    for p in psutil.Process(stack.proc.pid).children(recursive=True):
        try:
            if "labyard_hub.gpus.app" in " ".join(p.cmdline()):
                return p
        except psutil.NoSuchProcess:
            continue
    return None


def _dead(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_gpu_hours_match_the_pods_lifetimes_across_a_restart(stack, k8s_testbed, holders):
    tb, admin = k8s_testbed, _admin(stack)
    run_id = holders["run"]
    # let carol's run finish; its pod stays, with its start and finish times
    holders["release"].write_text("go")

    def finished():
        pods = tb.api.get(f"/api/v1/namespaces/labyard-{B}/pods", labelSelector=f"labyard.dev/run={run_id}")["items"]
        return pods[0] if pods and pods[0]["status"].get("phase") in ("Succeeded", "Failed") else None

    run_pod = wait_for(finished, 180, "carol's run to finish", interval=1)
    start = _ts(run_pod["status"]["startTime"])
    end = max(_ts(s["state"]["terminated"]["finishedAt"]) for s in run_pod["status"]["containerStatuses"])
    servers = {p["metadata"]["uid"]: p for p in _gpu_pods(tb, stack, holders).values()
               if p["metadata"]["labels"]["labyard.dev/user"] == "alice"}
    assert len(servers) == 2
    seen = []

    def recorded():
        data = admin.get(f"{admin.base}/api/intervals", timeout=30).json()
        seen.append(data)
        return {iv["uid"]: iv for iv in data["intervals"]}, _ts(data["as_of"])

    def run_closed():
        rows, _ = recorded()
        iv = rows.get(run_pod["metadata"]["uid"])
        return iv if iv and iv["end"] and _ts(iv["end"]) == end else None

    try:
        wait_for(run_closed, 60, "carol's run closed at its finish time", interval=1)
    except pytest.fail.Exception:
        mine = [iv for iv in seen[-1]["intervals"] if iv["uid"] == run_pod["metadata"]["uid"]] if seen else None
        pytest.fail(f"carol's run {start}..{end}: recorded {mine}; the pod's status: {json.dumps(run_pod['status'])[:2000]}")

    def check(rows: dict, as_of: float) -> None:
        run = rows[run_pod["metadata"]["uid"]]
        assert (_ts(run["start"]), _ts(run["end"]), run["gpus"]) == (start, end, 1)
        assert abs(run["gpu_hours"] - (end - start) / 3600) < 1e-6
        for uid, pod in servers.items():  # still running: counted from their start to the answer's as_of
            iv = rows[uid]
            assert (iv["end"], _ts(iv["start"]), iv["user"], iv["kind"]) == (None, _ts(pod["status"]["startTime"]), "alice", "server")
            assert abs(iv["gpu_hours"] - (as_of - _ts(pod["status"]["startTime"])) / 3600) < 1e-6

    check(*recorded())
    # the service restarts (the hub starts it again): what it recorded is still there, nothing is
    # counted twice, and the running servers go on from their pods' start times
    old = _service_process(stack)
    old.kill()
    # dead at once; a zombie until the hub, its parent, reaps it (not this process's child: no wait())
    wait_for(lambda: _dead(old), 30, "the killed labyard-gpus to exit")
    wait_for(lambda: (p := _service_process(stack)) is not None and p.pid != old.pid, 120, "labyard-gpus restarted")
    wait_for(lambda: admin.get(f"{admin.base}/api/allocations", timeout=30).status_code == 200, 120, "labyard-gpus answering")
    rows, as_of = recorded()
    check(rows, as_of)
    uids = [iv["uid"] for iv in seen[-1]["intervals"]]
    assert len(uids) == len(set(uids))
    # the reports add the same intervals up: per user this month, at least what our pods held
    # (other sessions' pods on the shared testbed may add to it), and CSV on request
    report = admin.get(f"{admin.base}/api/usage?by=user&period=month", timeout=30).json()
    carol = sum(r["gpu_hours"] for r in report["rows"] if r["key"] == "carol")
    assert carol >= (end - start) / 3600 - 1e-6
    by_project = admin.get(f"{admin.base}/api/usage?by=project&period=day&format=csv", timeout=30)
    assert by_project.headers["Content-Type"].startswith("text/csv")
    lines = by_project.text.splitlines()
    assert lines[0] == "period,project,gpu_hours" and any(f",{B}," in line for line in lines[1:])
