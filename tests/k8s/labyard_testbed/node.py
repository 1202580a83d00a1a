"""The testbed's real node: kubelet + containerd + runc + CNI, kube-proxy, CoreDNS, NetworkPolicy.

``testbed up`` starts it next to the simulated (kwok) nodes; ``down`` removes every trace of it.
Nothing here changes the host's network, iptables, routes of its own or sysctls:

* The node lives in a network namespace and a private mount namespace, held by one ``sleep``
  process (component ``node-ns``); every node daemon joins both with ``nsenter``. In the mount
  namespace ``/run`` is a fresh tmpfs (containerd's and runc's state, netns pins, the xtables
  lock), ``/var/lib`` and ``/var/log`` are the state dir's ``node/var-lib`` and ``node/var-log``
  (kubelet, containerd, CNI, pod logs), and the kernel tunables the kubelet insists on setting
  (``vm.overcommit_memory``, ``kernel.panic``, ...) are shadowed by files, so it cannot change
  the host's. iptables rules (kube-proxy, kube-router) and sysctls such as ``ip_forward`` are
  those of the node's network namespace.
* One veth pair joins it to the host: ``lbtb<N>`` on the host with ``198.19.N.1/24``, ``eth0``
  in the node with ``198.19.N.2`` (the node's InternalIP), and one host route sending the
  node's pod range ``198.18.N.0/24`` to it, so the host reaches pods and NodePorts. ``N`` is
  picked per state dir (and the next free one if taken), so several testbeds run side by side.
  The addresses are from 198.18.0.0/15, the range set aside for network tests (RFC 2544).
  Nothing routes the Service range (10.96.0.0/16) on the host: Services are reached from pods,
  or from the host through a NodePort or ``kubectl port-forward``.
* The control plane stays on the host's loopback (every existing user of the testbed keeps its
  addresses). The node reaches it through ``api-forward``, a small TCP forwarder listening on
  ``198.19.N.1:6443`` (the host end of the veth); pods reach it as ``kubernetes.default``
  (10.96.0.1:443), whose EndpointSlice points at that forwarder.
* The node's processes and pods share one cgroup per hierarchy, ``/labyard-testbed-<N>``
  (the kubelet's ``cgroupRoot``): ``down`` kills everything in it and removes it; the
  namespaces, the veth and the route go with the last process.

The node registers as ``real-node-1`` with the label ``labyard.dev/real-node=true`` and the
taint ``labyard.dev/real-node=true:NoSchedule``, so only pods that ask for it land there.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from typing import Any

from . import oci
from .control import (
    BUILD_SH, K8S_DIR, _alive, _clean_env, _issue_cert, _read_pidfile, _spawn, _stop_pid, _wait,
    stop_components, write_kubeconfig,
)
from .kubeapi import ApiError, KubeApi

NODE_NAME = "real-node-1"
LABEL = "labyard.dev/real-node"
TAINT = {"key": LABEL, "value": "true", "effect": "NoSchedule"}
TOLERATION = {"key": LABEL, "operator": "Exists", "effect": "NoSchedule"}
SERVICE_CIDR = "10.96.0.0/16"
DNS_IP = "10.96.0.10"
API_FORWARD_PORT = 6443
PAUSE_IMAGE = "localhost/labyard-testbed/pause:3.10.2"
COREDNS_IMAGE = "localhost/labyard-testbed/coredns:v1.14.7"
# in start order; down stops them in reverse
COMPONENTS = ["node-ns", "api-forward", "containerd", "kubelet", "kube-proxy", "kube-router"]
# what the kubelet sets at start unless protectKernelDefaults (which then refuses to start)
KERNEL_TUNABLES = {"vm/overcommit_memory": "1", "vm/panic_on_oom": "0", "kernel/panic": "10",
                   "kernel/panic_on_oops": "1", "kernel/keys/root_maxkeys": "1000000",
                   "kernel/keys/root_maxbytes": "25000000"}
CGROUP_FS = "/sys/fs/cgroup"


def enabled() -> bool:
    return os.environ.get("LABYARD_TESTBED_REAL_NODE", "1") != "0"


def bin_dir_if_built() -> str | None:
    out = subprocess.run(["bash", BUILD_SH, "--print-node"], check=True, stdout=subprocess.PIPE, text=True)
    d = out.stdout.strip()
    return d if os.path.exists(os.path.join(d, ".complete")) else None


def network(n: int) -> dict[str, Any]:
    return {"index": n, "host_if": f"lbtb{n}", "host_ip": f"198.19.{n}.1", "node_ip": f"198.19.{n}.2",
            "pod_cidr": f"198.18.{n}.0/24", "cgroup": f"labyard-testbed-{n}",
            "api": f"https://198.19.{n}.1:{API_FORWARD_PORT}"}


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _env() -> dict[str, str]:
    """The daemons' environment: they run iptables, ipset and CNI plugins from /usr/sbin."""
    env = _clean_env()
    env["PATH"] = env["PATH"] + ":/usr/local/sbin:/usr/sbin:/sbin"
    return env


