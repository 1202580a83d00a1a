"""Local mode: each project server is a JupyterLab process on this machine."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

from jupyterhub.spawner import SimpleLocalProcessSpawner, SpawnException
from jupyterhub.utils import random_port
from traitlets import Bool, Unicode

from .. import isolation
from ..access import AccessError, process_ids
from ..projects import Identity
from .base import ProjectSpawnerMixin


class LocalProjectSpawner(ProjectSpawnerMixin, SimpleLocalProcessSpawner):
    """One JupyterLab process per user and project, working in the project's directory.

    When the hub runs as root, each server (and so each of its kernels) runs as the user's LDAP
    uidNumber with the project's gidNumber, through the launcher of
    :mod:`labyard_hub.isolation`; the project directory is owned by the project's group (mode
    2770) and the home by the user (0700). A user without uidNumber, or a project without
    gidNumber, gets no server (403, with the reason).

    Without root, every server runs as the hub's own system user: users are NOT isolated from
    each other (any notebook can read every project directory). A single-person demo only.
    """

    projects_dir = Unicode(
        "projects",
        help="Directory holding one working directory per project (``<projects_dir>/<project>``).",
    ).tag(config=True)
    allow_gpu_flavors = Bool(
        False,
        help="""Offer flavours that ask for GPUs (local processes get no GPU isolation). Set it
        with ``local: {allow_gpu_flavors: true}`` in the settings, so that the scheduler offers
        the same flavours as the spawner.""",
    ).tag(config=True)
    log_dir = Unicode(
        "",
        help="""Directory of one log file per server (``<user>.<project>.log``, the server's and
        its kernels' output, readable by the platform only). Empty: servers write to the hub's
        own output. Example::

            c.LocalProjectSpawner.log_dir = "/var/lib/labyard/logs/servers"
        """,
    ).tag(config=True)

    @property
    def offers_gpus(self) -> bool:
        return self.allow_gpu_flavors

    @property
    def isolated(self) -> bool:
        """Whether servers run as the users' own uids (the hub runs as root)."""
        return isolation.enabled()

    @property
    def project_dir(self) -> Path:
        return Path(self.projects_dir).absolute() / self.name

    def run_as(self) -> isolation.RunAs | None:
        """Who the server runs as (None: the hub's own user, when it is not root)."""
        if not self.isolated:
            return None
        assert self.project is not None
        identity = self.identity or Identity(username=self.user.name)
        try:
            uid, gid = process_ids(identity, self.project)
        except AccessError as e:
            raise SpawnException(e.message, reason="identity", status_code=e.status) from e
        return isolation.RunAs(self.user.name, uid, gid, Path(self.home_dir).absolute())

    def authorize(self) -> None:
        super().authorize()
        self.run_as()  # refuse users without uidNumber (projects without gidNumber) before anything starts

    def _prepare(self, run_as: isolation.RunAs | None) -> int | None:
        """Directories and the log file (blocking: called in a thread)."""
        isolation.prepare_project_dir(self.project_dir, run_as.gid if run_as else None, isolate=run_as is not None)
        isolation.prepare_private_dir(Path(self.home_dir), run_as)
        if not self.log_dir:
            return None
        os.makedirs(self.log_dir, 0o700, exist_ok=True)
        fd = os.open(Path(self.log_dir) / f"{self.user.name}.{self.name}.log",
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, 0o600)
        return fd

    async def start(self):
        """Start the server: as the user (root hub) or as the hub's user, in the project dir.

        Its output goes to its own log (``log_dir``): a user's process never holds a file
        descriptor of a platform log.
        """
        if self.port == 0:
            self.port = random_port()
        run_as = self.run_as()
        argv, env = [*self.cmd, *self.get_args()], self.get_env()
        log = await asyncio.get_running_loop().run_in_executor(None, self._prepare, run_as)
        if run_as is not None:
            argv, env = run_as.command(argv, self.project_dir), run_as.environment(env)
        self.log.info("Spawning %s/%s%s", self.user.name, self.name,
                      f" as uid {run_as.uid}, gid {run_as.gid}" if run_as else " as the hub's user")
        try:
            self.proc = subprocess.Popen(
                argv, env=env, cwd="/" if run_as else self.project_dir, start_new_session=True,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT if log is not None else None,
            )
        finally:
            if log is not None:
                os.close(log)
        self.pid = self.proc.pid
        return (self.ip or "127.0.0.1", self.port)

    def get_args(self):
        args = [*super().get_args(), f"--ServerApp.root_dir={self.project_dir}"]
        if self.isolated:
            # kernels listen on loopback, where every user can connect: their channels are
            # encrypted and authenticated (CurveZMQ) with keys only the user can read
            args.append("--KernelManager.transport_encryption=required")
        return args

    def get_env(self):
        env = super().get_env()
        env.update(self.project_environment())
        env["LABYARD_PROJECT_DIR"] = str(self.project_dir)
        return env
