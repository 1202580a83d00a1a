"""`helm install` of helm/labyard with the images from `make images`, on the testbed's real node.

Real here: the hub image and the single-user image (`images/build`, loaded into the real node's
containerd with `testbed load-image`), every platform pod as a container on the real kubelet
node, the proxy's Service through kube-proxy (a NodePort, reached from the host as a browser
would reach a cluster's entry), cluster DNS between the components, slapd (on the host, reached
by the hub at the host's end of the node's veth), the project controller making the project
namespaces, alice's server as a container running as her LDAP uid/gid with the project volume,
and the NetworkPolicies the chart and the controller write, enforced by kube-router.

The images are built by `make images` (a cold build is ~25 min here); this test fails, never
skips, when they are missing, and says how to build them.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml

from labyard_hub import demo
from labyard_testbed.testing import REAL_NODE_PLACEMENT, Testbed, wait_for

from tests.support.directory import authenticator_config, start_directory

pytestmark = [pytest.mark.k8s, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "labyard"
NS = "labyard-real"
PLATFORM = ("hub", "proxy", "scheduler", "mlflow", "controller", "culler", "gpus")
PLACEMENT = {"nodeSelector": REAL_NODE_PLACEMENT["nodeSelector"], "tolerations": REAL_NODE_PLACEMENT["tolerations"]}


def _tag() -> str:
    """The images' tag: the chart's appVersion (what `make images` builds), or $LABYARD_IMAGE_TAG
    for images built with `images/build --tag` (not to replace the shared tag on a dev machine)."""
    if os.environ.get("LABYARD_IMAGE_TAG"):
        return os.environ["LABYARD_IMAGE_TAG"]
    return subprocess.run([str(ROOT / "images" / "build"), "--print-tag"], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.fixture(scope="module")
def images(k8s_testbed: Testbed, real_node: dict) -> dict[str, str]:
    """The two images of this tree's appVersion, from podman's store into the real node."""
    tag = _tag()
    refs = {n: f"localhost/labyard/{n}:{tag}" for n in ("hub", "singleuser")}
    missing = [r for r in refs.values() if subprocess.run(["podman", "image", "exists", r]).returncode]
    if missing:
        pytest.fail(f"images {missing} are not built: run `make images` (images/README.md)")
    for ref in refs.values():
        assert k8s_testbed.load_image(ref) == [ref]
    return refs


@pytest.fixture(scope="module")
def directory(tmp_path_factory, real_node: dict):
    """slapd with the demo users, also listening where the node's pods reach the host."""
    slapd = start_directory(tmp_path_factory.mktemp("slapd-real"), listen=(real_node["host_ip"],))
    yield slapd
    slapd.stop()


def values(images: dict[str, str], slapd, real_node: dict) -> dict:
    ldap = authenticator_config(slapd)
    ldap["server_urls"] = [f"ldap://{real_node['host_ip']}:{slapd.port}"]
    ldap["connect_timeout"], ldap["receive_timeout"] = 5.0, 10.0
    hub_name, tag = images["hub"].rsplit(":", 1)
    su_name, _ = images["singleuser"].rsplit(":", 1)
    v = {
        "image": {"name": hub_name, "tag": tag, "pullPolicy": "Never"},
        "hub": {"ldap": ldap, **PLACEMENT},
        "proxy": {"service": {"type": "NodePort"}, **PLACEMENT},
        "singleuser": {"image": {"name": su_name, "tag": tag, "pullPolicy": "Never"}, "homeStorage": "1Gi"},
        # users reach the proxy at the node's address (a NodePort), not a private one: MLflow is told
        "mlflow": {"allowedHosts": [f"{real_node['node_ip']}:*"]},
        "projectPolicy": {
            "flavors": {"cpu": {"display_name": "CPU (real node)", "cpu": 0.2, "memory": "1Gi",
                                "node_selector": REAL_NODE_PLACEMENT["nodeSelector"],
                                "tolerations": REAL_NODE_PLACEMENT["tolerations"]}},
            "defaults": {"flavors": ["cpu"]},
        },
    }
    for c in ("scheduler", "mlflow", "controller", "culler", "gpus"):
        v[c] = {**v.get(c, {}), **PLACEMENT}  # the chart's requests: CPU shares keep them alive next to the host's processes
    return v


def _pods(tb: Testbed, ns: str) -> list[dict]:
    return tb.api.get(f"/api/v1/namespaces/{ns}/pods")["items"]


def _available(tb: Testbed) -> dict[str, bool]:
    items = tb.api.get(f"/apis/apps/v1/namespaces/{NS}/deployments")["items"]
    return {d["metadata"]["name"]: any(c["type"] == "Available" and c["status"] == "True"
                                       for c in d.get("status", {}).get("conditions", [])) for d in items}


