"""``testbed build | up | down | status``: the Labyard Kubernetes testbed on loopback.

``up`` starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok and the pod
runner as background processes (each in its own session, pid and log in the state dir), creates
the simulated nodes and the ``labyard-local`` StorageClass, waits until the API answers, the
nodes are Ready and the ``default`` ServiceAccount exists, and prints ``KUBECONFIG=<path>`` last.
A running testbed is reused. ``down`` stops all of it, pod processes included.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zlib
from typing import Any

from .kubeapi import ApiError, KubeApi, load_kubeconfig

HERE = os.path.dirname(os.path.abspath(__file__))
K8S_DIR = os.path.dirname(HERE)
REPO = os.path.dirname(os.path.dirname(K8S_DIR))
BUILD_SH = os.path.join(K8S_DIR, "build", "build.sh")
COMPONENTS = ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "runner"]

GPU_PRODUCT = "NVIDIA-A100-SXM4-80GB"
NODES = [
    # name, cpu, memory, gpus
    ("gpu-node-1", "32", "256Gi", 4),
    ("gpu-node-2", "32", "256Gi", 4),
    ("cpu-node-1", "16", "64Gi", 0),
]
RUN_LOCAL_SELECTOR = {"key": '.metadata.labels.["labyard.dev/run-local"]', "operator": "NotIn", "values": ["true"]}


def state_dir() -> str:
    return os.environ.get("LABYARD_TESTBED_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "labyard-testbed", "state")


def say(msg: str) -> None:
    print(f"[testbed] {msg}", file=sys.stderr, flush=True)


# ---- build ----------------------------------------------------------------------------------
def build() -> str:
    """Build (or find) the binaries; return their directory."""
    out = subprocess.run(["bash", BUILD_SH], check=True, stdout=subprocess.PIPE, text=True)
    return out.stdout.strip().splitlines()[-1]


def bin_dir_if_built() -> str | None:
    out = subprocess.run(["bash", BUILD_SH, "--print"], check=True, stdout=subprocess.PIPE, text=True)
    d = out.stdout.strip()
    return d if os.path.exists(os.path.join(d, ".complete")) else None


# ---- processes ---------------------------------------------------------------------------------
def _proc_start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None


def _read_pidfile(path: str) -> tuple[int, str] | None:
    try:
        with open(path) as f:
            pid, start = f.read().split()[:2]
        return int(pid), start
    except (OSError, ValueError):
        return None


def _alive(path: str) -> int | None:
    """The pid in a pid file ("PID STARTTIME") if that very process still runs."""
    rec = _read_pidfile(path)
    if rec and _proc_start_time(rec[0]) == rec[1]:
        try:
            with open(f"/proc/{rec[0]}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return None
        except OSError:
            return None
        return rec[0]
    return None


def _spawn(state: str, name: str, argv: list[str], env: dict[str, str] | None = None, preexec_fn=None) -> int:
    logs = os.path.join(state, "logs")
    os.makedirs(logs, exist_ok=True)
    with open(os.path.join(logs, f"{name}.log"), "ab") as logf:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env or _clean_env(), preexec_fn=preexec_fn)
    os.makedirs(os.path.join(state, "pids"), exist_ok=True)
    with open(os.path.join(state, "pids", f"{name}.pid"), "w") as f:
        f.write(f"{proc.pid} {_proc_start_time(proc.pid)}\n")
    return proc.pid


def _clean_env() -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "TZ")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env["PATH"] = env.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    return env


def _stop_pid(pid: int, start: str, timeout: float) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _proc_start_time(pid) != start:
            return
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
        except OSError:
            return
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- PKI --------------------------------------------------------------------------------------------
def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def make_pki(pki: str) -> None:
    """CA, API server serving cert, admin client cert (system:masters), service-account key."""
    if os.path.exists(os.path.join(pki, "done-v2")):
        return
    os.makedirs(pki, mode=0o700, exist_ok=True)
    p = lambda n: os.path.join(pki, n)  # noqa: E731
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", p("ca.key"), "-out", p("ca.crt"), "-days", "3650",
             "-subj", "/CN=labyard-testbed-ca", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature")
    certs = {
        "apiserver": ("/CN=kube-apiserver",
                      "subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,"
                      "DNS:kubernetes.default,DNS:kubernetes.default.svc,"
                      "DNS:kubernetes.default.svc.cluster.local\nextendedKeyUsage=serverAuth\n"
                      "keyUsage=critical,digitalSignature,keyEncipherment"),
        "kubelet": ("/CN=labyard-pod-runner",
                    "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
                    "keyUsage=critical,digitalSignature,keyEncipherment"),
        "admin": ("/O=system:masters/CN=labyard-testbed-admin",
                  "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature,keyEncipherment"),
    }
    for name, (subj, ext) in certs.items():
        _issue_cert(pki, name, subj, ext)
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-out", p("sa.key"))
    _openssl("pkey", "-in", p("sa.key"), "-pubout", "-out", p("sa.pub"))
    open(p("done-v2"), "w").close()


def _issue_cert(pki: str, name: str, subj: str, ext: str) -> None:
    """``<name>.key`` and ``<name>.crt`` signed by the testbed CA, with the given x509v3 extensions."""
    p = lambda n: os.path.join(pki, n)  # noqa: E731
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-new", *ec, "-keyout", p(f"{name}.key"), "-out", p(f"{name}.csr"), "-subj", subj)
    with open(p(f"{name}.ext"), "w") as f:
        f.write(ext + "\n")
    _openssl("x509", "-req", "-in", p(f"{name}.csr"), "-CA", p("ca.crt"), "-CAkey", p("ca.key"),
             "-CAcreateserial", "-out", p(f"{name}.crt"), "-days", "3650", "-extfile", p(f"{name}.ext"))


def write_kubeconfig(path: str, pki: str, port: int, host: str = "127.0.0.1", user: str = "admin",
                     server_name: str | None = None) -> None:
    """A kubeconfig for the client certificate ``<pki>/<user>.crt``; ``server_name``: the name
    to check the API server's certificate against when ``host`` is not one of its addresses."""
    # JSON is YAML: kubectl, helm and kubernetes_asyncio read it, and so does kubeapi.py.
    cluster = {"server": f"https://{host}:{port}", "certificate-authority": os.path.join(pki, "ca.crt")}
    if server_name:
        cluster["tls-server-name"] = server_name
    cfg = {
        "apiVersion": "v1", "kind": "Config", "current-context": "labyard-testbed",
        "clusters": [{"name": "labyard-testbed", "cluster": cluster}],
        "users": [{"name": f"labyard-testbed-{user}", "user": {
            "client-certificate": os.path.join(pki, f"{user}.crt"), "client-key": os.path.join(pki, f"{user}.key")}}],
        "contexts": [{"name": "labyard-testbed", "context": {
            "cluster": "labyard-testbed", "user": f"labyard-testbed-{user}", "namespace": "default"}}],
        "preferences": {},
    }
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(cfg, f, indent=1)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


