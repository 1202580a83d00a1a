"""The testbed's pod runner: a tiny kubelet for pods labelled ``labyard.dev/run-local: "true"``.

kwok only pretends to run pods. For opted-in pods, once the real scheduler has bound them to a
(simulated) node, this runner really runs the first container's command as a local process and
reports its life in the pod's status, as a kubelet would:

* IP: each pod gets its own loopback address from 127.10.0.0/16 (``status.podIP``; another
  /16 in 127.100-199 for a testbed with a non-default state dir); ``0.0.0.0``
  in the command, args and env values is rewritten to that address, because all pods share the
  host network namespace.
* Environment: ``env`` (values, ``$(VAR)`` expansion, ``fieldRef``, ``resourceFieldRef``,
  ``configMapKeyRef``, ``secretKeyRef``), ``envFrom``, ``HOSTNAME`` and ``KUBERNETES_SERVICE_*``
  pointing at the testbed API server; ``PATH`` starts with the repo venv's ``bin``.
* Identity: ``runAsUser``/``runAsGroup``/``supplementalGroups``/``fsGroup`` become the process's
  real uid, gid and groups (we are root); ``runAsNonRoot`` is enforced.
* Volumes: directories under the state dir (emptyDir per pod, PVC per bound PV, configMap /
  secret / downwardAPI / projected files written from the objects, hostPath as is), bind-mounted
  at each ``mountPath`` in a private mount namespace (see podexec.py); ``fsGroup`` chowns them.
* Lifecycle: Running (ready per readinessProbe, if any) while the process runs; Succeeded or
  Failed by its exit code, or a restart per ``restartPolicy``; deleting the pod sends SIGTERM
  to the process group and SIGKILL after the grace period, then removes the pod object.
* Output: stdout+stderr go to ``<state>/pods/<namespace>/<pod>_<uid>.log`` (annotation
  ``labyard.dev/log-file`` on the pod; ``<pod>.log`` links to the newest).

It also provisions PersistentVolumes for claims of the ``labyard-local`` StorageClass (a
directory per volume), so pods with PVCs schedule and bind as on a real cluster.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from .kubeapi import ApiError, KubeApi

RUN_LOCAL_LABEL = "labyard.dev/run-local"
LOG_ANNOTATION = "labyard.dev/log-file"
PROVISIONER = "labyard.dev/local"

log = logging.getLogger("labyard-runner")


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _quantity_to_number(q: str) -> float:
    """Parse a Kubernetes quantity (``500m``, ``2``, ``1Gi``, ``1e3``) into a number."""
    suffixes = {
        "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
        "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
    }
    q = str(q)
    for s in sorted(suffixes, key=len, reverse=True):
        if q.endswith(s):
            return float(q[: -len(s)]) * suffixes[s]
    return float(q)


class ConfigError(Exception):
    """The pod cannot start yet (kubelet: CreateContainerConfigError); retried."""


class Runner:
    def __init__(self, api: KubeApi, state_dir: str, config: dict[str, Any]):
        self.api = api
        self.state = state_dir
        self.config = config
        self.pods_dir = os.path.join(state_dir, "pods")
        self.vol_dir = os.path.join(state_dir, "volumes")
        self.workers: dict[str, PodWorker] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.pod_net = ipaddress.ip_network(config.get("pod_network", "127.10.0.0/16"))
        self._ip_next = 2
        self._ip_file = os.path.join(state_dir, "runner-ipam.json")
        if os.path.exists(self._ip_file):
            with open(self._ip_file) as f:
                self._ip_next = json.load(f)["next"]

    # ---- addresses -------------------------------------------------------------------------
    def allocate_ip(self) -> str:
        with self.lock:
            n = self._ip_next
            self._ip_next += 1
            if self._ip_next % 256 in (0, 255):
                self._ip_next += 2
            with open(self._ip_file, "w") as f:
                json.dump({"next": self._ip_next}, f)
        return str(self.pod_net.network_address + n)

    # ---- API helpers ---------------------------------------------------------------------
    def event(self, pod: dict, etype: str, reason: str, message: str) -> None:
        md = pod["metadata"]
        ts = dt.datetime.now(dt.timezone.utc)
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": md["name"] + ".", "namespace": md["namespace"]},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": md["name"],
                               "namespace": md["namespace"], "uid": md["uid"],
                               "fieldPath": "spec.containers{%s}" % pod["spec"]["containers"][0]["name"]},
            "reason": reason, "message": message, "type": etype,
            "source": {"component": "labyard-pod-runner", "host": pod["spec"].get("nodeName", "")},
            "firstTimestamp": ts.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "lastTimestamp": ts.strftime("%Y-%m-%dT%H:%M:%SZ"), "count": 1,
            "reportingComponent": "labyard-pod-runner",
        }
        try:
            self.api.post(f"/api/v1/namespaces/{md['namespace']}/events", body)
        except (ApiError, OSError) as e:
            log.warning("event %s for %s/%s: %s", reason, md["namespace"], md["name"], e)

    def delete_pod_now(self, pod: dict) -> None:
        """What a kubelet does once a deleted pod's containers are gone: grace period 0."""
        md = pod["metadata"]
        try:
            self.api.delete(
                f"/api/v1/namespaces/{md['namespace']}/pods/{md['name']}",
                {"gracePeriodSeconds": 0, "preconditions": {"uid": md["uid"]}},
            )
        except ApiError as e:
            if e.status not in (404, 409):
                log.warning("final delete of %s/%s: %s", md["namespace"], md["name"], e)

    # ---- pod watch --------------------------------------------------------------------------
    def handle(self, etype: str, pod: dict) -> None:
        md = pod["metadata"]
        uid = md["uid"]
        with self.lock:
            worker = self.workers.get(uid)
        if etype == "DELETED":
            if worker:
                worker.request_stop(0)
            return
        if not pod["spec"].get("nodeName"):
            return  # not scheduled yet: the real scheduler decides
        if pod["spec"]["nodeName"] not in self.config.get("kwok_nodes", [pod["spec"]["nodeName"]]):
            return  # on the real node: its kubelet runs it
        deleting = md.get("deletionTimestamp") is not None
        if worker is None:
            if deleting or pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                if deleting:
                    self.delete_pod_now(pod)
                return
            worker = PodWorker(self, pod)
            with self.lock:
                self.workers[uid] = worker
            worker.start()
        elif deleting:
            worker.request_stop(int(md.get("deletionGracePeriodSeconds") or 0))
            if worker.done.is_set():
                self.delete_pod_now(pod)

    def watch_pods(self) -> None:
        path = "/api/v1/pods"
        selector = f"{RUN_LOCAL_LABEL}=true"
        while not self.stopping.is_set():
            try:
                lst = self.api.get(path, labelSelector=selector)
                seen = set()
                for pod in lst.get("items", []):
                    seen.add(pod["metadata"]["uid"])
                    self.handle("ADDED", pod)
                with self.lock:
                    gone = [w for u, w in self.workers.items() if u not in seen]
                for w in gone:
                    w.request_stop(0)
                rv = lst["metadata"]["resourceVersion"]
                while not self.stopping.is_set():
                    expired = False
                    for ev in self.api.watch(path, rv, timeout_seconds=120, labelSelector=selector):
                        obj = ev.get("object", {})
                        if ev["type"] == "ERROR":
                            expired = True
                            break
                        rv = obj.get("metadata", {}).get("resourceVersion", rv)
                        if ev["type"] != "BOOKMARK":
                            self.handle(ev["type"], obj)
                    if expired:
                        break
            except (ApiError, OSError, http.client.HTTPException, ValueError) as e:
                if self.stopping.is_set():
                    return
                log.warning("pod watch: %s; listing again", e)
                time.sleep(1)

    # ---- PersistentVolume provisioning -------------------------------------------------------
    def local_classes(self) -> set[str]:
        classes = self.api.get("/apis/storage.k8s.io/v1/storageclasses")["items"]
        return {c["metadata"]["name"] for c in classes if c.get("provisioner") == PROVISIONER}

    def provision_once(self) -> None:
        classes = self.local_classes()
        for pvc in self.api.get("/api/v1/persistentvolumeclaims")["items"]:
            spec, md = pvc["spec"], pvc["metadata"]
            if spec.get("volumeName") or spec.get("storageClassName") not in classes:
                continue
            if md.get("deletionTimestamp"):
                continue
            name = "pvc-" + md["uid"]
            path = os.path.join(self.vol_dir, "pv", name)
            os.makedirs(path, exist_ok=True)
            os.chmod(path, 0o777)  # as local-path-provisioner does; fsGroup narrows it per pod
            pv = {
                "apiVersion": "v1", "kind": "PersistentVolume",
                "metadata": {"name": name, "annotations": {
                    "pv.kubernetes.io/provisioned-by": PROVISIONER,
                    "labyard.dev/claim": f"{md['namespace']}/{md['name']}"}},
                "spec": {
                    "capacity": {"storage": spec.get("resources", {}).get("requests", {}).get("storage", "1Gi")},
                    "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
                    "persistentVolumeReclaimPolicy": "Delete",
                    "storageClassName": spec["storageClassName"],
                    "volumeMode": spec.get("volumeMode", "Filesystem"),
                    "hostPath": {"path": path, "type": "Directory"},
                    "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                                 "namespace": md["namespace"], "name": md["name"], "uid": md["uid"]},
                },
            }
            try:
                self.api.post("/api/v1/persistentvolumes", pv)
                log.info("provisioned %s for %s/%s", name, md["namespace"], md["name"])
            except ApiError as e:
                if e.status != 409:
                    raise
        for pv in self.api.get("/api/v1/persistentvolumes")["items"]:
            ann = pv["metadata"].get("annotations", {})
            if ann.get("pv.kubernetes.io/provisioned-by") != PROVISIONER:
                continue
            if pv.get("status", {}).get("phase") == "Released" and \
                    pv["spec"].get("persistentVolumeReclaimPolicy") == "Delete":
                shutil.rmtree(pv["spec"]["hostPath"]["path"], ignore_errors=True)
                try:
                    self.api.delete(f"/api/v1/persistentvolumes/{pv['metadata']['name']}")
                except ApiError as e:
                    if e.status != 404:
                        raise

    def provision_loop(self) -> None:
        while not self.stopping.wait(1.0):
            try:
                self.provision_once()
            except (ApiError, OSError, http.client.HTTPException, ValueError) as e:
                log.warning("provisioner: %s", e)

    # ---- `kubectl logs`: the one kubelet endpoint we serve -------------------------------------
    def log_file_for(self, ns: str, pod: str) -> str | None:
        link = os.path.join(self.pods_dir, ns, pod + ".log")
        return link if os.path.exists(link) else None

    def worker_for(self, ns: str, pod: str) -> PodWorker | None:
        with self.lock:
            for w in self.workers.values():
                if w.ns == ns and w.name == pod and not w.done.is_set():
                    return w
        return None

    def serve_logs(self) -> None:
        """HTTPS on the nodes' kubelet port: GET /containerLogs/<ns>/<pod>/<container>.

        The API server proxies ``kubectl logs`` here (nodes report 127.0.0.1 and this port).
        Pods that kwok simulates have no output: their logs are empty.
        """
        import http.server
        import ssl
        import urllib.parse

        runner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):  # quiet: the runner log is for pods
                pass

            def do_GET(self):  # noqa: N802 - http.server's naming
                url = urllib.parse.urlsplit(self.path)
                parts = url.path.strip("/").split("/")
                if len(parts) != 4 or parts[0] != "containerLogs":
                    self.send_error(404, "only /containerLogs/<namespace>/<pod>/<container> is served")
                    return
                _, ns, pod, _container = parts
                q = urllib.parse.parse_qs(url.query)
                follow = q.get("follow", ["false"])[0] == "true"
                tail = int(q["tailLines"][0]) if "tailLines" in q else None
                path = runner.log_file_for(ns, pod)
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()

                def chunk(data: bytes) -> None:
                    if data:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                        self.wfile.flush()

                try:
                    if path:
                        with open(path, "rb") as f:
                            data = f.read()
                            if tail is not None:
                                data = b"".join(data.splitlines(keepends=True)[-tail:]) if tail else b""
                            chunk(data)
                            while follow:
                                more = f.read()
                                if more:
                                    chunk(more)
                                    continue
                                if runner.worker_for(ns, pod) is None or runner.stopping.is_set():
                                    break
                                time.sleep(0.2)
                    self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass

        pki = os.path.join(self.state, "pki")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(os.path.join(pki, "kubelet.crt"), os.path.join(pki, "kubelet.key"))
        ctx.load_verify_locations(os.path.join(pki, "ca.crt"))
        ctx.verify_mode = ssl.CERT_REQUIRED  # only the API server (testbed CA client cert) may ask
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", self.config["kubelet_port"]), Handler)
        srv.daemon_threads = True
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
        srv.serve_forever()

    # ---- main ----------------------------------------------------------------------------------
    def run(self) -> None:
        os.makedirs(self.pods_dir, exist_ok=True)

        def on_term(signum, frame):
            self.stopping.set()
            raise SystemExit(0)

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        threading.Thread(target=self.provision_loop, daemon=True, name="provisioner").start()
        if self.config.get("kubelet_port"):
            threading.Thread(target=self.serve_logs, daemon=True, name="logs").start()
        try:
            self.watch_pods()
        finally:
            self.stopping.set()
            with self.lock:
                workers = list(self.workers.values())
            # Stopping the runner stops its pods: SIGTERM, SIGKILL after 3 s, and reap them.
            procs = [w.proc for w in workers if w.proc and w.proc.poll() is None]
            for p in procs:
                _killpg(p.pid, signal.SIGTERM)
            deadline = time.monotonic() + 3
            for p in procs:
                try:
                    p.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            for w in workers:
                w.kill_now()
            for p in procs:
                p.wait()


