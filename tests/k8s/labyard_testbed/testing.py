"""Helpers for tests on the Kubernetes testbed (used by tests/k8s/conftest.py and the tests)."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import pytest

from .kubeapi import ApiError, KubeApi


def wait_for(fn: Callable[[], Any], timeout: float, what: str, interval: float = 0.25) -> Any:
    """Call ``fn`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            v = fn()
            if v:
                return v
        except (ApiError, OSError, KeyError, IndexError) as e:
            last_exc = e
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what} (last error: {last_exc})")


@dataclass
class Testbed:
    __test__ = False  # not a test class, despite the name
    kubeconfig: str
    bin_dir: str
    state_dir: str
    api: KubeApi
    config: dict  # the running testbed's config.json (ports, bin_dir, pod_network, ...)

    def env(self) -> dict[str, str]:
        return dict(os.environ, KUBECONFIG=self.kubeconfig,
                    PATH=self.bin_dir + os.pathsep + os.environ.get("PATH", ""))

    def run(self, tool: str, *args: str, input: str | None = None, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess:
        """Run kubectl or helm from the testbed's bin dir against the testbed."""
        proc = subprocess.run([os.path.join(self.bin_dir, tool), *args], input=input, text=True,
                              capture_output=True, env=self.env(), timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{tool} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    def kubectl(self, *args: str, **kw: Any) -> subprocess.CompletedProcess:
        return self.run("kubectl", *args, **kw)

    def kubectl_json(self, *args: str) -> dict:
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def helm(self, *args: str, **kw: Any) -> subprocess.CompletedProcess:
        return self.run("helm", *args, **kw)

    def apply(self, obj: dict, namespace: str | None = None) -> None:
        args = ["apply", "-f", "-"] + (["-n", namespace] if namespace else [])
        self.kubectl(*args, input=json.dumps(obj))

    def pod(self, namespace: str, name: str) -> dict:
        return self.api.get(f"/api/v1/namespaces/{namespace}/pods/{name}")

    def events_for(self, namespace: str, name: str) -> list[dict]:
        return self.api.get(f"/api/v1/namespaces/{namespace}/events",
                            fieldSelector=f"involvedObject.name={name}")["items"]

    @property
    def node(self) -> dict | None:
        """The real node's part of config.json (name, node_ip, pod_cidr, ...), None without it."""
        return self.config.get("node")

    def load_image(self, source: str) -> list[str]:
        """``testbed load-image``: import an image archive or a podman image into the real node."""
        testbed = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "testbed")
        proc = subprocess.run([testbed, "load-image", source], capture_output=True, text=True, timeout=600,
                              env=dict(os.environ, LABYARD_TESTBED_DIR=self.state_dir))
        if proc.returncode != 0:
            raise AssertionError(f"testbed load-image {source} failed: {proc.stderr}")
        return proc.stdout.split()


# Pod spec fields that put a pod on the real node (its label and taint; docs/dev/testbed.md).
REAL_NODE_PLACEMENT = {
    "nodeSelector": {"labyard.dev/real-node": "true"},
    "tolerations": [{"key": "labyard.dev/real-node", "operator": "Exists", "effect": "NoSchedule"}],
}


def exists(tb: Testbed, path: str) -> bool:
    """Whether the API server has the object at ``path`` (any error: no)."""
    try:
        tb.api.get(path)
        return True
    except Exception:
        return False


def make_namespace(tb: Testbed, prefix: str = "t") -> str:
    """A fresh namespace whose ``default`` ServiceAccount exists (pods are admitted)."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    tb.api.post("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                       "metadata": {"name": name, "labels": {"labyard.dev/test": "true"}}})
    wait_for(lambda: tb.api.get(f"/api/v1/namespaces/{name}/serviceaccounts/default"), 30,
             f"the default ServiceAccount in {name}")
    return name