# ---- kwok stages ----------------------------------------------------------------------------------
def kwok_config(bin_dir: str) -> str:
    """kwok's own fast stages, with every pod stage made to skip opted-in (run-local) pods."""
    stage_dir = os.path.join(os.path.dirname(bin_dir), "kwok-stages")
    docs = ["apiVersion: config.kwok.x-k8s.io/v1alpha1\nkind: KwokConfiguration\n"
            "options:\n  enableCRDs: []\n  cidr: 127.21.0.1/16\n  nodeIP: 127.0.0.1\n"
            "  manageAllNodes: false\n  manageNodesWithAnnotationSelector: kwok.x-k8s.io/node=fake\n"
            "  nodeLeaseDurationSeconds: 40\n  nodeLeaseParallelism: 4\n"
            "  podPlayStageParallelism: 4\n  nodePlayStageParallelism: 4\n"
            "  podsOnNodeSyncParallelism: 1\n"
            "  enableDebuggingHandlers: false\n  enableProfilingHandler: false\n"]
    for fname in sorted(os.listdir(stage_dir)):
        with open(os.path.join(stage_dir, fname)) as f:
            text = f.read()
        if "kind: Pod\n" in text:
            marker = "    matchExpressions:\n"
            assert marker in text, fname
            sel = RUN_LOCAL_SELECTOR
            extra = (f"    - key: '{sel['key']}'\n      operator: '{sel['operator']}'\n"
                     f"      values:\n      - '{sel['values'][0]}'\n")
            text = text.replace(marker, marker + extra, 1)
        docs.append(text)
    return "---\n".join(d if d.endswith("\n") else d + "\n" for d in docs)