def _in_node(holder: int, *argv: str) -> list[str]:
    return ["nsenter", f"--target={holder}", "--net", "--mount", "--", *argv]


def _supervised(*argv: str) -> list[str]:
    """Restart the daemon when it exits, as systemd does on a real node (kube-proxy exits by
    design when its configuration file changes)."""
    loop = 'while :; do "$@"; echo "[testbed] $1 exited ($?); restarting in 2 s"; sleep 2; done'
    return ["bash", "-c", loop, "supervise", *argv]


# ---- cgroups --------------------------------------------------------------------------------------
def _hierarchies() -> list[str]:
    out = []
    for name in sorted(os.listdir(CGROUP_FS)):
        path = os.path.join(CGROUP_FS, name)
        if os.path.isdir(path) and not os.path.islink(path) and os.path.exists(os.path.join(path, "cgroup.procs")):
            out.append(path)
    return out


def _make_cgroups(cgroup: str) -> None:
    for h in _hierarchies():
        path = os.path.join(h, cgroup)
        os.makedirs(os.path.join(path, "node"), exist_ok=True)
        if os.path.basename(h) == "cpuset":  # a v1 cpuset takes no task before cpus/mems are set
            for d in (path, os.path.join(path, "node")):
                for f in ("cpuset.cpus", "cpuset.mems"):
                    with open(os.path.join(h, f)) as src:
                        value = src.read().strip()
                    with open(os.path.join(d, f), "w") as dst:
                        dst.write(value)


def _join_cgroups(cgroup: str):
    """A preexec_fn putting the child into ``<cgroup>/node`` in every hierarchy that has it."""
    targets = [os.path.join(h, cgroup, "node", "cgroup.procs") for h in _hierarchies()]

    def join() -> None:
        pid = str(os.getpid())
        for t in targets:
            try:
                with open(t, "w") as f:
                    f.write(pid)
            except OSError:
                pass
    return join


def _cgroup_pids(cgroup: str) -> set[int]:
    pids: set[int] = set()
    for h in _hierarchies():
        for root, _dirs, files in os.walk(os.path.join(h, cgroup)):
            if "cgroup.procs" in files:
                try:
                    with open(os.path.join(root, "cgroup.procs")) as f:
                        pids.update(int(p) for p in f.read().split())
                except OSError:
                    pass
    return pids


def _remove_cgroups(cgroup: str, timeout: float = 20) -> list[str]:
    """Kill every process in the node's cgroups (daemons, shims, containers), then remove them."""
    deadline = time.monotonic() + timeout
    killed = 0
    while (pids := _cgroup_pids(cgroup)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    left = _cgroup_pids(cgroup)
    if left:
        raise RuntimeError(f"processes {sorted(left)} in cgroup {cgroup} survived SIGKILL for {timeout} s")
    for h in _hierarchies():
        top = os.path.join(h, cgroup)
        for root, _dirs, _files in sorted(os.walk(top), key=lambda w: -w[0].count("/")):
            for _ in range(50):  # a cgroup stays busy for a moment after its last task exits
                try:
                    os.rmdir(root)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
    return [f"{killed} node processes"] if killed else []


# ---- PKI and kubeconfigs --------------------------------------------------------------------
def _node_pki(pki: str, node_ip: str) -> None:
    tls = "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage="
    _issue_cert(pki, "node-kubelet-client", f"/O=system:nodes/CN=system:node:{NODE_NAME}", tls + "clientAuth")
    _issue_cert(pki, "node-kube-proxy", "/CN=system:kube-proxy", tls + "clientAuth")
    _issue_cert(pki, "node-kubelet-serving", f"/CN={NODE_NAME}",
                f"subjectAltName=IP:{node_ip},DNS:{NODE_NAME}\n" + tls + "serverAuth")


# ---- objects ----------------------------------------------------------------------------------
def api_endpoints(net: dict) -> dict:
    """The ``kubernetes`` Service's EndpointSlice (the API server's own reconciler is off)."""
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "kubernetes-real-node", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "kubernetes",
                                    "endpointslice.kubernetes.io/managed-by": "labyard-testbed"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [net["host_ip"]], "conditions": {"ready": True}}],
            "ports": [{"name": "https", "port": API_FORWARD_PORT, "protocol": "TCP"}]}


