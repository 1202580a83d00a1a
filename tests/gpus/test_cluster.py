"""The cluster read when Kubernetes does not answer, and the page rendered from a read.

The reads themselves run against the Kubernetes testbed in tests/k8s/test_gpus.py; here the
API server is a loopback port where connecting hangs (a control plane that is down)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from kubernetes_asyncio.client import ApiClient, Configuration

from labyard_hub.gpus import inventory
from labyard_hub.gpus.cluster import NOT_CONFIGURED, ClusterReader, ClusterUnavailable, Snapshot, Utilisation
from labyard_hub.gpus.page import render
from labyard_hub.gpus.usage import UsageStore

from ..support.net import BlackHole
from .pods import T0, node, pod


def test_kubernetes_down_is_a_clear_error_not_a_hang(tmp_path):
    async def go():
        with BlackHole() as hole:
            config = Configuration(host=f"http://127.0.0.1:{hole.port}")
            async with ApiClient(config) as api:
                reader = ClusterReader(api, UsageStore(tmp_path / "usage.sqlite"), kube_timeout=0.5)
                await reader.refresh()
                with pytest.raises(ClusterUnavailable, match=r"did not answer the (node|pod) list|project quotas"):
                    reader.current()
                return reader

    reader = asyncio.run(go())
    assert reader.reads == 1 and "within 0.5s" in reader.error


def test_a_lasting_failure_is_logged_once_then_every_few_minutes(tmp_path, caplog, monkeypatch):
    async def go():
        with BlackHole() as hole:
            config = Configuration(host=f"http://127.0.0.1:{hole.port}")
            async with ApiClient(config) as api:
                reader = ClusterReader(api, UsageStore(tmp_path / "usage.sqlite"), kube_timeout=0.2)
                for _ in range(3):
                    await reader.refresh()
                first = [r for r in caplog.records if r.levelname == "ERROR"]
                monkeypatch.setattr(ClusterReader, "REPEAT_ERROR_SECONDS", 0)
                await reader.refresh()
                return reader, first

    caplog.set_level("INFO", logger="labyard.gpus")
    reader, first = asyncio.run(go())
    assert reader.reads == 4 and len(first) == 1 and "within 0.2s" in first[0].getMessage()
    assert len([r for r in caplog.records if r.levelname == "ERROR"]) == 2


def test_page_lists_nodes_allocations_and_projects_escaped():
    held = [inventory.allocation(pod("jupyter-alice--vision", "labyard-vision", gpus=2)),
            inventory.allocation(pod("run-x", "labyard-nlp", component="scheduled-run", project="nlp", user="<carol>",
                                     extra_labels={"labyard.dev/schedule": "s1", "labyard.dev/run": "r1"}))]
    held[0].idle_seconds = 1260
    snap = Snapshot(as_of=T0, nodes=inventory.gpu_nodes([node("gpu-node-1")], held), allocations=held,
                    projects=inventory.project_figures({"vision": {"nvidia.com/gpu": 1}}, held, []), waiting=[],
                    utilisation=Utilisation(configured=False, message=NOT_CONFIGURED))
    html = render(snap, None, "/services/labyard-gpus/", T0 + timedelta(hours=1))
    assert 'id="gpu-allocations"' in html and "labyard-vision/jupyter-alice--vision" in html
    assert "21 min 00 s" in html  # alice's server idle time
    assert "run r1 of schedule s1" in html and "&lt;carol&gt;" in html and "<carol>" not in html
    assert "gpus.prometheus_url" in html and "gpus.prometheusUrl" in html


def test_page_without_a_read_says_why():
    html = render(None, "the Kubernetes API did not answer the pod list within 10s", "/p/", T0)
    assert 'id="gpus-error"' in html and "did not answer the pod list" in html


def test_share_line_of_the_home_page():
    from labyard_hub.gpus.page import share, share_error

    html = share({"in_use": 2, "gpu_quota": 2, "waiting": 1, "gpu_hours_this_month": 3.25})
    assert ">2 in use of 2 · 1 waiting · you: 3.2 GPU-hours this month<" in html
    assert "no quota" in share({"in_use": 0, "gpu_quota": None, "waiting": 0, "gpu_hours_this_month": 0})
    assert 'title="&lt;x&gt;"' in share_error("<x>")
