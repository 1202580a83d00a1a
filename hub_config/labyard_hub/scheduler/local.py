"""The local backend (``labyard up``): state in sqlite, runs as papermill subprocesses.

* State lives in ``<data dir>/scheduler.sqlite``; every sqlite call runs on one dedicated
  thread, never on the event loop.
* A loop (every ``tick`` seconds) fires cron schedules (croniter, in the schedule's timezone)
  and collects finished runs. A cron time is recorded as handled *before* its run starts, and a
  run is recorded (``pending``) before its process starts, so a restart never runs a time twice;
  a ``pending`` run without a process is started after a restart, unless its runner is already
  running (it holds the run's lock: the service died after starting it, before recording it),
  which is then adopted: a run has one runner.
* Missed times (the service was down): ``missed_runs: run_once`` runs the latest of them once,
  ``skip`` skips them; times more than ``grace`` seconds late count as missed.
* Each run is ``python -m labyard_hub.scheduler.runner RUN_DIR`` in its own session: it keeps
  running while the service restarts, and its ``result.json`` is collected afterwards.
* Isolation (``isolate``: the platform runs as root, docs/admin/local.md): the runner stays
  the platform's, papermill and the kernel run as the owner's uid with the project's gid
  (:mod:`labyard_hub.isolation`). A run's state (``<data dir>/runs/<id>``: spec, log, result)
  is the platform's; its notebooks (``<run_files_dir>/<id>``: input, parameters, output,
  record) are the owner's alone, and the service reads them without following links.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import shutil
import signal
import sqlite3
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

from .. import isolation
from ..access import AccessError, IdentityUnavailable, process_ids
from ..isolation import RunAs
from ..projects import Flavor, Identity, Project
from . import runner
from .backend import Backend, BadRequest, log
from .models import Run, RunStatus, Schedule, now
from .tokens import RunTokens, TokenError

#: environment variables a run inherits from the service (never its hub token)
#: and the platform's session mark: a run outlives a restart of the service, not of `labyard up`
#: (stopped with it, recorded as failed when the next start collects it: docs/admin/install.md)
#: (not LABYARD_SESSION: a run in flight outlives a restart of the scheduler and of labyard up, by design)
_KEEP_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV", "JUPYTER_PATH")


def _proc_start(pid: int) -> float | None:
    """The start time of a process (clock ticks since boot), to tell it from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    return float(fields[19])


