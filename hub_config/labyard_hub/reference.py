"""Render the configuration reference (docs/admin/reference.md) from the traitlets' own help.

    python -m labyard_hub.reference > docs/admin/reference.md

The help text declared on each trait is the reference; a test checks the file is current.
"""

from __future__ import annotations

import inspect
import sys

from traitlets import HasTraits

from labyard_lab.diff.handlers import LabyardDiff

from .directory import Directory
from .kube.spawner import ProjectKubeSpawner
from .ldap import LDAPAuthenticator
from .mlflow_gate.app import GateConfig
from .spawners import LocalProjectSpawner

CLASSES: list[type[HasTraits]] = [Directory, LDAPAuthenticator, LocalProjectSpawner, ProjectKubeSpawner, GateConfig, LabyardDiff]


def _own_traits(cls: type[HasTraits]) -> dict:
    """Config traits declared by Labyard classes (not inherited from JupyterHub)."""
    mine = {}
    for klass in cls.__mro__:
        if not klass.__module__.startswith(("labyard_hub", "labyard_lab")):
            continue
        for name, trait in klass.class_own_traits(config=True).items():
            mine.setdefault(name, trait)
    return dict(sorted(mine.items()))


def render() -> str:
    out = [
        "# Configuration reference",
        "",
        "Generated from the code by `python -m labyard_hub.reference`; do not edit by hand.",
        "Set these in `jupyterhub_config.py` (`c.<Class>.<name> = ...`), in the `ldap:` section of a",
        "`labyard up --config` file (Directory and LDAPAuthenticator), or through the Helm values; `LabyardDiff`",
        "in the single-user server's config (`jupyter_server_config.py`, docs/admin/diff.md).",
        "",
    ]
    for cls in CLASSES:
        out += [f"## {cls.__name__}", "", inspect.cleandoc(cls.__doc__ or ""), ""]
        for name, trait in _own_traits(cls).items():
            default = trait.default_value_repr()
            out.append(f"### `{cls.__name__}.{name}`")
            out.append("")
            out.append(f"{type(trait).__name__}, default `{default}`")
            out.append("")
            if trait.help:
                out.append(inspect.cleandoc(trait.help))
                out.append("")
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
