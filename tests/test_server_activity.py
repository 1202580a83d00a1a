"""A busy kernel is activity of its server (labyard_lab.activity), on a real Jupyter server.

jupyter-server itself counts only what kernels send: a cell that computes without printing
leaves the server's ``last_activity`` (``GET /api/status``, what jupyterhub-singleuser reports to
the hub) at the moment the cell started. With the labyard_lab server extension it keeps moving
while the kernel is busy.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
import requests

from labyard_lab.activity import BUSY_CHECK_SECONDS

from .mlflow.support import wait_for
from .support.jupyter import JupyterServer
from .support.kernel import Kernel


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = JupyterServer(tmp_path_factory.mktemp("activity") / "vision").start()
    yield s
    s.stop()


def _last_activity(server: JupyterServer) -> datetime:
    status = requests.get(f"{server.url}/api/status", headers=server.headers, timeout=30).json()
    return datetime.fromisoformat(status["last_activity"].replace("Z", "+00:00"))


def _kernel_state(server: JupyterServer, kernel: Kernel) -> str:
    return requests.get(f"{server.url}/api/kernels/{kernel.id}", headers=server.headers, timeout=30).json()["execution_state"]


def test_a_silent_busy_kernel_keeps_the_server_active(server):
    kernel = Kernel(server.url + "/", server.token)
    try:
        assert kernel.execute("x = 1")["status"] == "ok"
        # a cell that neither prints nor returns for ten minutes; nobody watches it
        kernel.submit("import time\ntime.sleep(600)")
        started = _last_activity(server)
        # the server reports activity after the cell's start, with no message from the kernel
        wait_for(lambda: _last_activity(server) >= started + timedelta(seconds=2 * BUSY_CHECK_SECONDS),
                 120, 0.5, what="the busy kernel's activity")
        assert _kernel_state(server, kernel) == "busy"
    finally:
        kernel.interrupt()
        wait_for(lambda: _kernel_state(server, kernel) == "idle", 60, 0.5, what="the kernel idle after the interrupt")
        kernel.shutdown()
