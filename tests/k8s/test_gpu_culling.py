"""GPU-aware idle culling waited out on the Kubernetes testbed (issue 16, part 4).

A real ``labyard up --kubernetes --demo`` (hub, proxy, slapd, project controller, the idle culler
with Labyard's GPU-aware arbiter) with short culler settings: ``timeout`` 600 s, ``gpu_timeout``
:data:`GPU_TIMEOUT`, a check every :data:`CULL_EVERY` s and activity reports every
:data:`ACTIVITY_INTERVAL` s. Three servers in a project of this test's own (other sessions share
the testbed): an idle GPU server, an idle CPU server and a GPU server whose kernel runs a long
cell that prints nothing. The GPU servers are on the simulated GPU nodes, the CPU server on the
kwok CPU node; all three are run by the testbed's pod runner as local processes (JupyterLab as
in test_spawner.py), so their kernels are real.

The pod runner runs the servers with the venv of whichever checkout started the shared testbed:
the servers get this checkout's packages first on their PYTHONPATH (``server_environment``), so
the server extension under test is the one of this checkout.
"""

from __future__ import annotations

import sys
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from labyard_hub import demo

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.support.kernel import Kernel  # noqa: E402
from tests.support.stack import Stack  # noqa: E402

from labyard_testbed.kubeapi import ApiError  # noqa: E402
from labyard_testbed.testing import wait_for  # noqa: E402

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

#: long enough for the three servers to start and get a kernel each on a loaded 2-core machine
#: (a server that is ready waits for the others, touched through the proxy: see ``servers``)
GPU_TIMEOUT = 60
CULL_EVERY = 5
ACTIVITY_INTERVAL = 5
#: the project of this module: an LDAP group made for it, with a unique name
PROJECT = f"cull-{uuid.uuid4().hex[:6]}"
NAMESPACE = f"labyard-{PROJECT}"
#: who runs what: (user, flavour)
IDLE_GPU, IDLE_CPU, BUSY_GPU = ("alice", "gpu-1"), ("bob", "cpu"), ("carol", "gpu-1")


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory) -> Path:
    policy = yaml.safe_load(demo.POLICY_FILE.read_text())
    policy["projects"][PROJECT] = {"flavors": ["cpu", "gpu-1"], "quota": {"gpus": 2, "cpu": 32, "memory": "256Gi"}}
    path = tmp_path_factory.mktemp("policy") / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


def _exists(tb, path: str) -> bool:
    try:
        tb.api.get(path)
        return True
    except ApiError as e:
        if e.status == 404:
            return False
        raise


@pytest.fixture(scope="module")
def stack(tmp_path_factory, k8s_testbed, policy_file, service_accounts):
    config = {
        "policy_file": str(policy_file),
        "kubernetes": {"controller_interval": 2, "controller_kubeconfig": str(service_accounts["project-controller"])},
        "cull": {"enabled": True, "timeout": 600, "gpu_timeout": GPU_TIMEOUT, "every": CULL_EVERY,
                 "activity_interval": ACTIVITY_INTERVAL},
        "server_environment": {"PYTHONPATH": f"{ROOT / 'extensions'}:{ROOT / 'hub_config'}"},
    }
    s = Stack(tmp_path_factory.mktemp("labyard-cull"), config=config, kubeconfig=str(service_accounts["hub"])).start()
    try:
        conn = s.demo_ldap()
        conn.add(f"cn={PROJECT},ou=projects,{demo.SUFFIX}", ["posixGroup"],
                 {"cn": PROJECT, "gidNumber": 20077, "memberUid": [user for user, _ in (IDLE_GPU, IDLE_CPU, BUSY_GPU)]})
        # the project controller makes its namespace (with the quota the spawner checks first)
        wait_for(lambda: _exists(k8s_testbed, f"/api/v1/namespaces/{NAMESPACE}/resourcequotas/labyard-quota"), 120,
                 f"namespace {NAMESPACE}")
        yield s
        for user, _ in (IDLE_GPU, IDLE_CPU, BUSY_GPU):
            s.api(user).delete(f"{s.url}/hub/api/users/{user}/servers/{PROJECT}")
        try:
            wait_for(lambda: not k8s_testbed.api.get(f"/api/v1/namespaces/{NAMESPACE}/pods")["items"], 120, "the test's pods gone")
        except pytest.fail.Exception:
            pass  # clean-up only (seen once on a busy testbed: a pod the hub had deleted still Running); the namespace goes below
    finally:
        s.stop()
        try:
            k8s_testbed.api.delete(f"/api/v1/namespaces/{NAMESPACE}")
        except ApiError:
            pass


def _pod_name(user: str) -> str:
    return f"jupyter-{user}--{PROJECT}"


def _wait_pod_gone(tb, user: str, timeout: float) -> None:
    """Wait for the server pod of ``user`` to be gone; if it is not, fail saying how far it got."""
    path = f"/api/v1/namespaces/{NAMESPACE}/pods/{_pod_name(user)}"
    try:
        wait_for(lambda: not _exists(tb, path), timeout, f"{user}'s pod gone")
    except pytest.fail.Exception:
        pod = tb.api.get(path)
        pytest.fail(f"{user}'s pod still there after {timeout} s: deletionTimestamp "
                    f"{pod['metadata'].get('deletionTimestamp')}, phase {pod['status'].get('phase')}, node "
                    f"{pod['spec'].get('nodeName')} (the pod runner stops it: {tb.state_dir}/logs/runner.log)")


