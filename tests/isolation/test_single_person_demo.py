"""Without root, local mode is the single-person demo it always was, and says so at start-up
(docs/admin/local.md).

The tests run as root (CI does), so this starts a real ``labyard up --demo`` as a normal system
user (uid 40123, not in the directory) through the launcher, as somebody without root would.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from labyard_hub.isolation import SHARED_DIRS, RunAs

from ..support.kernel import Kernel
from ..support.stack import Stack

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="starting labyard up as another system user needs root")]

PLATFORM = 40123
ALICE = 10001


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = Path(tempfile.mkdtemp(prefix="labyard-demo-home-"))
    home.chmod(0o711)
    s = Stack(tmp_path_factory.mktemp("labyard-single-person"), run_as=RunAs("labdemo", PLATFORM, PLATFORM, home))
    try:
        yield s.start(240)
    finally:
        s.stop()
        shutil.rmtree(home, ignore_errors=True)


def test_the_banner_and_the_log_say_users_are_not_isolated(stack):
    lines = [line for line in stack.log.read_text().splitlines() if "local mode, SINGLE-PERSON DEMO" in line]
    assert any(line.startswith("  local mode") for line in lines), lines  # the banner
    assert any(line.startswith("[labyard ") for line in lines), lines  # the log
    assert all("system user 'labdemo'" in line and "NOT isolated" in line for line in lines), lines
    assert "users isolated" not in stack.log.read_text()


def test_alices_server_and_kernel_are_processes_of_the_platforms_user(stack):
    api = stack.api("alice")
    r = api.post(f"{api.base}/users/alice/servers/nlp", json={})
    assert r.status_code in (201, 202), r.text
    stack.wait_ready(api, "alice", "nlp")
    server = stack.server_process(PLATFORM, "nlp")
    assert (server.uids().real, server.gids().real) == (PLATFORM, PLATFORM)
    kernel = Kernel(f"{stack.url}/user/alice/nlp/", api.headers["Authorization"].split()[1])
    r = kernel.execute("import os\nprint(os.getuid(), os.getgid())")
    assert r["status"] == "ok" and r["stdout"].split() == [str(PLATFORM), str(PLATFORM)], r
    kernel.shutdown()
    with pytest.raises(LookupError):  # nothing runs as alice's own uid
        stack.server_process(ALICE, "nlp")


def test_its_state_is_still_its_own(stack):
    data = stack.data_dir
    for entry in data.iterdir():
        st = entry.lstat()
        assert st.st_uid == PLATFORM, entry
        if entry.name not in SHARED_DIRS:
            assert st.st_mode & 0o077 == 0, f"{entry} has mode {st.st_mode & 0o777:o}"
