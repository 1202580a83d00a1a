"""``labyard up``: the whole platform on one machine, as supervised child processes.

Children (each in its own session, so a Ctrl-C reaches only us and we stop them in order):
slapd (``--demo`` only), the MLflow tracking server, configurable-http-proxy and JupyterHub.
A child that dies is restarted (a few times); on SIGINT/SIGTERM, at any moment of start-up or
work, everything is stopped, the hub first so that it stops the users' servers. Each child is
tied to us by the parent-death signal and everything the platform starts carries its session
mark, swept when we end, even by SIGKILL (labyard_hub.lifecycle).

One ``labyard up`` per data dir (a lock the kernel drops when we die, so it is never stale);
``<data dir>/run/status.json`` says what runs, for ``labyard status``.
"""

from __future__ import annotations

import asyncio
import fcntl
import getpass
import json
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

from . import demo, hub_config_file, isolation, lifecycle
from .access import load_policy
from .projects import PolicyError
from .culler import culler_config
from .ready import problems, wait_ready
from .settings import MLFLOW_PREFIX, SETTINGS_ENV, Settings
from .slapd import Slapd, directory_ldif, free_port

log = logging.getLogger("labyard.up")

#: the token of the hub service ``labyard-up`` (scope ``proxy``): ``labyard up`` asks the hub with it
#: to add every route to a restarted proxy
ROUTES_TOKEN = "labyard-up.api-token"


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
    port: int | None = None
    proc: asyncio.subprocess.Process | None = None
    restarts: list[float] = field(default_factory=list)
    restarts_total: int = 0
    last_error: str | None = None

    async def start(self) -> None:
        if self.proc is not None:  # a restart: whatever is left of the old one's group goes first
            self._signal(signal.SIGKILL)
        out = asyncio.subprocess.DEVNULL
        if self.log_file:  # the platform's alone, like everything its children create (umask)
            out = os.open(self.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.fchmod(out, 0o600)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *lifecycle.tied(self.argv), env={**os.environ, **self.env}, stdout=out, stderr=out,
                stdin=asyncio.subprocess.DEVNULL, start_new_session=True, umask=isolation.PLATFORM_UMASK,
            )
        finally:
            if self.log_file:
                os.close(out)
        log.info("started %s (pid %d)", self.name, self.proc.pid)

    def state(self) -> dict:
        return {"name": self.name, "pid": self.proc.pid if self.proc else None, "port": self.port,
                "restarts": self.restarts_total, "last_error": self.last_error, "log": str(self.log_file)}

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
        self.settings: Settings | None = None
        self.session: str | None = None
        self.given_up: str | None = None
        self._tasks: set[asyncio.Task] = set()
        self._lock_fd: int | None = None

    def lock(self) -> None:
        """Take the data dir (one ``labyard up`` each), stop what an earlier session left running,
        then start the keeper and mark this session for every process started from now on."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "run").mkdir(exist_ok=True)
        fd = os.open(self.data_dir / "run" / "up.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SetupError(f"another labyard up runs on {self.data_dir} (see `labyard status --data-dir {self.data_dir}`)") from None
        self._lock_fd = fd
        (self.data_dir / "run" / "status.json").unlink(missing_ok=True)
        left = lifecycle.sweep(f"{self.data_dir}#", exact=False)
        if left:
            log.warning("stopped %d processes an earlier labyard up on %s left running: %s", len(left), self.data_dir, left)
        self.session = lifecycle.new_session(self.data_dir)
        self._keeper = lifecycle.start_keeper(self.session)
        os.environ[lifecycle.SESSION_ENV] = self.session

    def unlock(self) -> None:
        """The end of ``lock``: the keeper sweeps the session, the data dir is free."""
        os.environ.pop(lifecycle.SESSION_ENV, None)
        if self._lock_fd is not None:
            lifecycle.stop_keeper(self._keeper)
            os.close(self._lock_fd)
            self._lock_fd = None

    def write_status(self, state: str) -> None:
        """``run/status.json``: what ``labyard status`` reads (it probes the ports itself)."""
        s = self.settings
        services = []
        if s:
            services = [{"name": "labyard-scheduler", "port": s.scheduler_port}]
            if s.kubernetes is not None:  # labyard-gpus runs in Kubernetes mode only (docs/admin/gpus.md)
                services.append({"name": "labyard-gpus", "port": s.gpus_port})
        body = {"state": state, "pid": os.getpid(), "session": self.session, "public_url": f"http://127.0.0.1:{self.port}",
                "given_up": self.given_up, "updated": time.time(),
                "components": [c.state() for c in self.children], "services": services}
        path = self.data_dir / "run" / "status.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(body, indent=1))
        tmp.replace(path)

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

    @property
    def isolated(self) -> bool:
        """Local mode as root: users' servers and runs run as their own uids (docs/admin/local.md)."""
        return isolation.enabled() and not self.kubeconfig

    def prepare(self) -> Settings:
        """Write the settings and the demo directory, secure the data dir, build the children.

        Everything it creates is the platform's alone (umask 077); then
        :func:`labyard_hub.isolation.secure_data_dir` leaves only the projects, homes and run
        files passable to users. As root in local mode it checks that users' processes can run.
        """
        umask = os.umask(isolation.PLATFORM_UMASK)
        try:
            settings = self._prepare()
            isolation.secure_data_dir(self.data_dir)
        finally:
            os.umask(umask)
        if self.isolated:
            problem = isolation.unusable_by_users(self.data_dir)
            if problem:
                raise SetupError(problem)
        return settings

    def _prepare(self) -> Settings:
        for sub in ("logs", "hub", "mlflow"):
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
        self._secret("cookie-secret")
        self._secret("mlflow.api-token")  # the hub service `mlflow`: the gate's hub token and OAuth secret
        self._secret(ROUTES_TOKEN)  # the hub service `labyard-up`: asks the hub to restore a new proxy's routes
        # the MLflow store is read by the MLflow server only (servers of users run as their own uids)
        (self.data_dir / "mlflow").chmod(0o700)
        # an MLflow server of the admin's (mlflow_url in the config) replaces the embedded one
        mlflow_port = None if own.get("mlflow_url") else free_port()
        hub_port = own.get("hub_port") or free_port()
        if self.kubeconfig:
            kube = own.setdefault("kubernetes", {})
            kube["kubeconfig"] = str(self.kubeconfig)
            # the hub runs on this machine and pods reach it on loopback (hub_connect_url's
            # default): the testbed's pod runner runs them here
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
                "gpus_port": own.get("gpus_port") or free_port(),
                "mlflow_url": own.get("mlflow_url") or f"http://127.0.0.1:{mlflow_port}",
            })
            from .ldap import ldap_config

            ldap_config(settings.ldap)  # an unknown LDAP option stops us here, not the hub later
        except ValueError as e:
            raise SetupError(str(e)) from e
        try:
            load_policy(settings.policy_file)  # the hub would refuse it too; say so before starting anything
        except PolicyError as e:
            raise SetupError(str(e)) from e
        (self.data_dir / "culler_config.py").write_text(culler_config(settings.cull.gpu_timeout))
        settings.dump(self.data_dir / "settings.yaml")
        self._children(settings, mlflow_port)
        self.own_mlflow = mlflow_port is not None
        self.settings = settings
        return settings

    def _children(self, s: Settings, mlflow_port: int | None) -> None:
        chp = _which("configurable-http-proxy", "run `make setup` (it installs configurable-http-proxy with npm)")
        hub = _which("jupyterhub", "install the hub extra: pip install 'labyard[hub]'")
        if self.slapd:
            self.children.append(Child("slapd", self.slapd.command(), log_file=self.logs / "slapd.log", port=self.slapd.port))
        if mlflow_port:
            store = self.data_dir / "mlflow"
            self.children.append(Child(
                "mlflow",
                mlflow_server_command(mlflow_port, f"sqlite:///{store / 'mlflow.db'}", str(store / "artifacts")),
                env=mlflow_gate_env(f"{s.hub_connect_url}/hub/api", s.secret("mlflow.api-token"), s.policy_file),
                log_file=self.logs / "mlflow.log",
                port=mlflow_port,
            ))
        self.children.append(Child(
            "proxy",
            [chp, "--ip", "127.0.0.1", "--port", str(self.port), "--api-ip", "127.0.0.1", "--api-port", str(s.proxy_api_port),
             "--default-target", f"http://127.0.0.1:{s.hub_port}", "--error-target", f"http://127.0.0.1:{s.hub_port}/hub/error"],
            env={"CONFIGPROXY_AUTH_TOKEN": s.proxy_token_file.read_text().strip()},
            log_file=self.logs / "proxy.log",
            port=self.port,
        ))
        self.children.append(Child(
            "hub",
            [hub, "-f", str(hub_config_file())],
            env={SETTINGS_ENV: str(self.data_dir / "settings.yaml"), "JUPYTERHUB_CRYPT_KEY": self._secret("auth-state-key"),
                 **({"KUBECONFIG": str(s.kubernetes.kubeconfig)} if s.kubernetes and s.kubernetes.kubeconfig else {})},
            log_file=self.logs / "jupyterhub.log",
            stop_timeout=30,
            port=s.hub_port,
        ))
        for c in self.children:
            if c.name in ("hub", "mlflow"):
                c.env.setdefault("PYTHONUNBUFFERED", "1")
            c.env["PATH"] = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    async def run(self, ready: asyncio.Event | None = None) -> int:
        """Start, supervise, stop. SIGINT/SIGTERM at any moment (start-up included) stop it all."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        main = asyncio.current_task()

        def on_signal() -> None:
            if not stop.is_set():
                stop.set()
                if not supervising:  # start-up waits are cut short
                    main.cancel()

        supervising = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        (log.info if self.isolated or self.kubeconfig else log.warning)("%s", self.mode_line())
        try:
            self.write_status("starting")
            for c in self.children:
                await c.start()
                self.write_status("starting")
                if c.name == "slapd":
                    await wait_port(self.slapd.port, 10, c)
            await wait_http(f"http://127.0.0.1:{self.port}/hub/api/", 90, self.child("hub"))
            await self._wait_ready(180)
            self._banner()
            self.write_status("up")
            if ready:
                ready.set()
            supervising = True
            await self._supervise(stop)
            return 0
        except asyncio.CancelledError:
            if not stop.is_set():
                raise
            log.info("asked to stop during start-up")
            return 0
        except SetupError as e:
            log.error("%s", e)
            self.given_up = self.given_up or str(e)
            return 1
        finally:
            for task in self._tasks:
                task.cancel()
            self.write_status("stopping")
            for c in reversed(self.children):
                await c.stop()
            # what the children left (e.g. scheduled runs, kernels of a server the hub lost)
            if self.session and (left := await loop.run_in_executor(None, lifecycle.sweep, self.session)):
                log.info("stopped %d processes left by the components: %s", len(left), left)
            self.write_status("stopped")

    async def _wait_ready(self, timeout: float) -> None:
        """Up means: the proxy has the hub's routes and every service answers through it. A child
        that exits meanwhile fails the start at once, naming it."""
        public = f"http://127.0.0.1:{self.port}"
        # an MLflow of the admin's is not ours to wait for: the platform starts without it, and
        # runs wait in the kernels' local queues until it answers
        ready = asyncio.create_task(wait_ready(self.settings, public, timeout, mlflow=self.own_mlflow))
        try:
            while not ready.done():
                dead = next((c for c in self.children if c.proc and c.proc.returncode is not None), None)
                if dead:
                    raise SetupError(f"{dead.name} exited with {dead.proc.returncode} while the platform started; see {dead.log_file}")
                await asyncio.wait({ready}, timeout=1)
            ready.result()
            if not self.own_mlflow and (left := await problems(self.settings, public)):
                log.warning("started without MLflow: %s", "; ".join(left))
        except TimeoutError as e:
            raise SetupError(f"{e}; see the logs in {self.logs}") from e
        finally:
            ready.cancel()

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
                    c.last_error = f"exited with {c.proc.returncode} at {time.strftime('%Y-%m-%d %H:%M:%S')}; see {c.log_file}"
                    if len(c.restarts) > 3:
                        self.given_up = f"{c.name} exited 4 times in 5 minutes (last code {c.proc.returncode}): given up, platform stopped; see {c.log_file}"
                        c.last_error = self.given_up
                        raise SetupError(self.given_up)
                    log.warning("%s exited with %s; restarting it", c.name, c.proc.returncode)
                    await c.start()
                    c.restarts_total += 1
                    self.write_status("up")
                    if c.name == "proxy":
                        self._tasks.add(task := asyncio.create_task(self._restore_routes()))
                        task.add_done_callback(self._tasks.discard)

    async def _restore_routes(self, timeout: float = 300) -> None:
        """A restarted proxy starts with no routes (they live in its memory): ask the hub to add
        them all again (``POST /hub/api/proxy``) as soon as the proxy answers, instead of leaving
        users' servers unreachable until the hub's next route check (minutes)."""
        s = self.settings
        token = s.secret(ROUTES_TOKEN)
        loop = asyncio.get_running_loop()

        def sync() -> str | None:
            try:
                with urllib.request.urlopen(f"{s.proxy_api_url}/api/routes", timeout=5) as r:
                    r.read()
            except urllib.error.HTTPError:
                pass  # it answers (403 without its token): up
            except OSError as e:
                return f"the proxy does not answer yet: {e}"
            req = urllib.request.Request(f"{s.hub_connect_url}/hub/api/proxy", data=b"", method="POST",
                                         headers={"Authorization": f"token {token}"})
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    return None if r.status < 300 else f"the hub answered {r.status}"
            except urllib.error.HTTPError as e:
                return f"the hub answered {e.code}"
            except OSError as e:
                return f"the hub does not answer: {e}"

        deadline = time.monotonic() + timeout
        while True:
            why = await loop.run_in_executor(None, sync)
            if why is None:
                log.info("proxy restarted: routes restored from the hub")
                return
            if time.monotonic() > deadline:
                log.error("proxy restarted, but its routes could not be restored (%s); the hub adds them at its next "
                          "route check", why)
                return
            await asyncio.sleep(1)

    def _banner(self) -> None:
        lines = [f"Labyard is up: http://127.0.0.1:{self.port}/", f"  data and logs: {self.data_dir}"]
        if self.demo:
            lines += [
                f"  demo users (password {demo.PASSWORD!r}): alice (vision, nlp), bob (vision), carol (nlp), admin (hub admin)",
            ]
        lines.append(f"  {self.mode_line()}")
        lines.append("Press Ctrl-C to stop.")
        print("\n".join(lines), flush=True)

    def mode_line(self) -> str:
        """What this platform guarantees about users' processes (the banner and the log say it)."""
        if self.kubeconfig:
            return f"Kubernetes mode: servers are pods in labyard-<project> namespaces of {self.kubeconfig}"
        if self.isolated:
            return ("local mode, users isolated: each server, kernel and scheduled run is a process of the user's "
                    "LDAP uid with the project's gid (no CPU, memory or GPU limits; docs/admin/local.md)")
        return (f"local mode, SINGLE-PERSON DEMO: every server and run is a process of the system user "
                f"{getpass.getuser()!r}, so users are NOT isolated from each other (run labyard up as root to "
                "isolate them; docs/admin/local.md)")


