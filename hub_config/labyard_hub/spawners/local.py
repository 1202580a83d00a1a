"""Local mode: each project server is a JupyterLab process on this machine."""

from __future__ import annotations

import os
from pathlib import Path

from jupyterhub.spawner import SimpleLocalProcessSpawner
from traitlets import Bool, Unicode

from ..projects import Flavor
from .base import ProjectSpawnerMixin


class LocalProjectSpawner(ProjectSpawnerMixin, SimpleLocalProcessSpawner):
    """One JupyterLab process per user and project, working in the project's directory.

    For a demo or a single workstation only: every server runs as the hub's own system user,
    so users are NOT isolated from each other (any notebook can read every project directory).
    Use the Kubernetes spawner for a shared installation.
    """

    projects_dir = Unicode(
        "projects",
        help="Directory holding one working directory per project (``<projects_dir>/<project>``).",
    ).tag(config=True)
    allow_gpu_flavors = Bool(
        False, help="Offer flavours that ask for GPUs (local processes get no GPU isolation)."
    ).tag(config=True)

    def offered_flavors(self, project: str) -> list[Flavor]:
        flavors = super().offered_flavors(project)
        return flavors if self.allow_gpu_flavors else [f for f in flavors if f.gpus == 0]

    @property
    def project_dir(self) -> Path:
        return Path(self.projects_dir).absolute() / self.name

    def make_preexec_fn(self, name):
        project_dir = self.project_dir
        home = self.home_dir

        def preexec():
            os.makedirs(home, 0o700, exist_ok=True)
            os.makedirs(project_dir, 0o770, exist_ok=True)
            os.chdir(project_dir)

        return preexec

    def get_args(self):
        args = [*super().get_args(), f"--ServerApp.root_dir={self.project_dir}"]
        if os.geteuid() == 0:
            # local mode runs every server as the hub's own user; when that is root (a demo in
            # a container or CI) JupyterLab must be told it is meant
            args.append("--ServerApp.allow_root=True")
        return args

    def get_env(self):
        env = super().get_env()
        env.update(self.project_environment())
        env["LABYARD_PROJECT_DIR"] = str(self.project_dir)
        return env
