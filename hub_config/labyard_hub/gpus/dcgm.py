"""GPU utilisation and memory per pod, from a Prometheus that scrapes NVIDIA's dcgm-exporter.

dcgm-exporter exports per GPU (labels ``gpu``, ``UUID``, ``modelName``, ``Hostname``):
``DCGM_FI_DEV_GPU_UTIL`` (percent), ``DCGM_FI_DEV_FB_USED`` and ``DCGM_FI_DEV_FB_FREE`` (MiB of
frame buffer); with its Kubernetes pod attribution on, also ``namespace``, ``pod`` and
``container`` of the pod that was given the GPU (only pods that request ``nvidia.com/gpu`` or
a MIG slice). When Prometheus scrapes it with its own target labels, those of the GPU's pod
become ``exported_namespace`` and ``exported_pod``: both spellings are read, ``exported_*``
first. One instant query (``/api/v1/query``) per metric, plus
``max_over_time(DCGM_FI_DEV_GPU_UTIL[<threshold>s])``: a pod whose GPUs all stayed at 0 % over
that window holds them idle.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from urllib.parse import urlencode

from pydantic import BaseModel
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from .inventory import Allocation

UTIL = "DCGM_FI_DEV_GPU_UTIL"
FB_USED = "DCGM_FI_DEV_FB_USED"
FB_FREE = "DCGM_FI_DEV_FB_FREE"


class PrometheusError(Exception):
    """Prometheus did not answer, or not with a vector."""


class GpuMetrics(BaseModel):
    """One GPU as dcgm-exporter reports it, attributed to a pod."""

    namespace: str
    pod: str
    gpu: str | None = None
    uuid: str | None = None
    model: str | None = None
    hostname: str | None = None
    utilisation: float | None = None
    memory_used_mib: float | None = None
    memory_free_mib: float | None = None
    #: the highest utilisation over the idle threshold's window
    max_utilisation_window: float | None = None


def parse_vector(body: bytes | str) -> list[tuple[dict[str, str], float]]:
    """The samples of a Prometheus ``/api/v1/query`` answer: (labels, value) each.

    Raises:
        PrometheusError: not JSON, status not success, or not an instant vector.
    """
    try:
        data = json.loads(body)
    except ValueError as e:
        raise PrometheusError(f"Prometheus answered something that is not JSON: {e}") from e
    if not isinstance(data, dict) or data.get("status") != "success":
        error = data.get("error") if isinstance(data, dict) else None
        raise PrometheusError(f"Prometheus answered an error: {error or data!r}"[:500])
    result = data.get("data") or {}
    if result.get("resultType") != "vector":
        raise PrometheusError(f"Prometheus answered a {result.get('resultType')!r}, not a vector")
    samples = []
    for item in result.get("result") or []:
        try:
            samples.append((dict(item["metric"]), float(item["value"][1])))
        except (KeyError, IndexError, TypeError, ValueError):
            continue  # a sample we cannot read says nothing about the others
    return samples


def _gpu_key(labels: dict[str, str]) -> tuple[str, str, str] | None:
    ns = labels.get("exported_namespace") or labels.get("namespace")
    pod = labels.get("exported_pod") or labels.get("pod")
    if not ns or not pod:
        return None  # a GPU no pod was given (or attribution is off)
    return ns, pod, labels.get("UUID") or f"{labels.get('Hostname')}/{labels.get('gpu')}"


def merge(util, fb_used, fb_free, util_window) -> dict[tuple[str, str], list[GpuMetrics]]:
    """The four queries' samples, per (namespace, pod), one entry per GPU."""
    gpus: dict[tuple[str, str, str], GpuMetrics] = {}
    for samples, field in ((util, "utilisation"), (fb_used, "memory_used_mib"), (fb_free, "memory_free_mib"),
                           (util_window, "max_utilisation_window")):
        for labels, value in samples:
            key = _gpu_key(labels)
            if key is None:
                continue
            if key not in gpus:
                gpus[key] = GpuMetrics(namespace=key[0], pod=key[1], gpu=labels.get("gpu"), uuid=labels.get("UUID"),
                                       model=labels.get("modelName"), hostname=labels.get("Hostname"))
            setattr(gpus[key], field, value)
    by_pod: dict[tuple[str, str], list[GpuMetrics]] = {}
    def order(item):
        (ns, pod, _), m = item
        return ns, pod, m.hostname or "", int(m.gpu) if (m.gpu or "").isdigit() else 0, m.uuid or ""

    for (ns, pod, _), m in sorted(gpus.items(), key=order):
        by_pod.setdefault((ns, pod), []).append(m)
    return by_pod


def attach(allocations: list[Allocation], metrics: dict[tuple[str, str], list[GpuMetrics]], now: datetime,
           idle_threshold: float) -> None:
    """Put each allocation's GPU metrics on it; flag ``idle_gpu`` when it has held its GPUs for
    longer than ``idle_threshold`` seconds and every one of them stayed at 0 % all that time."""
    for a in allocations:
        found = metrics.get((a.namespace, a.pod))
        if not found:
            a.utilisation, a.idle_gpu = [], None
            continue
        a.utilisation = [m.model_dump(exclude={"namespace", "pod"}) for m in found]
        held_long = now - a.since >= timedelta(seconds=idle_threshold)
        a.idle_gpu = held_long and all(m.max_utilisation_window == 0 for m in found)


class Prometheus:
    """A Prometheus HTTP API at ``url`` (e.g. http://prometheus.monitoring.svc:9090)."""

    def __init__(self, url: str, timeout: float = 5.0):
        self.url = url.rstrip("/")
        self.timeout = timeout

    async def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        url = f"{self.url}/api/v1/query?{urlencode({'query': expr})}"
        try:
            r = await AsyncHTTPClient().fetch(url, request_timeout=self.timeout, connect_timeout=self.timeout)
        except HTTPClientError as e:
            body = e.response.body if e.response is not None else b""
            raise PrometheusError(f"Prometheus at {self.url} answered {e.code} to {expr!r}: {body[:300]!r}") from e
        except OSError as e:
            raise PrometheusError(f"Prometheus at {self.url} unreachable: {e}") from e
        return parse_vector(r.body)

    async def gpu_metrics(self, idle_threshold: float) -> dict[tuple[str, str], list[GpuMetrics]]:
        """Every attributed GPU's utilisation, memory and highest utilisation over the window."""
        exprs = (UTIL, FB_USED, FB_FREE, f"max_over_time({UTIL}[{int(idle_threshold)}s])")
        results = [await self.query(e) for e in exprs]
        return merge(*results)
