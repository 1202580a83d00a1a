"""The gate: an ASGI app wrapped around MLflow's own server app, in MLflow's process.

Every HTTP request to the server passes :meth:`Gate.__call__` before MLflow sees it:

1. only paths under the service prefix (``/services/mlflow/``) exist (plus ``/health`` for
   probes); the prefix is stripped, as MLflow serves from ``/``;
2. the request is matched to the MLflow route that will serve it (:class:`.routes.Router`);
   a route without a rule, and the ``never`` routes, are refused;
3. the caller is authenticated with the hub (:class:`.hub.HubLogin`), browsers with the OAuth
   cookie are held to same-origin requests (Fetch Metadata), and their current identity
   (projects, admin) is read through :class:`labyard_hub.access.HubIdentities`;
4. the rule decides (in a worker thread: it reads MLflow's store) and may rewrite the JSON body
   (authorship); searches are filtered; everything else streams through untouched in both
   directions (artifact uploads and downloads are never buffered here);
5. headers a client could use to pose as someone else reach MLflow never: ``Authorization``,
   the gate's cookies, ``X-Forwarded-*``, ``Forwarded``, ``X-Real-IP``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from urllib.parse import parse_qs, urlencode

from traitlets import Float, Integer, Unicode, default
from traitlets.config import Configurable

from ..access import Access, HubIdentities, IdentityUnavailable, load_policy
from .hub import HubLogin
from .objects import Objects, Refused
from .routes import ROUTES, Router, installed_routes, native_routes
from .rules import Decision, Request

log = logging.getLogger("labyard.mlflow_gate")

#: request headers that never reach MLflow
DROP_HEADERS = {b"authorization", b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto", b"x-forwarded-port",
                b"x-forwarded-prefix", b"forwarded", b"x-real-ip"}
#: upstream calls one filtered search may make to fill a page
MAX_SEARCH_CALLS = 20


class GateConfig(Configurable):
    """Settings of the MLflow gate (``mlflow server --app-name labyard``, docs/admin/mlflow.md).
    MLflow starts the gate, not the hub: each default comes from the environment of
    ``mlflow server``, where ``labyard up`` and the Helm chart put it (the variable is named
    with each setting)."""

    prefix = Unicode(help="""URL prefix MLflow is served under (the hub service's prefix).
        Default: $JUPYTERHUB_SERVICE_PREFIX, else /services/mlflow/.""").tag(config=True)

    @default("prefix")
    def _prefix(self):
        return "/" + (os.environ.get("JUPYTERHUB_SERVICE_PREFIX") or "/services/mlflow/").strip("/") + "/"

    hub_api_url = Unicode(help="""The hub's REST API as this server reaches it, e.g.
        http://hub:8081/hub/api. Default: $JUPYTERHUB_API_URL.""").tag(config=True)

    @default("hub_api_url")
    def _api_url(self):
        return os.environ.get("JUPYTERHUB_API_URL", "http://127.0.0.1:8081/hub/api")

    api_token = Unicode(help="""The hub service `mlflow`'s API token (its OAuth client secret; its
        role reads users and groups). Default: $JUPYTERHUB_API_TOKEN.""").tag(config=True)

    @default("api_token")
    def _api_token(self):
        return os.environ.get("JUPYTERHUB_API_TOKEN", "")

    identity_max_age = Float(help="""Seconds a user's projects and admin flag, and a token's
        owner, are kept before asking the hub again: how long a removal from a project (or a
        revoked token) may still be honoured here. Default: $LABYARD_MLFLOW_IDENTITY_MAX_AGE,
        else 10 (labyard_hub.access.IDENTITY_MAX_AGE).""").tag(config=True)

    @default("identity_max_age")
    def _identity_max_age(self):
        from ..access import IDENTITY_MAX_AGE

        return float(os.environ.get("LABYARD_MLFLOW_IDENTITY_MAX_AGE") or IDENTITY_MAX_AGE)

    policy_file = Unicode(help="""The project policy YAML (as the hub's). Default:
        $LABYARD_POLICY_FILE; none: every project member may use the project's experiments.""").tag(config=True)

    @default("policy_file")
    def _policy_file(self):
        return os.environ.get("LABYARD_POLICY_FILE", "")

    max_json_body = Integer(16 * 1024**2, help="""Largest JSON request body (bytes) the gate reads
        to decide; larger ones get 413. Artifact uploads are streamed and not limited here.""").tag(config=True)

    hub_timeout = Float(10.0, help="Seconds to wait for the hub before answering 503.").tag(config=True)


def _json_response(status: int, data: dict) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    body = json.dumps(data).encode()
    return status, [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"cache-control", b"no-store")], body


