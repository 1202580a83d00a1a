"""The local scheduler backend isolating runs (as root): papermill and the kernel as the owner,
the runner as the platform, the run's notebooks the owner's alone and read back safely."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from nbformat.v4 import new_code_cell, new_notebook

from labyard_hub import demo, isolation
from labyard_hub.access import Access, AccessError, StaticIdentities
from labyard_hub.projects import Identity, Project
from labyard_hub.scheduler.backend import BadRequest
from labyard_hub.scheduler.local import LocalBackend
from labyard_hub.scheduler.models import RunStatus, ScheduleCreate

from ..scheduler.conftest import wait_finished

pytestmark = [pytest.mark.asyncio(loop_scope="session"),
              pytest.mark.skipif(os.geteuid() != 0, reason="switching identity needs root (CI runs as root)")]

VISION = Project(name="vision", gid=20001)
ALICE = Identity(username="alice", uid=10001, gid=10000, projects=(VISION,))
DAVE = Identity(username="dave", projects=(VISION,))  # no uidNumber


def notebook(*sources: str) -> dict:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [new_code_cell(s) for s in sources]
    return nb


@pytest.fixture
async def backend():
    data = Path(tempfile.mkdtemp(prefix="labyard-runs-"))
    isolation.secure_data_dir(data)  # as labyard up leaves it
    b = LocalBackend(Access(demo.policy(), gpus=False), data / "scheduler", data / "projects", tick=0.3,
                     homes_dir=data / "homes", run_files_dir=data / "run-files", isolate=True,
                     identities=StaticIdentities([ALICE, DAVE]))
    b.root = data
    await b.start()
    yield b
    await b.stop()
    shutil.rmtree(data, ignore_errors=True)


async def run_once(b: LocalBackend, nb: dict, identity: Identity = ALICE):
    _, run = await b.create_schedule(identity, ScheduleCreate(project="vision", notebook="job.ipynb", notebook_content=nb))
    return await wait_finished(b, identity, run.id, timeout=180)


async def test_a_run_executes_as_its_owner_with_the_projects_gid(backend):
    done = await run_once(backend, notebook(
        "import json, os\n"
        "open('made-by-run.txt', 'w').write('x')\n"
        "print(json.dumps({'ids': [os.getuid(), os.getgid(), os.getgroups()], 'home': os.environ['HOME'],"
        " 'cwd': os.getcwd(), 'token': os.environ.get('JUPYTERHUB_API_TOKEN')}))"))
    assert done.status == RunStatus.succeeded, await backend.run_log(ALICE, done.id)
    out = json.loads(await backend.run_output(ALICE, done.id))
    printed = json.loads("".join(out["cells"][-1]["outputs"][0]["text"]))
    data = backend.root
    assert printed == {"ids": [10001, 20001, [20001]], "home": str(data / "homes" / "alice"),
                       "cwd": str(data / "projects" / "vision"), "token": None}
    made = (data / "projects" / "vision" / "made-by-run.txt").stat()
    assert (made.st_uid, made.st_gid, made.st_mode & 0o777) == (10001, 20001, 0o660)
    files = data / "run-files" / done.id
    assert (files.stat().st_uid, files.stat().st_mode & 0o777) == (10001, 0o700)
    assert {p.name: p.stat().st_uid for p in files.iterdir()} == {
        "input.ipynb": 10001, "parameters.json": 10001, "output.ipynb": 10001}
    state = data / "scheduler" / "runs" / done.id
    assert (state.stat().st_uid, state.stat().st_mode & 0o777) == (0, 0o700)
    assert "(as uid 10001, gid 20001)" in await backend.run_log(ALICE, done.id)


async def test_what_a_run_plants_in_its_files_never_reaches_the_platforms_secrets(backend):
    secret = backend.root / "scheduler" / "secret.txt"
    secret.write_text("PLATFORM-SECRET")
    secret.chmod(0o600)
    # the last cell replaces the output notebook and the MLflow record with links to the secret
    done = await run_once(backend, notebook(
        "import os\n"
        f"for name in ('output.ipynb', 'record.json'):\n"
        f"    path = os.path.join(os.environ['LABYARD_RUN_RECORD'].rsplit('/', 1)[0], name)\n"
        f"    if os.path.exists(path): os.remove(path)\n"
        f"    os.symlink({str(secret)!r}, path)\n"))
    assert done.mlflow_run_id is None
    with pytest.raises(BadRequest, match="cannot be served"):
        await backend.run_output(ALICE, done.id)
    assert "PLATFORM-SECRET" not in (await backend.run_log(ALICE, done.id))


async def test_an_owner_without_uid_number_cannot_schedule(backend):
    dave = DAVE
    with pytest.raises(AccessError) as e:
        await backend.create_schedule(dave, ScheduleCreate(project="vision", notebook="job.ipynb",
                                                           notebook_content=notebook("1")))
    assert e.value.status == 403 and "no uidNumber" in e.value.message
    assert await backend.list_schedules(dave) == []
