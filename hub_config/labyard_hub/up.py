"""``labyard up``: the whole platform on one machine, as supervised child processes.

Children (each in its own session, so a Ctrl-C reaches only us and we stop them in order):
slapd (``--demo`` only), the MLflow tracking server, configurable-http-proxy and JupyterHub.
A child that dies is restarted (a few times); on SIGINT/SIGTERM everything is stopped, the hub
first so that it stops the users' servers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import signal
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import demo, hub_config_file
from .culler import culler_config
from .settings import SETTINGS_ENV, Settings
from .slapd import Slapd, directory_ldif, free_port

log = logging.getLogger("labyard.up")


class SetupError(Exception):
    """Something the platform needs is missing; the message says what to install or change."""


def _which(name: str, hint: str) -> str:
    exe = shutil.which(name) or (str(Path(sys.executable).parent / name) if (Path(sys.executable).parent / name).exists() else None)
    if not exe:
        raise SetupError(f"{name} not found: {hint}")
    return exe


@dataclass
class Child:
    """One supervised process."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    log_file: Path | None = None
    stop_timeout: float = 15
    proc: asyncio.subprocess.Process | None = None
    restarts: list[float] = field(default_factory=list)

    async def start(self) -> None:
        out = open(self.log_file, "ab") if self.log_file else asyncio.subprocess.DEVNULL
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, env={**os.environ, **self.env}, stdout=out, stderr=out, stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        log.info("started %s (pid %d)", self.name, self.proc.pid)

    async def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        self._signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.stop_timeout)
        except asyncio.TimeoutError:
            log.warning("%s did not stop in %ss; killing it", self.name, self.stop_timeout)
            self._signal(signal.SIGKILL)
            await proc.wait()
        # anything left in its process group (e.g. server workers) goes too
        self._signal(signal.SIGKILL)
        log.info("stopped %s", self.name)

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass


async def wait_http(url: str, timeout: float, child: Child | None = None) -> None:
    """Wait until ``url`` answers with any HTTP status below 500."""
    deadline = time.monotonic() + timeout
    loop = asyncio.get_running_loop()

    def probe() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status < 500
        except urllib.error.HTTPError as e:
            return e.code < 500
        except OSError:
            return False

    while time.monotonic() < deadline:
        if child and child.proc and child.proc.returncode is not None:
            raise SetupError(f"{child.name} exited with {child.proc.returncode}; see {child.log_file}")
        if await loop.run_in_executor(None, probe):
            return
        await asyncio.sleep(0.2)
    raise SetupError(f"{url} did not answer within {timeout:.0f}s" + (f"; see {child.log_file}" if child else ""))


