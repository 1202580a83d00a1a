"""Local mode as root isolates users (issue 11, docs/admin/local.md), tried as the wrong person.

A real ``labyard up --demo`` as root. alice works in nlp and vision (servers, kernels, a
scheduled run). Then bob, in vision, runs tests/isolation/probe.py twice: in a kernel started
through his real server with the Jupyter REST and websocket API, and as a scheduled run. The
probe tries to read, list and write nlp's files, alice's home and run files and every piece of
platform state, to read other processes' environments, to signal them, to call every service
and the directory; it records what happened, and the tests check the records afterwards,
including that no secret or token of the platform or of alice appears anywhere in them.
"""

from __future__ import annotations

import errno
import json
import os
import time
import uuid
from pathlib import Path

import nbformat
import psutil
import pytest
import requests
import yaml
from nbformat.v4 import new_code_cell, new_notebook

from labyard_hub import demo

from ..scheduler.test_service import wait_run, wait_service
from ..support.kernel import Kernel
from ..support.stack import Stack

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="isolation needs labyard up as root (CI runs as root)")]

PROBE = (Path(__file__).parent / "probe.py").read_text()
ARTIFACTS = Path(__file__).parent.parent / "artifacts"
CHATTER = """import threading, time
def _chatter():
    for _ in range(3000):
        print({marker!r}, flush=True)
        time.sleep(0.2)
threading.Thread(target=_chatter, daemon=True).start()
"""
ALICE, BOB, VISION, NLP = 10001, 10002, 20001, 20002
ALICE_DN, BOB_DN = f"uid=alice,ou=people,{demo.SUFFIX}", f"uid=bob,ou=people,{demo.SUFFIX}"


def probe_notebook(targets: dict) -> dict:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [new_code_cell(PROBE), new_code_cell(f"import json\nprobe(json.loads({json.dumps(json.dumps(targets))}))")]
    return json.loads(nbformat.writes(nb))


def platform_processes(stack: Stack, *names: str) -> list[psutil.Process]:
    """The platform's (root's) processes of this stack, those whose command line has one of ``names``."""
    found = []
    for p in psutil.Process(stack.proc.pid).children(recursive=True):
        try:
            if p.uids().real == 0 and (not names or any(n in " ".join(p.cmdline()) for n in names)):
                found.append(p)
        except psutil.NoSuchProcess:
            continue
    return found


def platform_secrets(stack: Stack, alice_processes: list[psutil.Process]) -> dict[str, str]:
    """Every secret bob must not learn: the secret files (proxy token, cookie secret, ...), the
    directory's passwords, every token in the environment of the platform's processes and of alice's."""
    found = {f"secrets/{p.name}": p.read_text().strip() for p in (stack.data_dir / "secrets").iterdir()}
    settings = yaml.safe_load((stack.data_dir / "settings.yaml").read_text())
    found["settings.yaml: lookup_bind_password"] = settings["ldap"]["lookup_bind_password"]
    for who, processes in (("platform", platform_processes(stack)), ("alice", alice_processes)):
        for p in processes:
            try:
                name = f"{who}: {' '.join(p.cmdline())[-80:]}"
                for key, value in p.environ().items():
                    if any(w in key for w in ("TOKEN", "SECRET", "KEY", "PASSWORD")) and len(value) >= 16:
                        found[f"{name} ${key}"] = value
            except psutil.NoSuchProcess:
                continue
    return found


@pytest.fixture(scope="module")
def control_kernel():
    """A kernel with plain (unencrypted) channels, printing a marker: the probe must hear it,
    or its silence about alice's kernels would prove nothing."""
    from jupyter_client import KernelManager

    km = KernelManager(kernel_name="python3")
    km.start_kernel()
    kc = km.blocking_client()
    kc.start_channels()
    kc.wait_for_ready(timeout=120)
    kc.execute(CHATTER.format(marker="CONTROL-IOPUB-MARKER"))
    yield km
    kc.stop_channels()
    km.shutdown_kernel(now=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory, control_kernel):
    """alice's work in nlp and vision, then bob's probes in vision; the stack keeps running."""
    # dave: an LDAP account without uidNumber (no posixAccount), in vision
    stack = Stack(tmp_path_factory.mktemp("labyard-isolation"),
                  config={"ldap": {"user_search_filter": "(&(objectClass=inetOrgPerson)(uid={username}))"}}).start(240)
    try:
        yield _world(stack, control_kernel)
    finally:
        stack.stop()


