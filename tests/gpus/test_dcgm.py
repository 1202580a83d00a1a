"""Utilisation from Prometheus/dcgm-exporter, against a real HTTP server on loopback.

No GPU and no dcgm-exporter exist here: the server answers ``/api/v1/query`` with
``dcgm_prometheus.json``, Prometheus API answers in the documented format whose samples carry
dcgm-exporter's documented metric names and labels. That file is written from the
documentation, not captured from a real cluster (see its ``_comment``).
"""

from __future__ import annotations

import asyncio
import json
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from labyard_hub.gpus import dcgm, inventory
from ..support.net import BlackHole

from .pods import T0, pod

RECORDED = json.loads((Path(__file__).parent / "dcgm_prometheus.json").read_text())


class _Prometheus(BaseHTTPRequestHandler):
    queries: list[str] = []

    def do_GET(self):
        url = urlparse(self.path)
        query = parse_qs(url.query).get("query", [""])[0]
        self.queries.append(query)
        if url.path != "/api/v1/query":
            self.send_response(404)
            self.end_headers()
            return
        if query.startswith("max_over_time("):
            body = RECORDED["max_over_time"]
        elif query in RECORDED:
            body = RECORDED[query]
        else:
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps({"status": "error", "errorType": "bad_data", "error": "parse error"}).encode())
            return
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def prometheus():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Prometheus)
    _Prometheus.queries = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_metrics_per_pod_from_both_label_spellings(prometheus):
    metrics = asyncio.run(dcgm.Prometheus(prometheus).gpu_metrics(1800))
    assert set(metrics) == {("labyard-vision", "jupyter-alice--vision"), ("labyard-nlp", "run-r1-x7k2p")}
    alice = metrics[("labyard-vision", "jupyter-alice--vision")]
    assert [(m.gpu, m.utilisation, m.memory_used_mib, m.max_utilisation_window) for m in alice] == [
        ("0", 87.0, 61440.0, 93.0), ("1", 0.0, 0.0, 0.0)]
    assert alice[0].model == "NVIDIA A100-SXM4-80GB" and alice[0].hostname == "gpu-node-1"
    assert "max_over_time(DCGM_FI_DEV_GPU_UTIL[1800s])" in _Prometheus.queries


def test_idle_gpu_flag_needs_every_gpu_at_zero_for_the_whole_window(prometheus):
    metrics = asyncio.run(dcgm.Prometheus(prometheus).gpu_metrics(1800))
    now = T0 + timedelta(hours=1)
    server = inventory.allocation(pod("jupyter-alice--vision", "labyard-vision", gpus=2))
    run = inventory.allocation(pod("run-r1-x7k2p", "labyard-nlp", component="scheduled-run", project="nlp", user="carol"))
    young = inventory.allocation(pod("run-r1-x7k2p", "labyard-nlp", start=now - timedelta(minutes=5)))
    unseen = inventory.allocation(pod("jupyter-bob--vision", "labyard-vision", user="bob"))
    dcgm.attach([server, run, young, unseen], metrics, now, 1800)
    assert server.idle_gpu is False  # one of its two GPUs works
    assert run.idle_gpu is True and run.utilisation[0]["memory_used_mib"] == 1024.0
    assert young.idle_gpu is False  # at 0 %, but held for less than the threshold
    assert unseen.utilisation == [] and unseen.idle_gpu is None


def test_prometheus_errors_say_what_happened(prometheus):
    with pytest.raises(dcgm.PrometheusError, match="answered 400"):
        asyncio.run(dcgm.Prometheus(prometheus).query("not a query"))
    with pytest.raises(dcgm.PrometheusError, match="not JSON"):
        dcgm.parse_vector(b"<html>")
    with pytest.raises(dcgm.PrometheusError, match="not a vector"):
        dcgm.parse_vector(json.dumps({"status": "success", "data": {"resultType": "matrix", "result": []}}))


def test_prometheus_that_does_not_answer_is_an_error_after_its_timeout():
    async def go():
        with BlackHole() as hole:
            with pytest.raises(dcgm.PrometheusError, match="unreachable|599"):
                await dcgm.Prometheus(f"http://127.0.0.1:{hole.port}", timeout=0.5).query(dcgm.UTIL)

    asyncio.run(go())