# Cluster names from the API; every other name NXDOMAIN at once (no upstream DNS here), as a
# cluster's forwarder would answer for a name that does not exist.
COREFILE = """\
cluster.local:53 in-addr.arpa:53 ip6.arpa:53 {
    errors
    health :8080
    ready :8181
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        pods insecure
        ttl 5
    }
    cache 5
    loadbalance
}
.:53 {
    errors
    template ANY ANY {
        rcode NXDOMAIN
    }
}
"""


def dns_objects() -> list[tuple[str, dict]]:
    """CoreDNS as a real cluster runs it: Deployment + Service ``kube-dns`` in kube-system."""
    ns = "kube-system"
    labels = {"k8s-app": "kube-dns"}
    rules = [{"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"],
              "verbs": ["list", "watch"]},
             {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]}]
    container = {
        "name": "coredns", "image": COREDNS_IMAGE, "imagePullPolicy": "Never",
        "args": ["-conf", "/etc/coredns/Corefile"],
        "ports": [{"name": "dns", "containerPort": 53, "protocol": "UDP"},
                  {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181}, "periodSeconds": 2},
        "livenessProbe": {"httpGet": {"path": "/health", "port": 8080}, "periodSeconds": 10,
                          "failureThreshold": 5},
        "resources": {"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
        "securityContext": {"runAsNonRoot": True, "runAsUser": 65534, "runAsGroup": 65534,
                            "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns", "readOnly": True}],
    }
    return [
        ("/api/v1/namespaces/kube-system/serviceaccounts",
         {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "coredns", "namespace": ns}}),
        ("/apis/rbac.authorization.k8s.io/v1/clusterroles",
         {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
          "metadata": {"name": "labyard-testbed:coredns"}, "rules": rules}),
        ("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
         {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
          "metadata": {"name": "labyard-testbed:coredns"},
          "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                      "name": "labyard-testbed:coredns"},
          "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": ns}]}),
        ("/api/v1/namespaces/kube-system/configmaps",
         {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "coredns", "namespace": ns},
          "data": {"Corefile": COREFILE}}),
        ("/apis/apps/v1/namespaces/kube-system/deployments",
         {"apiVersion": "apps/v1", "kind": "Deployment",
          "metadata": {"name": "coredns", "namespace": ns, "labels": labels},
          "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                   "template": {"metadata": {"labels": labels}, "spec": {
                       "serviceAccountName": "coredns", "priorityClassName": "system-cluster-critical",
                       # port 53 as on a real cluster (NetworkPolicies name the pod's port), as nobody
                       "securityContext": {"sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start",
                                                        "value": "53"}]},
                       "dnsPolicy": "Default", "nodeSelector": {LABEL: "true"}, "tolerations": [TOLERATION],
                       "containers": [container],
                       "volumes": [{"name": "config", "configMap": {"name": "coredns"}}]}}}}),
        ("/api/v1/namespaces/kube-system/services",
         {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kube-dns", "namespace": ns, "labels": labels},
          "spec": {"clusterIP": DNS_IP, "selector": labels, "ports": [
              {"name": "dns", "port": 53, "targetPort": 53, "protocol": "UDP"},
              {"name": "dns-tcp", "port": 53, "targetPort": 53, "protocol": "TCP"}]}}),
    ]


def _create(api: KubeApi, path: str, obj: dict) -> None:
    try:
        api.post(path, obj)
    except ApiError as e:
        if e.status != 409:
            raise


