"""Run hub_config/jupyterhub_config.py as the hub would, on a settings file, without a hub."""

from __future__ import annotations

import os
from pathlib import Path

from traitlets.config import Config

ROOT = Path(__file__).resolve().parents[2]


def hub_config(settings_file: Path) -> Config:
    """The ``c`` that jupyterhub_config.py makes from ``settings_file`` ($LABYARD_SETTINGS)."""
    config = Config()
    old = os.environ.get("LABYARD_SETTINGS")
    os.environ["LABYARD_SETTINGS"] = str(settings_file)
    try:
        code = (ROOT / "hub_config" / "jupyterhub_config.py").read_text()
        exec(compile(code, "jupyterhub_config.py", "exec"), {"get_config": lambda: config})
    finally:
        if old is None:
            del os.environ["LABYARD_SETTINGS"]
        else:
            os.environ["LABYARD_SETTINGS"] = old
    return config
