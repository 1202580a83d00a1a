"""Hub tokens for scheduled runs: the owner's, usable for MLflow only.

A run records itself in MLflow through the gate (``/services/mlflow``) as its owner, with a
token the scheduler asks the hub for (``POST /hub/api/users/{owner}/tokens``, scopes
``access:services!service=mlflow``; the service's role has the ``tokens`` scope):

* local backend: one token per run, when it starts, expiring after the run's time limit;
* Kubernetes backend: one token per schedule, in a Secret its Jobs' and CronJob's pods read
  (a CronJob's pods start without the scheduler), revoked when the schedule is deleted.

The token opens nothing but MLflow, and there only what the owner may see and change *at that
moment* (the gate checks current membership on every request).
"""

from __future__ import annotations

import json
import os
from urllib.parse import quote

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

#: the only scope a run's token carries
MLFLOW_SCOPE = "access:services!service=mlflow"


class TokenError(Exception):
    pass


class RunTokens:
    """Makes run tokens with the scheduler service's own hub token.

    Args:
        api_url: the hub API (``$JUPYTERHUB_API_URL``); token: the service's (``$JUPYTERHUB_API_TOKEN``).
    """

    def __init__(self, api_url: str, token: str, timeout: float = 10.0):
        self.api_url = api_url.rstrip("/")
        self.token = token
        self.timeout = timeout

    @classmethod
    def from_env(cls) -> RunTokens:
        return cls(os.environ["JUPYTERHUB_API_URL"], os.environ["JUPYTERHUB_API_TOKEN"])

    async def _hub(self, method: str, path: str, body: dict | None = None) -> dict:
        req = HTTPRequest(f"{self.api_url}/{path}", method=method, body=json.dumps(body) if body is not None else None,
                          headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
                          request_timeout=self.timeout, connect_timeout=self.timeout, allow_nonstandard_methods=True)
        try:
            resp = await AsyncHTTPClient().fetch(req)
        except HTTPClientError as e:
            detail = e.response.body.decode(errors="replace")[:300] if e.response is not None else str(e)
            raise TokenError(f"the hub refused {method} {path}: {e.code} {detail}") from e
        except OSError as e:
            raise TokenError(f"the hub did not answer: {e}") from e
        return json.loads(resp.body) if resp.body else {}

    async def create(self, owner: str, note: str, seconds: int | None) -> tuple[str, str]:
        """A token of ``owner`` for MLflow only, valid ``seconds`` (None: until revoked).

        Returns:
            the token and its id (to revoke it).
        Raises:
            TokenError: the hub refused (e.g. the owner is gone) or did not answer.
        """
        body = {"scopes": [MLFLOW_SCOPE], "note": note, **({"expires_in": int(seconds)} if seconds else {})}
        made = await self._hub("POST", f"users/{quote(owner, safe='')}/tokens", body)
        return made["token"], made["id"]

    async def for_run(self, owner: str, run_id: str, seconds: int) -> str:
        """A token for one run (local backend), expiring after ``seconds``."""
        token, _ = await self.create(owner, f"labyard-scheduler run {run_id} (MLflow)", seconds)
        return token

    async def revoke(self, owner: str, token_id: str) -> None:
        try:
            await self._hub("DELETE", f"users/{quote(owner, safe='')}/tokens/{quote(token_id, safe='')}")
        except TokenError as e:
            if " 404 " not in str(e):
                raise

    async def revoke_noted(self, owner: str, note: str) -> int:
        """Revoke every token of ``owner`` made with ``note``; how many there were."""
        listed = await self._hub("GET", f"users/{quote(owner, safe='')}/tokens")
        found = [t["id"] for t in listed.get("api_tokens", []) if t.get("note") == note]
        for token_id in found:
            await self.revoke(owner, token_id)
        return len(found)