def mlflow_server_command(port: int, backend_store_uri: str, artifacts_destination: str, host: str = "127.0.0.1",
                          workers: int = 1, mlflow: str | None = None) -> list[str]:
    """``mlflow server`` with Labyard's gate (the ``labyard`` MLflow app): nothing it serves
    bypasses the per-project authorization (docs/admin/mlflow.md). ``mlflow``: the command (found on PATH)."""
    mlflow = mlflow or _which("mlflow", "install the hub extra: pip install 'labyard[hub]'")
    return [mlflow, "server", "--app-name", "labyard", "--host", host, "--port", str(port), "--workers", str(workers),
            "--backend-store-uri", backend_store_uri, "--artifacts-destination", artifacts_destination,
            # the client address MLflow sees is the proxy's, never what a client claims in X-Forwarded-For
            "--uvicorn-opts", "--no-proxy-headers"]


def mlflow_gate_env(hub_api_url: str, service_token: str, policy_file: Path | None = None,
                    prefix: str = MLFLOW_PREFIX) -> dict[str, str]:
    """The environment of ``mlflow server --app-name labyard``: who the hub service is and
    where the hub is (the names JupyterHub gives the services it runs itself)."""
    return {
        "JUPYTERHUB_API_URL": hub_api_url,
        "JUPYTERHUB_API_TOKEN": service_token,
        "JUPYTERHUB_SERVICE_NAME": "mlflow",
        "JUPYTERHUB_CLIENT_ID": "service-mlflow",
        "JUPYTERHUB_SERVICE_PREFIX": prefix,
        "JUPYTERHUB_OAUTH_CALLBACK_URL": prefix + "oauth_callback",
        "JUPYTERHUB_OAUTH_ACCESS_SCOPES": json.dumps(["access:services!service=mlflow"]),
        **({"LABYARD_POLICY_FILE": str(policy_file)} if policy_file else {}),
        # no MLflow server jobs (GenAI evaluation): they start seven worker processes
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }


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
