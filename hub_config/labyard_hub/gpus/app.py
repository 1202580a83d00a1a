"""The ``labyard-gpus`` hub service: the admin's GPU page and API, and members' project share.

Routes (under ``/services/labyard-gpus/``):

* ``GET /`` the page; ``GET api/allocations`` its data as JSON; ``GET api/usage?by=project|user
  &period=day|week|month[&since=YYYY-MM-DD][&format=csv]`` GPU-hours; ``GET api/intervals`` the
  recorded interval of each pod they come from: **hub admins only** (403 for anybody else);
* ``GET api/projects/<project>/share``: the project's GPU quota, GPUs in use and the caller's
  GPU-hours this month, for **members of the project** (and admins); ``GET projects/<project>/share``
  the same as one line of HTML, which the hub's home page shows in an iframe per project (a page
  load: the hub's OAuth logs the user in to the service on the way, which a script's fetch()
  could not, JupyterHub asking cookie-authenticated fetches for the service's XSRF token).

Every request is authenticated by the hub (OAuth cookie for browsers, ``Authorization: token``
for scripts); who is an admin or a member is read from the hub (:class:`HubIdentities`), as
everywhere in Labyard. Without a login, a browser is sent to the hub's login; a request with a
token the hub refuses gets 401. Errors are JSON ``{"message", "status"}``: 400 a bad parameter
(named), 403, 404, 503 when Kubernetes did not answer the last read (the reason said).

Run by the hub (``python -m labyard_hub.gpus.app``) in Kubernetes mode only; the Helm chart runs
it as its own Deployment. Documented in docs/admin/gpus.md.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import os
import signal
from datetime import date, datetime, time, timezone
from urllib.parse import urlparse

from jupyterhub.services.auth import HubOAuth, HubOAuthCallbackHandler, HubOAuthenticated
from jupyterhub.utils import url_path_join
from tornado import web

from ..access import HubIdentities, Identities
from ..projects import Identity
from ..webutil import current_identity, error_message
from . import page
from .cluster import ClusterReader, ClusterUnavailable
from .usage import GROUPINGS, PERIODS, UsageStore, period_start

log = logging.getLogger("labyard.gpus")


class BaseHandler(HubOAuthenticated, web.RequestHandler):
    hub_auth_class = HubOAuth

    @property
    def reader(self) -> ClusterReader:
        return self.settings["reader"]

    @property
    def usage(self) -> UsageStore:
        return self.settings["usage"]

    def get_login_url(self):
        # a script that sent a token the hub refused: 401, not a login page
        if self.request.headers.get("Authorization"):
            raise web.HTTPError(401, "the hub did not accept this token")
        return super().get_login_url()

    def set_default_headers(self):
        self.set_header("Cache-Control", "no-store")

    def write_error(self, status_code: int, **kwargs):
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"message": error_message(self, **kwargs), "status": status_code}))

    async def identity(self) -> Identity:
        return await current_identity(self)

    async def admin(self) -> Identity:
        identity = await self.identity()
        if not identity.admin:
            raise web.HTTPError(403, f"{identity.username} is not a hub admin: the GPU view is for admins only")
        return identity

    def snapshot(self):
        try:
            return self.reader.current()
        except ClusterUnavailable as e:
            raise web.HTTPError(503, str(e).replace("%", "%%")) from e

    def choice(self, name: str, allowed: tuple[str, ...], default: str) -> str:
        """Query parameter ``name``, one of ``allowed``; 400 naming it otherwise."""
        value = self.get_argument(name, default)
        if value not in allowed:
            raise web.HTTPError(400, f"{name} must be one of {', '.join(allowed)}, not {value!r}".replace("%", "%%"))
        return value

    def wants_csv(self) -> bool:
        """``format=csv``, or no format and ``Accept: text/csv``; 400 for another format."""
        fmt = self.get_argument("format", None)
        if fmt not in (None, "json", "csv"):
            raise web.HTTPError(400, f"format must be json or csv, not {fmt!r}".replace("%", "%%"))
        return fmt == "csv" or (fmt is None and "text/csv" in self.request.headers.get("Accept", ""))

    def since(self) -> datetime | None:
        try:
            return parse_since(self.get_argument("since", None))
        except ValueError as e:
            raise web.HTTPError(400, str(e).replace("%", "%%")) from e

    def send(self, data) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(data, default=str))


class PageHandler(BaseHandler):
    @web.authenticated
    async def get(self):
        await self.admin()
        error = None
        try:
            snapshot = self.reader.current()
        except ClusterUnavailable as e:
            snapshot, error = None, str(e)
        self.set_status(503 if error else 200)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(page.render(snapshot, error, self.settings["prefix"], datetime.now(timezone.utc)))


class AllocationsHandler(BaseHandler):
    @web.authenticated
    async def get(self):
        await self.admin()
        self.send(self.snapshot().model_dump(mode="json"))


def parse_since(value: str | None) -> datetime | None:
    """``since=YYYY-MM-DD`` (UTC midnight); ValueError naming the parameter."""
    if value is None:
        return None
    try:
        return datetime.combine(date.fromisoformat(value), time(), tzinfo=timezone.utc)
    except ValueError as e:
        raise ValueError(f"since must be a date YYYY-MM-DD, not {value!r}") from e


class UsageHandler(BaseHandler):
    @web.authenticated
    async def get(self):
        await self.admin()
        by = self.choice("by", GROUPINGS, "project")
        period = self.choice("period", PERIODS, "month")
        csv_wanted, since = self.wants_csv(), self.since()
        report = await self.usage.report(by, period, datetime.now(timezone.utc), since)
        if csv_wanted:
            self.set_header("Content-Type", "text/csv; charset=utf-8")
            self.set_header("Content-Disposition", f'attachment; filename="gpu-hours-by-{by}-per-{period}.csv"')
            self.finish(report.csv())
        else:
            self.send(report.model_dump(mode="json"))


class IntervalsHandler(BaseHandler):
    """``GET api/intervals[?since=YYYY-MM-DD][&format=csv]``: the recorded GPU intervals (one per
    pod), with their GPU-hours up to now: where the GPU-hours of the reports come from."""

    @web.authenticated
    async def get(self):
        await self.admin()
        csv_wanted, since = self.wants_csv(), self.since()
        now = datetime.now(timezone.utc)
        rows = [interval_row(iv, now) for iv in await self.usage.intervals(since)]
        if csv_wanted:
            out = io.StringIO()
            writer = csv.DictWriter(out, fieldnames=list(INTERVAL_FIELDS), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
            self.set_header("Content-Type", "text/csv; charset=utf-8")
            self.set_header("Content-Disposition", 'attachment; filename="gpu-intervals.csv"')
            self.finish(out.getvalue())
        else:
            self.send({"as_of": now.isoformat(), "intervals": rows})


INTERVAL_FIELDS = ("uid", "namespace", "pod", "kind", "project", "user", "server", "schedule", "run", "gpus",
                   "start", "end", "gpu_hours")


def interval_row(iv: dict, now: datetime) -> dict:
    """One recorded interval for the API: times in ISO 8601, GPU-hours up to its end (or ``now``)."""
    end = iv["end"] if iv["end"] is not None else now.timestamp()
    row = {k: iv.get(k) for k in INTERVAL_FIELDS}
    row["start"] = datetime.fromtimestamp(iv["start"], timezone.utc).isoformat()
    row["end"] = datetime.fromtimestamp(iv["end"], timezone.utc).isoformat() if iv["end"] is not None else None
    row["gpu_hours"] = round(max(0.0, end - iv["start"]) * iv["gpus"] / 3600, 9)
    return row


class ShareHandler(BaseHandler):
    """A project's GPU quota, GPUs in use and the caller's GPU-hours this month (members, admins):
    JSON under ``api/``, or (``html=True``) the line the hub's home page shows in an iframe."""

    def initialize(self, html: bool = False):
        self.html = html

    async def share(self, project: str) -> dict:
        identity = await self.identity()
        if not identity.admin and identity.project(project) is None:
            raise web.HTTPError(403, f"{identity.username} is not a member of project {project!r}".replace("%", "%%"))
        snapshot = self.snapshot()
        figures = next((p for p in snapshot.projects if p.project == project), None)
        now = datetime.now(timezone.utc)
        month = period_start(now, "month")
        report = await self.usage.report("user", "month", now, month, project=project, user=identity.username)
        return {
            "project": project,
            "quota": figures.quota if figures else None,
            # the policy's quota.gpus limits each GPU resource of the project alike
            "gpu_quota": max(figures.quota.values(), default=0) if figures and figures.quota is not None else None,
            "in_use": figures.in_use if figures else 0,
            "waiting": len(figures.waiting) if figures else 0,
            "user": identity.username,
            "month": month.date().isoformat(),
            "gpu_hours_this_month": round(sum(r.gpu_hours for r in report.rows), 6),
            "as_of": now.isoformat(),
        }

    @web.authenticated
    async def get(self, project):
        data = await self.share(project)
        if not self.html:
            self.send(data)
            return
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(page.share(data))

    def write_error(self, status_code: int, **kwargs):
        if not self.html:
            return super().write_error(status_code, **kwargs)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(page.share_error(error_message(self, **kwargs)))