# ---- objects ----------------------------------------------------------------------------------------
def node_manifest(name: str, cpu: str, mem: str, gpus: int, kubelet_port: int = 0) -> dict[str, Any]:
    labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
              "type": "kwok", "node.kubernetes.io/instance-type": "gpu" if gpus else "cpu"}
    capacity = {"cpu": cpu, "memory": mem, "pods": "110", "ephemeral-storage": "1Ti"}
    taints = []
    if gpus:
        labels.update({"nvidia.com/gpu.product": GPU_PRODUCT, "nvidia.com/gpu.count": str(gpus),
                       "nvidia.com/gpu.present": "true"})
        capacity["nvidia.com/gpu"] = str(gpus)
        taints = [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": labels,
                     "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"}},
        "spec": {"taints": taints},
        # The kubelet port is the pod runner's log server (kwok leaves daemonEndpoints alone when
        # it has no nodePort of its own), so `kubectl logs` reaches the runner.
        "status": {"capacity": capacity, "allocatable": dict(capacity),
                   "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet_port}},
                   "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux",
                                "kubeletVersion": "fake", "containerRuntimeVersion": "labyard-pod-runner"}},
    }


STORAGE_CLASS = {
    "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
    "metadata": {"name": "labyard-local",
                 "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
    "provisioner": "labyard.dev/local", "reclaimPolicy": "Delete",
    "volumeBindingMode": "Immediate", "allowVolumeExpansion": True,
}


# ---- up / down / status -----------------------------------------------------------------------------
def _paths(state: str) -> dict[str, str]:
    return {"pki": os.path.join(state, "pki"), "kubeconfig": os.path.join(state, "kubeconfig"),
            "config": os.path.join(state, "config.json")}


def running(state: str) -> dict[str, int | None]:
    """The components' pids (None: not running); the real node's too unless it is turned off."""
    alive = {c: _alive(os.path.join(state, "pids", f"{c}.pid")) for c in COMPONENTS}
    if _node_wanted(state):
        from . import node

        alive.update(node.running(state))
    return alive


def _node_wanted(state: str) -> bool:
    """Whether this testbed has, or at its next ``up`` gets, the real node."""
    from . import node

    try:
        with open(_paths(state)["config"]) as f:
            return node.enabled() or "node" in json.load(f)
    except (OSError, ValueError):
        return node.enabled()


def _api(state: str) -> KubeApi:
    return KubeApi(load_kubeconfig(_paths(state)["kubeconfig"]), timeout=10)


def _healthy(state: str) -> bool:
    try:
        return _api(state).request("GET", "/readyz", timeout=3) is not None
    except (OSError, ApiError, ValueError, KeyError):
        return False


def _wait(what: str, fn, timeout: float, state: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            v = fn()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - report the last error on timeout
            last = e
        for c, pid in running(state).items():
            if pid is None and os.path.exists(os.path.join(state, "pids", f"{c}.pid")):
                raise RuntimeError(f"{c} exited while waiting for {what}; see {state}/logs/{c}.log:\n"
                                   + _tail(os.path.join(state, "logs", f"{c}.log")))
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}: {last}")


def _tail(path: str, n: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def up(args: argparse.Namespace) -> int:
    from . import node as node_mod

    state = state_dir()
    os.makedirs(state, exist_ok=True)
    paths = _paths(state)
    alive = running(state)
    if all(alive.values()) and _healthy(state):
        say("reusing the running testbed")
        print(f"KUBECONFIG={paths['kubeconfig']}")
        return 0
    if any(alive.values()):
        say("a partial testbed is running: stopping it first")
    down(args, quiet=True)
    t0 = time.monotonic()
    bin_dir = bin_dir_if_built()
    if bin_dir is None:
        say("binaries not built yet: building (cold: see docs/dev/testbed.md for the time)")
        bin_dir = build()
    node_bin = None
    if node_mod.enabled():
        node_bin = node_mod.bin_dir_if_built()
        if node_bin is None:
            say("real-node binaries not built yet: building (LABYARD_TESTBED_REAL_NODE=0 to go without)")
            build()
            node_bin = node_mod.bin_dir_if_built()
    b = lambda n: os.path.join(bin_dir, n)  # noqa: E731
    # A fresh cluster every time it is started: no leftovers from earlier runs. (Whoever started
    # it marks that themselves: the pytest fixture writes started-by-pytest after this.)
    if os.path.exists(os.path.join(state, "started-by-pytest")):
        os.unlink(os.path.join(state, "started-by-pytest"))
    for d in ("etcd", "pids", "pods", "volumes", "logs"):
        shutil.rmtree(os.path.join(state, d), ignore_errors=True)
    for f in ("runner-ipam.json",):
        if os.path.exists(os.path.join(state, f)):
            os.unlink(os.path.join(state, f))
    make_pki(paths["pki"])
    pki = lambda n: os.path.join(paths["pki"], n)  # noqa: E731
    ports = {"etcd": _free_port(), "etcd_peer": _free_port(), "apiserver": _free_port(),
             "kubelet": _free_port()}
    write_kubeconfig(paths["kubeconfig"], paths["pki"], ports["apiserver"])
    venv_bin = os.environ.get("LABYARD_TESTBED_POD_PATH", os.path.join(REPO, ".venv", "bin"))
    config = {"bin_dir": bin_dir, "ports": ports, "apiserver_port": ports["apiserver"],
              "pod_network": pod_network(state), "kwok_nodes": [n[0] for n in NODES],
              "kubelet_port": ports["kubelet"],
              "path_prefix": [p for p in venv_bin.split(":") if p], "expose": _python_expose(venv_bin)}
    with open(paths["config"], "w") as f:
        json.dump(config, f, indent=1)
    etcd_url = f"http://127.0.0.1:{ports['etcd']}"
    _spawn(state, "etcd", [
        b("etcd"), "--name=testbed", f"--data-dir={state}/etcd",
        f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
        f"--listen-peer-urls=http://127.0.0.1:{ports['etcd_peer']}",
        f"--initial-advertise-peer-urls=http://127.0.0.1:{ports['etcd_peer']}",
        f"--initial-cluster=testbed=http://127.0.0.1:{ports['etcd_peer']}",
        "--unsafe-no-fsync", "--quota-backend-bytes=4294967296", "--log-level=warn"])
    _wait("etcd", lambda: json.load(urllib.request.urlopen(etcd_url + "/health", timeout=1))["health"] == "true",
          20, state)
    _spawn(state, "kube-apiserver", [
        b("kube-apiserver"), f"--etcd-servers={etcd_url}",
        "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={ports['apiserver']}",
        f"--tls-cert-file={pki('apiserver.crt')}", f"--tls-private-key-file={pki('apiserver.key')}",
        f"--client-ca-file={pki('ca.crt')}",
        f"--service-account-key-file={pki('sa.pub')}", f"--service-account-signing-key-file={pki('sa.key')}",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        "--api-audiences=https://kubernetes.default.svc.cluster.local",
        "--service-cluster-ip-range=10.96.0.0/16", "--endpoint-reconciler-type=none",
        "--authorization-mode=Node,RBAC", "--allow-privileged=true",
        "--enable-admission-plugins=NodeRestriction,NamespaceLifecycle,LimitRanger,ServiceAccount,DefaultStorageClass,"
        "DefaultTolerationSeconds,PodSecurity,Priority,StorageObjectInUseProtection,"
        "PersistentVolumeClaimResize,RuntimeClass,MutatingAdmissionWebhook,ValidatingAdmissionPolicy,"
        "ValidatingAdmissionWebhook,ResourceQuota",
        "--kubelet-preferred-address-types=InternalIP",
        f"--kubelet-certificate-authority={pki('ca.crt')}",
        f"--kubelet-client-certificate={pki('admin.crt')}", f"--kubelet-client-key={pki('admin.key')}",
        f"--cert-dir={state}/pki/apiserver-generated", "--profiling=false", "--v=1"])
    _wait("the API server", lambda: _healthy(state), 60, state, 0.2)
    t_api = time.monotonic() - t0
    kc = paths["kubeconfig"]
    _spawn(state, "kube-controller-manager", [
        b("kube-controller-manager"), f"--kubeconfig={kc}", "--leader-elect=false",
        f"--service-account-private-key-file={pki('sa.key')}", f"--root-ca-file={pki('ca.crt')}",
        f"--cluster-signing-cert-file={pki('ca.crt')}", f"--cluster-signing-key-file={pki('ca.key')}",
        "--use-service-account-credentials=false", "--controllers=*", "--secure-port=0", "--v=1"])
    _spawn(state, "kube-scheduler", [
        b("kube-scheduler"), f"--kubeconfig={kc}", "--leader-elect=false", "--secure-port=0", "--v=1"])
    with open(os.path.join(state, "kwok.yaml"), "w") as f:
        f.write(kwok_config(bin_dir))
    _spawn(state, "kwok", [
        b("kwok"), f"--kubeconfig={kc}", f"--config={state}/kwok.yaml",
        "--manage-all-nodes=false", "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
        "--cidr=127.21.0.1/16", "--node-ip=127.0.0.1", "--node-lease-duration-seconds=40",
        "--server-address="])
    _spawn(state, "runner", [sys.executable, "-I", os.path.join(K8S_DIR, "testbed"), "_runner"],
           env=dict(_clean_env(), LABYARD_TESTBED_DIR=state))
    api = _api(state)
    for node in NODES:
        try:
            api.post("/api/v1/nodes", node_manifest(*node, kubelet_port=ports["kubelet"]))
        except ApiError as e:
            if e.status != 409:
                raise
    try:
        api.post("/apis/storage.k8s.io/v1/storageclasses", STORAGE_CLASS)
    except ApiError as e:
        if e.status != 409:
            raise

    def nodes_ready() -> bool:  # the simulated ones; the real node is waited for below
        items = [n for n in api.get("/api/v1/nodes")["items"] if n["metadata"]["name"] in config["kwok_nodes"]]
        return len(items) >= len(NODES) and all(
            any(c["type"] == "Ready" and c["status"] == "True" for c in n.get("status", {}).get("conditions", []))
            for n in items)

    if node_bin:
        t_node = time.monotonic()
        config["node"] = node_mod.start(state, bin_dir, node_bin, paths["pki"], ports["apiserver"], api)
        config["node_bin_dir"] = node_bin
        with open(paths["config"], "w") as f:
            json.dump(config, f, indent=1)
    _wait("the nodes to be Ready", nodes_ready, 60, state, 0.2)
    _wait("the default ServiceAccount", lambda: api.get("/api/v1/namespaces/default/serviceaccounts/default"),
          60, state, 0.2)
    if node_bin:
        _wait("the real node to be Ready and cluster DNS to answer (logs: kubelet.log, containerd.log)",
              lambda: node_mod.ready(api), 180, state, 0.5)
        say(f"real node {node_mod.NODE_NAME} ready {time.monotonic() - t_node:.1f} s after its start; "
            f"node IP {config['node']['node_ip']}, pods {config['node']['pod_cidr']}")
    say(f"up in {time.monotonic() - t0:.1f} s (API server ready after {t_api:.1f} s); state {state}")
    print(f"KUBECONFIG={paths['kubeconfig']}")
    return 0


def pod_network(state: str) -> str:
    """Runner pod addresses: 127.10.0.0/16 for the default state dir, else one of
    127.100-199.0.0/16 chosen by the state dir, so testbeds running side by side differ."""
    if os.path.realpath(state) == os.path.realpath(
            os.path.join(os.path.expanduser("~"), ".cache", "labyard-testbed", "state")):
        return "127.10.0.0/16"
    return f"127.{100 + zlib.crc32(os.path.realpath(state).encode()) % 100}.0.0/16"


def _python_expose(venv_bins: str) -> list[str]:
    """The Python installations the venvs link to, so pods that are not root can run them."""
    out = []
    for vb in venv_bins.split(":"):
        cfg = os.path.join(os.path.dirname(vb), "pyvenv.cfg")
        try:
            with open(cfg) as f:
                for line in f:
                    k, _, v = line.partition("=")
                    if k.strip() == "home":
                        out.append(os.path.dirname(v.strip()))
        except OSError:
            pass
    return out


def stop_components(state: str, names: list[str], timeout: float) -> list[str]:
    """Stop these components in this order (SIGTERM, SIGKILL after ``timeout``); the stopped ones."""
    stopped = []
    for c in names:
        pidfile = os.path.join(state, "pids", f"{c}.pid")
        rec = _read_pidfile(pidfile)
        if rec and _alive(pidfile):
            _stop_pid(rec[0], rec[1], timeout)
            stopped.append(c)
        if os.path.exists(pidfile):
            os.unlink(pidfile)
    return stopped


def down(args: argparse.Namespace, quiet: bool = False) -> int:
    state = state_dir()
    from . import node

    stopped = node.stop(state)  # first: its kubelet would otherwise report pods to a dying API
    # The runner first (it stops its pods), then the rest in reverse start order.
    stopped += stop_components(state, ["runner", "kwok", "kube-scheduler", "kube-controller-manager",
                                       "kube-apiserver", "etcd"], 10)
    # Pod processes left behind by a runner that died.
    pods = os.path.join(state, "pods")
    for root, _dirs, files in os.walk(pods):
        if "pid" in files:
            rec = _read_pidfile(os.path.join(root, "pid"))
            if rec and _proc_start_time(rec[0]) == rec[1]:
                _stop_pid(rec[0], rec[1], 2)
                stopped.append(f"pod process {rec[0]}")
    if not quiet or stopped:
        say("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def status(args: argparse.Namespace) -> int:
    state = state_dir()
    alive = running(state)
    for c, pid in alive.items():
        print(f"{c:24} {'running pid ' + str(pid) if pid else 'stopped'}")
    ok = all(alive.values()) and _healthy(state)
    print(f"{'api':24} {'ready' if ok else 'not ready'}")
    if ok:
        print(f"KUBECONFIG={_paths(state)['kubeconfig']}")
    return 0 if ok else 1


def load_image(sources: list[str]) -> int:
    """``testbed load-image``: archives as they are, podman images through ``podman save``."""
    state = state_dir()
    try:
        for src in sources:
            for name in _load_one(state, src):
                print(name)
    except RuntimeError as e:
        say(str(e))
        return 1
    return 0


def _load_one(state: str, src: str) -> list[str]:
    import tempfile

    from .node import images as node_images
    from .node import import_archive

    if os.path.isfile(src):
        return import_archive(state, src)
    if not shutil.which("podman"):
        raise RuntimeError(f"{src}: not a file, and podman (for a podman image name) is not installed")
    proc = subprocess.run(["podman", "image", "inspect", "--format", "{{.Id}}", src], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{src}: not a file, and podman has no such image: {proc.stderr.strip()}")
    image_id = proc.stdout.strip()
    # podman images this node has imported (the node's dir is new at each `up`): the same image
    # again is not saved and imported again (1.5 GB images take minutes on a loaded machine).
    record = os.path.join(state, "node", "podman-images.json")
    loaded = json.load(open(record)) if os.path.exists(record) else {}
    if loaded.get(src, {}).get("id") == image_id and all(n in node_images(state) for n in loaded[src]["names"]):
        return loaded[src]["names"]
    with tempfile.TemporaryDirectory(prefix="labyard-image-") as tmp:
        archive = os.path.join(tmp, "image.tar")
        proc = subprocess.run(["podman", "save", "--format", "docker-archive", "-o", archive, src],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{src}: podman cannot save it: {proc.stderr.strip()}")
        names = import_archive(state, archive)
    loaded[src] = {"id": image_id, "names": names}
    with open(record, "w") as f:
        json.dump(loaded, f)
    return names


def runner_main(args: argparse.Namespace) -> int:
    from .runner import Runner

    state = state_dir()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    with open(_paths(state)["config"]) as f:
        config = json.load(f)
    Runner(_api(state), state, config).run()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="testbed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="build the binaries (no-op when cached); print their directory")
    sub.add_parser("up", help="start (or reuse) the testbed; last line KUBECONFIG=<path>")
    sub.add_parser("down", help="stop everything the testbed started")
    sub.add_parser("status", help="show the components; exit 0 when ready")
    sub.add_parser("env", help="print KUBECONFIG and PATH lines for the shell (eval \"$(testbed env)\")")
    li = sub.add_parser("load-image", help="import images into the real node's containerd: OCI or docker "
                        "archives (.tar), or podman image names (saved with podman save); prints their names")
    li.add_argument("images", nargs="+", metavar="ARCHIVE|PODMAN-IMAGE")
    sub.add_parser("_runner", help=argparse.SUPPRESS)
    fw = sub.add_parser("_forward", help=argparse.SUPPRESS)
    fw.add_argument("listen")
    fw.add_argument("target")
    args = ap.parse_args(argv)
    if args.cmd == "build":
        print(build())
        return 0
    if args.cmd == "env":
        bd = bin_dir_if_built() or ""
        print(f"export KUBECONFIG={_paths(state_dir())['kubeconfig']}")
        print(f"export PATH={bd}:$PATH")
        try:
            with open(_paths(state_dir())["config"]) as f:
                node_cfg = json.load(f).get("node")
        except (OSError, ValueError):
            node_cfg = None
        if node_cfg:
            print(f"export LABYARD_TESTBED_NODE_IP={node_cfg['node_ip']}")
        return 0
    if args.cmd == "load-image":
        return load_image(args.images)
    if args.cmd == "_forward":
        from .node import forward

        return forward(args.listen, args.target)
    if args.cmd in ("up", "down"):
        # One `up`/`down` at a time per state dir (parallel test workers share one testbed).
        os.makedirs(state_dir(), exist_ok=True)
        with open(os.path.join(state_dir(), "lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return {"up": up, "down": down}[args.cmd](args)
    return {"status": status, "_runner": runner_main}[args.cmd](args)
