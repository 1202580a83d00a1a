"""The Kubernetes testbed (issue 3): real control plane, simulated GPU nodes, pod runner.

Every test talks to the real kube-apiserver, scheduler and controllers started by
``tests/k8s/testbed up``; nothing is mocked. Nodes are simulated by kwok; pods labelled
``labyard.dev/run-local: "true"`` really run as local processes through the pod runner.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import time
import urllib.request

import pytest

from labyard_testbed.kubeapi import ApiError
from labyard_testbed.testing import Testbed, make_namespace, wait_for

pytestmark = pytest.mark.k8s

GPU_PRODUCT = "NVIDIA-A100-SXM4-80GB"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
RUN_LOCAL = {"labyard.dev/run-local": "true"}


def gpu_pod(name: str, gpus: int, labels: dict | None = None) -> dict:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {
            "tolerations": [GPU_TOLERATION],
            "nodeSelector": {"nvidia.com/gpu.product": GPU_PRODUCT},
            "containers": [{"name": "main", "image": "registry.invalid/cuda:12",
                            "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}],
        },
    }


def job(name: str, command: list[str], backoff_limit: int = 0, restart: str = "Never") -> dict:
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
        "spec": {"backoffLimit": backoff_limit, "template": {
            "metadata": {"labels": dict(RUN_LOCAL)},
            "spec": {"restartPolicy": restart, "containers": [{
                "name": "run", "image": "registry.invalid/papermill:1", "command": command,
                "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
            }]}}},
    }


def job_condition(tb: Testbed, ns: str, name: str, ctype: str) -> dict | None:
    j = tb.api.get(f"/apis/batch/v1/namespaces/{ns}/jobs/{name}")
    for c in j.get("status", {}).get("conditions", []) or []:
        if c["type"] == ctype and c["status"] == "True":
            return c
    return None


def job_pods(tb: Testbed, ns: str, name: str) -> list[dict]:
    return tb.api.get(f"/api/v1/namespaces/{ns}/pods", labelSelector=f"job-name={name}")["items"]


def read_log(pod: dict) -> str:
    path = pod["metadata"]["annotations"]["labyard.dev/log-file"]
    with open(path) as f:
        return f.read()


# The CronJob is created when the module starts, so the wait for the controller's next
# minute overlaps the other tests; test_cronjob_creates_jobs (last) checks the result.
@pytest.fixture(scope="module")
def cronjob(k8s_testbed: Testbed):
    ns = make_namespace(k8s_testbed, "cron")
    k8s_testbed.apply({
        "apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "tick"},
        "spec": {"schedule": "* * * * *", "concurrencyPolicy": "Forbid",
                 "jobTemplate": {"spec": {"backoffLimit": 0, "template": {
                     "metadata": {"labels": dict(RUN_LOCAL)},
                     "spec": {"restartPolicy": "Never", "containers": [{
                         "name": "tick", "image": "registry.invalid/papermill:1",
                         "command": ["sh", "-c", "echo tick at $(date +%s)"]}]}}}}},
    }, ns)
    return ns, time.monotonic()


def test_nodes_version_and_gpus(k8s_testbed: Testbed, cronjob) -> None:
    version = k8s_testbed.api.get("/version")
    assert version["gitVersion"] == "v1.36.3"
    nodes = {n["metadata"]["name"]: n for n in k8s_testbed.kubectl_json("get", "nodes")["items"]}
    gpu_nodes = [n for n in nodes.values() if n["metadata"]["labels"].get("nvidia.com/gpu.product") == GPU_PRODUCT]
    assert len(gpu_nodes) == 2
    for n in gpu_nodes:
        assert n["status"]["allocatable"]["nvidia.com/gpu"] == "4"
        assert n["metadata"]["labels"]["nvidia.com/gpu.count"] == "4"
        assert {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"} in n["spec"]["taints"]
        ready = [c for c in n["status"]["conditions"] if c["type"] == "Ready"]
        assert ready and ready[0]["status"] == "True"
    cpu_nodes = [n for n in nodes.values() if n["metadata"]["labels"].get("type") == "kwok"
                 and "nvidia.com/gpu" not in n["status"]["allocatable"]]
    assert len(cpu_nodes) == 1 and not cpu_nodes[0]["spec"].get("taints")


def test_gpu_pod_is_scheduled_on_a_gpu_node_and_runs(k8s_testbed: Testbed, k8s_namespace: str) -> None:
    k8s_testbed.apply(gpu_pod("one-gpu", 1), k8s_namespace)
    pod = wait_for(lambda: (p := k8s_testbed.pod(k8s_namespace, "one-gpu"))["status"].get("phase") == "Running" and p,
                   30, "the 1-GPU pod to run")
    assert pod["spec"]["nodeName"] in ("gpu-node-1", "gpu-node-2")
    assert pod["status"]["podIP"].startswith("127.21.")  # kwok's simulated pod network


def test_gpu_pod_without_toleration_never_lands_on_gpu_nodes(k8s_testbed: Testbed, k8s_namespace: str) -> None:
    pod = gpu_pod("no-toleration", 1)
    del pod["spec"]["tolerations"]
    k8s_testbed.apply(pod, k8s_namespace)
    ev = wait_for(lambda: [e for e in k8s_testbed.events_for(k8s_namespace, "no-toleration")
                           if e["reason"] == "FailedScheduling"], 30, "FailedScheduling")
    assert "untolerated taint" in ev[0]["message"]


def test_five_gpu_pod_stays_pending_with_failed_scheduling(k8s_testbed: Testbed, k8s_namespace: str) -> None:
    k8s_testbed.apply(gpu_pod("five-gpus", 5), k8s_namespace)
    ev = wait_for(lambda: [e for e in k8s_testbed.events_for(k8s_namespace, "five-gpus")
                           if e["reason"] == "FailedScheduling"], 30, "a FailedScheduling event")
    assert "Insufficient nvidia.com/gpu" in ev[0]["message"]
    pod = k8s_testbed.pod(k8s_namespace, "five-gpus")
    assert pod["status"]["phase"] == "Pending" and not pod["spec"].get("nodeName")


def test_gpu_quota_rejects_second_pod_with_403(k8s_testbed: Testbed, k8s_namespace: str) -> None:
    ns = k8s_namespace
    k8s_testbed.apply({"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "gpus"},
                       "spec": {"hard": {"requests.nvidia.com/gpu": "1"}}}, ns)
    # Admission enforces a quota once the quota controller has computed its status.
    wait_for(lambda: k8s_testbed.api.get(f"/api/v1/namespaces/{ns}/resourcequotas/gpus")
             .get("status", {}).get("hard"), 30, "the quota status")
    k8s_testbed.api.post(f"/api/v1/namespaces/{ns}/pods", gpu_pod("first", 1))
    with pytest.raises(ApiError) as err:
        k8s_testbed.api.post(f"/api/v1/namespaces/{ns}/pods", gpu_pod("second", 1))
    assert err.value.status == 403
    assert "exceeded quota" in err.value.message and "requests.nvidia.com/gpu" in err.value.message


def test_job_runs_real_command_and_completes(k8s_testbed: Testbed, k8s_namespace: str) -> None:
    ns = k8s_namespace
    k8s_testbed.apply(job("hello", ["sh", "-c", "echo hello from $(POD_NAME) as uid $(id -u); echo $((6*7))"]), ns)
    wait_for(lambda: job_condition(k8s_testbed, ns, "hello", "Complete"), 60, "the Job to complete")
    (pod,) = job_pods(k8s_testbed, ns, "hello")
    assert pod["status"]["phase"] == "Succeeded"
    term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 0 and term["reason"] == "Completed"
    out = read_log(pod)
    assert f"hello from {pod['metadata']['name']} as uid 0\n42\n" == out
    # The same output through the API server (`kubectl logs` reaches the runner's log server).
    assert k8s_testbed.kubectl("logs", "-n", ns, pod["metadata"]["name"]).stdout == out
    assert ipaddress.ip_address(pod["status"]["podIP"]) in ipaddress.ip_network(k8s_testbed.config["pod_network"])


def test_failing_job_fails_after_backoff_limit(k8s_testbed: Testbed, k8s_namespace: str) -> None:
    ns = k8s_namespace
    k8s_testbed.apply(job("broken", ["sh", "-c", "echo trying; exit 3"], backoff_limit=1), ns)
    cond = wait_for(lambda: job_condition(k8s_testbed, ns, "broken", "Failed"), 90, "the Job to fail")
    assert cond["reason"] == "BackoffLimitExceeded"
    pods = job_pods(k8s_testbed, ns, "broken")
    assert len(pods) == 2  # the first try and one retry (backoffLimit: 1)
    for p in pods:
        assert p["status"]["phase"] == "Failed"
        assert p["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3
        assert read_log(p) == "trying\n"


def test_runner_identity_volumes_and_pod_ip(k8s_testbed: Testbed, k8s_namespace: str) -> None:
    """A runner pod runs as the given uid/gid/groups, sees its volumes at their mountPaths
    and serves on its own pod IP (0.0.0.0 in its args is rewritten to that IP)."""
    ns, tb = k8s_namespace, k8s_testbed
    port = random.randint(20000, 29999)
    tb.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "project"},
              "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}}, ns)
    tb.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"},
              "data": {"greeting": "hi from a configmap"}}, ns)
    script = (
        "import json, os, pathlib\n"
        "info = {'uid': os.getuid(), 'gid': os.getgid(), 'groups': sorted(os.getgroups()),\n"
        "        'pod_ip': os.environ['POD_IP'], 'cwd': os.getcwd(),\n"
        "        'greeting': pathlib.Path('/etc/labyard-test/greeting').read_text(),\n"
        "        'home_writable': os.access('/home/jovyan', os.W_OK)}\n"
        "pathlib.Path('/srv/project/info.json').write_text(json.dumps(info))\n"
        f"os.execvp('python3', ['python3', '-m', 'http.server', '{port}', '--bind', '0.0.0.0',\n"
        "          '--directory', '/srv/project'])\n"
    )
    tb.apply({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "server", "labels": dict(RUN_LOCAL)},
        "spec": {
            "securityContext": {"runAsUser": 1234, "runAsGroup": 2345, "fsGroup": 3456,
                                "supplementalGroups": [4567], "fsGroupChangePolicy": "OnRootMismatch"},
            "containers": [{
                "name": "notebook", "image": "registry.invalid/singleuser:1",
                "command": ["python3", "-c", script], "workingDir": "/home/jovyan",
                "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True},
                "readinessProbe": {"httpGet": {"path": "/info.json", "port": port}, "periodSeconds": 5},
                "volumeMounts": [
                    {"name": "project", "mountPath": "/srv/project"},
                    {"name": "home", "mountPath": "/home/jovyan"},
                    {"name": "settings", "mountPath": "/etc/labyard-test", "readOnly": True},
                ],
            }],
            "volumes": [
                {"name": "project", "persistentVolumeClaim": {"claimName": "project"}},
                {"name": "home", "emptyDir": {}},
                {"name": "settings", "configMap": {"name": "settings"}},
            ],
        },
    }, ns)

    def ready():
        p = tb.pod(ns, "server")
        conds = {c["type"]: c["status"] for c in p["status"].get("conditions", [])}
        return conds.get("Ready") == "True" and p

    pod = wait_for(ready, 60, "the runner pod to be Ready")
    ip = pod["status"]["podIP"]
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(tb.config["pod_network"])
    with urllib.request.urlopen(f"http://{ip}:{port}/info.json", timeout=5) as resp:
        info = json.load(resp)
    assert info["uid"] == 1234 and info["gid"] == 2345
    assert info["groups"] == [2345, 3456, 4567]
    assert info["pod_ip"] == ip and info["cwd"] == "/home/jovyan" and info["home_writable"]
    assert info["greeting"] == "hi from a configmap"
    # The file is really owned by the pod's uid, with the fsGroup as group (setgid volume).
    pvc = tb.api.get(f"/api/v1/namespaces/{ns}/persistentvolumeclaims/project")
    pv = tb.api.get(f"/api/v1/persistentvolumes/{pvc['spec']['volumeName']}")
    st = os.stat(os.path.join(pv["spec"]["hostPath"]["path"], "info.json"))
    assert (st.st_uid, st.st_gid) == (1234, 3456)
    # Not reachable on another loopback address: the server listens on its pod IP only.
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/info.json", timeout=2)
    # Deleting the pod stops the process (SIGTERM) and removes the pod object.
    tb.api.delete(f"/api/v1/namespaces/{ns}/pods/server")

    def gone():
        try:
            tb.pod(ns, "server")
            return False
        except ApiError as e:
            return e.status == 404

    wait_for(gone, 40, "the pod to be deleted")
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{ip}:{port}/info.json", timeout=2)


def test_runner_init_container_secret_env_and_restart(k8s_testbed: Testbed, k8s_namespace: str) -> None:
    """Init containers run first; secret env is injected; OnFailure restarts the container."""
    ns, tb = k8s_namespace, k8s_testbed
    tb.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"},
              "stringData": {"token": "s3cret"}}, ns)
    main = ("test -f /work/init-ran || exit 9; n=$(cat /work/count 2>/dev/null || echo 0); "
            "echo $((n+1)) > /work/count; echo run $n token=$TOKEN; [ $n -ge 1 ]")
    tb.apply({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "retry", "labels": dict(RUN_LOCAL)},
        "spec": {
            "restartPolicy": "OnFailure",
            "initContainers": [{"name": "init", "image": "x", "command": ["sh", "-c", "touch /work/init-ran"],
                                "volumeMounts": [{"name": "work", "mountPath": "/work"}]}],
            "containers": [{"name": "main", "image": "x", "command": ["sh", "-c", main],
                            "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}}],
                            "volumeMounts": [{"name": "work", "mountPath": "/work"}]}],
            "volumes": [{"name": "work", "emptyDir": {}}],
        },
    }, ns)
    pod = wait_for(lambda: (p := tb.pod(ns, "retry"))["status"].get("phase") == "Succeeded" and p, 30,
                   "the pod to succeed after one restart")
    cs = pod["status"]["containerStatuses"][0]
    assert cs["restartCount"] == 1 and cs["state"]["terminated"]["exitCode"] == 0
    assert read_log(pod) == "run 0 token=s3cret\nrun 1 token=s3cret\n"


def test_kwok_pods_and_runner_pods_do_not_mix(k8s_testbed: Testbed, k8s_namespace: str) -> None:
    """A runner pod that cannot start (no command) is left alone by kwok: not faked Running."""
    ns = k8s_namespace
    k8s_testbed.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "nocmd", "labels": dict(RUN_LOCAL)},
                       "spec": {"containers": [{"name": "c", "image": "registry.invalid/x:1"}]}}, ns)
    wait_for(lambda: [e for e in k8s_testbed.events_for(ns, "nocmd") if e["reason"] == "Failed"], 30,
             "the runner's Failed event")
    pod = k8s_testbed.pod(ns, "nocmd")
    assert pod["status"]["phase"] == "Pending"
    waiting = pod["status"]["containerStatuses"][0]["state"]["waiting"]
    assert waiting["reason"] == "CreateContainerConfigError"


def test_helm_install_small_chart(k8s_testbed: Testbed, k8s_namespace: str) -> None:
    chart = os.path.join(os.path.dirname(__file__), "charts", "hello")
    k8s_testbed.helm("install", "demo", chart, "-n", k8s_namespace, "--wait", "--timeout", "90s",
                     "--set", "greeting=hi from the test")
    releases = json.loads(k8s_testbed.helm("list", "-n", k8s_namespace, "-o", "json").stdout)
    assert [(r["name"], r["status"]) for r in releases] == [("demo", "deployed")]
    dep = k8s_testbed.kubectl_json("get", "deployment", "demo", "-n", k8s_namespace)
    assert dep["status"].get("availableReplicas") == 2
    cm = k8s_testbed.kubectl_json("get", "configmap", "demo-greeting", "-n", k8s_namespace)
    assert cm["data"]["greeting"] == "hi from the test"


def test_kubernetes_asyncio_client_works(k8s_testbed: Testbed) -> None:
    """The client library that KubeSpawner uses reads the testbed's kubeconfig and lists nodes."""
    kio = pytest.importorskip("kubernetes_asyncio")
    import asyncio

    async def names() -> list[str]:
        await kio.config.load_kube_config(config_file=k8s_testbed.kubeconfig)
        async with kio.client.ApiClient() as api:
            nodes = await kio.client.CoreV1Api(api).list_node()
            return sorted(n.metadata.name for n in nodes.items)

    real = [k8s_testbed.node["name"]] if k8s_testbed.node else []  # the real node (test_realnode.py)
    assert asyncio.run(names()) == sorted(["cpu-node-1", "gpu-node-1", "gpu-node-2", *real])


def test_cronjob_creates_jobs(k8s_testbed: Testbed, cronjob) -> None:
    ns, created = cronjob
    # The controller starts a Job at the next full minute: at most ~60 s after creation.
    remaining = max(10.0, 75 - (time.monotonic() - created))
    jobs = wait_for(lambda: k8s_testbed.api.get(f"/apis/batch/v1/namespaces/{ns}/jobs")["items"],
                    remaining, "the CronJob's first Job")
    name = jobs[0]["metadata"]["name"]
    assert jobs[0]["metadata"]["ownerReferences"][0]["kind"] == "CronJob"
    # its pod really runs (a process on this machine): generous under load
    wait_for(lambda: job_condition(k8s_testbed, ns, name, "Complete"), 180, "the CronJob's Job to complete")
    (pod,) = job_pods(k8s_testbed, ns, name)
    assert read_log(pod).startswith("tick at ")