PROJECT = r"([a-z0-9][-a-z0-9_.]{0,62})"


def make_app(reader: ClusterReader, usage: UsageStore, identities: Identities, prefix: str) -> web.Application:
    api = url_path_join(prefix, "api")
    return web.Application([
        (prefix.rstrip("/") + "/?", PageHandler),
        (url_path_join(api, "allocations") + "/?", AllocationsHandler),
        (url_path_join(api, "usage") + "/?", UsageHandler),
        (url_path_join(api, "intervals") + "/?", IntervalsHandler),
        (url_path_join(api, "projects", PROJECT, "share") + "/?", ShareHandler),
        # what the hub's home page shows in each project's row, in an iframe: a page load (a
        # navigation), so the hub's OAuth logs the user in to the service on the way
        (url_path_join(prefix, "projects", PROJECT, "share") + "/?", ShareHandler, {"html": True}),
        (url_path_join(prefix, "oauth_callback"), HubOAuthCallbackHandler),
    ], reader=reader, usage=usage, identities=identities, prefix=prefix, cookie_secret=os.urandom(32))


async def make_api(kubeconfig: str | None):
    """A kubernetes_asyncio ApiClient (``kubeconfig``, else the pod's service account)."""
    from kubernetes_asyncio import config as kube_config
    from kubernetes_asyncio.client import ApiClient

    if kubeconfig:
        await kube_config.load_kube_config(config_file=kubeconfig)
    else:
        kube_config.load_incluster_config()
    return ApiClient()