def _diagnose(tb: Testbed, ns: str) -> str:
    out = []
    for p in _pods(tb, ns):
        out.append(f"{p['metadata']['name']} {p['status'].get('phase')} {json.dumps(p['status'].get('containerStatuses'))[:600]}")
        logs = tb.kubectl("logs", "-n", ns, p["metadata"]["name"], "--tail=30", check=False).stdout
        out.append(logs)
    return "\n".join(out)


@pytest.fixture(scope="module")
def install(k8s_testbed: Testbed, real_node: dict, images, directory, tmp_path_factory):
    tb = k8s_testbed
    vfile = tmp_path_factory.mktemp("values") / "values.yaml"
    vfile.write_text(yaml.safe_dump(values(images, directory, real_node)))
    # the project namespaces that earlier modules' stacks made (their controllers make one per
    # LDAP group), or this module's last run, still terminating: this release's controller makes them
    for ns in NAMESPACES:
        tb.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found", check=False)
    _gone(tb)
    tb.kubectl("create", "namespace", NS)
    adopted = _adopt_cluster_rbac(tb)
    t0 = time.monotonic()
    proc = tb.helm("install", "labyard", str(CHART), "--namespace", NS, "-f", str(vfile), "--wait",
                   "--timeout", "15m", timeout=1000, check=False)
    if proc.returncode:
        pytest.fail(f"helm install failed: {proc.stderr}\n{_diagnose(tb, NS)}")
    print(f"helm install --wait: {time.monotonic() - t0:.0f} s")
    port = tb.api.get(f"/api/v1/namespaces/{NS}/services/proxy-public")["spec"]["ports"][0]["nodePort"]
    yield {"url": f"http://{real_node['node_ip']}:{port}", "values": vfile}
    tb.helm("uninstall", "labyard", "--namespace", NS, "--wait", timeout=300, check=False)
    if adopted:  # the session's own RBAC (tests/k8s/conftest.py) for the modules after this one
        tb.kubectl("apply", "-f", "-", input=adopted)
    for ns in NAMESPACES:
        tb.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found", check=False)
    _gone(tb)  # the next modules use the project namespaces


