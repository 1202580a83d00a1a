"""Labyard's JupyterLab side: server extension, frontend (prebuilt labextension), kernel autolog."""

from .handlers import setup_handlers

__version__ = "0.1.0"


def _jupyter_labextension_paths():
    return [{"src": "labextension", "dest": "labyard-lab"}]


def _jupyter_server_extension_points():
    return [{"module": "labyard_lab"}]


def _load_jupyter_server_extension(server_app):
    setup_handlers(server_app.web_app)
    server_app.log.info("labyard_lab server extension loaded")
