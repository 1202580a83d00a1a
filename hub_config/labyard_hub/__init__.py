"""Labyard's hub side: LDAP identity and projects, spawners, services and the ``labyard`` CLI."""

from pathlib import Path

__version__ = "0.1.0"

TEMPLATES = str(Path(__file__).parent / "templates")


def hub_config_file() -> Path:
    """``jupyterhub_config.py``: beside the package in a checkout, inside it in a wheel."""
    here = Path(__file__).parent
    for candidate in (here.parent / "jupyterhub_config.py", here / "jupyterhub_config.py"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("jupyterhub_config.py is missing from the labyard installation")
