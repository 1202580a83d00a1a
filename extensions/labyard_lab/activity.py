"""A busy kernel is activity: a cell that computes without printing keeps its server from being culled.

jupyter-server counts what a kernel *sends* (its IOPub messages) as activity, not its being busy:
a cell that trains for an hour with no output looks idle from its first second, and the idle
culler (docs/admin/kubernetes.md, "Idle culling") would stop the server, and free its GPU, in the
middle of the run. The hub learns of a server's activity from jupyterhub-singleuser, which sends
``web_app.last_activity()`` every ``JUPYTERHUB_ACTIVITY_INTERVAL`` seconds; that includes every
``*_last_activity`` value of the web app's settings (jupyter-server's hook for extensions). While
any kernel is busy, this module sets ``labyard_busy_kernels_last_activity`` to the time of its
check, every :data:`BUSY_CHECK_SECONDS`.
"""

from __future__ import annotations

from datetime import datetime, timezone

from tornado.ioloop import PeriodicCallback

#: seconds between two looks at the kernels' states (a dict walk in memory: cheap)
BUSY_CHECK_SECONDS = 5
#: the web app setting jupyter-server's ``last_activity()`` reads (its name must end in ``_last_activity``)
SETTING = "labyard_busy_kernels_last_activity"


def busy_kernels(kernel_manager) -> list[str]:
    """Ids of the kernels whose last status was ``busy`` (running a cell, or any other request)."""
    ids = []
    for kernel_id in kernel_manager.list_kernel_ids():
        try:
            kernel = kernel_manager.get_kernel(kernel_id)
        except KeyError:  # shut down meanwhile
            continue
        if getattr(kernel, "execution_state", None) == "busy":
            ids.append(kernel_id)
    return ids


def mark_busy_kernels(settings: dict) -> bool:
    """Record now as the server's activity if a kernel is busy; whether one was."""
    if busy_kernels(settings["kernel_manager"]):
        settings[SETTING] = datetime.now(timezone.utc)  # aware, as jupyter-server's own times
        return True
    return False


def watch_busy_kernels(server_app, interval: float = BUSY_CHECK_SECONDS) -> PeriodicCallback:
    """Check the kernels every ``interval`` seconds on the server's event loop (started here)."""
    settings = server_app.web_app.settings
    callback = PeriodicCallback(lambda: mark_busy_kernels(settings), interval * 1000)
    callback.start()
    return callback
