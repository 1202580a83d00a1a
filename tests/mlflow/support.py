"""A real ``mlflow server`` that tests can stop and start again on the same port and store,
and a real IPython kernel started the way the platform starts it (jupyter_client, platform env)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
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

    def start(self, timeout: float = 240) -> MlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(
            [mlflow, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}", "--artifacts-destination", str(self.root / "artifacts")],
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
        r = requests.request(method, f"{self.url}/api/2.0/mlflow/{path}", timeout=10, **kw)
        r.raise_for_status()
        return r.json()

    def experiment(self, name: str) -> dict | None:
        r = requests.get(f"{self.url}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": name}, timeout=10)
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
        self.kc.wait_for_ready(timeout=60)

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
