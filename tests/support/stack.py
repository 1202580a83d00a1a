"""A whole Labyard (``labyard up``) as a subprocess, and logged-in HTTP clients for it."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import requests
import yaml

from labyard_hub import demo, isolation
from labyard_hub.slapd import free_port


def reachable_data_dir(data_dir: Path) -> Path:
    """``data_dir``, or as root a fresh directory in /tmp linked from it, removed at exit.

    As root, ``labyard up`` runs users' servers and runs as their own uids, which must pass
    through the data dir's parents; pytest's temporary directories are private (0700).
    """
    data_dir = Path(data_dir)
    if os.geteuid() != 0 or isolation.closed_ancestor(data_dir.parent) is None:
        return data_dir
    if data_dir.is_symlink():
        return data_dir.resolve()
    real = Path(tempfile.mkdtemp(prefix="labyard-stack-"))
    atexit.register(shutil.rmtree, real, ignore_errors=True)
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    if data_dir.is_dir():
        data_dir.rmdir()  # an empty directory of tmp_path_factory.mktemp (else: it fails here, as it should)
    data_dir.symlink_to(real, target_is_directory=True)
    return real


class Stack:
    """A ``labyard up`` in a subprocess. As root it isolates users (docs/admin/local.md): its
    data dir is then moved where users' processes can reach it (:func:`reachable_data_dir`)."""

    def __init__(self, data_dir: Path, config: dict | None = None, demo_mode: bool = True, kubeconfig: str | None = None,
                 run_as: isolation.RunAs | None = None):
        """``run_as``: start ``labyard up`` as this (non-root) system user, through the launcher:
        what a normal user gets (the single-person demo) on a machine whose tests run as root."""
        self.data_dir = reachable_data_dir(data_dir)
        self.run_as = run_as
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = config or {}
        self.demo = demo_mode
        self.kubeconfig = kubeconfig
        self.proc: subprocess.Popen | None = None
        self.log = data_dir / "labyard-up.log"
        self._seen: set[psutil.Process] = set()

    def start(self, timeout: float = 300) -> Stack:
        self.spawn()
        self.wait_log("Labyard is up", timeout)
        return self

    def spawn(self) -> Stack:
        """Start ``labyard up`` without waiting for it."""
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
        self._offset = out.tell()
        env = None
        if self.run_as is not None:  # its data dir, its home and what is in them are its own
            self.run_as.home.mkdir(parents=True, exist_ok=True)
            for path in (self.data_dir, *self.data_dir.iterdir(), self.run_as.home):
                os.chown(path, self.run_as.uid, self.run_as.gid)
            argv, env = self.run_as.command(argv, self.data_dir), self.run_as.environment(dict(os.environ))
        self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        return self

    def wait_log(self, text: str, timeout: float = 300, log: Path | None = None) -> None:
        """Wait until ``text`` appears in this run's output (or in ``log``, e.g. the hub's log)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"labyard up exited with {self.proc.returncode}:\n{self.log.read_text()}")
            if log is not None:
                if log.exists() and text in log.read_text(errors="replace"):
                    return
            elif text in self.log.read_text()[self._offset:]:
                return
            time.sleep(0.1)
        raise TimeoutError(f"{text!r} not seen in {timeout}s:\n{self.log.read_text()}")

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
        found = set()
        for p in self._seen:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    found.add(p)
            except psutil.NoSuchProcess:  # ended while we looked
                pass
        for p in psutil.process_iter(["cmdline", "cwd", "pid"]):
            try:
                if p.pid != os.getpid() and (marker in " ".join(p.info["cmdline"] or []) or marker in (p.info["cwd"] or "")):
                    found.add(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return sorted(found, key=lambda p: p.pid)

    def server_process(self, uid: int, server: str) -> psutil.Process:
        """The process of a single-user server of this stack (other stacks may run the same uids)."""
        for p in psutil.process_iter(["uids", "cmdline"]):
            try:
                if p.info["uids"].real == uid and "jupyterhub-singleuser" in " ".join(p.info["cmdline"] or []) \
                        and p.environ().get("JUPYTERHUB_SERVER_NAME") == server \
                        and p.environ().get("LABYARD_PROJECT_DIR", "").startswith(str(self.data_dir) + "/"):
                    return p
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        raise LookupError(f"no server {server} of uid {uid}")

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

    def browser_login(self, page, username: str, password: str = demo.PASSWORD) -> None:
        """Log a Playwright page in through the hub's login form, as a person does."""
        page.goto(f"{self.url}/hub/login")
        page.fill("#username_input", username)
        page.fill("#password_input", password)
        page.click("#login_submit")
        page.wait_for_url("**/hub/home")

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
