"""A whole Labyard (``labyard up``) as a subprocess, and logged-in HTTP clients for it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import requests
import yaml

from labyard_hub import demo
from labyard_hub.slapd import free_port


class Stack:
    def __init__(self, data_dir: Path, config: dict | None = None, demo_mode: bool = True, kubeconfig: str | None = None):
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = config or {}
        self.demo = demo_mode
        self.kubeconfig = kubeconfig
        self.proc: subprocess.Popen | None = None
        self.log = data_dir / "labyard-up.log"
        self._seen: set[psutil.Process] = set()

    def start(self, timeout: float = 120) -> Stack:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "labyard_hub.cli", "up", "--port", str(self.port), "--data-dir", str(self.data_dir)]
        if self.demo:
            argv.append("--demo")
        if self.kubeconfig:
            argv += ["--kubernetes", "--kubeconfig", str(self.kubeconfig)]
        if self.config:
            cfg = self.data_dir / "config.yaml"
            cfg.write_text(yaml.safe_dump(self.config))
            argv += ["--config", str(cfg)]
        out = open(self.log, "ab")
        offset = out.tell()
        self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"labyard up exited with {self.proc.returncode}:\n{self.log.read_text()}")
            if "Labyard is up" in self.log.read_text()[offset:]:
                return self
            time.sleep(0.2)
        raise TimeoutError(f"labyard up not ready in {timeout}s:\n{self.log.read_text()}")

    def stop(self, timeout: float = 60) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout)
        return self.proc.returncode if self.proc else 0

    def processes(self) -> list[psutil.Process]:
        """Processes of this stack still running: ``labyard up``'s descendants seen so far, and
        any process whose command line or working directory names the data dir."""
        if self.proc and self.proc.poll() is None:
            try:
                self._seen.update(psutil.Process(self.proc.pid).children(recursive=True))
            except psutil.NoSuchProcess:
                pass
        marker = str(self.data_dir)
        found = {p for p in self._seen if p.is_running() and p.status() != psutil.STATUS_ZOMBIE}
        for p in psutil.process_iter(["cmdline", "cwd", "pid"]):
            try:
                if p.pid != os.getpid() and (marker in " ".join(p.info["cmdline"] or []) or marker in (p.info["cwd"] or "")):
                    found.add(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return sorted(found, key=lambda p: p.pid)

    def demo_ldap(self):
        """A rootdn connection to the demo directory, to change it during a test."""
        import ldap3

        settings = yaml.safe_load((self.data_dir / "settings.yaml").read_text())
        root_pw = (self.data_dir / "secrets" / "ldap-root").read_text().strip()
        return ldap3.Connection(settings["ldap"]["server_urls"][0], f"cn=admin,{demo.SUFFIX}", root_pw,
                                auto_bind=True, raise_exceptions=True)

    def hub_log(self) -> str:
        return (self.data_dir / "logs" / "jupyterhub.log").read_text()

    def login(self, username: str, password: str = demo.PASSWORD) -> requests.Session:
        """A browser-like session: GET the form, POST it with the xsrf token."""
        s = requests.Session()
        s.get(f"{self.url}/hub/login", timeout=10)
        r = s.post(
            f"{self.url}/hub/login",
            data={"username": username, "password": password, "_xsrf": s.cookies.get("_xsrf")},
            allow_redirects=False,
            timeout=30,
        )
        s.login_status = r.status_code
        return s

    def token(self, username: str) -> str:
        s = self.login(username)
        assert s.login_status == 302, f"{username} could not log in ({s.login_status})"
        r = s.post(
            f"{self.url}/hub/api/users/{username}/tokens",
            json={"note": "test"},
            headers={"X-XSRFToken": s.cookies.get("_xsrf"), "Referer": f"{self.url}/hub/"},
            timeout=10,
        )
        r.raise_for_status()
        return r.json()["token"]

    def api(self, username: str) -> requests.Session:
        """A session that calls the hub REST API with a token of ``username``."""
        s = requests.Session()
        s.headers["Authorization"] = f"token {self.token(username)}"
        s.base = f"{self.url}/hub/api"
        return s

    def wait_ready(self, api: requests.Session, username: str, server: str, timeout: float = 180) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            model = api.get(f"{api.base}/users/{username}", timeout=10).json()["servers"].get(server) or {}
            if model.get("ready"):
                return model
            time.sleep(0.3)
        raise TimeoutError(f"{username}/{server} not ready in {timeout}s")
