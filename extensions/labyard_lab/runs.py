"""Runs API of the server extension: the MLflow runs of one notebook of this server's project.

``GET /labyard/runs?notebook=<path>`` answers::

    {"project", "notebook", "experiment_name", "experiment_id" (null: nothing recorded yet),
     "ui_url" (the experiment in the MLflow UI, through the hub), "runs": [run, ...], "queue": {...}}

where a run is ``{"run_id", "name", "status", "start_time", "end_time" (ms), "user", "params",
"metrics", "tags" (labyard.* only), "url"}``, newest first. ``GET /labyard/runs/status`` answers
the queue part alone: what the kernels of this user still have to send.

The server talks to MLflow itself (the browser never does), and only ever asks for the experiment
``<this server's project>/<notebook>``: a notebook path is relative and may not leave the project,
and runs whose ``labyard.project`` tag names another project are dropped. So this UI cannot show
another project's runs, whatever the browser sends.
"""

from __future__ import annotations

import json
import os
import posixpath
from urllib.parse import urlencode

import tornado
from jupyter_server.base.handlers import APIHandler
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from .autolog.config import default_queue_dir, experiment_name
from .autolog.sync import read_status

MAX_RUNS = 100
TIMEOUT = 10


class MlflowUnavailable(Exception):
    pass


def clean_notebook_path(path: str | None) -> str:
    """A notebook path inside the project, normalised; ValueError when it is not one."""
    if not path or "\x00" in path:
        raise ValueError("notebook is required")
    norm = posixpath.normpath(path.replace("\\", "/").lstrip("/"))
    if norm in (".", "") or norm.startswith("../") or norm == "..":
        raise ValueError(f"notebook path {path!r} leaves the project")
    return norm


def mlflow_url() -> str | None:
    return os.environ.get("LABYARD_MLFLOW_URI") or os.environ.get("MLFLOW_TRACKING_URI")


def ui_base() -> str:
    """The MLflow UI as the browser reaches it: the hub service ``/services/mlflow/``."""
    if os.environ.get("LABYARD_MLFLOW_UI_URL"):
        return os.environ["LABYARD_MLFLOW_UI_URL"].rstrip("/") + "/"
    return (os.environ.get("JUPYTERHUB_BASE_URL") or "/").rstrip("/") + "/services/mlflow/"


async def _mlflow(method: str, path: str, *, params: dict | None = None, body: dict | None = None) -> dict | None:
    """Call the MLflow REST API; None for 404 (RESOURCE_DOES_NOT_EXIST)."""
    base = mlflow_url()
    if not base:
        raise MlflowUnavailable("no MLflow server is configured for this server (MLFLOW_TRACKING_URI)")
    url = f"{base.rstrip('/')}/api/2.0/mlflow/{path}"
    if params:
        url += "?" + urlencode(params)
    req = HTTPRequest(url, method=method, body=json.dumps(body) if body is not None else None,
                      headers={"Content-Type": "application/json"}, request_timeout=TIMEOUT, connect_timeout=TIMEOUT)
    try:
        resp = await AsyncHTTPClient().fetch(req)
    except HTTPClientError as e:
        if e.code == 404:
            return None
        if e.code == 599:
            raise MlflowUnavailable(f"MLflow is unreachable: {e}") from e
        raise MlflowUnavailable(f"MLflow answered {e.code}: {e.response.body[:300] if e.response else e}") from e
    except OSError as e:
        raise MlflowUnavailable(f"MLflow is unreachable: {e}") from e
    return json.loads(resp.body or b"{}")


def _run_model(run: dict, experiment_id: str) -> dict:
    info, data = run["info"], run.get("data", {})
    tags = {t["key"]: t["value"] for t in data.get("tags", [])}
    return {
        "run_id": info["run_id"],
        "name": info.get("run_name") or tags.get("mlflow.runName") or info["run_id"][:8],
        "status": info.get("status"),
        "start_time": info.get("start_time"),
        "end_time": info.get("end_time"),
        "user": tags.get("labyard.user") or tags.get("mlflow.user"),
        "params": {p["key"]: p["value"] for p in data.get("params", [])},
        "metrics": {m["key"]: m["value"] for m in data.get("metrics", [])},
        "tags": {k: v for k, v in tags.items() if k.startswith("labyard.") and k not in ("labyard.provenance_id", "labyard.local_run_id")},
        "url": f"{ui_base()}#/experiments/{experiment_id}/runs/{info['run_id']}",
    }


async def notebook_runs(project: str, notebook: str) -> dict:
    name = experiment_name(project, notebook)
    result = {"project": project, "notebook": notebook, "experiment_name": name, "experiment_id": None,
              "ui_url": None, "runs": []}
    exp = await _mlflow("GET", "experiments/get-by-name", params={"experiment_name": name})
    if not exp:
        return result
    exp_id = exp["experiment"]["experiment_id"]
    found = await _mlflow("POST", "runs/search", body={"experiment_ids": [exp_id], "max_results": MAX_RUNS,
                                                       "order_by": ["attributes.start_time DESC"]}) or {}
    runs = [r for r in found.get("runs", []) if {t["key"]: t["value"] for t in r.get("data", {}).get("tags", [])}
            .get("labyard.project", project) == project]
    result.update(experiment_id=exp_id, ui_url=f"{ui_base()}#/experiments/{exp_id}",
                  runs=[_run_model(r, exp_id) for r in runs])
    return result


class RunsHandler(APIHandler):
    """``GET /labyard/runs?notebook=PATH``: runs of that notebook's experiment in this project."""

    @tornado.web.authenticated
    async def get(self):
        project = os.environ.get("LABYARD_PROJECT")
        if not project:
            raise tornado.web.HTTPError(409, "this server does not belong to a Labyard project")
        try:
            notebook = clean_notebook_path(self.get_query_argument("notebook", None))
        except ValueError as e:
            raise tornado.web.HTTPError(400, str(e)) from e
        try:
            result = await notebook_runs(project, notebook)
        except MlflowUnavailable as e:
            raise tornado.web.HTTPError(502, str(e)) from e
        result["queue"] = read_status(default_queue_dir())
        self.finish(json.dumps(result))


class QueueStatusHandler(APIHandler):
    """``GET /labyard/runs/status``: the local queue of this user's kernels."""

    @tornado.web.authenticated
    def get(self):
        self.finish(json.dumps(read_status(default_queue_dir())))


def runs_handlers(base_url: str) -> list[tuple]:
    from jupyter_server.utils import url_path_join

    return [
        (url_path_join(base_url, "labyard", "runs"), RunsHandler),
        (url_path_join(base_url, "labyard", "runs", "status"), QueueStatusHandler),
    ]


__all__ = ["clean_notebook_path", "notebook_runs", "runs_handlers"]
