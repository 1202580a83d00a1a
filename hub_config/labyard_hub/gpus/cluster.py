"""The periodic read of the cluster behind the ``labyard-gpus`` service.

Every ``poll_interval`` seconds: the nodes, every pod and the project quotas from the
Kubernetes API (each call bounded by ``kube_timeout``), the servers' last activity from the hub,
and (when configured) the GPU metrics from Prometheus. The result is one :class:`Snapshot`,
which the handlers serve, and one :meth:`UsageStore.observe` of the GPU intervals. A read that
fails keeps the last snapshot but marks it stale: the API then answers 503 with the reason
instead of old figures.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from datetime import datetime, timezone
from urllib.parse import urlencode

from pydantic import BaseModel
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from . import dcgm, inventory
from .inventory import Allocation, GpuNode, ProjectGpus, Waiting
from .usage import UsageStore

log = logging.getLogger("labyard.gpus")

#: what the page says when no Prometheus is configured
NOT_CONFIGURED = ("GPU utilisation is not configured: set gpus.prometheus_url in the Labyard settings "
                  "(Helm value gpus.prometheusUrl) to a Prometheus that scrapes NVIDIA's dcgm-exporter "
                  "with its Kubernetes pod attribution on (docs/admin/gpus.md).")


class Utilisation(BaseModel):
    configured: bool
    message: str | None = None
    error: str | None = None
    idle_threshold: int | None = None


class Snapshot(BaseModel):
    as_of: datetime
    nodes: list[GpuNode]
    allocations: list[Allocation]
    projects: list[ProjectGpus]
    waiting: list[Waiting]
    utilisation: Utilisation
    #: what the hub could not tell (idle times unknown then)
    hub_error: str | None = None


class ClusterUnavailable(Exception):
    """The Kubernetes API did not answer (the message says how)."""


class HubActivity:
    """Last activity of every active server, from the hub's REST API (``list:users``,
    ``read:users:activity``, ``read:servers``)."""

    def __init__(self, api_url: str, token: str, timeout: float = 10.0):
        self.api_url = api_url.rstrip("/")
        self.token = token
        self.timeout = timeout

    async def last_activity(self) -> dict[tuple[str, str], datetime]:
        """(user, server name) -> last activity, for every server the hub has running or starting."""
        found: dict[tuple[str, str], datetime] = {}
        offset = 0
        client = AsyncHTTPClient()
        while True:
            url = f"{self.api_url}/users?{urlencode({'state': 'active', 'offset': offset, 'limit': 200})}"
            r = await client.fetch(url, request_timeout=self.timeout, connect_timeout=self.timeout, headers={
                "Authorization": f"token {self.token}", "Accept": "application/jupyterhub-pagination+json"})
            page = json.loads(r.body)
            items = page.get("items", []) if isinstance(page, dict) else page
            for user in items:
                for name, server in (user.get("servers") or {}).items():
                    if server.get("last_activity"):
                        found[(user["name"], name)] = datetime.fromisoformat(server["last_activity"].replace("Z", "+00:00"))
            nxt = (page.get("_pagination") or {}).get("next") if isinstance(page, dict) else None
            if not items or not nxt:
                return found
            offset = nxt["offset"]


class ClusterReader:
    """Reads the cluster, keeps the last :class:`Snapshot`, records usage.

    Args:
        api: a kubernetes_asyncio ``ApiClient``.
        usage: where GPU intervals are recorded.
        hub: the servers' activity (None: idle times unknown).
        prometheus: dcgm-exporter metrics (None: utilisation not configured).
    """

    #: a failure that lasts is logged again this often (it is on the page at every read)
    REPEAT_ERROR_SECONDS = 300

    def __init__(self, api, usage: UsageStore, hub: HubActivity | None = None, prometheus: dcgm.Prometheus | None = None,
                 poll_interval: float = 15, kube_timeout: float = 10, idle_threshold: int = 1800):
        from kubernetes_asyncio.client import CoreV1Api

        self.core = CoreV1Api(api)
        self.usage = usage
        self.hub = hub
        self.prometheus = prometheus
        self.poll_interval = poll_interval
        self.kube_timeout = kube_timeout
        self.idle_threshold = idle_threshold
        self.snapshot: Snapshot | None = None
        self.error: str | None = "the cluster has not been read yet"
        self._error_logged = -math.inf
        self.reads = 0

    async def _kube(self, coro, what: str):
        try:
            return await asyncio.wait_for(coro, self.kube_timeout)
        except asyncio.TimeoutError as e:
            raise ClusterUnavailable(f"the Kubernetes API did not answer {what} within {self.kube_timeout:g}s") from e
        except Exception as e:  # ApiException, connection refused, TLS...: all mean "no answer we can use"
            reason = getattr(e, "reason", None) or str(e) or type(e).__name__
            status = getattr(e, "status", None)
            raise ClusterUnavailable(f"the Kubernetes API refused {what}: {status or ''} {reason}".replace("  ", " ")) from e

    async def read(self) -> Snapshot:
        """One read of everything; raises ClusterUnavailable when Kubernetes does not answer."""
        now = datetime.now(timezone.utc)
        async with asyncio.TaskGroup() as tg:
            nodes = tg.create_task(self._kube(self.core.list_node(), "the node list"))
            pods = tg.create_task(self._kube(self.core.list_pod_for_all_namespaces(), "the pod list"))
            quotas = tg.create_task(self._kube(self.core.list_resource_quota_for_all_namespaces(
                label_selector="app.kubernetes.io/name=labyard,app.kubernetes.io/component=quota"), "the project quotas"))
        pods = pods.result().items
        held = [a for a in map(inventory.allocation, pods) if a is not None]
        pending = [w for w in map(inventory.waiting, pods) if w is not None]
        ended = [e for e in map(inventory.ended_allocation, pods) if e is not None]
        project_quotas = {}
        for q in quotas.result().items:
            project = (q.metadata.labels or {}).get(inventory.LABEL_PREFIX + "project")
            if project:
                project_quotas[project] = inventory.quota_gpus(q)
        hub_error = None
        if self.hub is not None:
            try:
                activity = await self.hub.last_activity()
                for a in held:
                    if a.kind == "server" and (seen := activity.get((a.user, a.server))) is not None:
                        a.idle_seconds = max(0.0, (now - seen).total_seconds())
            except (HTTPClientError, OSError, ValueError) as e:
                hub_error = f"the hub did not say when servers were last active: {e}"
        utilisation = Utilisation(configured=False, message=NOT_CONFIGURED)
        if self.prometheus is not None:
            utilisation = Utilisation(configured=True, idle_threshold=self.idle_threshold)
            try:
                dcgm.attach(held, await self.prometheus.gpu_metrics(self.idle_threshold), now, self.idle_threshold)
            except dcgm.PrometheusError as e:
                utilisation.error = str(e)
        await self.usage.observe(now, held, ended)
        return Snapshot(as_of=now, nodes=inventory.gpu_nodes(nodes.result().items, held), allocations=held,
                        projects=inventory.project_figures(project_quotas, held, pending), waiting=pending,
                        utilisation=utilisation, hub_error=hub_error)

    async def refresh(self) -> None:
        """One read; the error (or its end) is logged when it begins or changes, and repeated at
        most every ``REPEAT_ERROR_SECONDS`` while it lasts, not at every poll."""
        failed: BaseException | None = None
        try:
            self.snapshot = await self.read()
            error = None
        except* ClusterUnavailable as group:
            error = str(group.exceptions[0])
        except* Exception as group:  # e.g. the usage store's disk: said on the page, the next read tries again
            failed = group.exceptions[0]
            error = f"reading the cluster failed: {failed!r}"
        now = time.monotonic()
        if error is None and self.error is not None and self.reads:
            log.info("the cluster is read again (%s before)", self.error)
        elif error is not None and (error != self.error or now - self._error_logged >= self.REPEAT_ERROR_SECONDS):
            log.error("%s", error, exc_info=failed)
            self._error_logged = now
        self.error = error
        self.reads += 1

    def current(self) -> Snapshot:
        """The last snapshot, if the last read succeeded; ClusterUnavailable saying why not."""
        if self.error is not None or self.snapshot is None:
            raise ClusterUnavailable(self.error or "the cluster has not been read yet")
        return self.snapshot

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.refresh()
            try:
                await asyncio.wait_for(stop.wait(), self.poll_interval)
            except asyncio.TimeoutError:
                pass
