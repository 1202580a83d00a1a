"""The ``labyard-scheduler`` hub service: a tornado REST API over a scheduler backend.

Every request is authenticated by the hub (OAuth cookie for browsers, ``Authorization: token``
for scripts and for the JupyterLab server extension). The user's uid, gid and current projects
come from the hub (:class:`labyard_hub.access.HubIdentities`: the hub's groups, kept in step
with LDAP; the service's role has ``read:users``, ``admin:auth_state`` and ``read:groups``), and
every decision goes through the backend, which asks :class:`labyard_hub.access.Access`.
Handlers are thin: parse -> pydantic model -> backend -> JSON. Errors are JSON ``{"message"}``:
400 for anything malformed (never a 500), 403 not allowed, 404 unknown id, 409 the schedule's
state forbids it, 413 body too large, 507 the disk is full. The API is documented in docs/admin/scheduler.md.

Run by the hub as a managed service: ``python -m labyard_hub.scheduler.app`` (it reads the
installation's settings from ``$LABYARD_SETTINGS`` and its address from the hub's environment).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import signal
import sqlite3
from urllib.parse import urlparse

from jupyterhub.services.auth import HubOAuth, HubOAuthCallbackHandler, HubOAuthenticated
from jupyterhub.utils import url_path_join
from pydantic import BaseModel, ValidationError
from tornado import web

from .. import isolation
from ..webutil import current_identity, error_message
from ..access import Access, AccessError, Identities, HubIdentities
from ..projects import Identity, validation_message
from .backend import Backend, BadRequest, Conflict, NotFound, Unavailable
from .models import ReproduceCreate, RunCreate, ScheduleCreate, ScheduleUpdate, check_notebook_path
from .params import ParameterError

log = logging.getLogger("labyard.scheduler")

#: JSON nested deeper than this is refused (a notebook is far shallower)
MAX_JSON_DEPTH = 100
#: a body up to this size is read (and dropped) before the 413, so that proxies in front see
#: an answer, not a connection closed while they were still sending; beyond it the connection closes
DISCARD_LIMIT = 1024**3


def json_depth(data) -> int:
    """How deeply ``data`` (parsed JSON) nests lists and objects, without recursion."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth)
            stack.extend((x, depth + 1) for x in item if isinstance(x, (dict, list)))
    return deepest


def parse_json(raw: bytes) -> object:
    """A request body as JSON; BadRequest saying what is wrong with it."""
    try:
        data = json.loads(raw or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"body is not JSON: {e}") from e
    except RecursionError as e:
        raise BadRequest(f"body is nested deeper than {MAX_JSON_DEPTH} levels") from e
    if json_depth(data) > MAX_JSON_DEPTH:
        raise BadRequest(f"body is nested deeper than {MAX_JSON_DEPTH} levels")
    return data