# ---- configuration files ---------------------------------------------------------------------
def _write(path: str, text: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


def _containerd_toml(d: str) -> str:
    return f"""version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
disabled_plugins = ["io.containerd.internal.v1.tracing", "io.containerd.snapshotter.v1.aufs",
                    "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{d}/containerd.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "/var/lib/containerd-opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # CAP_SYS_RESOURCE is not in our bounding set: without this every sandbox fails to start
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni"
"""


def _cni_conf(net: dict) -> str:
    return json.dumps({"cniVersion": "0.4.0", "name": "labyard-testbed", "plugins": [
        {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False, "hairpinMode": True,
         "ipam": {"type": "host-local", "ranges": [[{"subnet": net["pod_cidr"]}]],
                  "routes": [{"dst": "0.0.0.0/0"}]}},
        {"type": "portmap", "capabilities": {"portMappings": True}},
    ]}, indent=1)


def _kubelet_yaml(d: str, pki: str, net: dict) -> str:
    cfg = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
        # our machines: cgroup v1 (hybrid), swap allowed, no systemd
        "failCgroupV1": False, "cgroupDriver": "cgroupfs", "failSwapOn": False,
        "cgroupRoot": "/" + net["cgroup"],
        "containerRuntimeEndpoint": f"unix://{d}/containerd.sock",
        "address": net["node_ip"], "port": 10250, "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1", "healthzPort": 10248,
        "tlsCertFile": os.path.join(pki, "node-kubelet-serving.crt"),
        "tlsPrivateKeyFile": os.path.join(pki, "node-kubelet-serving.key"),
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                           "x509": {"clientCAFile": os.path.join(pki, "ca.crt")}},
        "authorization": {"mode": "Webhook"},
        "clusterDomain": "cluster.local", "clusterDNS": [DNS_IP],
        "resolvConf": "",  # no upstream DNS: pods resolve cluster names only
        "registerWithTaints": [TAINT],
        # a shared, busy disk: evict or collect images only when it is really full
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                         "nodefs.inodesFree": "1%"},
        "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": False, "rotateCertificates": False,
        "nodeStatusReportFrequency": "10s",
    }
    return json.dumps(cfg, indent=1)


def _kube_proxy_yaml(d: str, net: dict) -> str:
    cfg = {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": f"{d}/kube-proxy.kubeconfig"},
        "hostnameOverride": NODE_NAME, "mode": "iptables", "clusterCIDR": net["pod_cidr"],
        "nodePortAddresses": [net["node_ip"] + "/32"],
        "healthzBindAddress": "127.0.0.1:10256", "metricsBindAddress": "127.0.0.1:10249",
        "iptables": {"localhostNodePorts": False},
        # 0: leave the kernel's conntrack table size and timeouts alone (the size is global)
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
    }
    return json.dumps(cfg, indent=1)


HOLDER = r"""
set -eu
ready=$1 node=$2; shift 2
mount -t tmpfs -o mode=0755,size=256m labyard-node-run /run
mkdir -p /run/lock
mount --bind "$node/var-lib" /var/lib
mount --bind "$node/var-log" /var/log
for t in "$@"; do mount --bind "$node/sysctl/${t//\//.}" "/proc/sys/$t"; done
ip link set lo up
echo 1 > /proc/sys/net/ipv4/ip_forward
echo 1 > /proc/sys/net/bridge/bridge-nf-call-iptables
touch "$ready"
exec sleep infinity
"""


# ---- images -------------------------------------------------------------------------------------------
def _image_archives(node_bin: str) -> list[str]:
    """The pause and CoreDNS images, written once per build next to the binaries."""
    out_dir = os.path.join(os.path.dirname(node_bin), "images")
    os.makedirs(out_dir, exist_ok=True)
    images = [("pause.tar", oci.static_binary_image(PAUSE_IMAGE, os.path.join(node_bin, "pause"), "pause",
                                                    user="65535:65535")),
              ("coredns.tar", oci.static_binary_image(COREDNS_IMAGE, os.path.join(node_bin, "coredns"), "coredns",
                                                      user="65534:65534"))]
    paths = []
    for name, image in images:
        path = os.path.join(out_dir, name)
        if not os.path.exists(path):
            oci.write_archive(image, path)
        paths.append(path)
    return paths


def import_archive(state: str, archive: str) -> list[str]:
    """Import an image archive (OCI layout or docker-archive tar) into the node; return its names."""
    sock = os.path.join(state, "node", "containerd.sock")
    if not os.path.exists(sock):
        raise RuntimeError(f"the real node is not running (no {sock}): testbed up first")
    proc = _run("ctr", f"--address={sock}", "--namespace=k8s.io", "images", "import", "--no-unpack=false", archive)
    names = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("unpacking ")]
    if not names:
        raise RuntimeError(f"{archive} holds no named image (ctr said: {proc.stdout.strip()} {proc.stderr.strip()})")
    return names


def images(state: str) -> list[str]:
    sock = os.path.join(state, "node", "containerd.sock")
    proc = _run("ctr", f"--address={sock}", "--namespace=k8s.io", "images", "ls", "--quiet")
    return [n for n in proc.stdout.split() if not n.startswith("sha256:")]