class Platform:
    """Builds the settings and the children for one ``labyard up``."""

    def __init__(self, data_dir: Path, port: int, demo_mode: bool, config: Path | None, kubeconfig: Path | None = None):
        self.data_dir = data_dir.absolute()
        self.port = port
        self.demo = demo_mode
        self.config = config
        self.kubeconfig = kubeconfig.absolute() if kubeconfig else None
        self.children: list[Child] = []
        self.logs = self.data_dir / "logs"
        self.slapd: Slapd | None = None

    def _secret(self, name: str) -> str:
        path = self.data_dir / "secrets" / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            path.write_text(secrets.token_hex(32))
            path.chmod(0o600)
        return path.read_text().strip()

    def _demo_directory(self) -> dict:
        """Create (once) and configure the demo slapd; return the LDAPAuthenticator settings."""
        ldap_dir = self.data_dir / "ldap"
        service_password = self._secret("ldap-service")
        self.slapd = Slapd(ldap_dir, suffix=demo.SUFFIX, root_password=self._secret("ldap-root"),
                           reader_dn=f"cn={demo.SERVICE_ACCOUNT},ou=services,{demo.SUFFIX}")
        self.slapd.write_config()
        if not (ldap_dir / "data" / "data.mdb").exists():
            ldif = directory_ldif(demo.SUFFIX, demo.users_with_password(), demo.GROUPS,
                                  service=(demo.SERVICE_ACCOUNT, service_password))
            self.slapd.load(ldif)
        return {
            "server_urls": [self.slapd.url],
            "lookup_bind_dn": self.slapd.reader_dn,
            "lookup_bind_password": service_password,
            "user_search_base": f"ou=people,{demo.SUFFIX}",
            "project_search_base": f"ou=projects,{demo.SUFFIX}",
            "admin_groups": [demo.ADMIN_GROUP],
        }

    def prepare(self) -> Settings:
        for sub in ("logs", "hub", "projects", "homes", "mlflow"):
            (self.data_dir / sub).mkdir(parents=True, exist_ok=True)
        own: dict = {}
        if self.config:
            try:
                own = yaml.safe_load(self.config.read_text()) or {}
            except (OSError, yaml.YAMLError) as e:
                raise SetupError(f"cannot read {self.config}: {e}") from e
        if self.demo:
            own["ldap"] = {**self._demo_directory(), **own.get("ldap", {})}
            own.setdefault("policy_file", str(demo.POLICY_FILE))
        if not own.get("ldap"):
            raise SetupError("no LDAP configured: pass --demo, or --config FILE with an `ldap:` section (docs/admin/configuration.md)")
        self._secret("proxy-token")
        # an MLflow server of the admin's (mlflow_url in the config) replaces the embedded one
        mlflow_port = None if own.get("mlflow_url") else free_port()
        hub_port = own.get("hub_port") or free_port()
        if self.kubeconfig:
            kube = own.setdefault("kubernetes", {})
            kube["kubeconfig"] = str(self.kubeconfig)
            # the hub runs on this machine: pods reach it on loopback (the testbed runs pods here)
            kube.setdefault("hub_connect_url", f"http://127.0.0.1:{hub_port}")
            if self.demo:
                # in the testbed, pods with this label really run (tests/k8s, docs/dev/testbed.md)
                kube.setdefault("pod_labels", {"labyard.dev/run-local": "true"})
        try:
            settings = Settings.model_validate({
                **own,
                "data_dir": str(self.data_dir),
                "bind_url": f"http://127.0.0.1:{self.port}",
                "hub_port": hub_port,
                "proxy_api_port": own.get("proxy_api_port") or free_port(),
                "scheduler_port": own.get("scheduler_port") or free_port(),
                "mlflow_url": own.get("mlflow_url") or f"http://127.0.0.1:{mlflow_port}",
                "mlflow_proxy_port": own.get("mlflow_proxy_port") or free_port(),
            })
        except ValueError as e:
            raise SetupError(str(e)) from e
        (self.data_dir / "culler_config.py").write_text(culler_config(settings.cull.gpu_timeout))
        settings.dump(self.data_dir / "settings.yaml")
        self._children(settings, mlflow_port)
        return settings

    def _children(self, s: Settings, mlflow_port: int | None) -> None:
        chp = _which("configurable-http-proxy", "run `make setup` (it installs configurable-http-proxy with npm)")
        hub = _which("jupyterhub", "install the hub extra: pip install 'labyard[hub]'")
        if self.slapd:
            self.children.append(Child("slapd", self.slapd.command(), log_file=self.logs / "slapd.log"))
        if mlflow_port:
            mlflow = _which("mlflow", "install the hub extra: pip install 'labyard[hub]'")
            store = self.data_dir / "mlflow"
            self.children.append(Child(
                "mlflow",
                [mlflow, "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
                 "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", "--artifacts-destination", str(store / "artifacts")],
                # no MLflow server jobs (GenAI evaluation): they start seven worker processes
                env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                log_file=self.logs / "mlflow.log",
            ))
        self.children.append(Child(
            "proxy",
            [chp, "--ip", "127.0.0.1", "--port", str(self.port), "--api-ip", "127.0.0.1", "--api-port", str(s.proxy_api_port),
             "--default-target", f"http://127.0.0.1:{s.hub_port}", "--error-target", f"http://127.0.0.1:{s.hub_port}/hub/error"],
            env={"CONFIGPROXY_AUTH_TOKEN": s.proxy_token_file.read_text().strip()},
            log_file=self.logs / "proxy.log",
        ))
        self.children.append(Child(
            "hub",
            [hub, "-f", str(hub_config_file())],
            env={SETTINGS_ENV: str(self.data_dir / "settings.yaml"), "JUPYTERHUB_CRYPT_KEY": self._secret("auth-state-key"),
                 **({"KUBECONFIG": str(s.kubernetes.kubeconfig)} if s.kubernetes and s.kubernetes.kubeconfig else {})},
            log_file=self.logs / "jupyterhub.log",
            stop_timeout=30,
        ))
        for c in self.children:
            if c.name in ("hub", "mlflow"):
                c.env.setdefault("PYTHONUNBUFFERED", "1")
            c.env["PATH"] = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    async def run(self, ready: asyncio.Event | None = None) -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            for c in self.children:
                await c.start()
                if c.name == "slapd":
                    await wait_port(self.slapd.port, 10, c)
            await wait_http(f"http://127.0.0.1:{self.port}/hub/api/", 90, self.child("hub"))
            self._banner()
            if ready:
                ready.set()
            await self._supervise(stop)
            return 0
        except SetupError as e:
            log.error("%s", e)
            return 1
        finally:
            for c in reversed(self.children):
                await c.stop()

    async def _supervise(self, stop: asyncio.Event) -> None:
        """Restart children that die (at most 3 times in 5 minutes each) until asked to stop."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 1)
            except asyncio.TimeoutError:
                pass
            for c in self.children:
                if c.proc and c.proc.returncode is not None and not stop.is_set():
                    now = time.monotonic()
                    c.restarts = [t for t in c.restarts if now - t < 300] + [now]
                    if len(c.restarts) > 3:
                        raise SetupError(f"{c.name} keeps exiting (last code {c.proc.returncode}); see {c.log_file}")
                    log.warning("%s exited with %s; restarting it", c.name, c.proc.returncode)
                    await c.start()

    def _banner(self) -> None:
        lines = [f"Labyard is up: http://127.0.0.1:{self.port}/", f"  data and logs: {self.data_dir}"]
        if self.demo:
            lines += [
                f"  demo users (password {demo.PASSWORD!r}): alice (vision, nlp), bob (vision), carol (nlp), admin (hub admin)",
            ]
        if self.kubeconfig:
            lines.append(f"  Kubernetes mode: servers are pods in labyard-<project> namespaces of {self.kubeconfig}")
        elif self.demo:
            lines.append("  local mode: servers run as this system user; users are not isolated from each other")
        lines.append("Press Ctrl-C to stop.")
        print("\n".join(lines), flush=True)


async def wait_port(port: int, timeout: float, child: Child) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.proc.returncode is not None:
            raise SetupError(f"{child.name} exited with {child.proc.returncode}; see {child.log_file}")
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise SetupError(f"{child.name} did not listen on port {port} within {timeout}s")
