"""Run code in a kernel of a user's real server, through the proxy (Jupyter REST + websocket)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import datetime, timezone

import requests
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect


def _message(code: str, session: str) -> dict:
    return {
        "header": {"msg_id": uuid.uuid4().hex, "msg_type": "execute_request", "username": "test", "session": session,
                   "date": datetime.now(timezone.utc).isoformat(), "version": "5.3"},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                    "allow_stdin": False, "stop_on_error": True},
    }


async def _execute(ws_url: str, token: str, code: str, timeout: float) -> dict:
    ws = await websocket_connect(HTTPRequest(ws_url, headers={"Authorization": f"token {token}"}, request_timeout=60))
    session = uuid.uuid4().hex
    msg = _message(code, session)
    await ws.write_message(json.dumps(msg))
    out = {"stdout": "", "stderr": "", "error": None, "status": None}
    idle = False
    deadline = time.monotonic() + timeout
    try:
        while not (idle and out["status"]):
            raw = await asyncio.wait_for(ws.read_message(), max(1.0, deadline - time.monotonic()))
            if raw is None:
                raise ConnectionError("the kernel's websocket closed")
            reply = json.loads(raw)
            if reply.get("parent_header", {}).get("msg_id") != msg["header"]["msg_id"]:
                continue
            kind, content = reply["header"]["msg_type"], reply.get("content", {})
            if kind == "stream":
                out[content["name"]] += content["text"]
            elif kind == "error":
                out["error"] = f"{content['ename']}: {content['evalue']}"
            elif kind == "execute_reply":
                out["status"] = content["status"]
            elif kind == "status" and content.get("execution_state") == "idle":
                idle = True
    finally:
        ws.close()
    return out


async def _submit(ws_url: str, token: str, code: str, timeout: float) -> None:
    ws = await websocket_connect(HTTPRequest(ws_url, headers={"Authorization": f"token {token}"}, request_timeout=60))
    msg = _message(code, uuid.uuid4().hex)
    await ws.write_message(json.dumps(msg))
    deadline = time.monotonic() + timeout
    try:
        while True:
            raw = await asyncio.wait_for(ws.read_message(), max(1.0, deadline - time.monotonic()))
            if raw is None:
                raise ConnectionError("the kernel's websocket closed")
            reply = json.loads(raw)
            if (reply.get("parent_header", {}).get("msg_id") == msg["header"]["msg_id"]
                    and reply["header"]["msg_type"] == "status" and reply["content"].get("execution_state") == "busy"):
                return
    finally:
        ws.close()


class Kernel:
    """A kernel of a user's real server (``server_url`` like ``http://.../user/bob/vision/``),
    started and driven with the user's ``token``, as JupyterLab does."""

    def __init__(self, server_url: str, token: str):
        self.server_url = server_url
        self.headers = {"Authorization": f"token {token}"}
        self.token = token
        r = requests.post(server_url + "api/kernels", json={"name": "python3"}, headers=self.headers, timeout=60)
        r.raise_for_status()
        self.id = r.json()["id"]

    def execute(self, code: str, timeout: float = 180) -> dict:
        """Run ``code``; returns {"status": "ok"|"error", "stdout", "stderr", "error"}."""
        ws_url = self.server_url.replace("http://", "ws://", 1) + f"api/kernels/{self.id}/channels"
        return asyncio.run(_execute(ws_url, self.token, code, timeout))

    def submit(self, code: str, timeout: float = 60) -> None:
        """Start running ``code`` and return once the kernel says it is busy with it, leaving it
        running with nobody connected (a browser tab closed on a long cell)."""
        ws_url = self.server_url.replace("http://", "ws://", 1) + f"api/kernels/{self.id}/channels"
        asyncio.run(_submit(ws_url, self.token, code, timeout))

    def state(self) -> str:
        """The kernel's execution_state as its server sees it (busy, idle, ...)."""
        r = requests.get(self.server_url + f"api/kernels/{self.id}", headers=self.headers, timeout=60)
        r.raise_for_status()
        return r.json()["execution_state"]

    def interrupt(self) -> None:
        requests.post(self.server_url + f"api/kernels/{self.id}/interrupt", headers=self.headers, timeout=60).raise_for_status()

    def shutdown(self) -> None:
        requests.delete(self.server_url + f"api/kernels/{self.id}", headers=self.headers, timeout=60)