async def _send(send, status: int, headers: list, body: bytes = b"") -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(k.encode() if isinstance(k, str) else k, v.encode() if isinstance(v, str) else v) for k, v in headers]})
    await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive=None):
    """A ``receive`` that yields ``body`` once, then the client's own messages (disconnect)."""
    done = False

    async def _receive():
        nonlocal done
        if not done:
            done = True
            return {"type": "http.request", "body": body, "more_body": False}
        if receive is None:
            await asyncio.Event().wait()
        return await receive()

    return _receive


class Gate:
    """The ASGI app ``mlflow server --app-name labyard`` serves (see the module's docstring).

    Args:
        inner: MLflow's FastAPI app (its native routes and the Flask app mounted at ``/``).
        flask_app: MLflow's Flask app (its URL map is how MLflow routes).
        config: the settings; hub_login, identities, objects: swappable for tests.
    """

    def __init__(self, inner, flask_app, config: GateConfig | None = None, *, hub_login: HubLogin | None = None,
                 identities=None, objects: Objects | None = None):
        self.inner = inner
        self.config = config or GateConfig()
        c = self.config
        self.prefix = c.prefix.rstrip("/")
        self.router = Router(native_routes(inner), flask_app)
        self.access = Access(load_policy(c.policy_file or None))
        if hub_login is None:
            from jupyterhub.services.auth import HubOAuth

            hub_auth = HubOAuth(api_url=c.hub_api_url, api_token=c.api_token, base_url=c.prefix,
                                cache_max_age=int(max(1, c.identity_max_age)))
            hub_login = HubLogin(hub_auth, c.prefix, timeout=c.hub_timeout)
        self.login = hub_login
        self.identities = identities or HubIdentities(c.hub_api_url, c.api_token, max_age=c.identity_max_age,
                                                      timeout=c.hub_timeout)
        self.objects = objects or Objects(experiment_max_age=c.identity_max_age)
        missing = sorted(installed_routes(inner, flask_app) - set(ROUTES))
        if missing:
            log.warning("MLflow routes without a rule (refused until classified in labyard_hub/mlflow_gate/routes.py): %s",
                        ", ".join(missing))

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self.inner(scope, receive, send)
        if scope["type"] != "http":  # websockets: MLflow serves none
            await send({"type": "websocket.close", "code": 1008})
            return
        try:
            await self._http(scope, receive, send)
        except Refused as e:
            status, headers, body = _json_response(e.status, {"error_code": e.code, "message": e.message})
            await _send(send, status, headers, body)

    # ---- one request -------------------------------------------------------------------------
    async def _http(self, scope, receive, send):
        path, method = scope["path"], scope["method"]
        if path == "/health" and method in ("GET", "HEAD"):  # probes, without the prefix
            return await self.inner(scope, receive, send)
        if path == self.prefix:
            return await _send(send, 302, [("location", self.prefix + "/")])
        if not path.startswith(self.prefix + "/"):
            raise Refused(404, f"MLflow is served under {self.prefix}/")
        sub = path[len(self.prefix):]
        headers: dict[str, str] = {}
        for k, v in scope["headers"]:
            name = k.decode("latin-1").lower()
            value = v.decode("latin-1")
            headers[name] = f"{headers[name]}; {value}" if name == "cookie" and name in headers else headers.get(name, value)
        query = scope.get("query_string", b"").decode("latin-1")
        secure = (headers.get("x-forwarded-proto") or scope.get("scheme", "http")) == "https"
        if sub == "/oauth_callback" and method == "GET":
            status, hdrs = await self.login.callback(query, headers, secure)
            return await _send(send, status, hdrs)
        if method == "OPTIONS":
            raise Refused(405, "MLflow is used from its own origin only (no cross-origin requests)")

        match = self.router.match(method, sub)
        if match is None:
            raise Refused(404, f"MLflow has no endpoint {method} {sub}")
        rule = match.rule
        if rule is None:
            log.warning("refused unclassified MLflow route %s", match.key)
            raise Refused(404, f"{match.key} is not open through Labyard's MLflow gate (not classified)")
        if rule.never:
            raise Refused(403, f"{match.key} is not available through Labyard (MLflow's assistant and same-host-only "
                               "endpoints are off)")

        identity = None
        if rule.login:
            user, via = await self.login.authenticate(headers)
            if user is None:
                if method in ("GET", "HEAD") and (headers.get("sec-fetch-mode") == "navigate" or
                                                  "text/html" in headers.get("accept", "")):
                    status, hdrs = self.login.login_redirect(path + (f"?{query}" if query else ""), secure)
                    return await _send(send, status, hdrs)
                raise Refused(401, "log in to the hub, or send a hub token (MLFLOW_TRACKING_TOKEN, sent as "
                                   "'Authorization: Bearer <token>')")
            if via == "cookie":
                self._same_origin(method, headers)
            try:
                identity = await self.identities.get(user["name"])
            except IdentityUnavailable as e:
                raise Refused(503, f"cannot read {user['name']}'s projects from the hub: {e}", "TEMPORARILY_UNAVAILABLE") from e
            if rule.admin and not identity.admin:
                raise Refused(403, f"{match.key} is only for admins through Labyard")

        body_bytes: bytes | None = None
        req = Request(method, sub, match.params, parse_qs(query, keep_blank_values=True), None, headers)
        if rule.needs_body and rule.login:
            body_bytes = await self._read_body(receive)
            if body_bytes.strip():
                try:
                    req.body = json.loads(body_bytes)
                except ValueError as e:
                    raise Refused(400, f"the request body is not JSON: {e}") from e
        if identity is not None and not identity.admin:
            decision = Decision(identity, self.access, self.objects)
            await asyncio.get_running_loop().run_in_executor(None, rule.authorize, req, decision)
        if identity is not None and req.body is not None:
            new = rule.rewrite(req, identity)
            if new is not req.body:
                body_bytes = json.dumps(new).encode()

        inner_scope = self._inner_scope(scope, sub, body_bytes)
        if rule.filter is not None and identity is not None and not identity.admin:
            return await self._filtered(inner_scope, req, body_bytes or b"", rule.filter, identity, send)
        await self.inner(inner_scope, _replay(body_bytes, receive) if body_bytes is not None else receive, send)

    def _same_origin(self, method: str, headers: dict[str, str]) -> None:
        """Cookie logins are for the MLflow UI's own pages and XHRs: a request another site makes
        the browser send says so in ``Sec-Fetch-Site``, which no page can forge. Top-level
        navigations (a link to the UI) are fine; anything else must be same-origin."""
        site = headers.get("sec-fetch-site")
        if site in ("same-origin", "none"):
            return
        if method in ("GET", "HEAD") and (site is None or headers.get("sec-fetch-mode") == "navigate"):
            return
        raise Refused(403, f"cross-site request refused (Sec-Fetch-Site: {site}); API clients send a token instead")

    async def _read_body(self, receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise Refused(400, "the client went away while sending the request")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.config.max_json_body:
                raise Refused(413, f"request body larger than {self.config.max_json_body} bytes")
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    def _inner_scope(self, scope, sub: str, body: bytes | None) -> dict:
        raw = scope.get("raw_path") or scope["path"].encode()
        raw_prefix = self.prefix.encode()
        headers = []
        for k, v in scope["headers"]:
            k = k.lower()
            if k in DROP_HEADERS or (body is not None and k == b"content-length"):
                continue
            if k == b"cookie":
                kept = [c for c in v.split(b";") if c.strip().split(b"=", 1)[0] not in
                        (self.login.cookie_name.encode(), self.login.state_cookie_name.encode())]
                if not kept:
                    continue
                v = b";".join(kept)
            headers.append((k, v))
        if body is not None:
            headers.append((b"content-length", str(len(body)).encode()))
        return {**scope, "path": sub, "raw_path": raw[len(raw_prefix):] if raw.startswith(raw_prefix) else sub.encode(),
                "root_path": "", "headers": headers}

    # ---- filtered searches -------------------------------------------------------------------
    async def _call(self, scope: dict, body: bytes) -> tuple[int, list, bytes]:
        """Call MLflow inside the process and collect its answer (small JSON answers only)."""
        out: dict = {"status": 500, "headers": [], "body": []}

        async def capture(message):
            if message["type"] == "http.response.start":
                out["status"], out["headers"] = message["status"], message.get("headers", [])
            elif message["type"] == "http.response.body":
                out["body"].append(message.get("body", b""))

        await self.inner(scope, _replay(body), capture)
        return out["status"], out["headers"], b"".join(out["body"])

    def _page(self, scope: dict, req: Request, body: bytes, token: str) -> tuple[dict, bytes]:
        """The same search, from ``token`` on."""
        if req.method == "GET":
            query = {k: v for k, v in req.query.items() if k not in ("page_token", "pageToken")}
            query["page_token"] = [token]
            return {**scope, "query_string": urlencode(query, doseq=True).encode()}, b""
        data = {k: v for k, v in (req.body or {}).items() if k not in ("page_token", "pageToken")}
        data["page_token"] = token
        new = json.dumps(data).encode()
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"] + [(b"content-length", str(len(new)).encode())]
        return {**scope, "headers": headers}, new

    async def _filtered(self, scope, req: Request, body: bytes, flt, identity, send):
        """Answer a search with the caller's projects' items only, refilled up to ``max_results``
        from further pages (MLflow's offset page tokens let a page end mid-way)."""
        visible = self.access.visible_projects(identity) or set()
        status, headers, raw = await self._call(scope, body)
        try:
            data = json.loads(raw) if status == 200 else None
        except ValueError:
            data = None
        if not isinstance(data, dict):
            return await _send(send, status, headers, raw)
        keep = [i for i in data.get(flt.items, []) if flt.project_of(i) in visible]
        token = data.get("next_page_token")
        try:
            wanted = int(req.values("max_results")[0]) if req.values("max_results") else None
        except ValueError:
            wanted = None
        calls = 1
        while wanted and token and len(keep) < wanted and calls < MAX_SEARCH_CALLS:
            page_scope, page_body = self._page(scope, req, body, token)
            status, _, raw = await self._call(page_scope, page_body)
            calls += 1
            if status != 200:
                break
            page = json.loads(raw)
            items = page.get(flt.items, [])
            mine = [i for i in items if flt.project_of(i) in visible]
            if len(keep) + len(mine) <= wanted:
                keep += mine
                token = page.get("next_page_token")
                continue
            need = wanted - len(keep)
            seen = 0
            for index, item in enumerate(items):
                seen += flt.project_of(item) in visible
                if seen == need:
                    break
            from mlflow.utils.search_utils import SearchUtils

            try:
                offset = SearchUtils.parse_start_offset_from_page_token(token) + index + 1
            except Exception:  # noqa: BLE001 - not an offset token: give the page again next time
                break
            keep += mine[:need]
            token = SearchUtils.create_page_token(offset).decode()
            break
        data[flt.items] = keep
        if token:
            data["next_page_token"] = token
        else:
            data.pop("next_page_token", None)
        status, hdrs, out = _json_response(200, data)
        await _send(send, status, hdrs, out)


def create_app():
    """The ``mlflow.app`` entry point ``labyard``: ``mlflow server --app-name labyard``.

    MLflow calls it in each uvicorn worker (a factory: ``uvicorn --factory``).
    """
    from mlflow.environment_variables import _MLFLOW_SGI_NAME

    if _MLFLOW_SGI_NAME.get() not in (None, "uvicorn"):
        raise RuntimeError("the labyard MLflow app runs under uvicorn (mlflow server's default): "
                           "drop --gunicorn-opts/--waitress-opts")
    from mlflow.server import app as flask_app
    from mlflow.server.fastapi_app import create_fastapi_app

    return Gate(create_fastapi_app(flask_app), flask_app)
