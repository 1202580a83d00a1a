"""The local backend end to end: real papermill runs in subprocesses, sqlite state, cron, restarts."""

from __future__ import annotations

import asyncio
import json
import os
from datetime import timedelta

import pytest

from labyard_hub.access import AccessError, StaticIdentities
from labyard_hub.scheduler.backend import BadRequest, NotFound
from labyard_hub.scheduler.models import RunCreate, RunStatus, ScheduleCreate, ScheduleUpdate, now
from labyard_hub.scheduler.params import ParameterError

from . import notebooks
from .conftest import make_backend, wait_finished

# the backend fixture runs on the session loop (asyncio_default_fixture_loop_scope); its loop task must too
pytestmark = pytest.mark.asyncio(loop_scope="session")


def create(**kw) -> ScheduleCreate:
    return ScheduleCreate(**{"project": "vision", "notebook": "train.ipynb", **kw})


async def test_run_once_succeeds_with_parameters_in_the_project_dir(backend, identities, tmp_path):
    alice = identities["alice"]
    schedule, run = await backend.create_schedule(alice, create(parameters={"epochs": 3}))
    assert schedule.flavor == "cpu" and schedule.cron is None and run.status == RunStatus.running
    done = await wait_finished(backend, alice, run.id)
    assert done.status == RunStatus.succeeded and done.exit_code == 0 and done.attempts == 1
    output = json.loads(await backend.run_output(alice, run.id))
    printed = json.loads("".join(output["cells"][-1]["outputs"][0]["text"]))
    # the injected parameters took effect; the run worked in the project dir, knew its id, and
    # did not inherit any hub token
    assert printed == {"epochs": 3, "cwd": str(tmp_path / "projects" / "vision"), "project": "vision",
                       "run": run.id, "token": None, "uid": os.getuid(), "gid": os.getgid()}
    assert "trained baseline 3 3" in await backend.run_log(alice, run.id)


async def test_failure_reports_the_failing_cell_and_error(backend, identities):
    alice = identities["alice"]
    schedule, _ = await backend.create_schedule(alice, create(cron="0 3 * * *", timezone="Europe/Berlin"))
    run = await backend.run_now(alice, schedule.id, RunCreate(parameters={"epochs": 5}))
    done = await wait_finished(backend, alice, run.id)
    assert done.status == RunStatus.failed and done.exit_code == 1
    assert done.failed_cell == 2 and done.error == "ValueError: diverged at epoch 5"
    # the output notebook of a failed run is kept too
    assert "diverged at epoch 5" in (await backend.run_output(alice, run.id)).decode()


async def test_timeout_names_the_running_cell(tmp_path, identities):
    notebooks.write(tmp_path / "projects" / "vision" / "slow.ipynb", notebooks.training(sleep=120))
    b = make_backend(tmp_path)
    await b.start()
    try:
        alice = identities["alice"]
        _, run = await b.create_schedule(alice, create(notebook="slow.ipynb", timeout_seconds=20))
        done = await wait_finished(b, alice, run.id, timeout=60)
        assert done.status == RunStatus.failed and done.attempts == 1
        assert done.error == "timed out after 20s (in cell 2)" and done.failed_cell == 2
        assert "attempt 1 timed out after 20s" in await b.run_log(alice, run.id)
    finally:
        await b.stop()


async def test_failed_attempts_are_retried(backend, identities):
    alice = identities["alice"]
    _, run = await backend.create_schedule(alice, create(parameters={"epochs": 5}, retries=1))
    done = await wait_finished(backend, alice, run.id)
    assert done.status == RunStatus.failed and done.attempts == 2 and done.failed_cell == 2
    log = await backend.run_log(alice, run.id)
    assert log.count("failed: ValueError: diverged at epoch 5") == 2