def _world(stack: Stack, control_kernel) -> dict:
    data = stack.data_dir
    settings = yaml.safe_load((data / "settings.yaml").read_text())
    conn = stack.demo_ldap()
    conn.add(f"uid=dave,ou=people,{demo.SUFFIX}", ["inetOrgPerson"],
             {"uid": "dave", "cn": "Dave", "sn": "Dave", "userPassword": demo.PASSWORD})
    conn.modify(f"cn=vision,ou=projects,{demo.SUFFIX}", {"memberUid": [("MODIFY_ADD", ["dave"])]})
    w: dict = {"stack": stack, "data": data, "settings": settings, "marker": f"NLP-SECRET-{uuid.uuid4().hex}"}
    tokens = {u: stack.token(u) for u in ("alice", "bob")}
    w["tokens"] = tokens
    apis = {u: stack.api(u) for u in ("alice", "bob")}
    for user, server in (("alice", "nlp"), ("alice", "vision"), ("bob", "vision")):
        r = apis[user].post(f"{apis[user].base}/users/{user}/servers/{server}", json={})
        assert r.status_code in (201, 202), r.text
    for user, server in (("alice", "nlp"), ("alice", "vision"), ("bob", "vision")):
        stack.wait_ready(apis[user], user, server)
    url = lambda user, server: f"{stack.url}/user/{user}/{server}/"  # noqa: E731

    # alice: a result in nlp, a file shared in vision, a kernel kept running in nlp
    alice_nlp = Kernel(url("alice", "nlp"), tokens["alice"])
    r = alice_nlp.execute(f"open('results.txt', 'w').write({w['marker']!r})\nimport os\nprint(os.getuid(), os.getgid())")
    assert r["status"] == "ok" and r["stdout"].split() == [str(ALICE), str(NLP)], r
    w["alice_kernel"] = alice_nlp
    # ... which keeps printing (on its IOPub channel) while bob tries to listen in
    w["iopub_marker"] = f"ALICE-IOPUB-{uuid.uuid4().hex}"
    r = alice_nlp.execute(CHATTER.format(marker=w["iopub_marker"]))
    assert r["status"] == "ok", r
    alice_vision = Kernel(url("alice", "vision"), tokens["alice"])
    r = alice_vision.execute("open('shared-by-alice.txt', 'w').write('from alice\\n')")
    assert r["status"] == "ok", r
    w["alice_vision_kernel"] = alice_vision

    # alice: a scheduled run in nlp (its state and files are nlp's)
    base = wait_service(stack, apis["alice"])
    w["scheduler"] = base
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [new_code_cell("import os\nopen('from-alice-run.txt', 'w').write(str((os.getuid(), os.getgid())))")]
    r = apis["alice"].post(f"{base}/schedules", json={"project": "nlp", "notebook": "alice.ipynb",
                                                       "notebook_content": json.loads(nbformat.writes(nb))})
    assert r.status_code == 201, r.text
    run = wait_run(apis["alice"], base, r.json()["run"]["id"], timeout=300)
    assert run["status"] == "succeeded", apis["alice"].get(f"{base}/runs/{run['id']}/log").text
    w["alice_run"] = run

    alice_servers = [w["stack"].server_process(ALICE, "nlp"), w["stack"].server_process(ALICE, "vision")]
    alice_kernels = [c for p in alice_servers for c in p.children(recursive=True)]
    w["alice_processes"] = alice_servers + alice_kernels
    w["connection_files"] = sorted(str(p) for p in (data / "homes" / "alice").glob(".local/share/jupyter/runtime/kernel-*.json"))
    assert w["connection_files"], "alice's kernels have connection files"
    w["targets"] = targets = _targets(w)
    iopub = {f"alice's kernel {Path(f).stem}": json.loads(Path(f).read_text())["iopub_port"] for f in w["connection_files"]}
    targets["zmq"] = {"ports": {**iopub, "control": control_kernel.iopub_port}, "seconds": 8}
    for path in targets["read"] + targets["list"]:
        assert Path(path).exists(), f"probe target {path} does not exist: the probe would prove nothing"

    # bob: the probe in a kernel of his vision server, and as a scheduled run in vision
    bob = Kernel(url("bob", "vision"), tokens["bob"])
    sent = _with_allowed(targets)
    r = bob.execute(PROBE + f"\nimport json\nprobe(json.loads({json.dumps(json.dumps({**sent, 'report': 'probe-kernel.json'}))}))",
                    timeout=300)
    assert r["status"] == "ok", r
    bob.shutdown()
    w["kernel"] = json.loads((data / "projects" / "vision" / "probe-kernel.json").read_text())
    r = apis["bob"].post(f"{base}/schedules", json={"project": "vision", "notebook": "probe.ipynb",
                                                     "notebook_content": probe_notebook({**sent, "report": "probe-run.json"})})
    assert r.status_code == 201, r.text
    run = wait_run(apis["bob"], base, r.json()["run"]["id"], timeout=300)
    assert run["status"] == "succeeded", apis["bob"].get(f"{base}/runs/{run['id']}/log").text
    w["bob_run"] = run
    w["run"] = json.loads((data / "projects" / "vision" / "probe-run.json").read_text())
    w["secrets"] = platform_secrets(stack, w["alice_processes"])
    ARTIFACTS.mkdir(exist_ok=True)  # what bob's processes could see, for whoever wants to look
    for where in ("kernel", "run"):
        (ARTIFACTS / f"isolation-probe-{where}.json").write_text(json.dumps(w[where], indent=1))
    w["apis"] = apis
    return w


