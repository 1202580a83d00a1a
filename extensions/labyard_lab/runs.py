"""Runs API of the server extension: the MLflow runs of one notebook of this server's project.

``GET /labyard/runs?notebook=<path>`` answers::

    {"project", "notebook", "experiment_name", "experiment_id" (null: nothing recorded yet),
     "ui_url" (the experiment in the MLflow UI, through the hub), "runs": [run, ...], "queue": {...}}

where a run is ``{"run_id", "name", "status", "start_time", "end_time" (ms), "user", "params",
"metrics", "tags" (labyard.* only), "url", "reproducible"}``, newest first; ``reproducible``
lists what the run lacks to be reproduced (``["no image digest"]``; empty: nothing). ``GET /labyard/runs/status`` answers
the queue part alone: what the kernels of this user still have to send.

The server talks to MLflow itself (the browser never does), through the MLflow gate with this
server's token (so MLflow decides, per project, on the user's current membership), and only ever
asks for the experiment ``<this server's project>/<notebook>``: a notebook path is relative and
may not leave the project, and runs whose ``labyard.project`` tag names another project are
dropped. The user shown is the run's ``labyard.user``, which the gate sets from the authenticated
user when the run is created.
"""

from __future__ import annotations

import json
import os
import posixpath
from urllib.parse import urlencode

import tornado
from jupyter_server.base.handlers import APIHandler
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse

from .autolog.config import default_queue_dir, experiment_name
from .autolog.reproduce import missing
from .autolog.sync import read_status

MAX_RUNS = 100
TIMEOUT = 10


class MlflowUnavailable(Exception):
    """MLflow did not answer, or refused; ``status`` is its HTTP status when it answered."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


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


def mlflow_token() -> str | None:
    """The token this server calls MLflow with (the gate checks it): the spawner's
    ``MLFLOW_TRACKING_TOKEN``, else the server's own hub token."""
    return os.environ.get("MLFLOW_TRACKING_TOKEN") or os.environ.get("JUPYTERHUB_API_TOKEN")


def ui_base() -> str:
    """The MLflow UI as the browser reaches it: the hub service ``/services/mlflow/``."""
    if os.environ.get("LABYARD_MLFLOW_UI_URL"):
        return os.environ["LABYARD_MLFLOW_UI_URL"].rstrip("/") + "/"
    return (os.environ.get("JUPYTERHUB_BASE_URL") or "/").rstrip("/") + "/services/mlflow/"


async def mlflow_fetch(path: str, *, method: str = "GET", params: dict | None = None, body: dict | None = None,
                       **kwargs) -> HTTPResponse | None:
    """One request to the MLflow server (``path`` relative to it, e.g. ``api/2.0/mlflow/runs/get``):
    the one place this server talks to MLflow; None for 404. ``kwargs`` go to the HTTPRequest.

    Raises:
        MlflowUnavailable: no server configured, unreachable, or an error answer.
    """
    base = mlflow_url()
    if not base:
        raise MlflowUnavailable("no MLflow server is configured for this server (MLFLOW_TRACKING_URI)")
    url = f"{base.rstrip('/')}/{path}"
    if params:
        url += "?" + urlencode(params)
    kwargs.setdefault("request_timeout", TIMEOUT)
    headers = {"Content-Type": "application/json"}
    if mlflow_token():
        headers["Authorization"] = f"Bearer {mlflow_token()}"
    req = HTTPRequest(url, method=method, body=json.dumps(body) if body is not None else None,
                      headers=headers, connect_timeout=TIMEOUT, **kwargs)
    try:
        return await AsyncHTTPClient().fetch(req)
    except HTTPClientError as e:
        if e.code == 404:
            return None
        if e.code == 599:
            raise MlflowUnavailable(f"MLflow is unreachable: {e}") from e
        message = e.response.body[:300].decode(errors="replace") if e.response else str(e)
        try:
            message = json.loads(e.response.body).get("message", message)
        except (AttributeError, ValueError, TypeError):
            pass
        raise MlflowUnavailable(f"MLflow answered {e.code}: {message}", e.code) from e
    except OSError as e:
        raise MlflowUnavailable(f"MLflow is unreachable: {e}") from e


async def _mlflow(method: str, path: str, *, params: dict | None = None, body: dict | None = None) -> dict | None:
    """Call the MLflow REST API; None for 404 (RESOURCE_DOES_NOT_EXIST)."""
    resp = await mlflow_fetch(f"api/2.0/mlflow/{path}", method=method, params=params, body=body)
    return None if resp is None else json.loads(resp.body or b"{}")


async def get_run(run_id: str) -> dict | None:
    """``runs/get``: the run (info, data), or None if there is none with that id."""
    found = await _mlflow("GET", "runs/get", params={"run_id": run_id})
    return found.get("run") if found else None


async def get_experiment(experiment_id: str) -> dict | None:
    found = await _mlflow("GET", "experiments/get", params={"experiment_id": experiment_id})
    return found.get("experiment") if found else None


async def list_artifacts(run_id: str, path: str = "") -> list[dict]:
    """Files and folders of a run's artifacts under ``path`` (``{"path", "is_dir", "file_size"}``)."""
    found = await _mlflow("GET", "artifacts/list", params={"run_id": run_id, "path": path})
    return (found or {}).get("files", [])


async def download_artifact(run_id: str, path: str, **kwargs) -> bytes | None:
    """The bytes of one artifact file of a run (MLflow's ``get-artifact``), None if missing."""
    resp = await mlflow_fetch("get-artifact", params={"run_id": run_id, "path": path}, request_timeout=120, **kwargs)
    return None if resp is None else resp.body


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
        "reproducible": missing(tags),
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


__all__ = ["clean_notebook_path", "download_artifact", "get_experiment", "get_run", "list_artifacts", "mlflow_fetch",
           "notebook_runs", "runs_handlers"]
