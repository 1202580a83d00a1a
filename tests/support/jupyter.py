"""A real single-user Jupyter server (jupyter_server with the installed extensions) as a subprocess.

Started the way a Labyard spawner starts one, minus the hub: its root is a project directory,
``LABYARD_PROJECT`` / ``LABYARD_PROJECT_DIR`` name the project, and it authenticates with a
token (``api()``) or with the token's login cookie plus the xsrf token, as a browser does
(``browser()``). Its config and runtime dirs are private to the test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import requests

from labyard_hub.slapd import free_port

from ..mlflow.support import wait_for


class JupyterServer:
    def __init__(self, root: Path, project: str = "vision", args: list[str] | None = None, env: dict | None = None):
        self.root = root
        self.project = project
        self.args = args or []
        self.extra_env = env or {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = "test-token-" + os.urandom(6).hex()
        self.private = root.parent / f".jupyter-{root.name}-{self.port}"
        self.log = self.private / "server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "JPY_", "LABYARD_", "MLFLOW_", "GIT_CONFIG"))}
        env.update({
            "LABYARD_PROJECT": self.project, "LABYARD_PROJECT_DIR": str(self.root), "HOME": str(self.private / "home"),
            "JUPYTER_CONFIG_DIR": str(self.private / "config"), "JUPYTER_RUNTIME_DIR": str(self.private / "runtime"),
            "JUPYTER_DATA_DIR": str(self.private / "data"), **self.extra_env,
        })
        return env

    def start(self, timeout: float = 180) -> JupyterServer:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.private / "home").mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "jupyter_server", "--no-browser", f"--ServerApp.port={self.port}",
                "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root}",
                "--ServerApp.port_retries=0", *self.args]
        if os.geteuid() == 0:
            argv.append("--ServerApp.allow_root=True")
        out = open(self.log, "ab")
        self.proc = subprocess.Popen(argv, cwd=self.root, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(self._answers, timeout, 0.3, what=f"jupyter server on port {self.port} answering")
        except TimeoutError:
            self.stop()
            raise
        return self

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"jupyter server exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
        try:
            return requests.get(f"{self.url}/api/status", headers=self.headers, timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def stop(self) -> None:
        """The server and its kernels and terminals (its process group): SIGTERM, then SIGKILL."""
        for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
            if self.proc is None or self.proc.poll() is not None:
                return
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                continue

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"}

    def api(self) -> requests.Session:
        s = requests.Session()
        s.headers.update(self.headers)
        return s

    def browser(self) -> requests.Session:
        """A cookie session as JupyterLab in a browser has it (log in with the token once)."""
        s = requests.Session()
        r = s.get(f"{self.url}/lab", params={"token": self.token}, timeout=60)
        r.raise_for_status()
        return s

    def diff(self, session: requests.Session | None = None, timeout: float = 300, **body) -> requests.Response:
        return (session or self.api()).post(f"{self.url}/labyard/diff", data=json.dumps(body), timeout=timeout)

    def put_notebook(self, path: str, nb: dict) -> None:
        r = self.api().put(f"{self.url}/api/contents/{path}", json={"type": "notebook", "format": "json", "content": nb}, timeout=60)
        assert r.status_code in (200, 201), r.text
