"""The pieces of local-mode isolation (labyard_hub.isolation): the launcher, directory modes,
reading what a user's process wrote, the checks at start-up, the uid/gid rule."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from labyard_hub import isolation
from labyard_hub.access import AccessError, process_ids
from labyard_hub.isolation import RunAs
from labyard_hub.projects import Identity, Project

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="switching identity needs root (CI runs as root)")
BOB, VISION = 10002, 20001

REPORT = """
import getpass, json, os
umask = os.umask(0); os.umask(umask)
status = dict(l.split(':', 1) for l in open('/proc/self/status'))
try:
    os.setuid(0); regained = True
except PermissionError:
    regained = False
open('made-by-launch.txt', 'w').close()
st = os.stat('made-by-launch.txt')
print(json.dumps({"res_uid": os.getresuid(), "res_gid": os.getresgid(), "groups": os.getgroups(), "umask": umask,
                  "user": getpass.getuser(), "env": dict(os.environ), "cwd": os.getcwd(), "regained": regained,
                  "no_new_privs": status['NoNewPrivs'].strip(), "cap_eff": status['CapEff'].strip(),
                  "file": [st.st_uid, st.st_gid, st.st_mode & 0o7777]}))
"""


@pytest.fixture
def place():
    """A directory in /tmp (reachable by other users, unlike pytest's tmp_path as root)."""
    d = Path(tempfile.mkdtemp(prefix="labyard-isolation-"))
    d.chmod(0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def launch(run_as: RunAs, argv: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = run_as.environment(env if env is not None else {"PATH": os.environ["PATH"]})
    return subprocess.run(run_as.command(argv, cwd), env=env, capture_output=True, text=True, timeout=120)


@root_only
def test_the_launcher_switches_for_good_and_cleans_up(place):
    bob = RunAs("bob", BOB, VISION, place / "home")
    isolation.prepare_private_dir(bob.home, bob)
    project = place / "vision"
    isolation.prepare_project_dir(project, VISION, isolate=True)
    env = {"PATH": os.environ["PATH"], "TMPDIR": "/root/private", "LABYARD_PROJECT": "vision"}
    r = launch(bob, [sys.executable, "-c", REPORT], project, env)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["res_uid"] == [BOB] * 3 and got["res_gid"] == [VISION] * 3 and got["groups"] == [VISION]
    assert got["regained"] is False and got["no_new_privs"] == "1" and int(got["cap_eff"], 16) == 0
    assert got["umask"] == 0o007 and got["user"] == "bob" and got["cwd"] == str(project)
    # exactly the environment it was given, with the user's HOME/USER/LOGNAME, without TMPDIR
    assert {k: v for k, v in got["env"].items() if k not in ("LC_CTYPE",)} == {
        "PATH": os.environ["PATH"], "LABYARD_PROJECT": "vision", "HOME": str(bob.home), "USER": "bob", "LOGNAME": "bob"}
    # a new file in the project is the user's, the project's group's, and nobody else's
    assert got["file"] == [BOB, VISION, 0o660]


@root_only
def test_the_launcher_refuses_root_and_what_the_user_may_not_enter(place):
    private = place / "platform"
    private.mkdir(mode=0o700)
    r = launch(RunAs("root", 0, 0, place), ["true"], place)
    assert r.returncode == isolation.LAUNCH_FAILED and "users never run as root" in r.stderr
    r = launch(RunAs("bob", BOB, VISION, place), ["true"], private)
    assert r.returncode == isolation.LAUNCH_FAILED and "cannot enter" in r.stderr and "Permission denied" in r.stderr


def test_the_launcher_needs_root(place):
    if os.geteuid() == 0:
        r = launch(RunAs("bob", BOB, VISION, place), [sys.executable, "-m", "labyard_hub.isolation", "--user", "x",
                                                      "--uid", "10003", "--gid", "20002", "--home", "/", "--cwd", "/",
                                                      "--", "true"], place)
    else:
        r = launch(RunAs("bob", BOB, VISION, place), ["true"], place)
    assert r.returncode == isolation.LAUNCH_FAILED and "must be started as root" in r.stderr


@root_only
def test_reading_what_a_user_wrote_follows_no_trap(place):
    bob = RunAs("bob", BOB, VISION, place / "home")
    files = place / "files"
    isolation.prepare_private_dir(files, bob)
    secret = place / "secret"
    secret.write_text("platform secret")
    secret.chmod(0o600)
    good = files / "output.ipynb"
    good.write_text("{}")
    isolation.give(good, bob)
    assert isolation.read_user_file(good, bob) == b"{}"
    assert isolation.read_user_file(files / "missing", bob) is None
    (files / "link").symlink_to(secret)
    os.link(secret, files / "hardlink")
    os.mkfifo(files / "fifo")
    os.chown(files / "fifo", BOB, VISION)
    for name in ("link", "hardlink", "fifo"):
        with pytest.raises(PermissionError):
            isolation.read_user_file(files / name, bob)
    with pytest.raises(PermissionError):  # a file of someone else, even a regular one
        isolation.read_user_file(secret, bob)
    with pytest.raises(PermissionError):
        isolation.read_user_file(good, bob, limit=1)


def test_the_data_dir_is_passable_where_users_must_pass_and_private_elsewhere(tmp_path):
    data = tmp_path / "data"
    for sub in ("hub", "mlflow", "secrets", "projects", "logs"):
        (data / sub).mkdir(parents=True, mode=0o755)
    (data / "settings.yaml").write_text("x")
    (data / "settings.yaml").chmod(0o644)
    isolation.secure_data_dir(data)
    modes = {p.name: p.stat().st_mode & 0o777 for p in data.iterdir()}
    assert modes == {"hub": 0o700, "mlflow": 0o700, "secrets": 0o700, "logs": 0o700, "settings.yaml": 0o600,
                     "projects": 0o711, "homes": 0o711, "run-files": 0o711}
    assert data.stat().st_mode & 0o777 == 0o711


def test_a_closed_parent_is_named(place):
    closed = place / "closed"
    (closed / "labyard" / ".venv").mkdir(parents=True)
    closed.chmod(0o700)
    assert isolation.closed_ancestor(closed / "labyard" / ".venv") == closed
    assert isolation.closed_ancestor(place) is None
    closed.chmod(0o755)


@root_only
def test_start_up_refuses_a_data_dir_users_cannot_reach(tmp_path):
    closed = tmp_path / "closed"
    (closed / "data").mkdir(parents=True)
    closed.chmod(0o700)
    problem = isolation.unusable_by_users(closed / "data")
    assert problem and "the data dir" in problem and "is not reachable by other users" in problem
    assert "mode 0700" in problem and "chmod o+x" in problem


@root_only
def test_start_up_accepts_this_environment(place):
    # this checkout's .venv must be usable by other users, or no isolated test could run here
    assert isolation.unusable_by_users(place) is None


def test_processes_need_a_uid_number_and_a_project_gid_number():
    vision = Project(name="vision", gid=VISION)
    assert process_ids(Identity(username="bob", uid=BOB, projects=(vision,)), vision) == (BOB, VISION)
    with pytest.raises(AccessError) as e:
        process_ids(Identity(username="dave", projects=(vision,)), vision)
    assert e.value.status == 403 and "dave has no uidNumber" in e.value.message
    with pytest.raises(AccessError) as e:
        process_ids(Identity(username="bob", uid=BOB), Project(name="lab"))
    assert e.value.status == 403 and "project 'lab' has no gidNumber" in e.value.message
    with pytest.raises(AccessError):
        process_ids(Identity(username="root", uid=0), vision)


@root_only
def test_the_start_up_message_says_which_mode(place):
    code = ("from pathlib import Path\nfrom labyard_hub.up import Platform\n"
            "print(Platform(Path('/nonexistent'), 0, True, None).mode_line())")
    from labyard_hub.up import Platform

    assert Platform(place, 0, True, None).mode_line().startswith("local mode, users isolated: each server, kernel")
    # a real process that is not root (through the launcher) is a single-person demo, and says so
    r = launch(RunAs("bob", BOB, VISION, place), [sys.executable, "-c", code], place)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("local mode, SINGLE-PERSON DEMO: every server and run is a process of the system user 'bob'")
    assert "NOT isolated" in r.stdout