class PodWorker(threading.Thread):
    """Runs one pod: prepare, run the container (restarting per policy), report, clean up."""

    def __init__(self, runner: Runner, pod: dict):
        super().__init__(daemon=True, name="pod-" + pod["metadata"]["name"])
        self.r = runner
        self.api = runner.api
        self.pod = pod
        md = pod["metadata"]
        self.ns, self.name, self.uid = md["namespace"], md["name"], md["uid"]
        self.pod_path = f"/api/v1/namespaces/{self.ns}/pods/{self.name}"
        self.dir = os.path.join(runner.pods_dir, self.ns, f"{self.name}_{self.uid}")
        self.log_file = os.path.join(runner.pods_dir, self.ns, f"{self.name}_{self.uid}.log")
        self.stop_event = threading.Event()
        self.grace = 30
        self.done = threading.Event()
        self.proc: subprocess.Popen | None = None
        self.ip = ""
        self.host_ip = "127.0.0.1"
        self.ready = False
        self.restarts = 0
        self.started_at = ""
        self.start_time = now()

    # ---- control from the watch thread ----
    def request_stop(self, grace: int) -> None:
        self.grace = grace
        self.stop_event.set()

    def kill_now(self) -> None:
        self.grace = 0
        self.stop_event.set()
        proc = self.proc
        if proc:
            _killpg(proc.pid, signal.SIGKILL)  # the whole group: children may outlive the leader

    # ---- the container ----
    @property
    def container(self) -> dict:
        return self.pod["spec"]["containers"][0]

    def run(self) -> None:
        try:
            self._run()
        except Exception:  # noqa: BLE001 - a worker must report, never die silently
            log.exception("pod %s/%s", self.ns, self.name)
            try:
                self.patch_status(self._terminal_status(1, "RunnerError", "pod runner failed; see runner.log"))
            except Exception:  # noqa: BLE001
                pass
        finally:
            self.done.set()
            if self.stop_event.is_set():
                self.r.delete_pod_now(self.pod)
            with self.r.lock:
                if self.r.workers.get(self.uid) is self:
                    # Keep finished workers so MODIFIED events do not start them again.
                    pass

    def _run(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        self.ip = "127.0.0.1" if self.pod["spec"].get("hostNetwork") else self.r.allocate_ip()
        self.host_ip = self._node_ip()
        self.api.patch(self.pod_path, {"metadata": {"annotations": {LOG_ANNOTATION: self.log_file}}})
        link = os.path.join(os.path.dirname(self.log_file), self.name + ".log")
        try:
            os.unlink(link)
        except FileNotFoundError:
            pass
        os.symlink(os.path.basename(self.log_file), link)
        # Prepare until it works (missing ConfigMap/Secret/PVC binding), as a kubelet retries.
        while True:
            if self.stop_event.is_set():
                return
            try:
                prepared = self._prepare()
                spec = self._spec_for(prepared, self.container)
                inits = [self._spec_for(prepared, c) for c in self.pod["spec"].get("initContainers") or []]
                break
            except ConfigError as e:
                self.patch_status(self._waiting_status("CreateContainerConfigError", str(e)))
                self.r.event(self.pod, "Warning", "Failed", f"Error: {e}")
                if self.stop_event.wait(2):
                    return
        for init, ispec in zip(self.pod["spec"].get("initContainers") or [], inits):
            code = self._run_process(ispec, init["name"])
            if self.stop_event.is_set():
                return
            if code != 0:
                self.patch_status(self._terminal_status(code, "Error", f"init container {init['name']} failed"))
                return
        policy = self.pod["spec"].get("restartPolicy", "Always")
        backoff = 1.0
        while True:
            self.started_at = now()
            code = self._run_process(spec, self.container["name"], main=True)
            if self.stop_event.is_set():
                self.patch_status(self._terminal_status(code, "Error" if code else "Completed", "", deleting=True))
                return
            if policy == "Always" or (policy == "OnFailure" and code != 0):
                self.restarts += 1
                self.patch_status(self._waiting_status(
                    "CrashLoopBackOff", f"back-off {backoff:.0f}s restarting failed container",
                    last_exit=code))
                if self.stop_event.wait(backoff):
                    return
                backoff = min(backoff * 2, 10.0)
                continue
            self.patch_status(self._terminal_status(code, "Completed" if code == 0 else "Error", ""))
            return

    def _node_ip(self) -> str:
        try:
            node = self.api.get(f"/api/v1/nodes/{self.pod['spec']['nodeName']}")
            for a in node.get("status", {}).get("addresses", []):
                if a["type"] == "InternalIP":
                    return a["address"]
        except ApiError:
            pass
        return "127.0.0.1"

    # ---- preparing environment and volumes ----
    def _field(self, path: str) -> str:
        md, spec = self.pod["metadata"], self.pod["spec"]
        m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if m:
            return str(md.get(m.group(1), {}).get(m.group(2), ""))
        simple = {
            "metadata.name": md["name"], "metadata.namespace": md["namespace"],
            "metadata.uid": md["uid"], "spec.nodeName": spec.get("nodeName", ""),
            "spec.serviceAccountName": spec.get("serviceAccountName", ""),
            "status.podIP": self.ip, "status.podIPs": self.ip,
            "status.hostIP": self.host_ip, "status.hostIPs": self.host_ip,
        }
        if path in simple:
            return simple[path]
        if path in ("metadata.labels", "metadata.annotations"):
            d = md.get(path.split(".")[1], {})
            return "\n".join(f'{k}="{v}"' for k, v in sorted(d.items()))
        raise ConfigError(f"unsupported fieldRef {path}")

    def _resource_field(self, c: dict, ref: dict) -> str:
        res = ref["resource"]
        kind, _, name = res.partition(".")
        val = c.get("resources", {}).get(kind, {}).get(name)
        if val is None:
            val = {"cpu": "16", "memory": str(64 * 2**30)}.get(name, "0")  # node allocatable
        n = _quantity_to_number(val) / _quantity_to_number(ref.get("divisor", "1"))
        return str(int(-(-n // 1)))  # ceil, as the kubelet does

    def _get_obj(self, kind: str, name: str, optional: bool) -> dict | None:
        try:
            return self.api.get(f"/api/v1/namespaces/{self.ns}/{kind}/{name}")
        except ApiError as e:
            if e.status == 404:
                if optional:
                    return None
                raise ConfigError(f'{kind[:-1]} "{name}" not found') from e
            raise

    @staticmethod
    def _obj_data(obj: dict | None, secret: bool) -> dict[str, bytes]:
        if not obj:
            return {}
        out = {}
        for k, v in (obj.get("data") or {}).items():
            out[k] = base64.b64decode(v) if secret else v.encode()
        for k, v in (obj.get("binaryData") or {}).items():
            out[k] = base64.b64decode(v)
        return out

    def _env(self, c: dict) -> dict[str, str]:
        env: dict[str, str] = {}
        for src in c.get("envFrom") or []:
            prefix = src.get("prefix", "")
            if "configMapRef" in src:
                ref = src["configMapRef"]
                data = self._obj_data(self._get_obj("configmaps", ref["name"], ref.get("optional", False)), False)
            else:
                ref = src["secretRef"]
                data = self._obj_data(self._get_obj("secrets", ref["name"], ref.get("optional", False)), True)
            for k, v in data.items():
                env[prefix + k] = v.decode(errors="replace")
        for e in c.get("env") or []:
            name = e["name"]
            if "valueFrom" not in e:
                env[name] = _expand(e.get("value", ""), env)
                continue
            vf = e["valueFrom"]
            if "fieldRef" in vf:
                env[name] = self._field(vf["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in vf:
                env[name] = self._resource_field(c, vf["resourceFieldRef"])
            elif "configMapKeyRef" in vf or "secretKeyRef" in vf:
                secret = "secretKeyRef" in vf
                ref = vf["secretKeyRef" if secret else "configMapKeyRef"]
                obj = self._get_obj("secrets" if secret else "configmaps", ref["name"], ref.get("optional", False))
                data = self._obj_data(obj, secret)
                if ref["key"] in data:
                    env[name] = data[ref["key"]].decode(errors="replace")
                elif not ref.get("optional", False):
                    raise ConfigError(f'couldn\'t find key {ref["key"]} in {"Secret" if secret else "ConfigMap"} {self.ns}/{ref["name"]}')
        return env

    def _write_files(self, target: str, files: dict[str, bytes], items: list | None,
                     default_mode: int, gid: int | None) -> None:
        os.makedirs(target, exist_ok=True)
        chosen: list[tuple[str, bytes, int]] = []
        if items:
            for it in items:
                if it["key"] in files:
                    chosen.append((it["path"], files[it["key"]], it.get("mode", default_mode)))
        else:
            chosen = [(k, v, default_mode) for k, v in files.items()]
        for rel, data, mode in chosen:
            p = os.path.join(target, rel)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "wb") as f:
                f.write(data)
            os.chmod(p, mode)
            if gid is not None:
                os.chown(p, 0, gid)

    def _sa_token(self, src: dict) -> bytes:
        sa = self.pod["spec"].get("serviceAccountName") or "default"
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {
            "audiences": [src["audience"]] if src.get("audience") else None,
            "expirationSeconds": src.get("expirationSeconds", 3607),
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.name, "uid": self.uid}}}
        try:
            tr = self.api.post(f"/api/v1/namespaces/{self.ns}/serviceaccounts/{sa}/token", body)
        except ApiError as e:
            raise ConfigError(f"service account token: {e}") from e
        return tr["status"]["token"].encode()

    def _volume_source(self, vol: dict, fs_group: int | None) -> str:
        """Make the volume's directory (or file tree) and return its host path."""
        name = vol["name"]
        vdir = os.path.join(self.dir, "volumes", name)
        if "emptyDir" in vol:
            os.makedirs(vdir, exist_ok=True)
            os.chmod(vdir, 0o777)
            return vdir
        if "hostPath" in vol:
            hp = vol["hostPath"]
            if hp.get("type") in ("DirectoryOrCreate",) and not os.path.exists(hp["path"]):
                os.makedirs(hp["path"], mode=0o755)
            if not os.path.exists(hp["path"]):
                raise ConfigError(f"hostPath {hp['path']} does not exist")
            return hp["path"]
        if "persistentVolumeClaim" in vol:
            claim = vol["persistentVolumeClaim"]["claimName"]
            pvc = self._get_obj("persistentvolumeclaims", claim, False)
            pv_name = pvc["spec"].get("volumeName")
            if not pv_name or pvc.get("status", {}).get("phase") != "Bound":
                raise ConfigError(f'persistentvolumeclaim "{claim}" is not bound')
            pv = self.api.get(f"/api/v1/persistentvolumes/{pv_name}")
            src = pv["spec"].get("hostPath") or pv["spec"].get("local")
            if not src:
                # Any other PV type (nfs, csi, ...): a directory per claim under the state dir.
                path = os.path.join(self.r.vol_dir, "claims", self.ns, claim)
                os.makedirs(path, exist_ok=True)
                os.chmod(path, 0o777)
                return path
            os.makedirs(src["path"], exist_ok=True)
            return src["path"]
        gid = fs_group
        if "configMap" in vol or "secret" in vol:
            secret = "secret" in vol
            ref = vol["secret" if secret else "configMap"]
            obj = self._get_obj("secrets" if secret else "configmaps",
                                ref["secretName" if secret else "name"], ref.get("optional", False))
            shutil.rmtree(vdir, ignore_errors=True)
            self._write_files(vdir, self._obj_data(obj, secret), ref.get("items"),
                              ref.get("defaultMode", 0o644), gid)
            return vdir
        if "downwardAPI" in vol:
            files = {it["path"]: self._field(it["fieldRef"]["fieldPath"]).encode()
                     for it in vol["downwardAPI"].get("items", []) if "fieldRef" in it}
            self._write_files(vdir, files, None, vol["downwardAPI"].get("defaultMode", 0o644), gid)
            return vdir
        if "projected" in vol:
            shutil.rmtree(vdir, ignore_errors=True)
            mode = vol["projected"].get("defaultMode", 0o644)
            for s in vol["projected"].get("sources") or []:
                if "serviceAccountToken" in s:
                    sat = s["serviceAccountToken"]
                    self._write_files(vdir, {sat["path"]: self._sa_token(sat)}, None, mode, gid)
                elif "configMap" in s or "secret" in s:
                    secret = "secret" in s
                    ref = s["secret" if secret else "configMap"]
                    obj = self._get_obj("secrets" if secret else "configmaps", ref["name"], ref.get("optional", False))
                    self._write_files(vdir, self._obj_data(obj, secret), ref.get("items"), mode, gid)
                elif "downwardAPI" in s:
                    files = {it["path"]: self._field(it["fieldRef"]["fieldPath"]).encode()
                             for it in s["downwardAPI"].get("items", []) if "fieldRef" in it}
                    self._write_files(vdir, files, None, mode, gid)
            os.makedirs(vdir, exist_ok=True)
            return vdir
        # nfs, csi, ephemeral, ...: an empty directory per pod, noted in the runner log.
        log.info("pod %s/%s volume %s: unsupported type, using an empty directory", self.ns, self.name, name)
        os.makedirs(vdir, exist_ok=True)
        os.chmod(vdir, 0o777)
        return vdir

    @staticmethod
    def _apply_fs_group(path: str, gid: int, policy: str) -> None:
        """Give the volume to fsGroup: group-owned, group-writable, setgid directories."""
        st = os.stat(path)
        if policy == "OnRootMismatch" and st.st_gid == gid and (st.st_mode & 0o2070) == 0o2070:
            return
        for root, dirs, files in os.walk(path):
            for p in [root] + [os.path.join(root, f) for f in files]:
                if os.path.islink(p):
                    continue
                s = os.lstat(p)
                os.chown(p, s.st_uid, gid)
                if os.path.isdir(p):
                    os.chmod(p, (s.st_mode & 0o7777) | 0o2070)
                else:
                    os.chmod(p, (s.st_mode & 0o7777) | 0o060 | (0o010 if s.st_mode & 0o100 else 0))

    def _prepare(self) -> dict:
        """Everything except the argv: env, mounts, identity. Raises ConfigError to retry."""
        spec = self.pod["spec"]
        psc = spec.get("securityContext") or {}
        fs_group = psc.get("fsGroup")
        sources: dict[str, str] = {}
        for vol in spec.get("volumes") or []:
            src = self._volume_source(vol, fs_group)
            if fs_group is not None and ("emptyDir" in vol or "persistentVolumeClaim" in vol):
                self._apply_fs_group(src, fs_group, psc.get("fsGroupChangePolicy", "Always"))
            sources[vol["name"]] = src
        return {"sources": sources}

    def _spec_for(self, prepared: dict, c: dict) -> dict:
        spec = self.pod["spec"]
        psc = spec.get("securityContext") or {}
        csc = c.get("securityContext") or {}
        uid = csc.get("runAsUser", psc.get("runAsUser"))
        gid = csc.get("runAsGroup", psc.get("runAsGroup"))
        if os.geteuid() != 0:
            uid, gid = os.geteuid(), os.getegid()  # cannot switch identity: run as ourselves
        uid = 0 if uid is None else int(uid)
        gid = 0 if gid is None else int(gid)
        if csc.get("runAsNonRoot", psc.get("runAsNonRoot")) and uid == 0:
            raise ConfigError("container has runAsNonRoot and image will run as root")
        groups = [int(g) for g in psc.get("supplementalGroups") or []]
        if psc.get("fsGroup") is not None:
            groups.append(int(psc["fsGroup"]))
        groups = sorted(set(groups + [gid]))
        mounts = []
        for m in c.get("volumeMounts") or []:
            src = prepared["sources"].get(m["name"])
            if src is None:
                raise ConfigError(f"volumeMount {m['name']} has no volume")
            if m.get("subPath"):
                src = os.path.join(src, m["subPath"])
                if not os.path.exists(src):
                    os.makedirs(src, exist_ok=True)
            mounts.append([src, m["mountPath"], bool(m.get("readOnly"))])
        env = {
            "PATH": ":".join(self.r.config["path_prefix"] + [
                "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]),
            "HOSTNAME": self.name,
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(self.r.config["apiserver_port"]),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(self.r.config["apiserver_port"]),
            "KUBERNETES_PORT": f"tcp://127.0.0.1:{self.r.config['apiserver_port']}",
        }
        pod_env = self._env(c)
        if "PATH" in pod_env:
            pod_env["PATH"] = ":".join(self.r.config["path_prefix"] + [pod_env["PATH"]])
        env.update(pod_env)
        env = {k: v.replace("0.0.0.0", self.ip) for k, v in env.items()}
        argv = [_expand(a, env).replace("0.0.0.0", self.ip)
                for a in (c.get("command") or []) + (c.get("args") or [])]
        if not argv:
            raise ConfigError("the pod runner needs a command or args (it cannot read an image's entrypoint)")
        env.setdefault("HOME", c.get("workingDir") or "/")
        return {
            "uid": uid, "gid": gid, "groups": groups, "mounts": mounts, "argv": argv, "env": env,
            "cwd": c.get("workingDir") or "/",
            "expose": self.r.config.get("expose", []),
            "no_new_privs": csc.get("allowPrivilegeEscalation") is False,
        }

    def _run_process(self, spec: dict, cname: str, main: bool = False) -> int:
        """Run one container process to its end (or until the pod is deleted); return its code."""
        # Mount points that podexec will create on the host (empty directories): removed again
        # when the process ends, unless another pod still uses them.
        new_dirs = []
        for _src, dst, _ro in spec["mounts"]:
            d = dst
            while d not in ("/", "") and not os.path.lexists(d):
                new_dirs.append(d)
                d = os.path.dirname(d)
        spec_file = os.path.join(self.dir, f"{cname}.json")
        with open(spec_file, "w") as f:
            json.dump(spec, f)
        os.chmod(spec_file, 0o600)
        helper = os.path.join(os.path.dirname(os.path.abspath(__file__)), "podexec.py")
        argv = [sys.executable, "-I", helper, spec_file]
        if os.geteuid() == 0:
            argv = ["unshare", "--mount", "--propagation", "private"] + argv
        logf = open(self.log_file, "ab")
        try:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                start_new_session=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            )
        finally:
            logf.close()
        proc = self.proc
        with open(os.path.join(self.dir, "pid"), "w") as f:
            f.write(f"{proc.pid} {_start_time(proc.pid)}\n")
        if main:
            self.r.event(self.pod, "Normal", "Started", f"Started container {cname} (pid {proc.pid})")
            self.ready = self._probe() if self.container.get("readinessProbe") else True
            self.patch_status(self._running_status())
            threading.Thread(target=self._readiness_loop, args=(proc,), daemon=True).start()
        while True:
            if self.stop_event.wait(0.2):
                break
            if proc.poll() is not None:
                _remove_empty_dirs(new_dirs)
                return _exit_code(proc.returncode)
        # Deleted: SIGTERM to the process group, SIGKILL after the grace period.
        if proc.poll() is None:
            self.r.event(self.pod, "Normal", "Killing", f"Stopping container {cname}")
            _killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=max(self.grace, 0) or 0.001)
            except subprocess.TimeoutExpired:
                pass
        _killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        _remove_empty_dirs(new_dirs)
        return _exit_code(proc.returncode)

    # ---- readiness ----
    def _probe(self) -> bool:
        probe = self.container.get("readinessProbe") or {}
        try:
            if "httpGet" in probe:
                hg = probe["httpGet"]
                conn = http.client.HTTPConnection(self.ip, _port(hg["port"], self.container), timeout=1)
                conn.request("GET", hg.get("path", "/"))
                ok = 200 <= conn.getresponse().status < 400
                conn.close()
                return ok
            if "tcpSocket" in probe:
                with socket.create_connection((self.ip, _port(probe["tcpSocket"]["port"], self.container)), 1):
                    return True
        except OSError:
            return False
        return True  # exec and grpc probes: not run, taken as ready

    def _readiness_loop(self, proc: subprocess.Popen) -> None:
        probe = self.container.get("readinessProbe")
        if not probe:
            return
        period = probe.get("periodSeconds", 10)
        # Faster than a kubelet's default until the first success, so tests do not wait 10 s.
        interval = 0.5
        while proc.poll() is None and not self.stop_event.is_set():
            ok = self._probe()
            if ok != self.ready:
                self.ready = ok
                if proc.poll() is None:
                    self.patch_status(self._running_status())
            if ok:
                interval = period
            if self.stop_event.wait(interval):
                return

    # ---- status documents ----
    def _base_status(self) -> dict:
        return {
            "hostIP": self.host_ip, "hostIPs": [{"ip": self.host_ip}],
            "podIP": self.ip, "podIPs": [{"ip": self.ip}],
            "startTime": self.start_time,
        }

    def _conditions(self, ready: bool, reason: str | None = None) -> list[dict]:
        t = now()
        conds = [
            {"type": "PodReadyToStartContainers", "status": "True", "lastTransitionTime": t},
            {"type": "Initialized", "status": "True", "lastTransitionTime": t},
        ]
        for ctype in ("ContainersReady", "Ready"):
            c = {"type": ctype, "status": "True" if ready else "False", "lastTransitionTime": t}
            if not ready and reason:
                c["reason"] = reason
            conds.append(c)
        return conds

    def _other_containers(self) -> list[dict]:
        # Containers after the first are not run; they are reported running so the pod can be ready.
        return [{"name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": True,
                 "started": True, "restartCount": 0,
                 "state": {"running": {"startedAt": self.start_time}}}
                for c in self.pod["spec"]["containers"][1:]]

    def _cstatus(self, state: dict, ready: bool, last: dict | None = None) -> list[dict]:
        c = self.container
        cs = {"name": c["name"], "image": c.get("image", ""), "imageID": "",
              "containerID": f"labyard://{self.proc.pid if self.proc else 0}",
              "ready": ready, "started": "running" in state, "restartCount": self.restarts,
              "state": state}
        if last:
            cs["lastState"] = last
        return [cs] + self._other_containers()

    def _running_status(self) -> dict:
        st = self._base_status()
        st.update(phase="Running", conditions=self._conditions(self.ready, None if self.ready else "ContainersNotReady"),
                  containerStatuses=self._cstatus({"running": {"startedAt": self.started_at}}, self.ready))
        return st

    def _waiting_status(self, reason: str, message: str, last_exit: int | None = None) -> dict:
        st = self._base_status()
        last = None
        if last_exit is not None:
            last = {"terminated": {"exitCode": last_exit, "reason": "Error" if last_exit else "Completed",
                                   "startedAt": self.started_at, "finishedAt": now()}}
        st.update(phase="Running" if self.restarts else "Pending",
                  conditions=self._conditions(False, "ContainersNotReady"),
                  containerStatuses=self._cstatus({"waiting": {"reason": reason, "message": message}}, False, last))
        return st

    def _terminal_status(self, code: int, reason: str, message: str, deleting: bool = False) -> dict:
        st = self._base_status()
        term = {"exitCode": code, "reason": reason, "startedAt": self.started_at or now(), "finishedAt": now()}
        if message:
            term["message"] = message
        phase = "Succeeded" if code == 0 else "Failed"
        st.update(phase=phase, conditions=self._conditions(False, "PodCompleted" if code == 0 else "PodFailed"),
                  containerStatuses=self._cstatus({"terminated": term}, False))
        if deleting and self.pod["spec"].get("restartPolicy", "Always") == "Always":
            st["phase"] = "Failed" if code else "Succeeded"
        return st

    def patch_status(self, status: dict) -> None:
        try:
            self.api.patch(self.pod_path + "/status", {"status": status})
        except ApiError as e:
            if e.status not in (404, 409):
                log.warning("status of %s/%s: %s", self.ns, self.name, e)


def _expand(s: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion; ``$$(VAR)`` escapes; unknown references stay."""
    def rep(m: re.Match) -> str:
        if m.group(0).startswith("$$"):
            return m.group(0)[1:]
        return env.get(m.group(1), m.group(0))
    return re.sub(r"\$?\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", rep, s)


def _port(port: Any, container: dict) -> int:
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    raise OSError(f"no port named {port}")


def _remove_empty_dirs(dirs: list[str]) -> None:
    for d in sorted(set(dirs), key=lambda p: p.count("/"), reverse=True):
        try:
            if os.path.isdir(d) and not os.path.islink(d):
                os.rmdir(d)
            elif os.path.isfile(d) and os.path.getsize(d) == 0:
                os.unlink(d)
        except OSError:
            pass


def _exit_code(rc: int) -> int:
    return 128 - rc if rc < 0 else rc


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _start_time(pid: int) -> str:
    """Field 22 of /proc/PID/stat: tells a live pid from a reused one."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except OSError:
        return "0"
