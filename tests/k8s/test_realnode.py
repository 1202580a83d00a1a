"""The testbed's real node: a kubelet with containerd, runc, CNI, kube-proxy, CoreDNS, kube-router.

Real containers from a real image (static busybox, built by the fixture and loaded with
``testbed load-image``): identity and volume ownership as the kubelet applies them, Jobs as the
Job controller sees real exits, Services through kube-proxy and cluster DNS, NetworkPolicies as
kube-router enforces them, ``kubectl exec`` and ``port-forward`` through the kubelet, and what
``testbed down`` must leave behind (nothing). Nothing is mocked.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request

import pytest

from labyard_testbed.testing import REAL_NODE_PLACEMENT, Testbed, make_namespace, wait_for

pytestmark = pytest.mark.k8s
TESTBED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testbed")


def pod(name: str, image: str, command: list[str], restart: str = "Never", labels: dict | None = None,
        **spec) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels or {}},
            "spec": {**REAL_NODE_PLACEMENT, "restartPolicy": restart, "terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "main", "image": image, "imagePullPolicy": "Never",
                                     "command": command}], **spec}}


def server(name: str, image: str, text: str, labels: dict) -> dict:
    """busybox httpd on 8080 serving ``text`` at /, from an emptyDir."""
    p = pod(name, image, ["sh", "-c", f"echo {text} > /www/index.html && exec httpd -f -p 8080 -h /www"],
            restart="Always", labels=labels, volumes=[{"name": "www", "emptyDir": {}}])
    c = p["spec"]["containers"][0]
    c["volumeMounts"] = [{"name": "www", "mountPath": "/www"}]
    c["ports"] = [{"containerPort": 8080}]
    c["readinessProbe"] = {"tcpSocket": {"port": 8080}, "periodSeconds": 1}
    return p


def sleeper(name: str, image: str, labels: dict | None = None) -> dict:
    return pod(name, image, ["sleep", "3600"], restart="Always", labels=labels)


# HTTP GET with busybox nc (Debian's static busybox wget crashes); prints the whole response
HTTP_GET = "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3"


def phase(tb: Testbed, ns: str, name: str, *phases: str) -> dict | None:
    p = tb.pod(ns, name)
    return p if p.get("status", {}).get("phase") in phases else None


def running_ready(tb: Testbed, ns: str, name: str) -> dict | None:
    p = tb.pod(ns, name)
    st = p.get("status", {})
    ok = st.get("phase") == "Running" and all(c.get("ready") for c in st.get("containerStatuses") or [{}])
    return p if ok else None


def logs(tb: Testbed, ns: str, name: str) -> str:
    return tb.kubectl("logs", "-n", ns, name).stdout


def test_node_is_ready_with_its_label_taint_and_address(k8s_testbed: Testbed, real_node: dict) -> None:
    node = k8s_testbed.api.get(f"/api/v1/nodes/{real_node['name']}")
    assert node["metadata"]["labels"]["labyard.dev/real-node"] == "true"
    assert {"key": "labyard.dev/real-node", "value": "true", "effect": "NoSchedule"} in node["spec"]["taints"]
    info = node["status"]["nodeInfo"]
    assert info["kubeletVersion"] == "v1.36.3" and info["containerRuntimeVersion"].startswith("containerd://")
    assert {"type": "InternalIP", "address": real_node["node_ip"]} in node["status"]["addresses"]
    ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
    assert ready[0]["status"] == "True", ready


def test_pod_runs_as_its_uid_and_gid_with_a_group_owned_volume(k8s_testbed: Testbed, real_node: dict,
                                                               busybox_image: str, k8s_namespace: str) -> None:
    p = pod("ids", busybox_image, ["sh", "-c", "id; stat -c 'dir %g %a' /data; touch /data/f; "
                                               "stat -c 'file %u %g' /data/f"],
            securityContext={"runAsUser": 10001, "runAsGroup": 20001, "fsGroup": 20001},
            volumes=[{"name": "data", "emptyDir": {}}])
    p["spec"]["containers"][0]["volumeMounts"] = [{"name": "data", "mountPath": "/data"}]
    k8s_testbed.apply(p, k8s_namespace)
    done = wait_for(lambda: phase(k8s_testbed, k8s_namespace, "ids", "Succeeded", "Failed"), 120, "the pod to finish")
    out = logs(k8s_testbed, k8s_namespace, "ids")
    assert done["status"]["phase"] == "Succeeded", out
    assert done["spec"]["nodeName"] == real_node["name"]
    assert re.search(r"uid=10001 gid=20001 groups=\S*20001", out), out
    assert "dir 20001 2777" in out, out  # fsGroup: group-owned, group-writable, setgid
    assert "file 10001 20001" in out, out


def test_jobs_complete_and_fail_with_backoff_limit_exceeded(k8s_testbed: Testbed, real_node: dict,
                                                           busybox_image: str, k8s_namespace: str) -> None:
    def job(name: str, code: int, backoff: int) -> dict:
        template = pod(name, busybox_image, ["sh", "-c", f"echo run $HOSTNAME; exit {code}"])
        return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
                "spec": {"backoffLimit": backoff, "template": {"spec": template["spec"]}}}

    def condition(name: str) -> dict | None:
        j = k8s_testbed.api.get(f"/apis/batch/v1/namespaces/{k8s_namespace}/jobs/{name}")
        return next((c for c in j.get("status", {}).get("conditions") or []
                     if c["type"] in ("Complete", "Failed") and c["status"] == "True"), None)

    k8s_testbed.apply(job("ok", 0, 0), k8s_namespace)
    k8s_testbed.apply(job("bad", 3, 1), k8s_namespace)
    assert wait_for(lambda: condition("ok"), 120, "the good Job to finish")["type"] == "Complete"
    failed = wait_for(lambda: condition("bad"), 180, "the failing Job to give up")
    assert failed["type"] == "Failed" and failed["reason"] == "BackoffLimitExceeded", failed
    pods = k8s_testbed.api.get(f"/api/v1/namespaces/{k8s_namespace}/pods", labelSelector="job-name=bad")["items"]
    assert len(pods) == 2  # the first try and one retry
    for p in pods:
        term = p["status"]["containerStatuses"][0]["state"]["terminated"]
        assert term["exitCode"] == 3 and term["reason"] == "Error", term


def test_service_answers_by_dns_name_from_another_pod(k8s_testbed: Testbed, real_node: dict,
                                                     busybox_image: str) -> None:
    # A namespace named like the platform's, so the name is the one the chart's pods use.
    ns = make_namespace(k8s_testbed, "labyard")
    try:
        k8s_testbed.apply(server("hub-0", busybox_image, "hello-from-hub", {"app": "hub"}), ns)
        k8s_testbed.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "hub"},
                           "spec": {"selector": {"app": "hub"}, "ports": [{"port": 80, "targetPort": 8080}]}}, ns)
        wait_for(lambda: running_ready(k8s_testbed, ns, "hub-0"), 120, "the server pod")
        fqdn = f"hub.{ns}.svc.cluster.local"
        # getent resolves as glibc programs (the hub, Python) do: resolv.conf, search path, ndots
        k8s_testbed.apply(pod("client", busybox_image, ["sh", "-c", (
            f"set -e; full=$(getent hosts {fqdn} | cut -d' ' -f1); short=$(getent hosts hub | cut -d' ' -f1); "
            f"echo \"full=$full short=$short\"; {HTTP_GET} $full 80; "
            "if getent hosts nothing.example.org; then echo resolved-outside; fi")]), ns)
        done = wait_for(lambda: phase(k8s_testbed, ns, "client", "Succeeded", "Failed"), 120, "the client")
        out = logs(k8s_testbed, ns, "client")
        assert done["status"]["phase"] == "Succeeded", out
        ip = k8s_testbed.api.get(f"/api/v1/namespaces/{ns}/services/hub")["spec"]["clusterIP"]
        assert f"full={ip} short={ip}" in out, out  # by the full name and by the search path
        assert "hello-from-hub" in out, out  # the Service answered at that address
        assert "resolved-outside" not in out  # names outside the cluster do not resolve
    finally:
        k8s_testbed.api.delete(f"/api/v1/namespaces/{ns}")


def _connects(tb: Testbed, ns: str, client: str, ip: str) -> bool:
    proc = tb.kubectl("exec", "-n", ns, client, "--", "sh", "-c", f"{HTTP_GET} {ip} 8080", check=False, timeout=60)
    return proc.returncode == 0 and "protected" in proc.stdout


def test_network_policy_default_deny_allows_only_the_hub(k8s_testbed: Testbed, real_node: dict,
                                                         busybox_image: str) -> None:
    tb = k8s_testbed
    ns_a, ns_b, ns_hub = (make_namespace(tb, p) for p in ("np-a", "np-b", "np-hub"))
    try:
        tb.apply(server("web", busybox_image, "protected", {"app": "web"}), ns_a)
        tb.apply(sleeper("intruder", busybox_image), ns_b)
        tb.apply(sleeper("hub", busybox_image, {"app": "hub"}), ns_hub)
        tb.apply(sleeper("not-hub", busybox_image, {"app": "other"}), ns_hub)
        ip = wait_for(lambda: running_ready(tb, ns_a, "web"), 120, "the protected server")["status"]["podIP"]
        for ns, name in ((ns_b, "intruder"), (ns_hub, "hub"), (ns_hub, "not-hub")):
            wait_for(lambda ns=ns, name=name: running_ready(tb, ns, name), 120, f"pod {name}")
        # Before any policy everyone gets through: a refusal later is the policy, not the network.
        assert _connects(tb, ns_b, "intruder", ip)
        tb.apply({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                  "metadata": {"name": "default-deny"},
                  "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}, ns_a)
        tb.apply({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                  "metadata": {"name": "allow-from-hub"},
                  "spec": {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{"from": [{
                      "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns_hub}},
                      "podSelector": {"matchLabels": {"app": "hub"}}}]}]}}, ns_a)
        wait_for(lambda: not _connects(tb, ns_b, "intruder", ip), 60, "the policy to stop the other namespace")
        assert _connects(tb, ns_hub, "hub", ip)
        assert not _connects(tb, ns_hub, "not-hub", ip)  # right namespace, wrong pod
        assert not _connects(tb, ns_b, "intruder", ip)
        # The policy is the only thing in the way: without it, the intruder gets through again.
        tb.api.delete(f"/apis/networking.k8s.io/v1/namespaces/{ns_a}/networkpolicies/default-deny")
        tb.api.delete(f"/apis/networking.k8s.io/v1/namespaces/{ns_a}/networkpolicies/allow-from-hub")
        wait_for(lambda: _connects(tb, ns_b, "intruder", ip), 60, "traffic to flow again without the policies")
    finally:
        for ns in (ns_a, ns_b, ns_hub):
            tb.api.delete(f"/api/v1/namespaces/{ns}")


def _resolves(tb: Testbed, ns: str, client: str, name: str) -> str:
    proc = tb.kubectl("exec", "-n", ns, client, "--", "getent", "hosts", name, check=False, timeout=60)
    return proc.stdout.split()[0] if proc.returncode == 0 and proc.stdout.strip() else ""


def test_egress_policy_lets_dns_through_and_nothing_else(k8s_testbed: Testbed, real_node: dict,
                                                         busybox_image: str) -> None:
    """A user namespace's default-deny egress with DNS allowed, as the chart writes it."""
    tb = k8s_testbed
    ns_user, ns_other = make_namespace(tb, "np-user"), make_namespace(tb, "np-other")
    try:
        tb.apply(server("web", busybox_image, "protected", {"app": "web"}), ns_other)
        tb.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                  "spec": {"selector": {"app": "web"}, "ports": [{"port": 8080}]}}, ns_other)
        tb.apply(sleeper("client", busybox_image), ns_user)
        ip = wait_for(lambda: running_ready(tb, ns_other, "web"), 120, "the server")["status"]["podIP"]
        wait_for(lambda: running_ready(tb, ns_user, "client"), 120, "the client")
        name = f"web.{ns_other}.svc.cluster.local"
        assert _connects(tb, ns_user, "client", ip) and _resolves(tb, ns_user, "client", name)
        tb.apply({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                  "metadata": {"name": "egress-dns-only"},
                  "spec": {"podSelector": {}, "policyTypes": ["Egress"], "egress": [{
                      "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                              "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
                      "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}]}}, ns_user)
        wait_for(lambda: not _connects(tb, ns_user, "client", ip), 60, "the egress policy to apply")
        svc_ip = tb.api.get(f"/api/v1/namespaces/{ns_other}/services/web")["spec"]["clusterIP"]
        assert _resolves(tb, ns_user, "client", name) == svc_ip  # DNS still answers
        assert not _connects(tb, ns_user, "client", svc_ip)  # nor through the Service (port 8080 too)
    finally:
        for ns in (ns_user, ns_other):
            tb.api.delete(f"/api/v1/namespaces/{ns}")


def test_exec_port_forward_and_the_host_reaching_pods_and_node_ports(
        k8s_testbed: Testbed, real_node: dict, busybox_image: str, k8s_namespace: str) -> None:
    tb, ns = k8s_testbed, k8s_namespace
    tb.apply(server("web", busybox_image, "hello-host", {"app": "web"}), ns)
    ip = wait_for(lambda: running_ready(tb, ns, "web"), 120, "the server pod")["status"]["podIP"]
    assert tb.kubectl("exec", "-n", ns, "web", "--", "id", "-u").stdout.strip() == "0"
    # the host reaches pod IPs (one route to the node's pod range) ...
    with urllib.request.urlopen(f"http://{ip}:8080/", timeout=10) as r:
        assert r.read().decode().strip() == "hello-host"
    # ... NodePorts on the node's address ...
    tb.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
              "spec": {"type": "NodePort", "selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}},
             ns)
    port = tb.api.get(f"/api/v1/namespaces/{ns}/services/web")["spec"]["ports"][0]["nodePort"]
    body = wait_for(lambda: urllib.request.urlopen(f"http://{real_node['node_ip']}:{port}/", timeout=5).read(),
                    60, "the NodePort to answer")
    assert body.decode().strip() == "hello-host"
    # ... and kubectl port-forward, through the API server and the kubelet
    proc = subprocess.Popen([os.path.join(tb.bin_dir, "kubectl"), "port-forward", "-n", ns, "pod/web", "0:8080"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=tb.env())
    try:
        line = proc.stdout.readline()
        m = re.search(r"127\.0\.0\.1:(\d+)", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        with urllib.request.urlopen(f"http://127.0.0.1:{m.group(1)}/", timeout=10) as r:
            assert r.read().decode().strip() == "hello-host"
    finally:
        proc.terminate()
        proc.wait(10)


def test_pods_stay_off_the_real_node_unless_they_tolerate_it(k8s_testbed: Testbed, real_node: dict,
                                                            busybox_image: str, k8s_namespace: str) -> None:
    p = pod("no-toleration", busybox_image, ["true"])
    del p["spec"]["tolerations"]
    k8s_testbed.apply(p, k8s_namespace)
    ev = wait_for(lambda: [e for e in k8s_testbed.events_for(k8s_namespace, "no-toleration")
                           if e["reason"] == "FailedScheduling"], 60, "FailedScheduling")
    assert "1 node(s) didn't match Pod's node affinity/selector, 3 node(s) had untolerated taint" in ev[0]["message"]
    assert not k8s_testbed.pod(k8s_namespace, "no-toleration")["spec"].get("nodeName")


def test_node_rules_stay_in_the_node_namespace(k8s_testbed: Testbed, real_node: dict) -> None:
    """kube-proxy and kube-router program the node's network namespace, never the host's."""
    holder = real_node["holder"]
    inside = subprocess.run(["nsenter", f"--target={holder}", "--net", "--", "iptables-save"],
                            capture_output=True, text=True, check=True).stdout
    assert "KUBE-SERVICES" in inside and "KUBE-ROUTER" in inside
    host = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    assert "KUBE-" not in host
    with open(f"/proc/{holder}/mountinfo") as f:
        node_mounts = f.read()
    assert " /proc/sys/kernel/panic " in node_mounts  # the kubelet's tunables are shadowed there


# ---- down and a second up, on a testbed of its own -------------------------------------------
def _testbed(state: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TESTBED, *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, LABYARD_TESTBED_DIR=state))


def _traces(cfg: dict, netns: str, state: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/ns/net") == netns:
                found.append(f"process {pid} in the node's network namespace")
        except OSError:
            pass
    for h in os.listdir("/sys/fs/cgroup"):
        if os.path.exists(os.path.join("/sys/fs/cgroup", h, cfg["cgroup"])):
            found.append(f"cgroup {h}/{cfg['cgroup']}")
    if os.path.exists(f"/sys/class/net/{cfg['host_if']}"):
        found.append(f"interface {cfg['host_if']}")
    routes = subprocess.run(["ip", "route", "show", cfg["pod_cidr"]], capture_output=True, text=True).stdout
    if routes.strip():
        found.append(f"route {routes.strip()}")
    with open("/proc/self/mountinfo") as f:
        found += [f"mount {line.split()[4]}" for line in f if state in line]
    return found


def test_down_leaves_nothing_behind_and_a_second_up_is_clean(tmp_path_factory: pytest.TempPathFactory,
                                                              real_node: dict) -> None:
    state = str(tmp_path_factory.mktemp("second-testbed"))
    try:
        for round_ in (1, 2):
            up = _testbed(state, "up")
            assert up.returncode == 0, up.stderr[-3000:]
            with open(os.path.join(state, "config.json")) as f:
                cfg = json.load(f)["node"]
            assert cfg["index"] != real_node["index"]  # side by side with the session's testbed
            netns = os.readlink(f"/proc/{cfg['holder']}/ns/net")
            status = _testbed(state, "status")
            assert status.returncode == 0 and "kubelet" in status.stdout, status.stdout
            down = _testbed(state, "down")
            assert down.returncode == 0, down.stderr
            deadline = time.monotonic() + 30
            while (left := _traces(cfg, netns, state)) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert not left, f"round {round_}: {left}"
    finally:
        _testbed(state, "down")


def test_load_image_refuses_what_is_not_an_image(k8s_testbed: Testbed, real_node: dict, tmp_path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar")
    with pytest.raises(AssertionError, match="junk.tar"):
        k8s_testbed.load_image(str(junk))
