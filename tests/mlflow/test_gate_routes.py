"""The gate's allow-list against the installed MLflow server: every route it serves is
classified, so a route a newer MLflow adds fails here until someone decides who may use it.

The app is built exactly as ``mlflow server --app-name labyard`` builds it (MLflow's FastAPI app
around its Flask app); no server process is needed to list its routes.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from labyard_hub.mlflow_gate.routes import ROUTES, Router, installed_routes, native_routes


@pytest.fixture(scope="module")
def mlflow_apps():
    from mlflow.server import app as flask_app
    from mlflow.server.fastapi_app import create_fastapi_app

    return create_fastapi_app(flask_app), flask_app


def test_every_installed_route_is_classified(mlflow_apps):
    import mlflow

    installed = installed_routes(*mlflow_apps)
    unclassified = sorted(installed - set(ROUTES))
    assert not unclassified, (
        f"MLflow {mlflow.__version__} serves routes the gate has no rule for (they are refused until classified in "
        f"hub_config/labyard_hub/mlflow_gate/routes.py):\n" + "\n".join(unclassified))
    gone = sorted(set(ROUTES) - installed)
    assert not gone, f"routes classified but no longer served by MLflow {mlflow.__version__} (remove them):\n" + "\n".join(gone)


def test_native_routes_are_seen(mlflow_apps):
    """The FastAPI routes (served before the Flask app) are listed too: streaming artifacts,
    the assistant, the gateway; if FastAPI changed how included routers are kept, this fails."""
    native = {f"{m} {p}" for m, p in native_routes(mlflow_apps[0])}
    for key in ("PUT /api/2.0/mlflow-artifacts/artifacts/<path:artifact_path>", "GET /ajax-api/3.0/mlflow/assistant/config",
                "POST /v1/traces", "GET /health"):
        assert key in native


@pytest.mark.parametrize("method,path,key,params", [
    # a static route wins over a parameter (as werkzeug decides)
    ("GET", "/api/3.0/mlflow/traces/batchGet", "GET /api/3.0/mlflow/traces/batchGet", {}),
    ("GET", "/api/3.0/mlflow/traces/tr-1", "GET /api/3.0/mlflow/traces/<trace_id>", {"trace_id": "tr-1"}),
    # native FastAPI route first; a method it lacks falls through to Flask, as in Starlette
    ("PUT", "/api/2.0/mlflow-artifacts/artifacts/1/r/artifacts/a b.txt",
     "PUT /api/2.0/mlflow-artifacts/artifacts/<path:artifact_path>", {"artifact_path": "1/r/artifacts/a b.txt"}),
    ("DELETE", "/ajax-api/2.0/mlflow-artifacts/artifacts/1/r", "DELETE /ajax-api/2.0/mlflow-artifacts/artifacts/<path:artifact_path>",
     {"artifact_path": "1/r"}),
    ("HEAD", "/", "GET /", {}),
    ("GET", "/ajax-api/3.0/mlflow/assistant/providers/claude/models",
     "GET /ajax-api/3.0/mlflow/assistant/providers/<provider>/models", {"provider": "claude"}),
])
def test_requests_match_the_route_mlflow_serves(mlflow_apps, method, path, key, params):
    match = Router(native_routes(mlflow_apps[0]), mlflow_apps[1]).match(method, path)
    assert match is not None and match.key == key and match.params == params and match.rule is ROUTES[key]


def test_no_route_means_no_match(mlflow_apps):
    router = Router(native_routes(mlflow_apps[0]), mlflow_apps[1])
    assert router.match("GET", "/api/2.0/mlflow/nothing-here") is None
    assert router.match("PUT", "/api/2.0/mlflow/runs/get") is None  # wrong method


def test_never_and_admin_routes():
    assert all(ROUTES[k].never for k in ROUTES if "/assistant/" in k)
    for key in ("POST /v1/traces", "GET /api/3.0/mlflow/gateway/secrets/list", "POST /api/2.0/mlflow/webhooks",
                "GET /api/3.0/mlflow/workspaces"):
        assert ROUTES[key].admin
    assert not ROUTES["GET /health"].login and all(r.login for k, r in ROUTES.items() if k != "GET /health")


def _call_gate(mlflow_apps, path: str, query: bytes = b"") -> tuple[int, dict]:
    """One request through a real Gate around the real MLflow app, whose hub is down (nothing
    listens on its port); a token is sent."""
    from labyard_hub.mlflow_gate.app import Gate, GateConfig
    from labyard_hub.slapd import free_port

    config = GateConfig(api_token="the-service-token", hub_api_url=f"http://127.0.0.1:{free_port()}/hub/api", hub_timeout=5)
    gate = Gate(*mlflow_apps, config)
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "raw_path": path.encode(), "query_string": query,
             "headers": [(b"authorization", b"Bearer whatever")], "scheme": "http"}
    asyncio.run(gate(scope, receive, send))
    return sent[0]["status"], json.loads(sent[1]["body"])


def test_an_unclassified_route_is_refused_before_anything_else(mlflow_apps, monkeypatch):
    """A route without a rule answers 404 and never reaches MLflow, whoever asks (the login is
    not even looked at: the hub is down)."""
    from labyard_hub.mlflow_gate import routes

    monkeypatch.delitem(routes.ROUTES, "GET /api/2.0/mlflow/runs/get")
    status, body = _call_gate(mlflow_apps, "/services/mlflow/api/2.0/mlflow/runs/get", b"run_id=x")
    assert status == 404 and "not classified" in body["message"]


def test_a_hub_that_is_down_gives_a_fast_clear_503(mlflow_apps):
    status, body = _call_gate(mlflow_apps, "/services/mlflow/api/2.0/mlflow/runs/get", b"run_id=x")
    assert status == 503 and body["error_code"] == "TEMPORARILY_UNAVAILABLE" and "hub" in body["message"]
    status, body = _call_gate(mlflow_apps, "/api/2.0/mlflow/runs/get", b"run_id=x")  # outside the prefix
    assert status == 404 and "/services/mlflow/" in body["message"]
