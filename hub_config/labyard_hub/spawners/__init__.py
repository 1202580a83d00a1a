"""Spawners: one server per user per project, local processes or Kubernetes pods."""

from .base import ProjectSpawnerMixin
from .local import LocalProjectSpawner

__all__ = ["LocalProjectSpawner", "ProjectSpawnerMixin"]