async def test_cancel_stops_the_run(tmp_path, identities):
    notebooks.write(tmp_path / "projects" / "vision" / "slow.ipynb", notebooks.training(sleep=60))
    b = make_backend(tmp_path)
    await b.start()
    try:
        alice = identities["alice"]
        _, run = await b.create_schedule(alice, create(notebook="slow.ipynb"))
        with pytest.raises(AccessError) as e:
            await b.cancel_run(identities["bob"], run.id)  # a member, but not the owner
        assert e.value.status == 403
        cancelled = await b.cancel_run(alice, run.id)
        assert cancelled.status == RunStatus.cancelled
        assert not b._alive(cancelled)
        with pytest.raises(BadRequest, match="already cancelled"):
            await b.cancel_run(alice, run.id)
    finally:
        await b.stop()


async def test_authorization_and_validation(backend, identities):
    alice, bob, carol = identities["alice"], identities["bob"], identities["carol"]
    with pytest.raises(AccessError) as e:
        await backend.create_schedule(carol, create())
    assert e.value.status == 403
    with pytest.raises(AccessError) as e:
        await backend.create_schedule(alice, create(flavor="gpu-1"))  # local mode offers no GPU flavour
    assert e.value.status == 400 and "gpu-1" in e.value.message
    with pytest.raises(AccessError) as e:
        await backend.create_schedule(alice, create(flavor="huge"))
    assert e.value.status == 400 and "unknown flavor 'huge'" in e.value.message
    with pytest.raises(ParameterError, match="'epochs' must be int"):
        await backend.create_schedule(alice, create(parameters={"epochs": "three"}))
    with pytest.raises(BadRequest, match="not found"):
        await backend.create_schedule(alice, create(notebook="missing.ipynb"))
    schedule, _ = await backend.create_schedule(alice, create(cron="*/5 * * * *"))
    # bob (vision) sees it, carol (nlp only) does not, only alice may change it
    assert [s.id for s in await backend.list_schedules(bob)] == [schedule.id]
    assert await backend.list_schedules(carol) == []
    with pytest.raises(AccessError):
        await backend.get_schedule(carol, schedule.id)
    with pytest.raises(AccessError):
        await backend.set_paused(bob, schedule.id, True)
    with pytest.raises(NotFound):
        await backend.get_schedule(alice, "s-000000000000")


async def test_pause_resume_update_delete(backend, identities):
    alice = identities["alice"]
    schedule, _ = await backend.create_schedule(alice, create(cron="0 3 * * *", timezone="Asia/Tokyo"))
    assert schedule.next_run.astimezone().utcoffset() is not None
    assert (schedule.next_run + timedelta(hours=9)).hour == 3  # 03:00 in Tokyo
    paused = await backend.set_paused(alice, schedule.id, True)
    assert paused.paused and paused.next_run is None
    resumed = await backend.set_paused(alice, schedule.id, False)
    assert not resumed.paused and resumed.next_run == schedule.next_run
    changed = await backend.update_schedule(alice, schedule.id, ScheduleUpdate(cron="30 4 * * 1", parameters={"epochs": 2}))
    assert changed.cron == "30 4 * * 1" and changed.parameters == {"epochs": 2} and changed.next_run.weekday() in (0, 6)
    await backend.delete_schedule(alice, schedule.id)
    with pytest.raises(NotFound):
        await backend.get_schedule(alice, schedule.id)


async def _age(backend, schedule_id, minutes):
    """Pretend the schedule's last handled time was ``minutes`` ago (as if the service had been down)."""
    s = await backend._load_schedule(schedule_id)
    s.last_fire = now() - timedelta(minutes=minutes)
    await backend._save_schedule(s)


