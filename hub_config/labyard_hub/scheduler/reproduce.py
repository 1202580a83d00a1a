"""Reading a recorded MLflow run for a reproduction, through the MLflow gate, as the user.

The scheduler never reads MLflow with wider rights than the user who asks: it gets a token of
that user for MLflow only (:class:`.tokens.RunTokens`, a few minutes), so the gate decides on the
user's current membership (another project's run: 403), and revokes it afterwards.
"""

from __future__ import annotations

import json
from urllib.parse import urlencode

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from ..access import AccessError
from .backend import NotFound, Unavailable

TIMEOUT = 30


class GateReader:
    """Read-only calls to the MLflow gate with one user's token.

    Args:
        base: the gate's tracking URI (``.../services/mlflow``); token: the user's (MLflow only).
    """

    def __init__(self, base: str, token: str):
        self.base = base.rstrip("/")
        self.token = token

    async def _get(self, path: str, params: dict) -> bytes:
        req = HTTPRequest(f"{self.base}/{path}?{urlencode(params)}", headers={"Authorization": f"Bearer {self.token}"},
                          request_timeout=TIMEOUT, connect_timeout=TIMEOUT)
        try:
            return (await AsyncHTTPClient().fetch(req)).body
        except HTTPClientError as e:
            body = e.response.body if e.response is not None else b""
            try:
                message = json.loads(body).get("message") or body.decode(errors="replace")
            except ValueError:
                message = body.decode(errors="replace")[:300]
            if e.code == 403:
                raise AccessError(403, message or "MLflow refused") from e
            if e.code == 404 or b"RESOURCE_DOES_NOT_EXIST" in body:
                raise NotFound(message or f"not found in MLflow: {path}") from e
            raise Unavailable(f"MLflow answered {e.code}: {message}") from e
        except OSError as e:
            raise Unavailable(f"MLflow is unreachable: {e}") from e

    async def run(self, run_id: str) -> dict:
        """``runs/get``: ``{"info", "data"}``; NotFound for an unknown id."""
        try:
            data = json.loads(await self._get("api/2.0/mlflow/runs/get", {"run_id": run_id}))
        except Unavailable as e:
            if "INVALID_PARAMETER_VALUE" in str(e) or " 400:" in str(e):
                raise NotFound(f"no MLflow run {run_id!r}") from e
            raise
        return data["run"]

    async def artifacts(self, run_id: str, path: str) -> list[dict]:
        data = json.loads(await self._get("api/2.0/mlflow/artifacts/list", {"run_id": run_id, "path": path}))
        return data.get("files", [])

    async def artifact(self, run_id: str, path: str) -> bytes | None:
        try:
            return await self._get("get-artifact", {"run_id": run_id, "path": path})
        except NotFound:
            return None


def tags_of(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run.get("data", {}).get("tags", [])}


def metrics_of(run: dict) -> dict[str, float]:
    return {m["key"]: float(m["value"]) for m in run.get("data", {}).get("metrics", [])}


def describe_changes(recorded: dict, overrides: dict, use_current_data: bool) -> list[str]:
    """What a reproduction changes on purpose, in words (``parameters: alpha=0.5 (was 1.0)``)."""
    changes = []
    changed = {k: v for k, v in overrides.items() if recorded.get(k, object()) != v}
    if changed:
        changes.append("parameters: " + ", ".join(
            f"{k}={json.dumps(v)}" + (f" (was {json.dumps(recorded[k])})" if k in recorded else "")
            for k, v in sorted(changed.items())))
    if use_current_data:
        changes.append("use_current_data")
    return changes