class LocalBackend(Backend):
    def __init__(self, *args, tick: float = 1.0, grace: float = 60.0, homes_dir: Path | None = None,
                 run_files_dir: Path | None = None, isolate: bool = False, run_tokens: RunTokens | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.run_tokens = run_tokens
        if isolate and homes_dir is None:
            raise ValueError("an isolating local backend needs the users' homes_dir")
        self.homes_dir = Path(homes_dir) if homes_dir else None
        self.run_files_dir = Path(run_files_dir) if run_files_dir else self.data_dir / "run-files"
        self.isolate = isolate
        self.tick = tick
        self.grace = grace
        self.runs_dir = self.data_dir / "runs"
        self._db_thread = ThreadPoolExecutor(1, thread_name_prefix="scheduler-sqlite")
        self._db: sqlite3.Connection | None = None
        self._loop_task: asyncio.Task | None = None
        self._children: dict[str, asyncio.subprocess.Process] = {}
        self._lock = asyncio.Lock()
        #: the first pass after start: runs recorded ``pending`` without a pid are a previous instance's
        self._adopting = False

    # ---- sqlite (one thread) ---------------------------------------------------------
    def _connect(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.data_dir / "scheduler.sqlite")
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript("""
            CREATE TABLE IF NOT EXISTS schedules (id TEXT PRIMARY KEY, project TEXT NOT NULL, body TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS runs (id TEXT PRIMARY KEY, schedule_id TEXT NOT NULL, project TEXT NOT NULL,
                                             status TEXT NOT NULL, created TEXT NOT NULL, body TEXT NOT NULL);
            CREATE INDEX IF NOT EXISTS runs_schedule ON runs (schedule_id);
            CREATE INDEX IF NOT EXISTS runs_status ON runs (status);
        """)
        self._db = db

    async def _sql(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._db_thread, fn, *args)

    def _q(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._db:
            return self._db.execute(sql, args).fetchall()

    async def _save_schedule(self, s: Schedule) -> None:
        self._run_as(s)  # an owner without uidNumber is refused (403) before anything is stored
        await self._sql(self._q, "INSERT OR REPLACE INTO schedules VALUES (?, ?, ?)", (s.id, s.project, s.model_dump_json()))

    async def _load_schedule(self, schedule_id: str, projects_first: list[str] = ()) -> Schedule | None:
        rows = await self._sql(self._q, "SELECT body FROM schedules WHERE id = ?", (schedule_id,))
        return Schedule.model_validate_json(rows[0][0]) if rows else None

    async def _list_schedules(self, projects: list[str] | None) -> list[Schedule]:
        rows = await self._sql(self._q, "SELECT body FROM schedules ORDER BY rowid")
        schedules = [Schedule.model_validate_json(r[0]) for r in rows]
        return [s for s in schedules if projects is None or s.project in projects]

    async def _delete_schedule(self, s: Schedule) -> None:
        await self._sql(self._q, "DELETE FROM schedules WHERE id = ?", (s.id,))

    def _run_row(self, run: Run) -> tuple:
        body = json.dumps({**run.model_dump(mode="json"), "pid": run.pid, "pid_started": run.pid_started})
        return (run.id, run.schedule_id, run.project, run.status.value, run.created.isoformat(), body)

    async def _save_run(self, run: Run) -> None:
        await self._sql(self._q, "INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?)", self._run_row(run))

    async def _load_run(self, run_id: str, projects_first: list[str] = ()) -> Run | None:
        rows = await self._sql(self._q, "SELECT body FROM runs WHERE id = ?", (run_id,))
        return Run.model_validate_json(rows[0][0]) if rows else None

    async def _list_runs(self, schedule_id: str | None = None, projects: list[str] | None = None,
                         unfinished: bool = False) -> list[Run]:
        sql, args = "SELECT body FROM runs WHERE 1=1", []
        if schedule_id:
            sql += " AND schedule_id = ?"
            args.append(schedule_id)
        if unfinished:
            sql += " AND status IN ('pending', 'running')"
        rows = await self._sql(self._q, sql + " ORDER BY created DESC", tuple(args))
        runs = [Run.model_validate_json(r[0]) for r in rows]
        return [r for r in runs if projects is None or r.project in projects]

    # ---- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        await self._sql(self._connect)
        self._adopting = True
        try:
            await self.tick_once()  # adopt runs left by a previous instance, handle missed times
        finally:
            self._adopting = False
        self._loop_task = asyncio.create_task(self._loop())
        await super().start()

    async def stop(self) -> None:
        """Stop the loops; runs in flight keep going and are collected by the next instance."""
        if self._loop_task:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
        await super().stop()
        if self._db is not None:
            await self._sql(self._db.close)
        self._db_thread.shutdown(wait=True)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            try:
                await self.tick_once()
            except Exception:
                log.exception("scheduler tick failed")

    async def tick_once(self) -> None:
        async with self._lock:
            await self._collect()
            await self._fire_due()

    async def reconcile(self) -> list[Schedule]:
        async with self._lock:  # never between a cron time's check and its run
            return await super().reconcile()

    # ---- cron ------------------------------------------------------------------------
    async def _fire_due(self) -> None:
        t = now()
        for s in await self._list_schedules(None):
            if s.paused or not s.cron:
                continue
            last = s.last_fire or s.created
            due = s.next_fire(last)
            if due is None or due > t:
                continue
            latest = due
            while True:  # the latest due time (never more than one run for all of them)
                following = s.next_fire(latest)
                if following is None or following > t:
                    break
                latest = following
            late = (t - latest).total_seconds() > self.grace
            fire = not late or s.missed_runs == "run_once"
            if fire:
                # the owner's membership and the flavour, now (not as they were when scheduled)
                try:
                    owner, reason = await self._owner_now(s)
                except IdentityUnavailable as e:
                    log.warning("schedule %s: cannot check %s now (%s); trying again", s.id, s.owner, e)
                    continue  # the time stays due; past the grace it counts as missed
            s.last_fire = latest
            s.next_run = s.next_fire(latest)
            if fire and reason:
                await self._pause(s, reason)
                continue
            if fire:
                s.run_as_uid, s.run_as_gid = owner.uid, owner.project(s.project).gid
            await self._save_schedule(s)
            if not fire:
                log.info("schedule %s: skipping missed time %s (missed_runs: skip)", s.id, latest)
                continue
            active = await self._list_runs(schedule_id=s.id, unfinished=True)
            if active and s.concurrency == "forbid":
                log.info("schedule %s: run %s still active; not starting another (concurrency: forbid)", s.id, active[0].id)
                continue
            if active and s.concurrency == "replace":
                for r in active:
                    await self._cancel_run(r)
            log.info("schedule %s: firing for %s%s", s.id, latest, " (missed)" if late else "")
            await self._new_run(s, self.access.flavor(s.flavor), {}, "cron")

    # ---- reproductions --------------------------------------------------------------
    async def _reproduction_environment(self, gate, req, tags: dict[str, str], warnings: list[str]) -> str | None:
        """Local mode: runs use this platform's Python environment; its lock (the sha256 of its
        pip freeze) must be the recorded one, or the user chose to be warned."""
        from labyard_lab.autolog.provenance import pip_freeze
        from labyard_lab.autolog.reproduce import freeze_difference, freeze_lock

        if tags.get("labyard.mode", "local") != "local":
            self._environment_differs(req, f"MLflow run {req.reproduce} ran on Kubernetes (image "
                                      f"{tags.get('labyard.image', '?')}); this platform runs locally", warnings)
            return None
        recorded = tags.get("labyard.env.lock_sha256")
        current_freeze = await self._in_thread(pip_freeze)
        if recorded is None:
            self._environment_differs(req, f"MLflow run {req.reproduce} has no environment lock recorded", warnings)
            return None
        if recorded == freeze_lock(current_freeze):
            return None
        old = await gate.artifact(req.reproduce, "environment/requirements.txt")
        diff = freeze_difference(old.decode(errors="replace"), current_freeze) if old is not None else []
        shown = ", ".join(diff[:10]) + (f" and {len(diff) - 10} more" if len(diff) > 10 else "")
        self._environment_differs(req, "the Python environment differs from the one MLflow run "
                                  f"{req.reproduce} recorded" + (f": {shown}" if shown else ""), warnings)
        return None

    async def _changed_inputs(self, project: str, files: list[dict], warnings: list[str]) -> list[str]:
        from labyard_lab.autolog.reproduce import compare_inputs

        found = await self._in_thread(compare_inputs, files, self.project_dir(project))
        if found["unknown"]:
            warnings.append("input files that changed while the original read them (not comparable): "
                            + ", ".join(found["unknown"]))
        return [f"{p} (changed)" for p in found["changed"]] + [f"{p} (vanished)" for p in found["vanished"]]

    # ---- runs ------------------------------------------------------------------------
    def _run_dir(self, run: Run) -> Path:
        return self.runs_dir / run.id

    def _run_as(self, schedule: Schedule) -> RunAs | None:
        """Who a run of ``schedule`` executes as (None: this service's user, when not isolated).

        Raises:
            AccessError: 403 when the owner had no uidNumber or the project no gidNumber.
        """
        if not self.isolate:
            return None
        uid, gid = process_ids(Identity(username=schedule.owner, uid=schedule.run_as_uid),
                               Project(name=schedule.project, gid=schedule.run_as_gid))
        return RunAs(schedule.owner, uid, gid, self._home(schedule.owner))

    def _home(self, owner: str) -> Path:
        assert self.homes_dir is not None
        return self.homes_dir / owner

    def _files(self, run: Run) -> Path:
        """The run's notebooks (input, parameters, output, record): the owner's alone."""
        return self.run_files_dir / run.id

    def _prepare_run(self, run: Run, run_as: RunAs | None, spec: dict) -> None:
        """Directories and files of a run, before any of its processes exists (in a thread)."""
        isolation.prepare_project_dir(Path(spec["cwd"]), run_as.gid if run_as else None, isolate=run_as is not None)
        if self.homes_dir is not None:
            isolation.prepare_private_dir(self._home(run.owner), run_as)
        rdir = self._run_dir(run)
        rdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.run_files_dir.mkdir(parents=True, exist_ok=True, mode=0o711)
        files = self._files(run)
        if files.exists():  # a recorded run started again: whatever its owner's processes left goes
            shutil.rmtree(files)
        # written while the directory is still the platform's, handed over afterwards
        isolation.prepare_private_dir(files, None)
        shutil.copyfile(self.snapshots.path(run.notebook_sha256), spec["input"])
        Path(spec["parameters_file"]).write_text(json.dumps(run.parameters))
        for path in (spec["input"], spec["parameters_file"], files):
            isolation.give(Path(path), run_as)
        (rdir / "spec.json").write_text(json.dumps(spec))

    async def _start_run(self, schedule: Schedule, run: Run, flavor: Flavor | None = None) -> Run:
        try:
            run_as = self._run_as(schedule)
        except AccessError as e:
            return await self._finish(run, {"status": "failed", "error": e.message})
        rdir, files = self._run_dir(run), self._files(run)
        project_dir = self.project_dir(run.project)
        env = {
            "LABYARD_USER": run.owner,
            "LABYARD_PROJECT": run.project,
            "LABYARD_PROJECT_DIR": str(project_dir),
            "LABYARD_FLAVOR": run.flavor,
            "LABYARD_GPUS": str(getattr(self.policy.flavors.get(run.flavor), "gpus", 0)),
            "LABYARD_NOTEBOOK": run.notebook,
            "LABYARD_NOTEBOOK_SHA256": run.notebook_sha256,
            "LABYARD_SCHEDULE_ID": run.schedule_id,
            "LABYARD_RUN_ID": run.id,
            # the kernel side (MLflow autolog) writes {"mlflow_run_id": ...} here
            "LABYARD_RUN_RECORD": str(files / "record.json"),
        }
        if run.reproduce is not None:
            env["LABYARD_REPRODUCE"] = run.reproduce.model_dump_json()
        if self.homes_dir is not None:
            env["HOME"] = str(self._home(run.owner))
        if self.mlflow_url:
            env["MLFLOW_TRACKING_URI"] = self.mlflow_url
            if self.run_tokens is not None:
                # the run logs through the MLflow gate as its owner, with a token for MLflow only
                seconds = run.timeout_seconds * (run.retries + 1) + 3600
                try:
                    env["MLFLOW_TRACKING_TOKEN"] = await self.run_tokens.for_run(run.owner, run.id, seconds)
                except TokenError as e:
                    log.warning("run %s: no MLflow token (%s); its records wait in the queue", run.id, e)
        spec = {
            "input": str(files / "input.ipynb"),
            "output": str(files / "output.ipynb"),
            "parameters_file": str(files / "parameters.json"),
            "cwd": str(project_dir),
            "env": env,
            "timeout_seconds": run.timeout_seconds,
            "retries": run.retries,
            "log": str(rdir / "log.txt"),
            "run_as": run_as.to_json() if run_as else None,
        }
        await self._in_thread(self._prepare_run, run, run_as, spec)
        base_env = {k: os.environ[k] for k in _KEEP_ENV if k in os.environ}
        # the run's lock, taken here and inherited by the runner, which holds it until it ends
        lock = os.open(rdir / runner.LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.warning("run %s: a runner already runs it; not starting another", run.id)
                return run
            with open(rdir / "runner.err", "ab") as err:  # the child has its own copy; ours is closed at once
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "labyard_hub.scheduler.runner", str(rdir),
                    stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                    stderr=err, env=base_env, cwd=str(rdir), start_new_session=True, pass_fds=(lock,),
                )
            os.ftruncate(lock, 0)
            os.write(lock, str(proc.pid).encode())
        finally:
            os.close(lock)
        self._children[run.id] = proc
        asyncio.get_running_loop().create_task(self._reap(run.id, proc))
        run = run.model_copy(update={"status": RunStatus.running, "started": now(), "pid": proc.pid,
                                     "pid_started": _proc_start(proc.pid)})
        await self._save_run(run)
        log.info("run %s of schedule %s started (pid %d%s)", run.id, run.schedule_id, proc.pid,
                 f"; as uid {run_as.uid}, gid {run_as.gid}" if run_as else "")
        return run

    async def _reap(self, run_id: str, proc: asyncio.subprocess.Process) -> None:
        await proc.wait()
        self._children.pop(run_id, None)

    def _alive(self, run: Run) -> bool:
        if run.id in self._children:
            return True
        return run.pid is not None and _proc_start(run.pid) is not None and _proc_start(run.pid) == run.pid_started

    async def _collect(self) -> None:
        """Finish runs whose runner wrote a result; fail runs whose runner vanished; start lost pending runs."""
        for run in await self._list_runs(unfinished=True):
            rdir = self._run_dir(run)
            result = rdir / "result.json"
            if result.exists():
                await self._finish(run, json.loads(result.read_text()))
            elif run.status == RunStatus.pending and run.pid is None:
                if not self._adopting:
                    continue  # being started by this instance right now (_new_run records it before it starts it)
                running = runner.holder(rdir)
                if running is not None:
                    # started by a service that died before it recorded the pid: adopt it, never start it twice
                    if running:
                        log.info("run %s was started (pid %d) but not recorded as running; adopting it", run.id, running)
                        await self._save_run(run.model_copy(update={"status": RunStatus.running, "started": now(),
                                                                    "pid": running, "pid_started": _proc_start(running)}))
                    continue
                schedule = await self._load_schedule(run.schedule_id)
                if schedule is not None:
                    log.info("run %s was recorded but never started; starting it", run.id)
                    await self._start_run(schedule, run)
                else:
                    await self._finish(run, {"status": "cancelled", "error": "schedule deleted before the run started"})
            elif not self._alive(run):
                await asyncio.sleep(0.2)  # the runner may be writing its result right now
                if result.exists():
                    await self._finish(run, json.loads(result.read_text()))
                else:
                    await self._finish(run, {"status": "failed", "error": "the run's process ended without a result (killed?)"})
            else:
                state = rdir / "state.json"
                if state.exists():
                    try:
                        attempts = json.loads(state.read_text()).get("attempt", run.attempts)
                    except json.JSONDecodeError:
                        continue
                    if attempts != run.attempts:
                        await self._save_run(run.model_copy(update={"attempts": attempts}))

    async def _finish(self, run: Run, result: dict) -> Run:
        done = run.model_copy(update={
            "status": RunStatus(result.get("status", "failed")),
            "finished": datetime.fromisoformat(result["finished"]) if result.get("finished") else now(),
            "exit_code": result.get("exit_code"),
            "attempts": result.get("attempts", run.attempts),
            "failed_cell": result.get("failed_cell"),
            "error": result.get("error"),
            "mlflow_run_id": result.get("mlflow_run_id"),
        })
        await self._save_run(done)
        log.info("run %s %s", run.id, done.status.value)
        return done

    async def _cancel_run(self, run: Run) -> Run:
        if run.pid and self._alive(run):
            try:
                os.killpg(run.pid, signal.SIGTERM)  # the runner stops papermill and writes its result
            except ProcessLookupError:
                pass
            for _ in range(100):
                if (self._run_dir(run) / "result.json").exists():
                    break
                await asyncio.sleep(0.1)
        result = self._run_dir(run) / "result.json"
        if result.exists():
            data = json.loads(result.read_text())
            if data.get("status") != "cancelled" and run.status.finished is False:
                data = {**data}  # it finished on its own just before
            return await self._finish(run, data)
        return await self._finish(run, {"status": "cancelled", "error": "cancelled"})

    def _owner(self, run: Run) -> RunAs | None:
        """Who the run executed as (from its spec), to read what its processes wrote."""
        try:
            return RunAs.from_json(json.loads((self._run_dir(run) / "spec.json").read_text()).get("run_as"))
        except (OSError, ValueError):
            return None

    async def _output(self, run: Run) -> bytes | None:
        def read() -> bytes | None:
            try:
                return isolation.read_user_file(self._files(run) / "output.ipynb", self._owner(run))
            except PermissionError as e:
                raise BadRequest(f"run {run.id}: its output notebook cannot be served: {e}") from e

        return await self._in_thread(read)

    async def _log(self, run: Run) -> str | None:
        path = self._run_dir(run) / "log.txt"
        return await self._in_thread(lambda: path.read_text(errors="replace")) if path.exists() else None