@pytest.mark.parametrize(("policy", "expected"), [("run_once", 1), ("skip", 0)])
async def test_missed_times_after_a_restart(tmp_path, identities, policy, expected):
    notebooks.write(tmp_path / "projects" / "vision" / "train.ipynb", notebooks.training())
    alice = identities["alice"]
    # hourly, at the minute that was 10 minutes ago: its latest time is 10 minutes late
    minute = (now() - timedelta(minutes=10)).minute
    b = make_backend(tmp_path)
    await b.start()
    schedule, _ = await b.create_schedule(alice, create(cron=f"{minute} * * * *", missed_runs=policy))
    await b.stop()
    # while the service is down, the time passes (and, 1 h 15 min back, another one)
    b = make_backend(tmp_path)
    await b._sql(b._connect)
    await _age(b, schedule.id, 75)
    await b._sql(b._db.close)
    b = make_backend(tmp_path)
    await b.start()
    try:
        runs = await b.list_runs(alice, schedule_id=schedule.id)
        assert len(runs) == expected  # never one run per missed time
        assert all(r.trigger == "cron" for r in runs)
        s = await b.get_schedule(alice, schedule.id)
        assert now() - timedelta(minutes=11) < s.last_fire < now() - timedelta(minutes=9)
        assert s.next_run > now() + timedelta(minutes=45)
        for r in runs:
            assert (await wait_finished(b, alice, r.id)).status == RunStatus.succeeded
    finally:
        await b.stop()


async def test_a_due_time_fires_once_and_forbid_skips_while_running(tmp_path, identities):
    notebooks.write(tmp_path / "projects" / "vision" / "slow.ipynb", notebooks.training(sleep=8))
    alice = identities["alice"]
    b = make_backend(tmp_path)
    await b.start()
    try:
        schedule, _ = await b.create_schedule(alice, create(notebook="slow.ipynb", cron="* * * * *"))
        await _age(b, schedule.id, 1)
        await b.tick_once()
        await b.tick_once()
        runs = await b.list_runs(alice, schedule_id=schedule.id)
        assert len(runs) == 1 and runs[0].status == RunStatus.running
        await _age(b, schedule.id, 1)  # due again while the first run still runs
        await b.tick_once()
        assert len(await b.list_runs(alice, schedule_id=schedule.id)) == 1
        await b.cancel_run(alice, runs[0].id)
    finally:
        await b.stop()


async def test_restart_while_a_run_is_in_flight(tmp_path, identities):
    """The service stops mid-run; the run goes on; the next instance collects it: one run, right status."""
    notebooks.write(tmp_path / "projects" / "vision" / "slow.ipynb", notebooks.training(sleep=4, fail_at_epoch=7))
    alice = identities["alice"]
    b = make_backend(tmp_path)
    await b.start()
    _, ok = await b.create_schedule(alice, create(notebook="slow.ipynb", parameters={"epochs": 2}))
    _, bad = await b.create_schedule(alice, create(notebook="slow.ipynb", parameters={"epochs": 7}))
    await b.stop()
    b2 = make_backend(tmp_path)
    await b2.start()
    try:
        assert (await b2.get_run(alice, ok.id)).status == RunStatus.running
        assert b2._alive(await b2.get_run(alice, ok.id))
        done_ok = await wait_finished(b2, alice, ok.id)
        done_bad = await wait_finished(b2, alice, bad.id)
        assert done_ok.status == RunStatus.succeeded and done_ok.attempts == 1
        assert done_bad.status == RunStatus.failed and done_bad.error == "ValueError: diverged at epoch 7"
        assert len(await b2.list_runs(alice)) == 2
    finally:
        await b2.stop()


async def test_a_killed_runner_is_reported_failed(tmp_path, identities):
    import signal

    notebooks.write(tmp_path / "projects" / "vision" / "slow.ipynb", notebooks.training(sleep=60))
    alice = identities["alice"]
    b = make_backend(tmp_path)
    await b.start()
    try:
        _, run = await b.create_schedule(alice, create(notebook="slow.ipynb"))
        await asyncio.sleep(1)
        os.killpg(run.pid, signal.SIGKILL)
        done = await wait_finished(b, alice, run.id, timeout=20)
        assert done.status == RunStatus.failed and "without a result" in done.error
    finally:
        await b.stop()


async def test_run_input_is_the_snapshot_it_executed(backend, identities, tmp_path):
    alice, carol = identities["alice"], identities["carol"]
    _, run = await backend.create_schedule(alice, create(parameters={"epochs": 2}))
    nb_path = tmp_path / "projects" / "vision" / "train.ipynb"
    scheduled = json.loads(nb_path.read_text())
    nb_path.write_text(nb_path.read_text().replace("epochs = 1", "epochs = 7"))  # changed after scheduling
    assert json.loads(await backend.run_input(alice, run.id)) == scheduled
    with pytest.raises(AccessError):
        await backend.run_input(carol, run.id)
    with pytest.raises(NotFound):
        await backend.run_input(alice, "r-000000000000")
    await wait_finished(backend, alice, run.id)