def _targets(w: dict) -> dict:
    data, s = w["data"], w["settings"]
    alice_run = w["alice_run"]["id"]
    d = str(data)
    hub = f"http://127.0.0.1:{s['hub_port']}"
    alice_vision_url = w["stack"].server_process(ALICE, "vision").environ()["JUPYTERHUB_SERVICE_URL"].rstrip("/")
    alice_nlp_url = w["stack"].server_process(ALICE, "nlp").environ()["JUPYTERHUB_SERVICE_URL"].rstrip("/")
    scheduler = f"http://127.0.0.1:{s['scheduler_port']}/services/labyard-scheduler/api"
    own = {"Authorization": "token $OWN_TOKEN"}
    platform_files = [f"{d}/settings.yaml", f"{d}/culler_config.py", f"{d}/hub/jupyterhub.sqlite",
                      f"{d}/mlflow/mlflow.db", f"{d}/logs/jupyterhub.log", f"{d}/logs/proxy.log", f"{d}/logs/mlflow.log",
                      f"{d}/logs/servers/alice.nlp.log", f"{d}/logs/servers/bob.vision.log", f"{d}/ldap/slapd.conf",
                      f"{d}/ldap/data/data.mdb", f"{d}/scheduler/scheduler.sqlite",
                      f"{d}/scheduler/runs/{alice_run}/spec.json", f"{d}/scheduler/runs/{alice_run}/log.txt",
                      *(str(p) for p in (data / "secrets").iterdir())]
    # what alice's run logged to MLflow (its notebooks): the server's files, whoever serves them
    artifacts = sorted(p for p in (data / "mlflow").rglob("*.ipynb") if p.is_file())
    assert artifacts, "alice's run logged its notebooks to MLflow"
    platform_files.append(str(artifacts[0]))
    return {
        "read": [f"{d}/projects/nlp/results.txt", f"{d}/projects/nlp/from-alice-run.txt",
                 f"{d}/run-files/{alice_run}/output.ipynb", f"{d}/run-files/{alice_run}/input.ipynb",
                 *w["connection_files"], *platform_files],
        "list": [d, f"{d}/projects", f"{d}/homes", f"{d}/run-files", f"{d}/projects/nlp", f"{d}/homes/alice",
                 f"{d}/run-files/{alice_run}", f"{d}/scheduler", f"{d}/logs", f"{d}/secrets", f"{d}/hub", f"{d}/mlflow", str(artifacts[0].parent)],
        "write": [f"{d}/projects/nlp/bob.txt", f"{d}/projects/nlp/results.txt", f"{d}/homes/alice/bob.txt",
                  f"{d}/run-files/{alice_run}/output.ipynb", f"{d}/bob.txt", f"{d}/projects/bob.txt", f"{d}/homes/bob.txt",
                  f"{d}/secrets/bob", *platform_files[:3], f"{d}/logs/jupyterhub.log", f"{d}/scheduler/scheduler.sqlite"],
        # positive controls: what bob may do
        "allowed": {"read": [f"{d}/projects/vision/shared-by-alice.txt"], "list": [f"{d}/projects/vision"],
                    "write": [f"{d}/projects/vision/shared-by-alice.txt", f"{d}/homes/bob/note.txt"]},
        "signal": [p.pid for p in w["alice_processes"] + platform_processes(w["stack"], "jupyterhub -f", "scheduler.app")],
        "http": {
            "proxy API, no token": [f"http://127.0.0.1:{s['proxy_api_port']}/api/routes", {}, None],
            "proxy API, own token": [f"http://127.0.0.1:{s['proxy_api_port']}/api/routes", own, None],
            "hub API: alice": [f"{hub}/hub/api/users/alice", own, None],
            "hub API: all users": [f"{hub}/hub/api/users", own, None],
            "hub API: groups": [f"{hub}/hub/api/groups/nlp", own, None],
            "hub API: own user": [f"{hub}/hub/api/user", own, None],
            "alice's vision server, direct": [f"{alice_vision_url}/api/contents", own, None],
            "alice's nlp server, direct": [f"{alice_nlp_url}/api/contents", own, None],
            "alice's nlp server, no token": [f"{alice_nlp_url}/api/contents", {}, None],
            "scheduler: nlp schedules": [f"{scheduler}/schedules?project=nlp", own, None],
            "scheduler: alice's nlp run": [f"{scheduler}/runs/{alice_run}/output", own, None],
            "scheduler: runs": [f"{scheduler}/runs", own, None],
            "scheduler, no token": [f"{scheduler}/runs", {}, None],
            # the MLflow server's own port: what the gate (issue 10) lets through
            "MLflow direct, no token": [f"{s['mlflow_url']}/api/2.0/mlflow/experiments/search", {}, {"max_results": 1000}],
            "MLflow direct, own token": [f"{s['mlflow_url']}/api/2.0/mlflow/experiments/search", own, {"max_results": 1000}],
        },
        "ldap": {"url": s["ldap"]["server_urls"][0], "searches": [
            [bind, base] for bind in (None, [BOB_DN, demo.PASSWORD])
            for base in (demo.SUFFIX, f"ou=projects,{demo.SUFFIX}", BOB_DN, ALICE_DN)]},
    }


