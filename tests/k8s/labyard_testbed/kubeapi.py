"""A small Kubernetes REST client on the standard library only.

The testbed's control script and pod runner must work before any virtualenv exists (CI builds
the testbed first), so they talk to the API server with ``http.client`` and the admin client
certificate instead of a client library. Tests use it too when they need the raw HTTP status
(for example the 403 of a ResourceQuota rejection).
"""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.parse
from dataclasses import dataclass
from typing import Any, Iterator


class ApiError(Exception):
    """A non-2xx answer of the API server.

    Attributes:
        status: the HTTP status code.
        body: the decoded ``Status`` object (or ``{"message": <text>}``).
    """

    def __init__(self, status: int, body: dict[str, Any]):
        self.status = status
        self.body = body
        super().__init__(f"{status} {body.get('reason', '')}: {body.get('message', '')}")

    @property
    def reason(self) -> str:
        return str(self.body.get("reason", ""))

    @property
    def message(self) -> str:
        return str(self.body.get("message", ""))


@dataclass
class Credentials:
    """Where the API server is and how to authenticate to it (client certificate or token)."""

    host: str
    port: int
    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None
    token: str | None = None


class KubeApi:
    """Blocking JSON client: ``get``/``post``/``patch``/``delete`` and ``watch``.

    Paths are API paths such as ``/api/v1/namespaces/default/pods``. Every call opens its own
    connection, so one instance may be shared by threads.
    """

    def __init__(self, creds: Credentials, timeout: float = 30.0):
        self.creds = creds
        self.timeout = timeout
        ctx = ssl.create_default_context(cafile=creds.ca_file)
        if creds.cert_file:
            ctx.load_cert_chain(creds.cert_file, creds.key_file)
        self._ssl = ctx

    def _conn(self, timeout: float | None) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(
            self.creds.host, self.creds.port, context=self._ssl, timeout=timeout
        )

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: dict[str, Any] | None = None,
        content_type: str = "application/json",
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Send one request and return the decoded JSON answer; raise ApiError on non-2xx."""
        if params:
            path = path + "?" + urllib.parse.urlencode(params)
        headers = {"Accept": "application/json"}
        if self.creds.token:
            headers["Authorization"] = "Bearer " + self.creds.token
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = content_type
        conn = self._conn(timeout or self.timeout)
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        try:
            decoded = json.loads(raw) if raw else {}
        except ValueError:
            decoded = {"message": raw.decode(errors="replace")}
        if resp.status >= 300:
            raise ApiError(resp.status, decoded if isinstance(decoded, dict) else {"message": str(decoded)})
        return decoded

    def get(self, path: str, **params: Any) -> dict[str, Any]:
        return self.request("GET", path, params=params or None)

    def post(self, path: str, body: Any, **params: Any) -> dict[str, Any]:
        return self.request("POST", path, body, params=params or None)

    def put(self, path: str, body: Any) -> dict[str, Any]:
        return self.request("PUT", path, body)

    def patch(self, path: str, body: Any, kind: str = "strategic") -> dict[str, Any]:
        ctype = {
            "strategic": "application/strategic-merge-patch+json",
            "merge": "application/merge-patch+json",
            "json": "application/json-patch+json",
        }[kind]
        return self.request("PATCH", path, body, content_type=ctype)

    def delete(self, path: str, body: Any = None) -> dict[str, Any]:
        return self.request("DELETE", path, body)

    def watch(
        self, path: str, resource_version: str, timeout_seconds: int = 300, **params: Any
    ) -> Iterator[dict[str, Any]]:
        """Yield watch events (``{"type": ..., "object": ...}``) until the server ends the watch.

        Raises ApiError for a non-2xx start, and yields ``ERROR`` events as they come (a 410
        "Expired" means: list again).
        """
        q = dict(params, watch="true", resourceVersion=resource_version,
                 timeoutSeconds=str(timeout_seconds), allowWatchBookmarks="true")
        headers = {"Accept": "application/json"}
        if self.creds.token:
            headers["Authorization"] = "Bearer " + self.creds.token
        conn = self._conn(timeout_seconds + 30)
        try:
            conn.request("GET", path + "?" + urllib.parse.urlencode(q), headers=headers)
            resp = conn.getresponse()
            if resp.status >= 300:
                raw = resp.read()
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = {"message": raw.decode(errors="replace")}
                raise ApiError(resp.status, body)
            while True:
                line = resp.readline()
                if not line:
                    return
                line = line.strip()
                if line:
                    yield json.loads(line)
        finally:
            conn.close()


def load_kubeconfig(path: str) -> Credentials:
    """Read the testbed's own kubeconfig (file paths, not inline data) into Credentials.

    Only the shape that ``testbed up`` writes is supported: one cluster with
    ``certificate-authority`` and one user with ``client-certificate``/``client-key``.
    The file is JSON, which is valid YAML, so no YAML parser is needed.
    """
    with open(path) as f:
        cfg = json.load(f)
    cluster = cfg["clusters"][0]["cluster"]
    user = cfg["users"][0]["user"]
    url = urllib.parse.urlsplit(cluster["server"])
    return Credentials(
        host=url.hostname or "127.0.0.1",
        port=url.port or 443,
        ca_file=cluster["certificate-authority"],
        cert_file=user.get("client-certificate"),
        key_file=user.get("client-key"),
        token=user.get("token"),
    )
