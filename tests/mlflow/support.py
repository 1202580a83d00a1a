"""A real ``mlflow server`` that tests can stop and start again on the same port and store,
and a real IPython kernel started the way the platform starts it (jupyter_client, platform env)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

from labyard_hub.slapd import free_port


class MlflowServer:
    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 600) -> MlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(
            [mlflow, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}", "--artifacts-destination", str(self.root / "artifacts")],
            # as `labyard up` runs it: without MLflow's job runner, seven more processes that import
            # MLflow at every start and write to the same sqlite file (on a loaded machine they
            # held the server's writes for minutes after each restart)
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited:\n{(self.root / 'server.log').read_text()[-3000:]}")
            try:
                if requests.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"mlflow server not up in {timeout}s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    # REST helpers (the real API, as a user or the Runs panel would see it)
    def api(self, method: str, path: str, **kw) -> dict:
        r = requests.request(method, f"{self.url}/api/2.0/mlflow/{path}", timeout=120, **kw)
        r.raise_for_status()
        return r.json()

    def experiment(self, name: str) -> dict | None:
        r = requests.get(f"{self.url}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": name}, timeout=120)
        return r.json()["experiment"] if r.status_code == 200 else None

    def runs(self, experiment_id: str) -> list[dict]:
        return self.api("POST", "runs/search", json={"experiment_ids": [experiment_id], "max_results": 1000}).get("runs", [])

    def artifacts(self, run_id: str, path: str = "") -> list[str]:
        body = self.api("GET", "artifacts/list", params={"run_id": run_id, "path": path})
        out = []
        for f in body.get("files", []):
            out += self.artifacts(run_id, f["path"]) if f["is_dir"] else [f["path"]]
        return out

    def metric_history(self, run_id: str, key: str) -> list[dict]:
        return self.api("GET", "metrics/get-history", params={"run_id": run_id, "metric_key": key, "max_results": 25000}).get("metrics", [])


def wait_for(predicate, timeout: float = 60, interval: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"{what} not met in {timeout}s (last: {last!r})")


def tags_of(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def platform_env(*, project_dir: Path, home: Path, notebook: Path | None, mlflow_url: str, project: str = "vision",
                 user: str = "alice") -> dict[str, str]:
    """The environment a Labyard spawner gives a server (and jupyter_server passes to kernels)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LABYARD_", "JPY_", "JUPYTER"))}
    env.update({
        "LABYARD_PROJECT": project, "LABYARD_FLAVOR": "cpu", "LABYARD_PROJECT_DIR": str(project_dir),
        "JUPYTERHUB_USER": user, "HOME": str(home), "MLFLOW_TRACKING_URI": mlflow_url,
    })
    if notebook is not None:
        env["JPY_SESSION_NAME"] = str(notebook)
    return env


class Kernel:
    """A real ipykernel from this venv, started by jupyter_client like jupyter_server does."""

    def __init__(self, env: dict[str, str], cwd: Path):
        from jupyter_client import KernelManager

        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(env=env, cwd=str(cwd))
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=300)

    def run(self, code: str, timeout: float = 120) -> dict:
        """Execute a cell; return its outputs by kind and the wall time."""
        outputs = {"stdout": "", "stderr": "", "error": None, "data": []}

        def hook(msg):
            t = msg["msg_type"]
            if t == "stream":
                outputs[msg["content"]["name"]] += msg["content"]["text"]
            elif t == "error":
                outputs["error"] = "\n".join(msg["content"]["traceback"])
            elif t in ("execute_result", "display_data"):
                outputs["data"].append(msg["content"]["data"])

        t0 = time.monotonic()
        reply = self.kc.execute_interactive(code, output_hook=hook, timeout=timeout)
        outputs["seconds"] = time.monotonic() - t0
        outputs["status"] = reply["content"]["status"]
        return outputs

    def value(self, expr: str):
        out = self.run(f"print(repr({expr}))")
        assert out["status"] == "ok", out
        import ast

        return ast.literal_eval(out["stdout"].strip())

    def shutdown(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=False)


class Gate:
    """A real HTTP proxy on loopback in front of an ``mlflow server``, a stand-in for the
    platform's authorizing gate. It answers 401 unless the request carries
    ``Authorization: Bearer <token>`` (what the MLflow client sends from
    ``MLFLOW_TRACKING_TOKEN``) with the token currently valid, to show that a queue waits out an
    expired token. With ``token=None`` every request passes.

    ``unanswered_batches_over = N``: a ``log-batch`` of more than N entities is passed to the
    server, which stores it, and the connection is then closed without an answer: what the
    client sees of a server too busy to answer within its timeout (``unanswered`` counts them)."""

    def __init__(self, upstream: str, token: str | None = "valid-1"):
        import http.server
        import json
        import threading

        gate = self
        self.upstream = upstream
        self.token = token
        self.refused = 0
        self.unanswered_batches_over: int | None = None
        self.unanswered = 0
        self.batches: list[int] = []  # entities of every log-batch that reached the gate

        class Handler(http.server.BaseHTTPRequestHandler):
            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if gate.token is not None and self.headers.get("Authorization") != f"Bearer {gate.token}":
                    gate.refused += 1
                    data = b'{"error_code": "UNAUTHENTICATED", "message": "token expired"}'
                    self.send_response(401)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                r = requests.request(self.command, gate.upstream + self.path, data=body or None, timeout=60,
                                     headers={k: v for k, v in self.headers.items() if k.lower() in ("content-type",)})
                if self.path.endswith("/runs/log-batch"):
                    sent = json.loads(body)
                    gate.batches.append(sum(len(sent.get(k, [])) for k in ("metrics", "params", "tags")))
                    if gate.unanswered_batches_over is not None and gate.batches[-1] > gate.unanswered_batches_over:
                        gate.unanswered += 1
                        self.close_connection = True  # stored upstream; the client never hears of it
                        return
                self.send_response(r.status_code)
                self.send_header("Content-Type", r.headers.get("Content-Type", "application/json"))
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            do_GET = do_POST = do_PATCH = do_DELETE = _forward

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class PeakRss:
    """Peak resident memory of a process while the block runs (sampled every 20 ms)."""

    def __init__(self, proc):
        self.proc, self.peak = proc, 0
        self._stop = threading.Event()

    def __enter__(self):
        self.base = self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.02)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def serving_process(server_pid: int):
    """The process that serves HTTP for ``mlflow server`` (pid): the uvicorn it runs (one worker)."""
    import psutil

    kids = [p for p in psutil.Process(server_pid).children(recursive=True) if "uvicorn" in " ".join(p.cmdline())]
    if not kids:
        raise RuntimeError(f"no uvicorn under mlflow server {server_pid}")
    return kids[0]


def gate_server_pid(data_dir: Path) -> int:
    """The ``mlflow server --app-name labyard`` of the ``labyard up`` with this data dir."""
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "--app-name" in cmd and str(data_dir) in " ".join(cmd):
            return p.pid
    raise RuntimeError(f"no mlflow server --app-name labyard for {data_dir}")


def stream(size_mb: int, block: bytes):
    """``size_mb`` MiB of ``block`` (1 MiB), as a request body that is never held in memory."""
    for _ in range(size_mb):
        yield block