def _with_allowed(targets: dict) -> dict:
    out = {k: v for k, v in targets.items() if k != "allowed"}
    for kind, paths in targets["allowed"].items():
        out[kind] = out[kind] + paths
    return out


REPORTS = ("kernel", "run")


@pytest.mark.parametrize("where", REPORTS)
def test_bob_runs_as_himself_with_the_projects_gid(world, where):
    ident = world[where]["identity"]
    assert (ident["uid"], ident["euid"], ident["gid"], ident["egid"], ident["groups"]) == (BOB, BOB, VISION, VISION, [VISION])
    assert ident["user"] == "bob" and ident["home"] == str(world["data"] / "homes" / "bob")
    assert ident["umask"] == 0o007 and ident["no_new_privs"] == "1" and int(ident["cap_eff"], 16) == 0
    assert ident["cwd"] == str(world["data"] / "projects" / "vision")
    assert world[where]["setuid_root"]["ok"] is False


@pytest.mark.parametrize("where", REPORTS)
def test_bob_cannot_read_list_or_write_nlp_alice_or_the_platform(world, where):
    report, targets = world[where], world["targets"]
    for kind in ("read", "list", "write"):
        for path in targets[kind]:
            result = report[kind][path]
            assert not result["ok"] and result["errno"] == errno.EACCES, f"{kind} {path}: {result}"
    # nothing was written where bob may not write
    assert (world["data"] / "projects" / "nlp" / "results.txt").read_text() == world["marker"]
    assert not (world["data"] / "projects" / "nlp" / "bob.txt").exists()


@pytest.mark.parametrize("where", REPORTS)
def test_bob_works_in_vision_and_his_home(world, where):
    report, allowed = world[where], world["targets"]["allowed"]
    for kind in ("read", "list", "write"):
        for path in allowed[kind]:
            assert report[kind][path]["ok"], f"bob could not {kind} {path}: {report[kind][path]}"
    assert report["read"][allowed["read"][0]]["data"].startswith("from alice")


