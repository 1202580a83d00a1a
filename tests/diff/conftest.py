"""A real Jupyter server with the Labyard extension, for the diff API and nbdime's routes."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from bench.diff.notebooks import edited_rerun, executed

from ..support.jupyter import JupyterServer


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("diff-server")
    (base / "nlp").mkdir()
    (base / "nlp" / "secret.ipynb").write_text(json.dumps(executed(3, 1000, seed=9)))
    s = JupyterServer(base / "vision", project="vision").start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def small_pair(server):
    """Two versions of a 12-cell notebook in the project: fit.ipynb and fit-v2.ipynb."""
    a = executed(12, 20_000, seed=1)
    b = edited_rerun(a, seed=2, inserted=2, deleted=1, edited=0.3)
    (server.root / "fit.ipynb").write_text(json.dumps(a))
    (server.root / "fit-v2.ipynb").write_text(json.dumps(b))
    return a, b


def terminal(server: JupyterServer, script: str, timeout: float = 120) -> str:
    """Run shell commands in a terminal of the server (as a user would), return what it printed
    (with the commands echoed: print markers with ``printf '=%s=\\n' NAME`` to find output)."""

    async def run() -> str:
        from tornado.httpclient import HTTPRequest
        from tornado.websocket import websocket_connect

        import requests

        name = requests.post(f"{server.url}/api/terminals", headers=server.headers, timeout=30).json()["name"]
        ws = await websocket_connect(HTTPRequest(f"ws://127.0.0.1:{server.port}/terminals/websocket/{name}", headers=server.headers))
        # the terminal echoes what is typed: the marker is printed by printf, so it never appears as typed
        n = time.monotonic_ns()
        marker = f"done-{n}-done"
        await ws.write_message(json.dumps(["stdin", f"export PAGER=cat GIT_PAGER=cat TERM=dumb\n{script}\nprintf '%s-{n}-%s\\n' done done\n"]))
        out = ""
        deadline = time.monotonic() + timeout
        while marker not in out:
            msg = await asyncio.wait_for(ws.read_message(), max(1, deadline - time.monotonic()))
            if msg is None:
                break
            kind, *data = json.loads(msg)
            if kind == "stdout":
                out += data[0]
        ws.close()
        requests.delete(f"{server.url}/api/terminals/{name}", headers=server.headers, timeout=30)
        return out.replace("\r\n", "\n")

    return asyncio.run(run())