async def serve() -> None:
    from ..settings import Settings
    from .cluster import HubActivity
    from .dcgm import Prometheus

    logging.basicConfig(level=logging.INFO, format="[%(levelname)1.1s %(asctime)s %(name)s] %(message)s")
    s = Settings.load()
    g = s.gpus
    api_url, token = os.environ["JUPYTERHUB_API_URL"], os.environ["JUPYTERHUB_API_TOKEN"]
    k = s.kubernetes
    if k is None:
        raise SystemExit("labyard-gpus: Kubernetes mode only (local mode has no GPU inventory; docs/admin/gpus.md)")
    kubeconfig = k.gpus_kubeconfig or k.kubeconfig
    api = await make_api(str(kubeconfig) if kubeconfig else None)
    usage = UsageStore(s.data_dir / "gpus" / "usage.sqlite")
    reader = ClusterReader(api, usage, HubActivity(api_url, token),
                           Prometheus(g.prometheus_url, g.prometheus_timeout) if g.prometheus_url else None,
                           poll_interval=g.poll_interval, kube_timeout=g.kube_timeout, idle_threshold=g.idle_threshold)
    url = urlparse(os.environ["JUPYTERHUB_SERVICE_URL"])
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/services/labyard-gpus/")
    app = make_app(reader, usage, HubIdentities(api_url, token), prefix)
    server = app.listen(url.port, address=url.hostname or "127.0.0.1", xheaders=True)
    log.info("labyard-gpus listening on %s (Prometheus: %s)", url.geturl(), g.prometheus_url or "not configured")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    poller = asyncio.create_task(reader.run(stop))
    await stop.wait()
    server.stop()
    await poller
    await api.close()
    usage.close()
    log.info("labyard-gpus stopped")


def main() -> None:
    asyncio.run(serve())


if __name__ == "__main__":
    main()