@pytest.mark.parametrize("where", REPORTS)
def test_no_secret_or_token_but_his_own_reaches_bob(world, where):
    report = json.dumps(world[where])
    leaked = [name for name, value in world["secrets"].items() if value in report]
    assert not leaked, f"bob's {where} learned: {leaked}"
    assert world["marker"] not in report and world["iopub_marker"] not in report
    # his own environment holds his server's token (his rights only) and nothing of the platform
    env = world[where]["env"]
    assert not any(k in env for k in ("JUPYTERHUB_CRYPT_KEY", "CONFIGPROXY_AUTH_TOKEN", "LABYARD_SETTINGS"))


def test_the_secret_list_is_not_empty(world):
    # the check above means something only if it looked for the real secrets
    names = " ".join(world["secrets"])
    for expected in ("secrets/proxy-token", "secrets/cookie-secret", "secrets/ldap-root", "lookup_bind_password", "labyard_hub.scheduler.app $JUPYTERHUB_API_TOKEN",
                     "$CONFIGPROXY_AUTH_TOKEN", "$JUPYTERHUB_CRYPT_KEY", "alice: "):
        assert expected in names, (expected, sorted(world["secrets"]))


@pytest.mark.parametrize("where", REPORTS)
def test_other_users_processes_are_closed_to_bob(world, where):
    report = world[where]
    others = {pid: e for pid, e in report["proc"].items() if e["uid"] != BOB}
    assert len(others) > 10 and any(e["uid"] == ALICE for e in others.values())
    for pid, entry in others.items():
        assert not entry["environ"]["ok"], f"bob read the environment of pid {pid} (uid {entry['uid']})"
        assert not entry["fd"]["ok"], f"bob listed the files of pid {pid} (uid {entry['uid']})"
    for pid, result in report["signal"].items():
        assert not result["ok"] and result["errno"] == errno.EPERM, f"bob could signal pid {pid}: {result}"


@pytest.mark.parametrize("where", REPORTS)
def test_bob_cannot_listen_to_alices_kernels(world, where):
    heard = world[where]["zmq"]
    assert "CONTROL-IOPUB-MARKER" in heard.pop("control")  # the probe hears a plain kernel...
    assert len(heard) >= 2 and all(text == "" for text in heard.values()), heard  # ...and nothing of alice's


@pytest.mark.parametrize("where", REPORTS)
def test_services_refuse_bob(world, where):
    http = world[where]["http"]
    if where == "kernel":  # the server's own token works, with bob's rights...
        assert http["hub API: own user"]["status"] == 200
        assert json.loads(http["hub API: own user"]["body"])["name"] == "bob"
        assert http["scheduler: runs"]["status"] == 200
        assert {r["project"] for r in json.loads(http["scheduler: runs"]["body"])} <= {"vision"}
    else:  # a scheduled run holds no hub token at all
        assert "JUPYTERHUB_API_TOKEN" not in world[where]["env"]
        assert http["hub API: own user"]["status"] == 403
    for name in ("proxy API, no token", "proxy API, own token", "hub API: alice", "hub API: all users",
                 "hub API: groups", "alice's vision server, direct", "alice's nlp server, direct",
                 "scheduler: nlp schedules", "scheduler: alice's nlp run", "scheduler, no token"):
        assert http[name]["status"] in (401, 403, 404), f"{name}: {http[name]}"
    assert http["alice's nlp server, no token"]["status"] in (302, 401, 403), http["alice's nlp server, no token"]


@pytest.mark.parametrize("where", REPORTS)
def test_the_directory_shows_bob_only_himself_and_the_projects(world, where):
    ldap = world[where]["ldap"]
    entries = lambda bind, base: ldap[f"{bind} @ {base}"].get("entries", [])  # noqa: E731
    for base in (demo.SUFFIX, f"ou=projects,{demo.SUFFIX}", BOB_DN, ALICE_DN):
        assert entries("anonymous", base) == []
    assert entries(BOB_DN, ALICE_DN) == []
    assert [e["dn"] for e in entries(BOB_DN, BOB_DN)] == [BOB_DN]  # he reads his own entry...
    assert "vision" in json.dumps(entries(BOB_DN, f"ou=projects,{demo.SUFFIX}"))  # ...and the project groups
    others = json.dumps({k: v for k, v in ldap.items() if k != f"{BOB_DN} @ {BOB_DN}"})
    assert "userPassword" not in others  # (his own password hash is his: the demo directory lets him change it)
    assert ALICE_DN not in others.replace(f"@ {ALICE_DN}", "")


