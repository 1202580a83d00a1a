"""Labyard's JupyterLab side: server extension, frontend (prebuilt labextension), kernel autolog."""

__version__ = "0.1.0"


def _jupyter_labextension_paths():
    return [{"src": "labextension", "dest": "labyard-lab"}]


def _jupyter_server_extension_points():
    return [{"module": "labyard_lab"}]


def _load_jupyter_server_extension(server_app):
    from .handlers import setup_handlers  # here, so that the kernel side and the diff worker stay light

    setup_handlers(server_app)
    from .activity import watch_busy_kernels  # a busy kernel keeps its server from being culled

    watch_busy_kernels(server_app)
    server_app.log.info("labyard_lab server extension loaded")
