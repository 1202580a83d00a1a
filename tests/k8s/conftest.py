"""pytest fixtures for tests that need the Kubernetes testbed (marker ``k8s``).

``k8s_testbed`` (session scope) runs ``tests/k8s/testbed up``: it reuses a testbed that is
already up, or starts one (building the binaries first on a cold machine). A testbed started
by pytest is stopped by the last pytest session using it, unless ``LABYARD_TESTBED_KEEP=1``;
one started by hand is left running.
``kubeconfig`` is the path alone. ``k8s_namespace`` makes a fresh namespace per test.
``real_node`` makes sure the real kubelet node is Ready and cluster DNS answers; ``busybox_image``
is a small image (static busybox) loaded into that node.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys

import pytest

K8S_DIR = os.path.dirname(os.path.abspath(__file__))
TESTBED = os.path.join(K8S_DIR, "testbed")
if K8S_DIR not in sys.path:
    sys.path.insert(0, K8S_DIR)

from labyard_testbed.control import state_dir  # noqa: E402
from labyard_testbed.kubeapi import ApiError, KubeApi, load_kubeconfig  # noqa: E402
from labyard_testbed.testing import REAL_NODE_PLACEMENT, Testbed, make_namespace, wait_for  # noqa: E402,F401


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "k8s: needs the Kubernetes testbed (tests/k8s/testbed up)")


@contextlib.contextmanager
def _users_lock(state: str):
    with open(os.path.join(state, "users.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _live_users(users_dir: str) -> list[str]:
    live = []
    for name in os.listdir(users_dir):
        try:
            with open(os.path.join(users_dir, name)) as f:
                start = f.read().strip()
            with open(f"/proc/{int(name)}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[19] == start:
                    live.append(name)
                    continue
        except (OSError, ValueError, IndexError):
            pass
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(users_dir, name))  # a session that died
    return live


@pytest.fixture(scope="session")
def k8s_testbed() -> Testbed:
    """The running testbed, started if needed.

    Several pytest sessions may share one testbed (each registers its pid under
    ``<state>/users``). A testbed that a pytest session started is stopped by the last session
    that leaves it; one started by hand (``testbed up``) is never stopped by pytest.
    """
    state = state_dir()
    users = os.path.join(state, "users")
    os.makedirs(users, exist_ok=True)
    marker = os.path.join(state, "started-by-pytest")
    me = os.path.join(users, str(os.getpid()))
    with _users_lock(state):
        was_up = subprocess.run([TESTBED, "status"], capture_output=True).returncode == 0
        with open(f"/proc/{os.getpid()}/stat") as f, open(me, "w") as out:
            out.write(f.read().rsplit(")", 1)[1].split()[19])
        proc = subprocess.run([TESTBED, "up"], stdout=subprocess.PIPE, text=True, timeout=3600)
        if proc.returncode != 0:
            os.unlink(me)
            pytest.fail(f"testbed up failed ({proc.returncode}); see its stderr above")
        if not was_up:
            open(marker, "w").close()
    kubeconfig = proc.stdout.strip().splitlines()[-1].split("=", 1)[1]
    with open(os.path.join(os.path.dirname(kubeconfig), "config.json")) as f:
        config = json.load(f)
    tb = Testbed(kubeconfig=kubeconfig, bin_dir=config["bin_dir"],
                 state_dir=os.path.dirname(kubeconfig), api=KubeApi(load_kubeconfig(kubeconfig)),
                 config=config)
    yield tb
    with _users_lock(state):
        with contextlib.suppress(OSError):
            os.unlink(me)
        stop = (not _live_users(users) and os.path.exists(marker)
                and os.environ.get("LABYARD_TESTBED_KEEP") != "1")
        if stop:
            os.unlink(marker)
            subprocess.run([TESTBED, "down"], check=False)


@pytest.fixture(scope="session")
def kubeconfig(k8s_testbed: Testbed) -> str:
    return k8s_testbed.kubeconfig


HELM_CHART = os.path.join(os.path.dirname(os.path.dirname(K8S_DIR)), "helm", "labyard")
SERVICE_ACCOUNTS = ("hub", "project-controller", "scheduler", "gpus")


@pytest.fixture(scope="session")
def service_accounts(tmp_path_factory, k8s_testbed: Testbed) -> dict[str, str]:
    """The chart's RBAC (only its templates/<component>/rbac.yaml files) applied in namespace
    ``labyard``; a kubeconfig (path) per service account.

    The hub, the project controller, the scheduler and labyard-gpus run with these in the tests, never as
    cluster admin: the tests prove that the rights the chart grants are enough, and no more.
    """
    tb = k8s_testbed
    tb.kubectl("create", "namespace", "labyard", check=False)
    rbac = [arg for component in ("hub", "scheduler", "controller", "gpus") for arg in ("--show-only", f"templates/{component}/rbac.yaml")]
    rendered = tb.helm("template", "labyard", HELM_CHART, "--namespace", "labyard", *rbac).stdout
    tb.kubectl("apply", "-f", "-", input=rendered)
    with open(tb.kubeconfig) as f:
        cluster = json.load(f)["clusters"][0]["cluster"]
    out = tmp_path_factory.mktemp("sa")
    paths = {}
    for sa in SERVICE_ACCOUNTS:
        token = tb.kubectl("create", "token", sa, "-n", "labyard", "--duration=4h").stdout.strip()
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": sa,
            "clusters": [{"name": "testbed", "cluster": cluster}],
            "users": [{"name": sa, "user": {"token": token}}],
            "contexts": [{"name": sa, "context": {"cluster": "testbed", "user": sa}}],
        }
        paths[sa] = str(out / f"{sa}.kubeconfig")
        with open(paths[sa], "w") as f:
            json.dump(config, f)
    # the admission policy that keeps the controller inside project namespaces is in force
    wait_for(lambda: _policy_ready(tb), 60, "the chart's ValidatingAdmissionPolicy")
    return paths


def _policy_ready(tb: Testbed) -> bool:
    try:
        tb.api.get("/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicybindings/labyard-project-controller")
        return True
    except ApiError:
        return False


@pytest.fixture
def k8s_namespace(k8s_testbed: Testbed) -> str:
    name = make_namespace(k8s_testbed)
    yield name
    try:
        k8s_testbed.api.delete(f"/api/v1/namespaces/{name}")
    except ApiError:
        pass


@pytest.fixture(scope="session")
def real_node(k8s_testbed: Testbed) -> dict:
    """The real node (kubelet + containerd), Ready, with cluster DNS answering: its config
    (``name``, ``node_ip``, ``pod_cidr``, ``host_ip``, ...). Put a pod there with
    ``REAL_NODE_PLACEMENT`` (``labyard_testbed.testing``)."""
    from labyard_testbed import node

    if not k8s_testbed.node:
        pytest.fail("the testbed runs without its real node (LABYARD_TESTBED_REAL_NODE=0 at its `up`?): "
                    "tests/k8s/testbed down, then up with the node")
    wait_for(lambda: node.ready(k8s_testbed.api), 180, "the real node to be Ready with cluster DNS")
    return k8s_testbed.node


@pytest.fixture(scope="session")
def busybox_image(real_node: dict, k8s_testbed: Testbed, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A static-busybox image (sh, id, stat, httpd, nc; glibc's getent for name lookups) loaded into the real node;
    the image reference (use ``imagePullPolicy: Never`` or ``IfNotPresent``)."""
    from labyard_testbed import oci

    ref = "localhost/labyard-testbed/busybox:testbed"
    archive = str(tmp_path_factory.mktemp("images") / "busybox.tar")
    oci.write_archive(oci.busybox_image(ref), archive)
    assert k8s_testbed.load_image(archive) == [ref]
    return ref