@pytest.mark.parametrize("where", REPORTS)
def test_mlflow_shows_bob_nothing_of_nlp(world, where):
    for name in ("MLflow direct, no token", "MLflow direct, own token"):
        r = world[where]["http"][name]
        assert r["status"] in (401, 403) or '"nlp/' not in r.get("body", ""), f"{name}: {r}"


def test_alice_and_bob_share_vision_through_the_projects_gid(world):
    shared = world["data"] / "projects" / "vision" / "shared-by-alice.txt"
    st = shared.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (ALICE, VISION, 0o660)
    assert shared.read_text().startswith("from alice\nwritten by uid 10002")  # bob appended to alice's file
    r = world["alice_vision_kernel"].execute("print(open('shared-by-alice.txt').read().count('10002'))")
    assert r["status"] == "ok" and r["stdout"].strip() == "2", r  # the kernel's and the run's lines
    vision = world["data"] / "projects" / "vision"
    st = vision.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, VISION, 0o2770)
    nlp = world["data"] / "projects" / "nlp"
    assert (nlp.stat().st_gid, nlp.stat().st_mode & 0o7777) == (NLP, 0o2770)


def test_alices_work_is_unchanged(world):
    data = world["data"]
    # her scheduled run in nlp ran as her with nlp's gid, wrote into nlp and kept its output
    assert (data / "projects" / "nlp" / "from-alice-run.txt").read_text() == str((ALICE, NLP))
    out = world["apis"]["alice"].get(f"{world['scheduler']}/runs/{world['alice_run']['id']}/output")
    assert out.status_code == 200 and "from-alice-run.txt" in out.text
    # her run was recorded in MLflow (autolog through the papermill wrapper)
    assert world["alice_run"]["mlflow_run_id"]
    # her servers are hers: uid, project gid, home
    for server, gid in (("nlp", NLP), ("vision", VISION)):
        p = world["stack"].server_process(ALICE, server)
        assert (p.uids().real, p.gids().real) == (ALICE, gid)
        assert p.environ()["HOME"] == str(data / "homes" / "alice")
    home = (data / "homes" / "alice").stat()
    assert (home.st_uid, home.st_mode & 0o777) == (ALICE, 0o700)


def test_the_platforms_state_is_its_own(world):
    data = world["data"]
    assert data.stat().st_mode & 0o777 == 0o711
    for entry in data.iterdir():
        mode = entry.lstat().st_mode & 0o777
        if entry.name in ("projects", "homes", "run-files"):
            assert mode == 0o711, entry
        else:
            assert mode & 0o077 == 0, f"{entry} has mode {mode:o}"
    for sub in ("hub", "mlflow", "logs", "secrets", "ldap", "scheduler"):
        for path in (data / sub).rglob("*"):
            assert path.lstat().st_uid == 0, path
    run_files = data / "run-files" / world["bob_run"]["id"]
    st = run_files.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (BOB, 0o700)


def test_an_account_without_uid_number_gets_no_server_and_no_run(world):
    stack = world["stack"]
    dave = stack.api("dave")
    assert dave.get(f"{dave.base}/user").json()["groups"] == ["vision"]
    r = dave.post(f"{dave.base}/users/dave/servers/vision", json={})
    assert r.status_code == 403 and "no uidNumber" in r.json()["message"], r.text
    r = dave.post(f"{world['scheduler']}/schedules", json={"project": "vision", "notebook": "probe.ipynb",
                                                           "notebook_content": probe_notebook({"report": "x.json"})})
    assert r.status_code == 403 and "no uidNumber" in r.json()["message"], r.text


def test_the_start_up_message_says_users_are_isolated(world):
    log = world["stack"].log.read_text()
    assert "local mode, users isolated" in log
    assert "SINGLE-PERSON DEMO" not in log
