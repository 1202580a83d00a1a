"""Is the whole platform up? The hub answers, the proxy has the hub's routes, and every service
answers through the proxy.

``labyard up`` prints "Labyard is up" only after :func:`wait_ready`; the Helm chart runs
``labyard ready`` as a post-install/post-upgrade hook, so ``helm install --wait`` returns only
once users can log in and every service behind the proxy answers.

A route that exists but whose target is down answers 502/503 from the proxy; a service whose
route is not there yet falls through to the hub. Both count as "not ready".
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from .settings import Settings


@dataclass(frozen=True)
class Probe:
    """One thing that must answer: ``url`` with a status below 500."""

    what: str
    url: str
    headers: tuple[tuple[str, str], ...] = ()


def _get(probe: Probe, timeout: float = 5) -> tuple[int, bytes]:
    req = urllib.request.Request(probe.url, headers=dict(probe.headers))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def expected_routes(settings: Settings) -> list[str]:
    """The proxy routes the hub must have added: its own and one per service with a URL."""
    routes = ["/", "/services/labyard-scheduler/"]
    if settings.mlflow_url:
        routes.append("/services/mlflow/")
    if settings.kubernetes is not None:
        routes.append("/services/labyard-gpus/")
    return routes


async def problems(settings: Settings, public_url: str, mlflow: bool = True) -> list[str]:
    """What is not answering yet (empty: everything is up). ``mlflow=False`` leaves MLflow out:
    ``labyard up`` does not wait for an MLflow server of the admin's (it did not start it)."""
    loop = asyncio.get_running_loop()
    public = public_url.rstrip("/")
    found: list[str] = []

    async def get(probe: Probe) -> tuple[int, bytes] | None:
        try:
            return await loop.run_in_executor(None, _get, probe)
        except OSError as e:
            found.append(f"{probe.what}: {probe.url} unreachable ({getattr(e, 'reason', e)})")
            return None

    hub = await get(Probe("hub", f"{settings.hub_connect_url.rstrip('/')}/hub/health"))
    if hub is not None and hub[0] != 200:
        found.append(f"hub: /hub/health answered {hub[0]}")
    token = settings.secret("proxy-token")
    routes = await get(Probe("proxy API", f"{settings.proxy_api_url.rstrip('/')}/api/routes",
                             (("Authorization", f"token {token}"),)))
    if routes is not None:
        if routes[0] != 200:
            found.append(f"proxy API: /api/routes answered {routes[0]}")
        else:
            # the proxy lists routes without their trailing slash
            have = {r.rstrip("/") or "/" for r in json.loads(routes[1])}
            missing = [r for r in expected_routes(settings) if (r.rstrip("/") or "/") not in have]
            if missing:
                found.append(f"proxy: no route yet for {', '.join(missing)}")
    through = [Probe("hub through the proxy", f"{public}/hub/api/")]
    through.append(Probe("labyard-scheduler through the proxy", f"{public}/services/labyard-scheduler/api/whoami"))
    if settings.kubernetes is not None:
        # without a login it sends to the hub's login page: an answer, not a 502 of the proxy
        through.append(Probe("labyard-gpus through the proxy", f"{public}/services/labyard-gpus/api/allocations"))
    if settings.mlflow_url and mlflow:
        through.append(Probe("MLflow", f"{settings.mlflow_url.rstrip('/')}/health"))
        through.append(Probe("MLflow through the proxy", f"{public}/services/mlflow/"))
    for probe in through:
        answer = await get(probe)
        if answer is not None and answer[0] >= 500:
            found.append(f"{probe.what}: {probe.url} answered {answer[0]}")
    return found


async def wait_ready(settings: Settings, public_url: str, timeout: float, poll: float = 1, mlflow: bool = True) -> None:
    """Return once :func:`problems` finds none; raise TimeoutError listing the last ones."""
    deadline = time.monotonic() + timeout
    while True:
        found = await problems(settings, public_url, mlflow=mlflow)
        if not found:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"not up after {timeout:.0f}s: " + "; ".join(found))
        await asyncio.sleep(poll)