# ---- decisions at the moment of action ---------------------------------------------------------
def _bob_removed_from_vision(identities):
    return identities["bob"].model_copy(update={"projects": ()})


async def test_a_cron_time_rechecks_the_owner_and_pauses_with_the_reason(tmp_path, identities):
    """bob leaves vision: at his schedule's next cron time no run starts; the schedule is paused with
    the reason, which alice (the project) sees too; it stays paused, and bob cannot resume it."""
    notebooks.write(tmp_path / "projects" / "vision" / "train.ipynb", notebooks.training())
    people = StaticIdentities(identities)
    b = make_backend(tmp_path, identities=people)
    await b.start()
    try:
        bob = identities["bob"]
        schedule, _ = await b.create_schedule(bob, create(cron="* * * * *"))
        people.set(_bob_removed_from_vision(identities))
        await _age(b, schedule.id, 1)
        await b.tick_once()
        assert await b.list_runs(identities["alice"], schedule_id=schedule.id) == []
        seen = await b.get_schedule(identities["alice"], schedule.id)
        assert seen.paused and seen.next_run is None
        assert seen.paused_reason == "bob is no longer a member of project 'vision'"
        await _age(b, schedule.id, 1)
        await b.tick_once()
        assert await b.list_runs(identities["alice"], schedule_id=schedule.id) == []
        with pytest.raises(AccessError) as e:
            await b.set_paused(_bob_removed_from_vision(identities), schedule.id, False)
        assert e.value.status == 403
    finally:
        await b.stop()


async def test_the_reconcile_pass_pauses_without_waiting_for_a_cron_time(tmp_path, identities):
    notebooks.write(tmp_path / "projects" / "vision" / "train.ipynb", notebooks.training())
    people = StaticIdentities(identities)
    b = make_backend(tmp_path, identities=people)
    await b.start()
    try:
        schedule, _ = await b.create_schedule(identities["bob"], create(cron="0 3 * * *"))
        other, _ = await b.create_schedule(identities["alice"], create(cron="0 3 * * *"))
        assert await b.reconcile() == []
        people.set(_bob_removed_from_vision(identities))
        paused = await b.reconcile()
        assert [s.id for s in paused] == [schedule.id]
        assert (await b.get_schedule(identities["alice"], other.id)).paused is False
        assert await b.reconcile() == []  # nothing resumes it, nothing pauses it twice
    finally:
        await b.stop()


async def test_when_the_hub_cannot_say_nothing_runs_and_nothing_is_decided(tmp_path, identities):
    from labyard_hub.access import IdentityUnavailable

    class HubDown(StaticIdentities):
        async def get(self, name, fresh=False):
            raise IdentityUnavailable("the hub did not answer")

    notebooks.write(tmp_path / "projects" / "vision" / "train.ipynb", notebooks.training())
    b = make_backend(tmp_path)
    await b.start()
    schedule, _ = await b.create_schedule(identities["alice"], create(cron="* * * * *"))
    await b.stop()
    b = make_backend(tmp_path, identities=HubDown(identities))
    await b._sql(b._connect)
    await _age(b, schedule.id, 1)
    await b.tick_once()
    s = await b._load_schedule(schedule.id)
    assert not s.paused and await b._list_runs(schedule_id=schedule.id) == []
    assert s.last_fire < now() - timedelta(seconds=50)  # still due: the next tick tries again
    await b._sql(b._db.close)


