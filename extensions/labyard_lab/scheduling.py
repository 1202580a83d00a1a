"""Server-extension handlers that call the labyard-scheduler hub service on the user's behalf.

``/labyard/scheduler/<path>`` is passed to ``$LABYARD_SCHEDULER_URL/<path>`` (the service's
``api/`` URL) with this server's hub token, whose owner is the user (the hub's ``server`` role
grants it ``access:services!service=labyard-scheduler``). The browser therefore never needs a
token of its own, and the service still decides everything (project membership, flavours,
parameters): nothing here allows what the service would refuse.

A server acts for its own project only (``$LABYARD_PROJECT``), even for a user who is in others
too, so that one project's server never writes another project's notebooks or outputs into its
files: a request naming another project is 400, a change to (or opening the output of) a
schedule or run of another project 403, and lists are this project's. Reading one schedule or
run by id is left to the service (a member of both projects may read both).

Two additions, so that the service never has to read the user's files:

* ``POST schedules`` and ``POST inspect`` get ``project`` (this server's project) and
  ``notebook_content`` read from the notebook as saved on this server;
* ``POST runs/<id>/open`` copies a run's output notebook to
  ``scheduled-runs/<notebook name>/<run id>.ipynb`` in the project and returns its path (in
  Kubernetes mode the run wrote it there itself; it is opened where it is).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from urllib.parse import urlencode

import tornado
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import ensure_async, url_path_join
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

OUTPUT_DIR = "scheduled-runs"


def scheduler_url() -> str | None:
    return os.environ.get("LABYARD_SCHEDULER_URL")


async def call_scheduler(method: str, path: str, body: bytes | None = None, query: str = "", **kwargs):
    """One request to the scheduler service with this server's token (its owner is the user);
    the response whatever its status. Raises HTTPError 503/502 when there is no service or it
    does not answer. ``kwargs`` go to the HTTPRequest (e.g. ``streaming_callback``)."""
    if not scheduler_url():
        raise tornado.web.HTTPError(503, "no scheduler service is configured for this server (LABYARD_SCHEDULER_URL)")
    url = url_path_join(scheduler_url(), path) + (f"?{query}" if query else "")
    req = HTTPRequest(
        url, method=method, body=body if method in ("POST", "PATCH", "PUT") else None,
        headers={"Authorization": f"token {os.environ.get('JUPYTERHUB_API_TOKEN', '')}",
                 "Content-Type": "application/json", "Accept": "application/json"},
        request_timeout=60, allow_nonstandard_methods=True, **kwargs,
    )
    try:
        return await AsyncHTTPClient().fetch(req, raise_error=False)
    except (HTTPClientError, OSError) as e:
        raise tornado.web.HTTPError(502, f"the scheduler service did not answer: {e}") from e


#: paths that name one schedule or run: ``schedules/<id>...``, ``runs/<id>...``
_ITEM = re.compile(r"^(schedules|runs)/([a-z0-9-]{1,64})(/.*)?$")


class SchedulerProxyHandler(APIHandler):
    """Pass a request to the scheduler service and its answer back, for this server's project."""

    @property
    def project(self) -> str | None:
        return os.environ.get("LABYARD_PROJECT")

    def _same_project(self, asked) -> None:
        if self.project and asked not in (None, "", self.project):
            raise tornado.web.HTTPError(400, f"this server is for project {self.project!r}, not {asked!r}: "
                                             f"use a server of project {asked!r}")

    async def _check_item(self, path: str) -> None:
        """403 for a schedule or run of another project (the service answers 403/404 for the rest)."""
        match = _ITEM.match(path.strip("/"))
        if not match or not self.project:
            return
        kind, item = match.group(1), match.group(2)
        resp = await self.call("GET", f"{kind}/{item}")
        if resp.code == 200 and json.loads(resp.body).get("project") != self.project:
            raise tornado.web.HTTPError(403, f"{kind[:-1]} {item} is not of project {self.project!r}, this server's project")

    def _query(self) -> str:
        """The query string, limited to this server's project."""
        args = {k: [v.decode() for v in vs] for k, vs in self.request.query_arguments.items()}
        if self.project:
            self._same_project((args.get("project") or [None])[0])
            args["project"] = [self.project]
        return urlencode(args, doseq=True)

    async def call(self, method: str, path: str, body: bytes | None = None, query: str = ""):
        return await call_scheduler(method, path, body, query)

    def relay(self, resp) -> None:
        if resp.code == 599:
            raise tornado.web.HTTPError(502, f"the scheduler service did not answer: {resp.error}")
        self.set_status(resp.code)
        self.set_header("Content-Type", resp.headers.get("Content-Type", "application/json"))
        self.finish(resp.body or b"")

    def _with_project(self) -> bytes:
        try:
            data = json.loads(self.request.body or b"{}")
        except json.JSONDecodeError as e:
            raise tornado.web.HTTPError(400, f"body is not JSON: {e}") from e
        if isinstance(data, dict) and self.project:
            self._same_project(data.get("project"))
            data["project"] = self.project
        return json.dumps(data).encode()

    async def _with_notebook(self) -> bytes:
        try:
            data = json.loads(self.request.body or b"{}")
        except json.JSONDecodeError as e:
            raise tornado.web.HTTPError(400, f"body is not JSON: {e}") from e
        if isinstance(data, dict):
            if self.project:
                self._same_project(data.get("project"))
                data["project"] = self.project
            notebook = data.get("notebook")
            if isinstance(notebook, str) and data.get("notebook_content") is None:
                try:
                    model = await ensure_async(self.contents_manager.get(notebook, content=True, type="notebook"))
                except tornado.web.HTTPError as e:
                    raise tornado.web.HTTPError(400, f"cannot read notebook {notebook!r}: {e.log_message}") from e
                data["notebook_content"] = model["content"]
        return json.dumps(data, default=str).encode()

    @tornado.web.authenticated
    async def get(self, path):
        if path.strip("/") in ("schedules", "runs"):
            return self.relay(await self.call("GET", path, query=self._query()))
        self.relay(await self.call("GET", path, query=self.request.query))

    @tornado.web.authenticated
    async def post(self, path):
        if path.strip("/") in ("schedules", "inspect"):
            body = await self._with_notebook()
        elif path.strip("/") == "runs":  # a reproduction: of a run of this server's project only
            body = self._with_project()
        elif path.endswith("/open") and path.startswith("runs/"):
            return await self.open_output(path.split("/")[1])
        else:
            await self._check_item(path)
            body = self.request.body or b"{}"
        self.relay(await self.call("POST", path, body))

    @tornado.web.authenticated
    async def patch(self, path):
        await self._check_item(path)
        self.relay(await self.call("PATCH", path, self.request.body or b"{}"))

    @tornado.web.authenticated
    async def delete(self, path):
        await self._check_item(path)
        self.relay(await self.call("DELETE", path))

    async def open_output(self, run_id: str) -> None:
        run = await self.call("GET", f"runs/{run_id}")
        if run.code != 200:
            return self.relay(run)
        info = json.loads(run.body)
        if self.project and info.get("project") != self.project:
            # never copy another project's output into this project's files
            raise tornado.web.HTTPError(403, f"run {run_id} is not of project {self.project!r}, this server's project")
        stem = posixpath.splitext(posixpath.basename(info["notebook"]))[0]
        folder = posixpath.join(OUTPUT_DIR, stem)
        path = posixpath.join(folder, f"{run_id}.ipynb")
        cm = self.contents_manager
        output = await self.call("GET", f"runs/{run_id}/output")
        if output.code != 200:
            # Kubernetes mode: the run wrote its output into the project volume, which this server sees
            if output.code == 404 and await ensure_async(cm.file_exists(path)):
                return self.finish(json.dumps({"path": path, "run": info}))
            return self.relay(output)
        for d in (OUTPUT_DIR, folder):
            if not await ensure_async(cm.dir_exists(d)):
                await ensure_async(cm.save({"type": "directory"}, d))
        await ensure_async(cm.save({"type": "notebook", "format": "json", "content": json.loads(output.body)}, path))
        self.finish(json.dumps({"path": path, "run": info}))


def scheduling_handlers(base_url: str) -> list[tuple]:
    return [(url_path_join(base_url, "labyard", "scheduler", "(.*)"), SchedulerProxyHandler)]