# ---- up / down -------------------------------------------------------------------------------------------
def _pick_index(state: str) -> int:
    return 1 + zlib.crc32(os.path.realpath(state).encode()) % 250


def start(state: str, bin_dir: str, node_bin: str, pki: str, apiserver_port: int, api: KubeApi) -> dict:
    """Start the node's namespaces and daemons; return its part of config.json."""
    d = os.path.join(state, "node")
    for masked in ("/run", "/var/lib", "/var/log"):
        if os.path.realpath(state).startswith(masked + "/"):
            raise RuntimeError(f"the state dir {state} is under {masked}, which the node's mount namespace replaces")
    shutil.rmtree(d, ignore_errors=True)
    for sub in ("var-lib", "var-log", "sysctl", "cni"):
        os.makedirs(os.path.join(d, sub), exist_ok=True)
    for tunable, value in KERNEL_TUNABLES.items():
        _write(os.path.join(d, "sysctl", tunable.replace("/", ".")), value + "\n")

    # The namespaces, then the veth pair: its host-side name claims the index N.
    ready = os.path.join(d, "ns-ready")
    first = _pick_index(state)
    cfg: dict[str, Any] = {}
    for attempt in range(250):
        n = (first - 1 + attempt) % 250 + 1
        net = network(n)
        if os.path.exists(f"/sys/class/net/{net['host_if']}"):
            continue
        if _cgroup_pids(net["cgroup"]):
            continue  # processes of a testbed whose veth is gone: not ours to touch
        _write(os.path.join(d, "network.json"), json.dumps(net))  # for down, should up fail half-way
        _make_cgroups(net["cgroup"])
        holder = _spawn(state, "node-ns", ["unshare", "--net", "--mount", "--propagation", "private", "--",
                                           "bash", "-c", HOLDER, "holder", ready, d, *KERNEL_TUNABLES],
                        env=_env(), preexec_fn=_join_cgroups(net["cgroup"]))
        _wait("the node's namespaces", lambda: os.path.exists(ready), 20, state)
        if _run("ip", "link", "add", net["host_if"], "type", "veth", "peer", "name", "eth0", "netns", str(holder),
                check=False).returncode == 0:
            cfg = {"enabled": True, "name": NODE_NAME, "holder": holder, **net}
            break
        _stop_pid(holder, _read_pidfile(os.path.join(state, "pids", "node-ns.pid"))[1], 5)
        _remove_cgroups(net["cgroup"])
        os.unlink(ready)
    if not cfg:
        os.unlink(os.path.join(d, "network.json"))
        raise RuntimeError("no free network index for the real node (all of lbtb1..lbtb250 exist)")
    _run("ip", "addr", "add", f"{cfg['host_ip']}/24", "dev", cfg["host_if"])
    _run("ip", "link", "set", cfg["host_if"], "up")
    _run("ip", "route", "add", cfg["pod_cidr"], "via", cfg["node_ip"], "dev", cfg["host_if"])
    inside = lambda *a: _run(*_in_node(holder, *a))  # noqa: E731
    inside("ip", "addr", "add", f"{cfg['node_ip']}/24", "dev", "eth0")
    inside("ip", "link", "set", "eth0", "up")
    # node-local clients of ClusterIPs need a route for kube-proxy's DNAT to apply; nothing
    # forwards it further (the host does not route)
    inside("ip", "route", "add", SERVICE_CIDR, "dev", "eth0")

    join = _join_cgroups(cfg["cgroup"])
    _spawn(state, "api-forward", [sys.executable, "-I", os.path.join(K8S_DIR, "testbed"), "_forward",
                                  f"{cfg['host_ip']}:{API_FORWARD_PORT}", f"127.0.0.1:{apiserver_port}"],
           env=_env(), preexec_fn=join)

    _node_pki(pki, cfg["node_ip"])
    kc = lambda name, user: write_kubeconfig(  # noqa: E731
        os.path.join(d, f"{name}.kubeconfig"), pki, API_FORWARD_PORT, host=cfg["host_ip"], user=user,
        server_name="kubernetes")
    kc("kubelet", "node-kubelet-client")
    kc("kube-proxy", "node-kube-proxy")
    kc("kube-router", "admin")
    _write(os.path.join(d, "containerd.toml"), _containerd_toml(d))
    _write(os.path.join(d, "cni", "10-labyard.conflist"), _cni_conf(cfg))
    _write(os.path.join(d, "kubelet.yaml"), _kubelet_yaml(d, pki, cfg))
    _write(os.path.join(d, "kube-proxy.yaml"), _kube_proxy_yaml(d, cfg))

    nb = lambda n: os.path.join(node_bin, n)  # noqa: E731
    _spawn(state, "containerd", _in_node(holder, *_supervised("containerd", f"--config={d}/containerd.toml")),
           env=_env(), preexec_fn=join)
    _wait("containerd", lambda: os.path.exists(os.path.join(d, "containerd.sock")), 30, state)
    for archive in _image_archives(node_bin):
        _wait(f"containerd to import {os.path.basename(archive)}",
              lambda a=archive: _try(import_archive, state, a), 30, state, 0.5)
    _spawn(state, "kubelet", _in_node(holder, *_supervised(
        nb("kubelet"), f"--config={d}/kubelet.yaml", f"--kubeconfig={d}/kubelet.kubeconfig",
        f"--node-ip={cfg['node_ip']}", f"--hostname-override={NODE_NAME}", f"--node-labels={LABEL}=true",
        "--v=1")), env=_env(), preexec_fn=join)
    _spawn(state, "kube-proxy", _in_node(holder, *_supervised(nb("kube-proxy"), f"--config={d}/kube-proxy.yaml",
                                                              "--v=1")), env=_env(), preexec_fn=join)
    _create(api, "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices", api_endpoints(cfg))
    for path, obj in dns_objects():
        _create(api, path, obj)
    _spawn(state, "kube-router", _in_node(holder, *_supervised(
        nb("kube-router"), f"--kubeconfig={d}/kube-router.kubeconfig", f"--hostname-override={NODE_NAME}",
        "--run-firewall=true", "--run-router=false", "--run-service-proxy=false", "--enable-cni=false",
        "--enable-ipv4=true", "--enable-ipv6=false", f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--health-port=0", "--metrics-port=0", "--v=1")), env=_env(), preexec_fn=join)
    return cfg


def _try(fn, *args):
    try:
        return fn(*args)
    except (ApiError, RuntimeError, OSError):
        return None


def ready(api: KubeApi) -> bool:
    """Node Ready and cluster DNS answering (its pod ready)."""
    node = api.get(f"/api/v1/nodes/{NODE_NAME}")
    if not any(c["type"] == "Ready" and c["status"] == "True" for c in node.get("status", {}).get("conditions", [])):
        return False
    pods = api.get("/api/v1/namespaces/kube-system/pods", labelSelector="k8s-app=kube-dns")["items"]
    return any(all(c.get("ready") for c in p.get("status", {}).get("containerStatuses", []) or [{}])
               and p.get("status", {}).get("phase") == "Running" for p in pods)


def running(state: str) -> dict[str, int | None]:
    return {c: _alive(os.path.join(state, "pids", f"{c}.pid")) for c in COMPONENTS}


def stop(state: str) -> list[str]:
    """Stop the node: daemons, then everything left in its cgroups; namespaces and veth go with them."""
    stopped = stop_components(state, list(reversed(COMPONENTS)), 5)
    try:
        with open(os.path.join(state, "node", "network.json")) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return stopped
    stopped += _remove_cgroups(cfg["cgroup"])
    # the kernel removes the veth (and with it the route) once the namespace is gone
    deadline = time.monotonic() + 10
    while os.path.exists(f"/sys/class/net/{cfg['host_if']}") and time.monotonic() < deadline:
        time.sleep(0.1)
    if os.path.exists(f"/sys/class/net/{cfg['host_if']}"):
        _run("ip", "link", "del", cfg["host_if"], check=False)
    os.unlink(os.path.join(state, "node", "network.json"))
    return stopped


# ---- the API forwarder -------------------------------------------------------------------------------
def forward(listen: str, target: str) -> int:
    """Relay TCP connections from ``listen`` (the host end of the veth) to ``target`` (loopback)."""
    lhost, lport = listen.rsplit(":", 1)
    thost, tport = target.rsplit(":", 1)

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            treader, twriter = await asyncio.open_connection(thost, int(tport))
        except OSError:
            writer.close()
            return
        await asyncio.gather(pump(reader, twriter), pump(treader, writer))

    async def main() -> None:
        server = await asyncio.start_server(handle, lhost, int(lport), reuse_address=True)
        async with server:
            await server.serve_forever()

    asyncio.run(main())
    return 0