def _server(api, user: str) -> dict | None:
    return api.get(f"{api.base}/users/{user}", timeout=30).json()["servers"].get(PROJECT)


def _when(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


@pytest.fixture(scope="module")
def servers(stack, k8s_testbed):
    """The three servers, started together and ready; a kernel in each, through the proxy."""
    apis = {}
    for user, flavor in (BUSY_GPU, IDLE_CPU, IDLE_GPU):
        apis[user] = stack.api(user)
        r = apis[user].post(f"{apis[user].base}/users/{user}/servers/{PROJECT}", json={"flavor": flavor})
        assert r.status_code in (201, 202), r.text
    users = [user for user, _ in (BUSY_GPU, IDLE_CPU, IDLE_GPU)]

    def touch_ready() -> bool:
        """All three ready? Each ready one is asked for its status through the proxy meanwhile:
        traffic is activity (the hub reads the proxy's), so none is culled while it waits for the
        others (under load, or while another session's pods hold the GPUs)."""
        ready = [u for u in users if (_server(apis[u], u) or {}).get("ready")]
        for u in ready:
            apis[u].get(f"{stack.url}/user/{u}/{PROJECT}/api/status", timeout=30)
        return len(ready) == len(users)

    wait_for(touch_ready, 300, "the three servers to be ready")
    kernels = {user: Kernel(f"{stack.url}/user/{user}/{PROJECT}/", apis[user].headers["Authorization"].split()[1])
               for user in users}
    return apis, kernels


def test_where_the_servers_run(k8s_testbed, servers):
    """GPU servers on the kwok GPU nodes, the CPU server on the kwok CPU node (not the real node):
    all three run by the pod runner, and a kernel answers in each."""
    _, kernels = servers
    kwok_nodes = set(k8s_testbed.config["kwok_nodes"])
    for user, flavor in (BUSY_GPU, IDLE_CPU, IDLE_GPU):
        pod = k8s_testbed.pod(NAMESPACE, _pod_name(user))
        node = pod["spec"]["nodeName"]
        assert node in kwok_nodes, (user, node)
        assert node.startswith("gpu-node-" if flavor != "cpu" else "cpu-node-"), (user, node)
        assert pod["metadata"]["labels"]["labyard.dev/run-local"] == "true"
        out = kernels[user].execute("import os, labyard_lab; print(os.environ['LABYARD_FLAVOR'], labyard_lab.__file__)")
        assert out["status"] == "ok", out
        flavor_seen, module = out["stdout"].split()
        assert flavor_seen == flavor
        assert module.startswith(str(ROOT / "extensions")), module  # this checkout's server extension


def test_idle_gpu_server_is_culled_while_cpu_and_busy_gpu_servers_run(k8s_testbed, stack, servers):
    apis, kernels = servers
    busy, cpu, idle = BUSY_GPU[0], IDLE_CPU[0], IDLE_GPU[0]
    # carol: a cell that computes for an hour without printing; nobody watches it
    busy_since = datetime.now(timezone.utc)
    kernels[busy].submit("import time\ntime.sleep(3600)")
    # then the last requests to the two idle servers: bob's (CPU) first, so that he is idle for
    # at least as long as alice (GPU) when the culler stops her server
    for user in (cpu, idle):
        assert kernels[user].execute("1 + 1")["status"] == "ok"

    # alice's server: stopped by the culler (nobody else stops it), its pod deleted
    wait_for(lambda: _server(apis[idle], idle) is None, GPU_TIMEOUT + 10 * CULL_EVERY + 120, "the idle GPU server culled")
    _wait_pod_gone(k8s_testbed, idle, 120)
    stopped = apis[idle].get(f"{apis[idle].base}/users/{idle}", params={"include_stopped_servers": "1"}, timeout=30).json()
    idle_last = _when(stopped["servers"][PROJECT]["last_activity"])

    # bob's CPU server, idle at least as long when the culler stopped alice's: still running
    model = _server(apis[cpu], cpu)
    assert model and model["ready"], model
    assert _when(model["last_activity"]) <= idle_last, (model["last_activity"], idle_last)
    assert datetime.now(timezone.utc) - _when(model["last_activity"]) > timedelta(seconds=GPU_TIMEOUT)
    assert _exists(k8s_testbed, f"/api/v1/namespaces/{NAMESPACE}/pods/{_pod_name(cpu)}")

    # carol's busy GPU server: her activity keeps reaching the hub past the point where an idle
    # server of hers would have been culled, and it runs all along
    def busy_and_active_past_the_gpu_timeout() -> bool:
        model = _server(apis[busy], busy)
        assert model and model["ready"], f"the busy GPU server was stopped: {model}"
        return _when(model["last_activity"]) > busy_since + timedelta(seconds=GPU_TIMEOUT + 2 * CULL_EVERY)

    wait_for(busy_and_active_past_the_gpu_timeout, GPU_TIMEOUT + 10 * CULL_EVERY + 120,
             "the busy server's activity past the GPU timeout")
    assert _exists(k8s_testbed, f"/api/v1/namespaces/{NAMESPACE}/pods/{_pod_name(busy)}")
    assert kernels[busy].state() == "busy"

    # the culler's log (in the hub's, which runs it) names the server it stopped and its idle time, and no other
    log = stack.hub_log()
    assert f"Culling server {idle}/{PROJECT} (inactive for" in log
    assert f"Culling server {cpu}/{PROJECT}" not in log and f"Culling server {busy}/{PROJECT}" not in log

