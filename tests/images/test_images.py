"""Smoke tests of the images `make images` builds (images/build): each one really run with podman.

The hub image serves a real platform here (its proxy, its hub with the scheduler, MLflow entry
and culler as the hub's services, its MLflow server, all in containers of that image on this
machine's loopback) against a real slapd, and alice logs in through the proxy. The single-user
image runs as alice's LDAP uid and the project's gid, which no /etc/passwd in it knows.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
import zipfile
from pathlib import Path

import pytest
import requests
import yaml

from labyard_hub import demo
from labyard_hub.ready import wait_ready
from labyard_hub.settings import Settings
from labyard_hub.slapd import free_port
from labyard_hub.up import mlflow_gate_env, mlflow_server_command

from ..support.directory import authenticator_config

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "images" / "build"
ENV = {**os.environ, "CONTAINERS_CONF": str(ROOT / "images" / "containers.conf")}
pytestmark = pytest.mark.slow


def _lock_version(name: str) -> str:
    for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines():
        if line.lower().startswith(f"{name}=="):
            return line.split("==", 1)[1]
    raise AssertionError(f"{name} is not in requirements/lock.txt")


@pytest.fixture(scope="session")
def images() -> dict[str, str]:
    """Both images, built (or found current in podman's layer cache) by images/build."""
    if not shutil.which("podman"):
        pytest.fail("podman is missing: run `make images` as root (it installs podman, runc and debootstrap)")
    proc = subprocess.run([str(BUILD)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, f"images/build failed:\n{proc.stdout}\n{proc.stderr}"
    tag = subprocess.run([str(BUILD), "--print-tag"], capture_output=True, text=True, check=True).stdout.strip()
    return {"hub": f"localhost/labyard/hub:{tag}", "singleuser": f"localhost/labyard/singleuser:{tag}"}


def podman(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["podman", *args], env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_tags_follow_the_chart(images):
    chart = yaml.safe_load((ROOT / "helm" / "labyard" / "Chart.yaml").read_text())
    assert images["hub"].endswith(f":{chart['appVersion']}")
    for ref in images.values():
        labels = json.loads(podman("image", "inspect", ref).stdout)[0]["Labels"]
        assert labels["org.opencontainers.image.version"] == chart["appVersion"]


def test_hub_image_has_every_platform_command(images):
    script = textwrap.dedent("""
        set -e
        echo "uid=$(id -u)"
        echo "pid1=$(tr '\\0' ' ' </proc/1/cmdline | cut -d' ' -f1)"
        echo "jupyterhub=$(jupyterhub --version)"
        echo "chp=$(configurable-http-proxy --version)"
        echo "mlflow=$(mlflow --version)"
        labyard --help >/dev/null && echo labyard=ok
        python -c 'import labyard_hub.scheduler.app, labyard_hub.services.controller, labyard_hub.mlflow_gate, jupyterhub_idle_culler, kubespawner, ldap3' && echo imports=ok
        python -c 'from importlib.metadata import entry_points; print("gate=" + entry_points(group="mlflow.app")["labyard"].value)'
        test -f /etc/labyard/jupyterhub_config.py && echo config=ok
        touch /usr/local/bin/x 2>/dev/null && echo root=writable || echo root=read-only
    """)
    out = dict(line.split("=", 1) for line in podman("run", "--rm", "--network", "none", images["hub"], "sh", "-c", script).stdout.splitlines()
               if "=" in line)
    assert out["uid"] == "1000"
    assert out["pid1"] == "tini"
    assert out["jupyterhub"] == _lock_version("jupyterhub")
    lock = json.loads((ROOT / "hub_config" / "package-lock.json").read_text())
    assert out["chp"] == lock["packages"]["node_modules/configurable-http-proxy"]["version"]
    assert out["mlflow"].endswith(_lock_version("mlflow"))
    assert out["gate"] == "labyard_hub.mlflow_gate:create_app"  # mlflow server --app-name labyard
    assert out["labyard"] == out["imports"] == out["config"] == "ok"
    assert out["root"] == "read-only"


@pytest.fixture
def platform(images, tmp_path, ldap_posix):
    """Proxy, hub (with its services) and MLflow, each a container of the hub image on loopback."""
    data = tmp_path / "data"
    (data / "secrets").mkdir(parents=True)
    (data / "hub").mkdir()
    (data / "mlflow").mkdir()
    for name in ("proxy-token", "cookie-secret", "mlflow.api-token"):
        (data / "secrets" / name).write_text(uuid.uuid4().hex + uuid.uuid4().hex)
        (data / "secrets" / name).chmod(0o600)
    port, hub_port, api_port, mlflow_port = free_port(), free_port(), free_port(), free_port()
    settings = Settings.model_validate({
        "data_dir": "/srv/data", "bind_url": f"http://127.0.0.1:{port}", "hub_port": hub_port,
        "proxy_api_port": api_port, "scheduler_port": free_port(),
        "mlflow_url": f"http://127.0.0.1:{mlflow_port}", "policy_file": "/srv/policy.yaml",
        "ldap": authenticator_config(ldap_posix), "cull": {"enabled": True},
    })
    settings.dump(data / "settings.yaml")
    (data / "culler_config.py").write_text("from labyard_hub.culler import gpu_aware_arbiter\n"
                                           "c.IdleCuller.cull_arbiter_hook = gpu_aware_arbiter(gpu_timeout=900)\n")
    subprocess.run(["chown", "-R", "1000:1000", str(data)], check=True)
    token = (data / "secrets" / "proxy-token").read_text()
    run = ["run", "-d", "--rm", "--network", "host", "--read-only", "--tmpfs", "/tmp"]
    names = []

    def start(name: str, *args: str) -> None:
        names.append(f"labyard-smoke-{name}-{uuid.uuid4().hex[:6]}")
        podman(*run, "--name", names[-1], *args)

    try:
        gate_env = mlflow_gate_env(f"http://127.0.0.1:{hub_port}/hub/api", (data / "secrets" / "mlflow.api-token").read_text())
        start("mlflow", "-v", f"{data / 'mlflow'}:/srv/mlflow", *(f"--env={k}={v}" for k, v in gate_env.items()), images["hub"],
              *mlflow_server_command(mlflow_port, "sqlite:////srv/mlflow/mlflow.db", "/srv/mlflow/artifacts", mlflow="mlflow"))
        start("proxy", "-e", f"CONFIGPROXY_AUTH_TOKEN={token}", images["hub"], "configurable-http-proxy",
              "--ip", "127.0.0.1", "--port", str(port), "--api-ip", "127.0.0.1", "--api-port", str(api_port),
              "--default-target", f"http://127.0.0.1:{hub_port}", "--error-target", f"http://127.0.0.1:{hub_port}/hub/error")
        start("hub", "-v", f"{data}:/srv/data", "-v", f"{demo.POLICY_FILE}:/srv/policy.yaml:ro",
              "-e", "LABYARD_SETTINGS=/srv/data/settings.yaml", "-e", f"JUPYTERHUB_CRYPT_KEY={uuid.uuid4().hex * 2}",
              images["hub"])
        host = settings.model_copy(update={"secrets_dir": data / "secrets"})
        try:
            import asyncio

            asyncio.run(wait_ready(host, f"http://127.0.0.1:{port}", timeout=300))
        except TimeoutError:
            logs = "\n".join(podman("logs", n, check=False).stderr[-3000:] for n in names)
            raise AssertionError(f"the platform did not come up:\n{logs}") from None
        yield f"http://127.0.0.1:{port}"
    finally:
        for n in names:
            podman("rm", "-f", "-t", "5", n, check=False)


def test_hub_image_serves_the_platform(platform):
    s = requests.Session()
    s.get(f"{platform}/hub/login", timeout=30)
    r = s.post(f"{platform}/hub/login", data={"username": "alice", "password": demo.PASSWORD, "_xsrf": s.cookies.get("_xsrf")},
               allow_redirects=False, timeout=60)
    assert r.status_code == 302
    home = s.get(f"{platform}/hub/home", timeout=30)
    assert home.status_code == 200 and "vision" in home.text and "nlp" in home.text
    # the scheduler (a hub service the hub started inside its container) answers for her, after
    # the OAuth round trip a browser makes
    html = {"Accept": "text/html"}
    who = s.get(f"{platform}/services/labyard-scheduler/api/whoami", headers=html, timeout=60)
    assert who.status_code == 200, who.text
    assert who.json()["name"] == "alice" and sorted(who.json()["projects"]) == ["nlp", "vision"]
    # MLflow (mlflow server --app-name labyard) behind the gate: her browser login after the OAuth round trip, nobody without
    search = f"{platform}/services/mlflow/ajax-api/2.0/mlflow/experiments/search?max_results=10"
    r = s.get(search, headers=html, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json"), r.text
    assert requests.get(search, timeout=30).status_code == 401


def _tiny_wheel(directory: Path) -> Path:
    """A real (pure Python) wheel, made by hand: pip --user installs it with no index."""
    path = directory / "labyard_smoke-1.0-py3-none-any.whl"
    files = {
        "labyard_smoke/__init__.py": "WHO = 'smoke'\n",
        "labyard_smoke-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: labyard-smoke\nVersion: 1.0\n",
        "labyard_smoke-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + "labyard_smoke-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in {**files, "labyard_smoke-1.0.dist-info/RECORD": record}.items():
            z.writestr(name, text)
    return path


def test_singleuser_runs_as_any_ldap_uid(images, tmp_path):
    uid, gid = 10001, 20001  # alice, project vision (the demo directory)
    home, project, extra = tmp_path / "home", tmp_path / "project", tmp_path / "extra"
    for d in (home, project):
        d.mkdir()
        os.chown(d, uid, gid)
    project.chmod(0o2770)
    extra.mkdir()
    _tiny_wheel(extra)
    nb = {"cells": [{"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": "n = 1", "outputs": [], "execution_count": None},
                    {"cell_type": "code", "metadata": {}, "source": "import getpass, os\nprint(getpass.getuser(), os.getuid(), os.getgid(), n)",
                     "outputs": [], "execution_count": None}],
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    (extra / "in.ipynb").write_text(json.dumps(nb))
    script = textwrap.dedent("""
        set -e
        echo "whoami=$(whoami)"
        echo "group=$(id -gn)"
        echo "pid1=$(tr '\\0' ' ' </proc/1/cmdline | cut -d' ' -f1)"
        cd /srv/project
        git init -q repo && cd repo && echo hi > f && git add f && git commit -qm first && echo "author=$(git log -1 --format=%an)"
        pip install -q --user --no-index /extra/labyard_smoke-1.0-py3-none-any.whl
        python -c 'import labyard_smoke, site; print("usersite=" + labyard_smoke.__file__.split(site.getuserbase())[0] + "ok")'
        papermill --no-progress-bar /extra/in.ipynb /srv/project/out.ipynb -p n 7 >/tmp/papermill.log 2>&1 && echo papermill=ok || tail -5 /tmp/papermill.log
        python -c 'import json; t = json.load(open("/srv/project/out.ipynb"))["cells"][-1]["outputs"][0]["text"]; print("kernel=" + "_".join("".join(t).split()))'
        jupyter labextension list 2>&1 | grep -q labyard-lab && echo labextension=ok
        python -c 'import labyard_lab, nbdime, mlflow, ipykernel, jupyterlab' && echo imports=ok
        jupyterhub-singleuser --version >/dev/null && echo singleuser=ok
        echo "home=$HOME"
    """)
    # --passwd=false: podman would add a passwd line for the uid; Kubernetes does not
    proc = podman("run", "--rm", "--network", "none", "--passwd=false", "--user", f"{uid}:{gid}",
                  "-e", "JUPYTERHUB_USER=alice", "-e", "LABYARD_PROJECT=vision", "-e", "HOME=/home/alice",
                  "-v", f"{home}:/home/alice", "-v", f"{project}:/srv/project", "-v", f"{extra}:/extra:ro",
                  images["singleuser"], "sh", "-c", script)
    out = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    assert out["whoami"] == "alice", proc.stdout + proc.stderr
    assert out["group"] == "vision"
    assert out["pid1"] == "tini"
    assert out["author"] == "alice"
    assert out["usersite"] == "ok"  # installed under ~/.local
    assert out["papermill"] == "ok" and out["kernel"] == "alice_10001_20001_7"
    assert out["labextension"] == out["imports"] == out["singleuser"] == "ok"
    assert out["home"] == "/home/alice"
    written = project / "out.ipynb"
    assert (written.stat().st_uid, written.stat().st_gid) == (uid, gid)
    assert any((home / ".local" / "lib").glob("python3*/site-packages/labyard_smoke/__init__.py"))


def test_singleuser_git_and_nbdime_are_notebook_aware(images, tmp_path):
    """nbdime's extension is enabled in the image, and git in any shell of the container (as an
    LDAP uid, no server running) diffs notebooks with the drivers from git's system files."""
    project = tmp_path / "project"
    project.mkdir()
    os.chown(project, 10001, 20001)

    def notebook(n: int) -> str:
        return json.dumps({"cells": [{"cell_type": "code", "id": "c1", "metadata": {}, "source": f"epochs = {n}",
                                      "outputs": [], "execution_count": None}],
                           "metadata": {}, "nbformat": 4, "nbformat_minor": 5})

    (project / "v1.ipynb").write_text(notebook(3))
    (project / "v2.ipynb").write_text(notebook(5))
    script = textwrap.dedent("""
        set -e
        jupyter server extension list 2>&1 | grep -q 'nbdime.*enabled' && echo nbdime_server=ok
        jupyter server extension list 2>&1 | grep -q 'labyard_lab.*enabled' && echo labyard_server=ok
        jupyter labextension list 2>&1 | grep -q 'nbdime-jupyterlab.*enabled' && echo nbdime_lab=ok
        echo "attr=$(cd /srv/project && git init -q repo && cd repo && cp ../v1.ipynb fit.ipynb && git check-attr diff fit.ipynb)"
        cd /srv/project/repo && git add fit.ipynb && git commit -qm first
        cp ../v2.ipynb fit.ipynb
        git diff >/tmp/diff.txt && grep -q '^## modified /cells/0/source' /tmp/diff.txt && echo diff=ok || cat /tmp/diff.txt
        git diff --no-ext-diff | grep -q '^+epochs = 5' && echo textconv=ok
        git config --show-origin --get diff.jupyternotebook.command | grep -q '^file:/etc/gitconfig' && echo origin=ok
    """)
    proc = podman("run", "--rm", "--network", "none", "--passwd=false", "--user", "10001:20001",
                  "-e", "JUPYTERHUB_USER=alice", "-e", "LABYARD_PROJECT=vision", "-v", f"{project}:/srv/project",
                  images["singleuser"], "sh", "-c", script)
    out = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    assert out.get("nbdime_server") == out.get("labyard_server") == out.get("nbdime_lab") == "ok", proc.stdout + proc.stderr
    assert out["attr"] == "fit.ipynb: diff: jupyternotebook"
    assert out.get("diff") == "ok", proc.stdout + proc.stderr
    assert out.get("textconv") == out.get("origin") == "ok", proc.stdout + proc.stderr
    config = podman("run", "--rm", "--network", "none", images["singleuser"], "python", "-c",
                    "from jupyter_server.serverapp import ServerApp; a = ServerApp(); a.load_config_file();"
                    " print(a.config.LabyardDiff.git_drivers)").stdout.strip()
    assert config == "False"


def test_singleuser_without_a_home_env(images):
    """A scheduled run's pod sets no usable HOME beforehand: the hook makes one as the uid."""
    proc = podman("run", "--rm", "--network", "none", "--passwd=false", "--user", "10002:20001", "-e", "LABYARD_USER=bob",
                  images["singleuser"], "sh", "-c", 'echo "$(whoami) $HOME"; touch "$HOME/x" && echo writable')
    assert proc.stdout.split() == ["bob", "/tmp/home-bob", "writable"], proc.stdout + proc.stderr


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
