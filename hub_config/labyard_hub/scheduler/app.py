"""The ``labyard-scheduler`` hub service: a tornado REST API over a scheduler backend.

Every request is authenticated by the hub (OAuth cookie for browsers, ``Authorization: token``
for scripts and for the JupyterLab server extension). The user's uid, gid and projects come from
their auth_state (the service's role has ``read:users`` and ``admin:auth_state``), and every
decision goes through the backend, which uses :func:`labyard_hub.projects.authorize`.
Handlers are thin: parse -> pydantic model -> backend -> JSON. Errors are JSON ``{"message"}``.
The API is documented in docs/admin/scheduler.md.

Run by the hub as a managed service: ``python -m labyard_hub.scheduler.app`` (it reads the
installation's settings from ``$LABYARD_SETTINGS`` and its address from the hub's environment).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from urllib.parse import urlparse

from jupyterhub.services.auth import HubOAuth, HubOAuthCallbackHandler, HubOAuthenticated
from jupyterhub.utils import url_path_join
from pydantic import BaseModel, ValidationError
from tornado import web
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from ..projects import AccessError, Identity, ProjectPolicy
from .backend import Backend, BadRequest, NotFound
from .models import RunCreate, ScheduleCreate, ScheduleUpdate
from .params import ParameterError

log = logging.getLogger("labyard.scheduler")


def _validation_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        where = ".".join(str(x) for x in err.get("loc", ())) or "body"
        msg = err.get("msg", "invalid").removeprefix("Value error, ")
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


class IdentityCache:
    """The user's Identity from their auth_state on the hub, kept for ``max_age`` seconds."""

    def __init__(self, api_url: str, token: str, max_age: float = 30):
        self.api_url = api_url
        self.token = token
        self.max_age = max_age
        self._cache: dict[str, tuple[float, Identity]] = {}

    async def get(self, name: str) -> Identity:
        hit = self._cache.get(name)
        if hit and time.monotonic() - hit[0] < self.max_age:
            return hit[1]
        req = HTTPRequest(url_path_join(self.api_url, "users", name), headers={"Authorization": f"token {self.token}"},
                          request_timeout=10)
        try:
            resp = await AsyncHTTPClient().fetch(req)
        except HTTPClientError as e:
            raise web.HTTPError(502, f"cannot read {name}'s identity from the hub: {e}") from e
        model = json.loads(resp.body)
        identity = Identity.from_auth_state(name, model.get("auth_state"), admin=bool(model.get("admin")))
        self._cache[name] = (time.monotonic(), identity)
        return identity


class APIHandler(HubOAuthenticated, web.RequestHandler):
    hub_auth_class = HubOAuth

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
        message = self._reason
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, web.HTTPError) and exc.log_message:
            message = exc.log_message % exc.args if exc.args else exc.log_message
        self.finish(json.dumps({"message": message, "status": status_code}))

    async def identity(self) -> Identity:
        return await self.settings["identities"].get(self.current_user["name"])

    def body(self, model: type[BaseModel]) -> BaseModel:
        try:
            data = json.loads(self.request.body or b"{}")
        except json.JSONDecodeError as e:
            raise web.HTTPError(400, f"body is not JSON: {e}") from e
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise web.HTTPError(400, _validation_message(e)) from e

    def send(self, data, status: int = 200) -> None:
        self.set_status(status)
        if isinstance(data, BaseModel):
            data = data.model_dump(mode="json")
        elif isinstance(data, list):
            data = [d.model_dump(mode="json") if isinstance(d, BaseModel) else d for d in data]
        self.finish(json.dumps(data))


def api_errors(method):
    """Map backend exceptions to JSON errors: AccessError -> its status, NotFound -> 404, bad input -> 400."""

    async def wrapper(self, *args, **kwargs):
        try:
            return await method(self, *args, **kwargs)
        except AccessError as e:
            raise web.HTTPError(e.status, e.message.replace("%", "%%")) from e
        except NotFound as e:
            raise web.HTTPError(404, str(e).replace("%", "%%")) from e
        except ValidationError as e:
            raise web.HTTPError(400, _validation_message(e).replace("%", "%%")) from e
        except (BadRequest, ParameterError) as e:
            raise web.HTTPError(400, str(e).replace("%", "%%")) from e

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


class RunHandler(APIHandler):
    @api_errors
    async def get(self, rid):
        self.send(await self.backend.get_run(await self.identity(), rid))


class RunOutputHandler(APIHandler):
    @api_errors
    async def get(self, rid):
        data = await self.backend.run_output(await self.identity(), rid)
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
        from .models import check_notebook_path

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


def make_app(backend: Backend, prefix: str, hub_api_url: str, token: str) -> web.Application:
    api = url_path_join(prefix, "api")
    sid = r"([a-z0-9-]{1,64})"
    routes = [
        (url_path_join(api, "schedules") + "/?", SchedulesHandler),
        (url_path_join(api, "schedules", sid) + "/?", ScheduleHandler),
        (url_path_join(api, "schedules", sid, "(pause|resume)"), ScheduleActionHandler),
        (url_path_join(api, "schedules", sid, "runs") + "/?", ScheduleRunsHandler),
        (url_path_join(api, "runs") + "/?", RunsHandler),
        (url_path_join(api, "runs", sid) + "/?", RunHandler),
        (url_path_join(api, "runs", sid, "output"), RunOutputHandler),
        (url_path_join(api, "runs", sid, "log"), RunLogHandler),
        (url_path_join(api, "runs", sid, "cancel"), RunCancelHandler),
        (url_path_join(api, "inspect"), InspectHandler),
        (url_path_join(api, "whoami"), WhoAmIHandler),
        (url_path_join(prefix, "oauth_callback"), HubOAuthCallbackHandler),
    ]
    return web.Application(
        routes,
        backend=backend,
        identities=IdentityCache(hub_api_url, token),
        api_prefix=api,
        cookie_secret=os.urandom(32),
    )


def backend_from_settings() -> Backend:
    """The backend for this installation: Kubernetes when ``settings.kubernetes`` is set, else local."""
    from ..settings import Settings

    s = Settings.load()
    policy = ProjectPolicy.from_yaml(s.policy_file) if s.policy_file else ProjectPolicy.model_validate(
        {"flavors": {"default": {"display_name": "Default"}}})
    data_dir = s.data_dir / "scheduler"
    k = s.kubernetes
    if k is not None:
        from .kube import KubernetesBackend

        kubeconfig = k.scheduler_kubeconfig or k.kubeconfig
        return KubernetesBackend(policy, data_dir, image=k.image, kubeconfig=str(kubeconfig) if kubeconfig else None,
                                 extra_labels=k.pod_labels, mlflow_url=s.mlflow_url)
    from .local import LocalBackend

    # local processes get no GPU isolation: like the local spawner, offer CPU flavours only
    cpu_only = [f for f in policy.flavors.values() if f.gpus == 0]
    return LocalBackend(policy, data_dir, s.projects_dir, available_flavors=cpu_only, mlflow_url=s.mlflow_url)


async def serve(backend: Backend | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="[%(levelname)1.1s %(asctime)s %(name)s] %(message)s")
    backend = backend or backend_from_settings()
    url = urlparse(os.environ["JUPYTERHUB_SERVICE_URL"])
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/services/labyard-scheduler/")
    await backend.start()
    app = make_app(backend, prefix, os.environ["JUPYTERHUB_API_URL"], os.environ["JUPYTERHUB_API_TOKEN"])
    server = app.listen(url.port, address=url.hostname or "127.0.0.1", xheaders=True)
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