@web.stream_request_body
class APIHandler(HubOAuthenticated, web.RequestHandler):
    """Base of the API handlers: JSON errors, the caller's identity, bodies with a size limit.

    Bodies are streamed: up to ``max_body_bytes`` is kept; a larger one is read to its end
    (up to :data:`DISCARD_LIMIT`) without being kept, and answered 413.
    """

    hub_auth_class = HubOAuth

    def prepare(self):
        self._chunks: list[bytes] | None = []
        self._size = 0
        limit = self.settings["max_body_bytes"]
        length = self.request.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > DISCARD_LIMIT:
            raise web.HTTPError(413, f"body of {length} bytes is larger than {limit} bytes")
        self.request.connection.set_max_body_size(DISCARD_LIMIT)

    def data_received(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._chunks is not None and self._size <= self.settings["max_body_bytes"]:
            self._chunks.append(chunk)
        else:
            self._chunks = None

    @property
    def raw_body(self) -> bytes:
        if self._chunks is None:
            raise web.HTTPError(413, f"body of {self._size} bytes is larger than {self.settings['max_body_bytes']} bytes")
        return b"".join(self._chunks)

    @property
    def backend(self) -> Backend:
        return self.settings["backend"]

    def get_login_url(self):
        # API clients get a JSON 403, not a redirect to the login page
        if self.request.headers.get("Accept", "").startswith("text/html"):
            return super().get_login_url()
        raise web.HTTPError(403, "not logged in to the hub (send a token or log in)")

    def set_default_headers(self):
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")

    def write_error(self, status_code: int, **kwargs):
        self.finish(json.dumps({"message": error_message(self, **kwargs), "status": status_code}))

    async def identity(self) -> Identity:
        return await current_identity(self)

    def body(self, model: type[BaseModel]) -> BaseModel:
        """The body as ``model``: 413 if too large, 400 (naming the fields) if not what it must be."""
        data = parse_json(self.raw_body)
        try:
            return model.model_validate(data)
        except RecursionError as e:
            raise BadRequest(f"body is nested deeper than {MAX_JSON_DEPTH} levels") from e

    def send(self, data, status: int = 200) -> None:
        self.set_status(status)
        if isinstance(data, BaseModel):
            data = data.model_dump(mode="json")
        elif isinstance(data, list):
            data = [d.model_dump(mode="json") if isinstance(d, BaseModel) else d for d in data]
        self.finish(json.dumps(data))


def disk_full(e: Exception) -> bool:
    """Whether ``e`` says the disk (or the quota) is full: an OSError, or sqlite's own error."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return "database or disk is full" in str(e)


def api_errors(method):
    """Map backend exceptions to JSON errors: AccessError -> its status, NotFound -> 404,
    Conflict -> 409, bad input -> 400, Unavailable (e.g. the project namespace is not set up
    yet) -> 503."""

    async def wrapper(self, *args, **kwargs):
        try:
            return await method(self, *args, **kwargs)
        except AccessError as e:
            raise web.HTTPError(e.status, e.message.replace("%", "%%")) from e
        except NotFound as e:
            raise web.HTTPError(404, str(e).replace("%", "%%")) from e
        except Conflict as e:
            raise web.HTTPError(409, str(e).replace("%", "%%")) from e
        except ValidationError as e:
            raise web.HTTPError(400, validation_message(e).replace("%", "%%")) from e
        except (BadRequest, ParameterError) as e:
            raise web.HTTPError(400, str(e).replace("%", "%%")) from e
        except Unavailable as e:
            raise web.HTTPError(503, str(e).replace("%", "%%")) from e
        except (OSError, sqlite3.OperationalError) as e:
            if not disk_full(e):
                raise
            log.error("%s %s: no space left on the scheduler's disk (%s): %s", self.request.method, self.request.path,
                      self.backend.data_dir, e)
            raise web.HTTPError(507, f"no space left on the platform's disk: nothing was saved ({e}). "
                                     "Ask your administrator to free space, then try again.".replace("%", "%%")) from e

    wrapper.__name__ = method.__name__
    return web.authenticated(wrapper)


class SchedulesHandler(APIHandler):
    @api_errors
    async def get(self):
        project = self.get_argument("project", None)
        self.send(await self.backend.list_schedules(await self.identity(), project))

    @api_errors
    async def post(self):
        req = self.body(ScheduleCreate)
        schedule, run = await self.backend.create_schedule(await self.identity(), req)
        data = schedule.model_dump(mode="json")
        if run is not None:
            data["run"] = run.model_dump(mode="json")
        self.set_header("Location", url_path_join(self.settings["api_prefix"], "schedules", schedule.id))
        self.send(data, 201)


class ScheduleHandler(APIHandler):
    @api_errors
    async def get(self, sid):
        self.send(await self.backend.get_schedule(await self.identity(), sid))

    @api_errors
    async def patch(self, sid):
        self.send(await self.backend.update_schedule(await self.identity(), sid, self.body(ScheduleUpdate)))

    @api_errors
    async def delete(self, sid):
        await self.backend.delete_schedule(await self.identity(), sid)
        self.set_status(204)
        self.finish()


class ScheduleActionHandler(APIHandler):
    @api_errors
    async def post(self, sid, action):
        self.send(await self.backend.set_paused(await self.identity(), sid, action == "pause"))


class ScheduleRunsHandler(APIHandler):
    @api_errors
    async def get(self, sid):
        self.send(await self.backend.list_runs(await self.identity(), schedule_id=sid))

    @api_errors
    async def post(self, sid):
        run = await self.backend.run_now(await self.identity(), sid, self.body(RunCreate))
        self.set_header("Location", url_path_join(self.settings["api_prefix"], "runs", run.id))
        self.send(run, 201)


class RunsHandler(APIHandler):
    @api_errors
    async def get(self):
        self.send(await self.backend.list_runs(await self.identity(), schedule_id=self.get_argument("schedule", None),
                                               project=self.get_argument("project", None)))

    @api_errors
    async def post(self):
        """``POST runs`` ``{"reproduce": "<MLflow run id>", ...}``: 201, the reproduction's run."""
        data = parse_json(self.raw_body)
        if not isinstance(data, dict) or "reproduce" not in data:
            raise BadRequest('POST runs needs {"reproduce": "<MLflow run id>"} (other runs start from a schedule: '
                             "POST schedules/{id}/runs)")
        req = ReproduceCreate.model_validate(data)
        run = await self.backend.reproduce(await self.identity(), req)
        self.set_header("Location", url_path_join(self.settings["api_prefix"], "runs", run.id))
        self.send(run, 201)


class RunHandler(APIHandler):
    @api_errors
    async def get(self, rid):
        self.send(await self.backend.get_run(await self.identity(), rid))


class RunNotebookHandler(APIHandler):
    """``GET runs/{id}/output`` (the executed notebook) and ``runs/{id}/input`` (what it executed)."""

    @api_errors
    async def get(self, rid, which):
        read = self.backend.run_output if which == "output" else self.backend.run_input
        data = await read(await self.identity(), rid)
        self.set_header("Content-Type", "application/x-ipynb+json")
        self.finish(data)


class RunLogHandler(APIHandler):
    @api_errors
    async def get(self, rid):
        text = await self.backend.run_log(await self.identity(), rid)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(text)


class RunCancelHandler(APIHandler):
    @api_errors
    async def post(self, rid):
        self.send(await self.backend.cancel_run(await self.identity(), rid))


class InspectRequest(BaseModel):
    project: str
    notebook: str
    notebook_content: dict | None = None


class InspectHandler(APIHandler):
    """``POST inspect``: the parameters (types, defaults) and flavours the Schedule dialog offers."""

    @api_errors
    async def post(self):
        req = self.body(InspectRequest)
        identity = await self.identity()
        try:
            notebook = check_notebook_path(req.notebook)
        except ValueError as e:
            raise BadRequest(str(e)) from e
        digest, specs = await self.backend.parameters_of(identity, req.project, notebook, req.notebook_content)
        flavors = self.backend.flavors_for(identity, req.project)
        self.send({
            "notebook_sha256": digest,
            "parameters": [s.model_dump(mode="json") for s in specs],
            "flavors": [{"name": f.name, "display_name": f.label, "gpus": f.gpus} for f in flavors],
        })


class WhoAmIHandler(APIHandler):
    @api_errors
    async def get(self):
        identity = await self.identity()
        self.send({"name": identity.username, "projects": identity.project_names, "admin": identity.admin})


def make_app(backend: Backend, prefix: str) -> web.Application:
    """The service's tornado application over ``backend`` (whose identity source it shares)."""
    api = url_path_join(prefix, "api")
    sid = r"([a-z0-9-]{1,64})"
    routes = [
        (url_path_join(api, "schedules") + "/?", SchedulesHandler),
        (url_path_join(api, "schedules", sid) + "/?", ScheduleHandler),
        (url_path_join(api, "schedules", sid, "(pause|resume)"), ScheduleActionHandler),
        (url_path_join(api, "schedules", sid, "runs") + "/?", ScheduleRunsHandler),
        (url_path_join(api, "runs") + "/?", RunsHandler),
        (url_path_join(api, "runs", sid) + "/?", RunHandler),
        (url_path_join(api, "runs", sid, "(output|input)"), RunNotebookHandler),
        (url_path_join(api, "runs", sid, "log"), RunLogHandler),
        (url_path_join(api, "runs", sid, "cancel"), RunCancelHandler),
        (url_path_join(api, "inspect"), InspectHandler),
        (url_path_join(api, "whoami"), WhoAmIHandler),
        (url_path_join(prefix, "oauth_callback"), HubOAuthCallbackHandler),
    ]
    return web.Application(
        routes,
        backend=backend,
        identities=backend.identities,
        max_body_bytes=backend.limits.max_body_bytes,
        api_prefix=api,
        cookie_secret=os.urandom(32),
    )


def backend_from_settings(identities: Identities) -> Backend:
    """The backend for this installation: Kubernetes when ``settings.kubernetes`` is set, else local.

    Args:
        identities: where users' current identities come from (the hub, in the service).
    """
    from ..settings import Settings

    from .tokens import RunTokens

    s = Settings.load()
    access = Access.from_settings(s)
    data_dir = s.data_dir / "scheduler"
    # runs log to MLflow through the gate, as their owner (tokens for MLflow only)
    mlflow = {"mlflow_url": s.mlflow_gated_uri, "run_tokens": RunTokens.from_env() if s.mlflow_url else None}
    k = s.kubernetes
    common = {"identities": identities, "limits": s.scheduler, **mlflow}
    if k is not None:
        from .kube import KubernetesBackend

        kubeconfig = k.scheduler_kubeconfig or k.kubeconfig
        return KubernetesBackend(access, data_dir, image=k.image, kubeconfig=str(kubeconfig) if kubeconfig else None,
                                 extra_labels=k.pod_labels, **common)
    from .local import LocalBackend

    # as root, runs execute as their owners (docs/admin/local.md)
    return LocalBackend(access, data_dir, s.projects_dir, homes_dir=s.homes_dir, run_files_dir=s.run_files_dir,
                        isolate=isolation.enabled(), **common)


async def serve(backend: Backend | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="[%(levelname)1.1s %(asctime)s %(name)s] %(message)s")
    backend = backend or backend_from_settings(HubIdentities(os.environ["JUPYTERHUB_API_URL"], os.environ["JUPYTERHUB_API_TOKEN"]))
    url = urlparse(os.environ["JUPYTERHUB_SERVICE_URL"])
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/services/labyard-scheduler/")
    await backend.start()
    app = make_app(backend, prefix)
    server = app.listen(url.port, address=url.hostname or "127.0.0.1", xheaders=True, max_body_size=DISCARD_LIMIT)
    log.info("labyard-scheduler listening on %s (%s backend)", url.geturl(), type(backend).__name__)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    hub_pid = os.getppid()

    async def watch_parent():
        # a hub that dies (or stops us while we were still starting) must not leave us firing schedules
        while not stop.is_set():
            await asyncio.sleep(2)
            if os.getppid() != hub_pid:
                log.warning("the hub (pid %d) is gone; stopping", hub_pid)
                stop.set()

    watcher = asyncio.create_task(watch_parent())
    await stop.wait()
    watcher.cancel()
    server.stop()
    await backend.stop()
    log.info("labyard-scheduler stopped")


def main() -> None:
    asyncio.run(serve())


if __name__ == "__main__":
    main()