async def test_a_flavour_removed_from_the_policy_is_409_and_pauses_never_500(tmp_path, identities):
    from labyard_hub.projects import ProjectPolicy
    from labyard_hub.scheduler.backend import Conflict

    def policy(*names):
        return ProjectPolicy.model_validate({"flavors": {n: {} for n in names}})

    notebooks.write(tmp_path / "projects" / "vision" / "train.ipynb", notebooks.training())
    alice = identities["alice"]
    b = make_backend(tmp_path, policy=policy("cpu", "big"))
    await b.start()
    schedule, _ = await b.create_schedule(alice, create(cron="0 3 * * *", flavor="big"))
    await b.stop()
    # the admin removes flavour "big"; the service restarts with the new policy
    b = make_backend(tmp_path, policy=policy("cpu"))
    await b.start()
    try:
        assert (await b.get_schedule(alice, schedule.id)).flavor == "big"  # still listed, not a 500
        with pytest.raises(Conflict, match="flavour is gone: unknown flavor 'big'"):
            await b.run_now(alice, schedule.id, RunCreate())
        s = await b.get_schedule(alice, schedule.id)
        assert s.paused and "flavour is gone" in s.paused_reason
        assert await b.list_runs(alice, schedule_id=schedule.id) == []
        with pytest.raises(Conflict, match="stays paused: the schedule's flavour is gone"):
            await b.set_paused(alice, schedule.id, False)
        with pytest.raises(AccessError) as e:
            await b.update_schedule(alice, schedule.id, ScheduleUpdate(flavor="big"))
        assert e.value.status == 400
        fixed = await b.update_schedule(alice, schedule.id, ScheduleUpdate(flavor="cpu"))
        assert fixed.flavor == "cpu" and fixed.paused  # resuming is the owner's decision
        resumed = await b.set_paused(alice, schedule.id, False)
        assert not resumed.paused and resumed.paused_reason is None and resumed.next_run
    finally:
        await b.stop()


async def test_pausing_by_hand_says_who_paused(backend, identities):
    alice = identities["alice"]
    schedule, _ = await backend.create_schedule(alice, create(cron="0 3 * * *"))
    assert (await backend.set_paused(alice, schedule.id, True)).paused_reason == "paused by alice"


# ---- snapshots and descriptors -----------------------------------------------------------------
async def test_snapshots_no_schedule_uses_are_cleaned_and_limited_per_user(tmp_path, identities):
    from labyard_hub.settings import SchedulerSettings

    alice = identities["alice"]
    b = make_backend(tmp_path, limits=SchedulerSettings(snapshot_ttl=60, snapshots_per_user=3))
    await b.start()
    try:
        nb = notebooks.training()
        used, _ = await b.create_schedule(alice, create(cron="0 3 * * *", notebook_content=json.loads(json.dumps(nb))))
        digests = []
        for epochs in range(5):  # the Schedule dialog, opened five times on a changing notebook
            nb.cells[1].source = f"epochs = {epochs}\n"
            digest, _ = await b.parameters_of(alice, "vision", "train.ipynb", json.loads(json.dumps(nb)))
            digests.append(digest)
        kept = {d for d in digests if b.snapshots.exists(d)}
        assert kept == set(digests[-3:])  # her three newest unused ones
        assert b.snapshots.exists(used.notebook_sha256)
        # an hour later nothing unused is left; the schedule's snapshot stays
        old = now().timestamp() - 3600
        for mark in (b.snapshots.root / "owners" / "alice").iterdir():
            os.utime(mark, (old, old))
        for path in b.snapshots.root.glob("*.ipynb"):
            os.utime(path, (old, old))
        assert set(await b.clean_snapshots()) == kept
        assert b.snapshots.exists(used.notebook_sha256)
        await b.tick_once()
        run = await b.run_now(alice, used.id, RunCreate())
        assert (await wait_finished(b, alice, run.id)).status == RunStatus.succeeded
    finally:
        await b.stop()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_runs_leave_no_open_descriptor_behind(backend, identities):
    alice = identities["alice"]
    schedule, first = await backend.create_schedule(alice, create(cron="0 3 * * *"))
    before = _open_fds()
    for _ in range(5):
        run = await backend.run_now(alice, schedule.id, RunCreate())
        assert (await wait_finished(backend, alice, run.id)).status == RunStatus.succeeded
    await asyncio.sleep(1)  # the reaper has seen every child exit
    assert _open_fds() <= before
