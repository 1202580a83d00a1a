"""The MLflow UI and API behind the hub login: a JupyterHub service at ``/services/mlflow/``.

Run by the hub as a managed service (see ``jupyterhub_config.py``)::

    python -m labyard_hub.services.mlflow_proxy

Environment: the hub's service variables (``JUPYTERHUB_SERVICE_URL``, ``JUPYTERHUB_SERVICE_PREFIX``,
``JUPYTERHUB_API_TOKEN``, ...) and ``LABYARD_MLFLOW_UPSTREAM``, the internal MLflow server.

Every request must carry a hub login (browser: OAuth cookie of this service; API: a hub token in
``Authorization: token ...``) with the ``access:services!service=mlflow`` scope; anything else is
sent to the hub's login page (browser) or refused with 403. Requests are forwarded with the
prefix stripped, the user's name in ``X-Labyard-User`` and the response streamed back.

Project isolation (see docs/admin/mlflow.md): MLflow itself has no per-experiment permissions.
This proxy is the place to enforce them (experiment names start with ``<project>/``; the user's
hub groups are the projects). Today it only authenticates; our own Runs panel never asks for
another project's experiments. :func:`project_of_experiment` and :func:`allowed` are the
decision the enforcing step will call.
"""

from __future__ import annotations

import logging
import os
from urllib.parse import urlsplit

from jupyterhub.services.auth import HubOAuthCallbackHandler, HubOAuthenticated
from jupyterhub.utils import url_path_join
from tornado import httpclient, httputil, ioloop, web

log = logging.getLogger("labyard.mlflow_proxy")

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "host", "cookie", "authorization", "content-length"}
MAX_BODY = 2 * 1024**3  # artifact uploads through the UI/API


def project_of_experiment(name: str) -> str | None:
    """``"vision/analysis/fit.ipynb"`` → ``"vision"``; None for names outside the convention."""
    project, sep, _ = name.partition("/")
    return project if sep and project else None


def allowed(user_groups: set[str], experiment_name: str, admin: bool = False) -> bool:
    """May a user with these hub groups (= projects) see this experiment?"""
    project = project_of_experiment(experiment_name)
    return admin or (project is not None and project in user_groups)


@web.stream_request_body
class ProxyHandler(HubOAuthenticated, web.RequestHandler):
    """Forwards ``<prefix><path>`` to ``<upstream>/<path>`` for logged-in users."""

    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

    def initialize(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self._chunks: list[bytes] = []

    async def prepare(self):
        # authenticate before the body streams in; HubOAuthenticated redirects browsers to login
        user = self.current_user
        if user is None:
            if self.request.method in ("GET", "HEAD") and "text/html" in self.request.headers.get("Accept", ""):
                self.redirect(self.get_login_url())
            else:
                raise web.HTTPError(403, "log in to the hub (or send a hub API token) to use MLflow")
            return
        self.request.connection.set_max_body_size(MAX_BODY)

    def check_xsrf_cookie(self):
        """Cookie-authenticated XHRs of the MLflow UI cannot carry the hub's xsrf token, so
        cross-site requests are refused with the browser's Fetch Metadata instead: a request
        made by a page of another site says so in ``Sec-Fetch-Site`` and cannot forge it."""
        site = self.request.headers.get("Sec-Fetch-Site")
        if site in ("same-origin", "none"):
            return
        if site is None and self.request.method in ("GET", "HEAD", "OPTIONS"):
            return
        raise web.HTTPError(403, f"cross-site request refused (Sec-Fetch-Site: {site})")

    def data_received(self, chunk: bytes) -> None:
        self._chunks.append(chunk)

    async def _forward(self, path: str):
        if self._finished:
            return
        url = f"{self.upstream}/{path}"
        if self.request.query:
            url += f"?{self.request.query}"
        headers = httputil.HTTPHeaders()
        for k, v in self.request.headers.get_all():
            if k.lower() not in HOP_BY_HOP:
                headers.add(k, v)
        headers["Host"] = urlsplit(self.upstream).netloc  # MLflow checks the Host header
        headers["X-Labyard-User"] = self.current_user["name"]
        body = b"".join(self._chunks) if self.request.method in ("POST", "PUT", "PATCH", "DELETE") else None
        if body is None and self.request.method in ("POST", "PUT", "PATCH"):
            body = b""
        started = False

        def on_header(line: str) -> None:
            nonlocal started
            line = line.rstrip("\r\n")
            if line.startswith("HTTP/"):
                self.set_status(int(line.split(" ", 2)[1]))
                self.clear_header("Content-Type")
            elif line and ":" in line:
                k, v = line.split(":", 1)
                if k.lower() not in HOP_BY_HOP and k.lower() not in ("server", "date"):
                    self.add_header(k.strip(), v.strip())

        def on_chunk(chunk: bytes) -> None:
            nonlocal started
            started = True
            self.write(chunk)
            self.flush()

        req = httpclient.HTTPRequest(
            url, method=self.request.method, headers=headers, body=body, follow_redirects=False,
            header_callback=on_header, streaming_callback=on_chunk, request_timeout=600, connect_timeout=10,
            allow_nonstandard_methods=True, decompress_response=False,
        )
        try:
            await httpclient.AsyncHTTPClient().fetch(req, raise_error=False)
        except OSError as e:
            if started:
                raise
            self.clear()
            raise web.HTTPError(502, f"MLflow is unreachable: {e}") from e
        self.finish()

    async def get(self, path):
        await self._forward(path)

    async def head(self, path):
        await self._forward(path)

    async def post(self, path):
        await self._forward(path)

    async def put(self, path):
        await self._forward(path)

    async def patch(self, path):
        await self._forward(path)

    async def delete(self, path):
        await self._forward(path)

    async def options(self, path):
        await self._forward(path)


def make_app(upstream: str, prefix: str) -> web.Application:
    return web.Application(
        [
            (url_path_join(prefix, "oauth_callback"), HubOAuthCallbackHandler),
            (url_path_join(prefix, "(.*)"), ProxyHandler, {"upstream": upstream}),
        ],
        cookie_secret=os.urandom(32),
    )


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s mlflow-proxy %(levelname)s %(message)s")
    upstream = os.environ["LABYARD_MLFLOW_UPSTREAM"]
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/services/mlflow/")
    url = urlsplit(os.environ["JUPYTERHUB_SERVICE_URL"])
    httpclient.AsyncHTTPClient.configure(None, max_body_size=MAX_BODY)
    app = make_app(upstream, prefix)
    app.listen(url.port, url.hostname, max_body_size=MAX_BODY)
    log.info("proxying %s to %s on %s", prefix, upstream, url.netloc)
    ioloop.IOLoop.current().start()


if __name__ == "__main__":
    main()