NAMESPACES = (NS, "labyard-nlp", "labyard-vision", "labyard-admins")
CLUSTER_KINDS = ("ClusterRole", "ClusterRoleBinding", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")


def _adopt_cluster_rbac(tb: Testbed) -> str:
    """Cluster-scoped RBAC that an earlier module applied from the chart (the session's
    ``service_accounts``) is handed to this release, as Helm adopts objects with its ownership
    marks; returns those objects as they were (YAML), to apply again after the uninstall."""
    rendered = tb.helm("template", "labyard", str(CHART), "--namespace", "labyard").stdout
    names = [(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(rendered) if d and d.get("kind") in CLUSTER_KINDS]
    kept = []
    for kind, name in names:
        got = tb.kubectl("get", kind.lower(), name, "-o", "yaml", check=False)
        if got.returncode:
            continue
        obj = yaml.safe_load(got.stdout)
        meta = obj["metadata"]
        for key in ("resourceVersion", "uid", "creationTimestamp", "managedFields", "generation"):
            meta.pop(key, None)
        meta.get("annotations", {}).pop("kubectl.kubernetes.io/last-applied-configuration", None)
        obj.pop("status", None)
        kept.append(obj)
        tb.kubectl("label", kind.lower(), name, "app.kubernetes.io/managed-by=Helm", "--overwrite")
        tb.kubectl("annotate", kind.lower(), name, "meta.helm.sh/release-name=labyard",
                   f"meta.helm.sh/release-namespace={NS}", "--overwrite")
    return yaml.safe_dump_all(kept) if kept else ""


def _gone(tb: Testbed) -> None:
    def none_left() -> bool:
        names = {n["metadata"]["name"] for n in tb.api.get("/api/v1/namespaces")["items"]}
        return not names & set(NAMESPACES)

    wait_for(none_left, 300, f"namespaces {NAMESPACES} to be gone")


def _login(url: str, user: str) -> requests.Session:
    s = requests.Session()
    s.get(f"{url}/hub/login", timeout=30)
    r = s.post(f"{url}/hub/login", data={"username": user, "password": demo.PASSWORD, "_xsrf": s.cookies.get("_xsrf")},
               allow_redirects=False, timeout=60)
    assert r.status_code == 302, (r.status_code, r.text[:500])
    tok = s.post(f"{url}/hub/api/users/{user}/tokens", json={"note": "test"},
                 headers={"X-XSRFToken": s.cookies.get("_xsrf"), "Referer": f"{url}/hub/"}, timeout=30)
    tok.raise_for_status()
    api = requests.Session()
    api.headers["Authorization"] = f"token {tok.json()['token']}"
    api.base = f"{url}/hub/api"
    return api


def test_platform_runs_on_the_real_node_and_alice_logs_in(k8s_testbed: Testbed, real_node: dict, install) -> None:
    tb = k8s_testbed
    available = _available(tb)
    assert set(available) == set(PLATFORM) and all(available.values()), available
    for p in _pods(tb, NS):
        if p["metadata"].get("labels", {}).get("job-name"):
            continue
        assert p["spec"]["nodeName"] == real_node["name"], p["metadata"]["name"]
        assert p["status"]["phase"] == "Running", (p["metadata"]["name"], p["status"])
    alice = _login(install["url"], "alice")
    me = alice.get(f"{alice.base}/user", timeout=30).json()
    assert me["name"] == "alice"


def _start(alice: requests.Session, project: str) -> None:
    r = alice.post(f"{alice.base}/users/alice/servers/{project}", json={"flavor": "cpu"}, timeout=60)
    assert r.status_code in (201, 202), r.text


def _ready(alice: requests.Session, project: str) -> None:
    wait_for(lambda: (alice.get(f"{alice.base}/users/alice", timeout=30).json()["servers"].get(project) or {}).get("ready"),
             400, f"alice's {project} server to be ready")


@pytest.fixture(scope="module")
def alice_servers(install) -> requests.Session:
    """alice's vision and nlp servers on the cpu flavour, ready (the hub waited for the pods and
    their routes): vision is the server of the issue's check, nlp the target of bob's probe."""
    alice = _login(install["url"], "alice")
    for project in ("vision", "nlp"):
        _start(alice, project)
    for project in ("vision", "nlp"):
        _ready(alice, project)
    return alice


def test_alice_server_is_a_real_container_with_her_ids_and_the_project_volume(
        k8s_testbed: Testbed, real_node: dict, images, install, alice_servers) -> None:
    tb, alice = k8s_testbed, alice_servers
    pod = tb.pod("labyard-vision", "jupyter-alice--vision")
    assert pod["spec"]["nodeName"] == real_node["name"]
    status = pod["status"]["containerStatuses"][0]
    assert status["ready"] and status["imageID"], status
    assert pod["spec"]["containers"][0]["image"] == images["singleuser"]
    # inside the container, as the kubelet and runc made it
    script = ("id; stat -c 'mount %g' /srv/project; echo hi > /srv/project/alice-was-here; "
              "stat -c 'file %u %g' /srv/project/alice-was-here; echo home=$HOME; touch $HOME/h && echo home-ok")
    out = tb.kubectl("exec", "-n", "labyard-vision", "jupyter-alice--vision", "--", "sh", "-c", script, timeout=120).stdout
    assert "uid=10001" in out and "gid=20001" in out, out
    # (a name for her uid is the start hook's, for the server's processes only, not for `kubectl
    # exec`: tests/images checks `whoami` there)
    assert "file 10001 20001" in out, out
    assert "home-ok" in out, out
    # her server answers through the proxy's Service with her token
    url = f"{install['url']}/user/alice/vision/api/contents/"
    r = requests.get(url, headers=alice.headers, timeout=60)
    assert r.status_code == 200, (r.status_code, r.text[:300])


def _probe_pod(image: str, targets: list[tuple[str, int]]) -> dict:
    """A pod as bob's in vision (Pod Security "restricted"), connecting to each target once a
    second, 15 rounds: kube-router puts a new pod's rules in place some time after it starts."""
    code = ("import socket,time\n"
            "for n in range(1, 16):\n"
            "    res = []\n"
            "    for h,p in %r:\n"
            "        try:\n"
            "            socket.create_connection((h,p),3).close(); res.append('open')\n"
            "        except OSError: res.append('closed')\n"
            "    print('round', n, *res, flush=True)\n"
            "    time.sleep(1)\n") % (targets,)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bob-probe"},
            "spec": {**REAL_NODE_PLACEMENT, "restartPolicy": "Never",
                     "securityContext": {"runAsUser": 10002, "runAsGroup": 20001, "runAsNonRoot": True,
                                         "seccompProfile": {"type": "RuntimeDefault"}},
                     "containers": [{"name": "probe", "image": image, "imagePullPolicy": "Never",
                                     "command": ["python3", "-c", code],
                                     "resources": {"requests": {"cpu": "10m", "memory": "64Mi"},
                                                   "limits": {"cpu": "200m", "memory": "256Mi"}},
                                     "securityContext": {"allowPrivilegeEscalation": False,
                                                         "capabilities": {"drop": ["ALL"]}}}]}}


@pytest.fixture(scope="module")
def bob_probe(k8s_testbed: Testbed, real_node: dict, images, install, alice_servers) -> list[list[str]]:
    """What a pod in vision reached, round by round: [alice's server, MLflow's pod, MLflow's Service]."""
    tb = k8s_testbed
    server = tb.pod("labyard-nlp", "jupyter-alice--nlp")
    alice_ip, alice_port = server["status"]["podIP"], server["spec"]["containers"][0]["ports"][0]["containerPort"]
    mlflow = next(p for p in _pods(tb, NS) if p["metadata"]["name"].startswith("mlflow-"))
    targets = [(alice_ip, alice_port), (mlflow["status"]["podIP"], 5000), (f"mlflow.{NS}.svc.cluster.local", 5000)]
    tb.apply(_probe_pod(images["singleuser"], targets), "labyard-vision")
    done = wait_for(lambda: (p := tb.pod("labyard-vision", "bob-probe"))["status"].get("phase") in ("Succeeded", "Failed") and p,
                    300, "bob's probe pod to finish")
    out = tb.kubectl("logs", "-n", "labyard-vision", "bob-probe").stdout
    assert done["status"]["phase"] == "Succeeded" and done["spec"]["nodeName"] == real_node["name"], out
    rounds = [line.split()[2:] for line in out.splitlines() if line.startswith("round ")]
    assert len(rounds) == 15, out
    print("bob's probe:", out)
    return rounds


def test_a_pod_in_vision_cannot_reach_alice_server(install, alice_servers, bob_probe) -> None:
    assert all(r[0] == "closed" for r in bob_probe), bob_probe
    # the hub's side of the same network does reach her server (the policy, not the network, refuses bob)
    r = requests.get(f"{install['url']}/user/alice/nlp/api/status", headers=alice_servers.headers, timeout=60)
    assert r.status_code == 200, r.text[:300]


def test_a_pod_in_vision_cannot_reach_mlflow_directly(bob_probe) -> None:
    """MLflow's port admits the proxy, the hub and the readiness check only: project pods log
    through the proxy's /services/mlflow/ with their own token (docs/admin/mlflow.md)."""
    assert all(r[1:] == ["closed", "closed"] for r in bob_probe[-5:]), bob_probe


def _mlflow_run(url: str, user: requests.Session, tag: str, value: str, timeout: float = 180) -> dict:
    """The MLflow run tagged ``tag=value`` among those ``user`` sees, through the proxy's /services/mlflow."""
    api = f"{url}/services/mlflow/api/2.0/mlflow"

    def found() -> dict | None:
        exps = user.post(f"{api}/experiments/search", json={"max_results": 1000}, timeout=30)
        assert exps.status_code == 200, exps.text[:300]
        ids = [e["experiment_id"] for e in exps.json().get("experiments", [])]
        if not ids:
            return None
        runs = user.post(f"{api}/runs/search", json={"experiment_ids": ids, "filter": f"tags.`{tag}` = '{value}'"}, timeout=30)
        assert runs.status_code == 200, runs.text[:300]
        done = [r for r in runs.json().get("runs", []) if r["info"]["status"] != "RUNNING"]
        return done[0] if done else None

    return wait_for(found, timeout, f"the MLflow run with {tag}={value}")


def test_a_scheduled_notebook_runs_as_a_real_job_and_an_upgrade_keeps_db_schedule_and_auth_state(
        k8s_testbed: Testbed, real_node: dict, images, install, alice_servers) -> None:
    from tests.scheduler import notebooks

    tb, alice = k8s_testbed, alice_servers
    base = f"{install['url']}/services/labyard-scheduler/api"
    wait_for(lambda: alice.get(f"{base}/whoami", timeout=30).status_code == 200, 120, "the scheduler service")
    nb = notebooks.training()
    nightly = alice.post(f"{base}/schedules", json={"project": "nlp", "notebook": "train.ipynb", "notebook_content": nb,
                                                    "cron": "0 3 * * *", "parameters": {"epochs": 2}}, timeout=60)
    assert nightly.status_code == 201, nightly.text
    now = alice.post(f"{base}/schedules", json={"project": "nlp", "notebook": "train.ipynb", "notebook_content": nb,
                                                "parameters": {"epochs": 3}}, timeout=60)
    assert now.status_code == 201, now.text

    def finished() -> dict | None:
        runs = alice.get(f"{base}/schedules/{now.json()['id']}/runs", timeout=30).json()
        runs = runs.get("items", runs) if isinstance(runs, dict) else runs
        return next((r for r in runs if r["status"] in ("succeeded", "failed", "cancelled")), None)

    run = wait_for(finished, 400, "the run-now Job to finish")
    jobs = tb.api.get("/apis/batch/v1/namespaces/labyard-nlp/jobs",
                      labelSelector=f"labyard.dev/schedule={now.json()['id']}")["items"]
    pods = tb.api.get("/api/v1/namespaces/labyard-nlp/pods", labelSelector=f"job-name={jobs[0]['metadata']['name']}")["items"]
    assert run["status"] == "succeeded", (run, _diagnose(tb, "labyard-nlp"))
    assert pods and all(p["spec"]["nodeName"] == real_node["name"] for p in pods)
    assert pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    # the Job recorded its MLflow run through the proxy's /services/mlflow as alice
    recorded = _mlflow_run(install["url"], alice, "labyard.scheduled_run", run["id"])
    tags = {t["key"]: t["value"] for t in recorded["data"].get("tags", [])}
    assert recorded["info"]["status"] == "FINISHED", recorded["info"]
    assert tags["mlflow.user"] == "alice" and tags["labyard.project"] == "nlp", tags
    assert {p["key"]: p["value"] for p in recorded["data"].get("params", [])}.get("epochs") == "3"

    # helm upgrade to new images (a new tag of the same build, loaded into the node as a
    # registry pull would) with changed values
    new_tag = f"{images['hub'].rsplit(':', 1)[1]}-upgrade"
    for ref in images.values():
        subprocess.run(["podman", "tag", ref, f"{ref.rsplit(':', 1)[0]}:{new_tag}"], check=True)
        assert tb.load_image(f"{ref.rsplit(':', 1)[0]}:{new_tag}")
    secrets = tb.api.get(f"/api/v1/namespaces/{NS}/secrets/labyard-secrets")["data"]
    hub_before = {p["metadata"]["name"] for p in _pods(tb, NS) if p["metadata"]["name"].startswith("hub-")}
    t0 = time.monotonic()
    tb.helm("upgrade", "labyard", str(CHART), "--namespace", NS, "-f", str(install["values"]),
            "--set", f"image.tag={new_tag},singleuser.image.tag={new_tag},culler.timeout=7200",
            "--wait", "--timeout", "15m", timeout=1000)
    print(f"helm upgrade --wait: {time.monotonic() - t0:.0f} s")
    hub_after = {p["metadata"]["name"] for p in _pods(tb, NS) if p["metadata"]["name"].startswith("hub-")}
    assert hub_after and not hub_after & hub_before  # a new hub process read the kept database
    for d in tb.api.get(f"/apis/apps/v1/namespaces/{NS}/deployments")["items"]:
        images_now = {c["image"] for c in d["spec"]["template"]["spec"]["containers"]}
        assert all(i.endswith(f":{new_tag}") for i in images_now if "labyard/" in i), (d["metadata"]["name"], images_now)
    assert _available(tb) == dict.fromkeys(PLATFORM, True)
    # her running server survived the upgrade and answers through the new proxy
    t0 = time.monotonic()
    wait_for(lambda: requests.get(f"{install['url']}/user/alice/vision/api/status", headers=alice.headers,
                                  timeout=30).status_code == 200, 360, "alice's server through the proxy after the upgrade")
    print(f"alice's server answered {time.monotonic() - t0:.0f} s after the upgrade")
    assert tb.api.get(f"/api/v1/namespaces/{NS}/secrets/labyard-secrets")["data"] == secrets
    # the token alice got before the upgrade lives in the hub database
    wait_for(lambda: alice.get(f"{alice.base}/user", timeout=30).status_code == 200, 180, "the new hub")
    me = alice.get(f"{alice.base}/user", timeout=30).json()
    assert me["name"] == "alice" and "nlp" in me["servers"]
    # the scheduler still lists her schedule and still knows her projects (the hub decrypts her auth_state)
    wait_for(lambda: alice.get(f"{base}/whoami", timeout=30).status_code == 200, 180, "the scheduler after the upgrade")
    assert "nlp" in alice.get(f"{base}/whoami", timeout=30).json()["projects"]
    listed = alice.get(f"{base}/schedules", params={"project": "nlp"}, timeout=30)
    assert listed.status_code == 200, listed.text
    items = listed.json()
    items = items.get("items", items) if isinstance(items, dict) else items
    assert nightly.json()["id"] in {s["id"] for s in items}
