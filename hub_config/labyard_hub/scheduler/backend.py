"""What every backend shares: authorization, parameter checks, snapshots and re-checks.

A backend stores schedules and runs and executes runs; :class:`Backend` does everything that
must be the same whatever executes the run, so that the local and the Kubernetes backends
answer the same request in the same way:

* every request is decided by :class:`labyard_hub.access.Access` (not a member of the
  project: 403; flavour unknown or not allowed: 400; schedules and runs are visible to the
  members of their project, and only their owner, or a hub admin, may change, run, cancel or
  delete them);
* a schedule that acts on its own is checked again at that moment, on its owner's current
  identity (``identities.get(owner, fresh=True)``): at every cron time, and in a reconcile pass
  every ``reconcile_interval`` seconds. If the owner left the project or the flavour is gone,
  the schedule is paused with the reason (:attr:`Schedule.paused_reason`) and no run starts;
  nothing resumes it but its owner (or an admin), and resuming is checked the same way (409);
* parameters are checked against the notebook's ``parameters`` cell (400 naming the problem);
* notebook snapshots that no schedule uses are deleted after ``snapshot_ttl`` seconds, and a
  user keeps at most ``snapshots_per_user`` of them (the oldest go first).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from ..access import Access, AccessError, Identities, IdentityUnavailable
from ..projects import Flavor, Identity
from ..settings import SchedulerSettings
from .models import (Parameter, ReproduceCreate, Reproduction, Run, RunCreate, Schedule, ScheduleCreate, ScheduleUpdate,
                     new_id, now)
from .params import ParameterError, inspect_parameters, validate_parameters
from .snapshots import SnapshotStore

log = logging.getLogger("labyard.scheduler")


class NotFound(Exception):
    """An unknown schedule or run id (HTTP 404)."""


class BadRequest(ValueError):
    """A request that cannot be carried out as sent (HTTP 400)."""


class Unavailable(Exception):
    """Something the request needs is not there yet, e.g. the project's namespace (HTTP 503)."""


class Conflict(Exception):
    """A request the schedule's current state forbids, e.g. resuming while its flavour is gone (HTTP 409)."""


class Backend:
    """Base class of the scheduler backends.

    Args:
        access: the access rules (:class:`labyard_hub.access.Access`).
        data_dir: the service's own state (snapshots; the local backend's database and runs).
        projects_dir: local mode: the project directories.
        mlflow_url: the tracking server runs log to.
        identities: where users' current identities come from (:class:`HubIdentities` in the
            service; tests pass a :class:`labyard_hub.access.StaticIdentities`).
        limits: snapshot limits and the reconcile interval (:class:`SchedulerSettings`).

    Subclasses implement storage (``_save_schedule``, ``_load_schedule``, ``_list_schedules``,
    ``_delete_schedule``, ``_save_run``, ``_load_run``, ``_list_runs``) and execution
    (``_start_run``, ``_cancel_run``, ``_output``, ``_log``, and ``start``/``stop`` of any loop).
    """

    def __init__(self, access: Access, data_dir: Path, projects_dir: Path | None = None, mlflow_url: str | None = None, *,
                 identities: Identities, limits: SchedulerSettings | None = None):
        self.access = access
        self.policy = access.policy
        self.identities = identities
        self.limits = limits or SchedulerSettings()
        self.data_dir = Path(data_dir)
        self.projects_dir = Path(projects_dir) if projects_dir else None
        self.mlflow_url = mlflow_url
        #: makes users' MLflow-only tokens (runs log with them; reproductions read with them)
        self.run_tokens = None
        self.snapshots = SnapshotStore(self.data_dir / "snapshots")
        self._referenced: set[str] | None = None  # snapshots schedules use, as the last pass found them
        self._tasks: list[asyncio.Task] = []

    # ---- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        """Start the periodic passes (reconcile, snapshot clean-up); subclasses first set up storage."""
        self._tasks = [asyncio.create_task(self._every(self.limits.reconcile_interval, self.reconcile)),
                       asyncio.create_task(self._every(60, self.clean_snapshots))]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._tasks = []

    async def _every(self, seconds: float, job) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await job()
            except Exception:
                log.exception("scheduler: %s failed", job.__name__)

    # ---- checks ----------------------------------------------------------------------
    def flavors_for(self, identity: Identity, project: str) -> list[Flavor]:
        """The flavours ``identity`` may choose for a run in ``project`` (403 if not a member)."""
        self.access.member(identity, project)
        return self.access.flavors(project)

    async def _in_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    def project_dir(self, project: str) -> Path:
        if self.projects_dir is None:
            raise BadRequest("this backend has no project directories; send notebook_content")
        return self.projects_dir / project

    def _read_notebook(self, project: str, path: str) -> bytes:
        base = self.project_dir(project).resolve()
        full = (base / path).resolve()
        if base not in full.parents:
            raise BadRequest(f"notebook {path!r} is outside the project")
        try:
            return full.read_bytes()
        except FileNotFoundError as e:
            raise BadRequest(f"notebook {path!r} not found in project {project!r}") from e

    async def parameters_of(self, identity: Identity, project: str, notebook: str,
                            content: dict[str, Any] | bytes | None = None) -> tuple[str, list[Parameter]]:
        """Snapshot a notebook and inspect its parameters; returns (sha256, parameters).

        ``content``: the notebook as JSON (stored normalised), as bytes (stored as they are: a
        recorded snapshot keeps its sha256), or None (read from the project directory)."""
        self.access.authorize(identity, project, None)
        try:
            if isinstance(content, bytes):
                digest = await self._in_thread(self.snapshots.put, content, identity.username)
            elif content is not None:
                digest = await self._in_thread(self.snapshots.put_json, content, identity.username)
            else:
                raw = await self._in_thread(self._read_notebook, project, notebook)
                digest = await self._in_thread(self.snapshots.put, raw, identity.username)
        except ValueError as e:
            raise BadRequest(f"notebook {notebook!r}: {e}") from e
        await self._in_thread(self.snapshots.limit_owner, identity.username, self.limits.snapshots_per_user,
                              await self._referenced_snapshots(), digest)
        try:
            specs = await self._in_thread(inspect_parameters, self.snapshots.path(digest))
        except Exception as e:  # papermill raises various errors on odd notebooks
            raise BadRequest(f"cannot read the parameters of {notebook!r}: {e}") from e
        return digest, specs

    async def _referenced_snapshots(self, fresh: bool = False) -> set[str]:
        """The snapshots schedules use (as the last clean-up pass found them, plus newer schedules)."""
        if fresh or self._referenced is None:
            self._referenced = {s.notebook_sha256 for s in await self._list_schedules(None)}
        return self._referenced

    async def clean_snapshots(self) -> list[str]:
        """Delete snapshots no schedule uses that are older than ``snapshot_ttl``; returns their digests."""
        referenced = await self._referenced_snapshots(fresh=True)
        return await self._in_thread(self.snapshots.clean, referenced, self.limits.snapshot_ttl)

    async def _owner_now(self, schedule: Schedule) -> tuple[Identity, str | None]:
        """The schedule owner's current identity and why the schedule may not run now (None: it may).

        Raises:
            IdentityUnavailable: the hub could not say (nothing is decided; try again later).
        """
        owner = await self.identities.get(schedule.owner, fresh=True)
        return owner, self.access.why_not(owner, schedule.project, schedule.flavor)

    async def _pause(self, schedule: Schedule, reason: str) -> Schedule:
        """Pause a schedule because of ``reason`` (shown with it); no run starts until it is resumed."""
        log.warning("schedule %s of %s in %s paused: %s", schedule.id, schedule.owner, schedule.project, reason)
        paused = schedule.model_copy(update={"paused": True, "paused_reason": reason, "next_run": None, "updated": now()})
        await self._save_schedule(paused)
        return paused

    async def reconcile(self) -> list[Schedule]:
        """One pass over every active cron schedule: pause those whose owner left the project or
        whose flavour is gone. Resumes nothing. Returns the schedules it paused."""
        paused = []
        owners: dict[str, Identity] = {}
        for s in await self._list_schedules(None):
            if s.paused or not s.cron:
                continue
            try:
                if s.owner not in owners:
                    owners[s.owner] = await self.identities.get(s.owner, fresh=True)
            except IdentityUnavailable as e:
                log.warning("reconcile: cannot read %s's identity now (%s); checking again next pass", s.owner, e)
                continue
            reason = self.access.why_not(owners[s.owner], s.project, s.flavor)
            if reason:
                paused.append(await self._pause(s, reason))
        return paused

    # ---- schedules -------------------------------------------------------------------
    async def create_schedule(self, identity: Identity, req: ScheduleCreate) -> tuple[Schedule, Run | None]:
        """Create a schedule; a run-once schedule (``cron`` null) starts its run at once."""
        project, flavor = self.access.authorize(identity, req.project, req.flavor)
        digest, specs = await self.parameters_of(identity, req.project, req.notebook, req.notebook_content)
        params = validate_parameters(specs, req.parameters)
        t = now()
        schedule = Schedule(
            id=new_id("s"), name=req.name or Path(req.notebook).stem, owner=identity.username, project=project.name,
            notebook=req.notebook, notebook_sha256=digest, parameter_specs=specs, parameters=params,
            flavor=flavor.name, cron=req.cron, timezone=req.timezone, timeout_seconds=req.timeout_seconds,
            retries=req.retries, concurrency=req.concurrency, missed_runs=req.missed_runs, created=t, updated=t,
            last_fire=t if req.cron else None, run_as_uid=identity.uid, run_as_gid=project.gid,
        )
        schedule.next_run = schedule.next_fire(t)
        (await self._referenced_snapshots()).add(digest)
        await self._save_schedule(schedule)
        run = None
        if not req.cron:
            run = await self._new_run(schedule, flavor, {}, "once")
        return schedule, run

    async def get_schedule(self, identity: Identity, schedule_id: str) -> Schedule:
        schedule = await self._load_schedule(schedule_id, identity.project_names)
        if schedule is None:
            raise NotFound(f"no schedule {schedule_id!r}")
        self.access.may_see(identity, schedule.project)
        return schedule

    async def list_schedules(self, identity: Identity, project: str | None = None) -> list[Schedule]:
        if project is not None:
            self.access.may_see(identity, project)
        visible = self.access.visible_projects(identity)
        projects = [project] if project else (sorted(visible) if visible is not None else None)
        return await self._list_schedules(projects)

    async def update_schedule(self, identity: Identity, schedule_id: str, upd: ScheduleUpdate) -> Schedule:
        schedule = await self.get_schedule(identity, schedule_id)
        self.access.may_change(identity, schedule.owner, schedule.project)
        changes = upd.model_dump(exclude_unset=True)
        if "flavor" in changes:
            _, flavor = self.access.authorize(identity, schedule.project, changes["flavor"] or None)
            changes["flavor"] = flavor.name
        elif not schedule.paused and (gone := self.access.flavor_problem(schedule.project, schedule.flavor)):
            await self._pause(schedule, f"the schedule's flavour is gone: {gone}")
            raise Conflict(f"schedule {schedule_id} is paused, its flavour is gone: {gone}. "
                           "Change its flavor (with this change), then resume it.")
        if "parameters" in changes:
            changes["parameters"] = validate_parameters(schedule.parameter_specs, changes["parameters"] or {})
        if "timezone" in changes and changes["timezone"] is None:
            del changes["timezone"]
        for key in ("timeout_seconds", "retries", "concurrency", "missed_runs", "name"):
            if key in changes and changes[key] is None:
                del changes[key]
        t = now()
        updated = schedule.model_copy(update={**changes, "updated": t})
        if "cron" in changes or "timezone" in changes:
            updated.last_fire = t if updated.cron else None
        if updated.next_fire(t) is None and updated.cron:
            raise BadRequest(f"cron {updated.cron!r} never fires in timezone {updated.timezone}")
        updated.next_run = None if updated.paused else updated.next_fire(updated.last_fire or t)
        await self._save_schedule(updated)
        return updated

    async def set_paused(self, identity: Identity, schedule_id: str, paused: bool) -> Schedule:
        """Pause or resume. Resuming checks the owner and the flavour again: 409 naming what is wrong."""
        schedule = await self.get_schedule(identity, schedule_id)
        self.access.may_change(identity, schedule.owner, schedule.project)
        t = now()
        if not paused:
            try:
                _, reason = await self._owner_now(schedule)
            except IdentityUnavailable as e:
                raise Conflict(f"cannot check {schedule.owner}'s membership now: {e}") from e
            if reason:
                if not schedule.paused or schedule.paused_reason != reason:
                    await self._pause(schedule, reason)
                raise Conflict(f"schedule {schedule_id} stays paused: {reason}")
        # resuming does not fire the times that passed while paused
        updated = schedule.model_copy(update={
            "paused": paused, "paused_reason": f"paused by {identity.username}" if paused else None, "updated": t,
            "last_fire": t if (schedule.cron and not paused) else schedule.last_fire})
        updated.next_run = None if paused else updated.next_fire(t)
        await self._save_schedule(updated)
        return updated

    async def delete_schedule(self, identity: Identity, schedule_id: str) -> None:
        schedule = await self.get_schedule(identity, schedule_id)
        self.access.may_change(identity, schedule.owner, schedule.project)
        for run in await self._list_runs(schedule_id=schedule_id, projects=[schedule.project]):
            if not run.status.finished:
                await self._cancel_run(run)
        await self._delete_schedule(schedule)

    # ---- runs ------------------------------------------------------------------------
    async def run_now(self, identity: Identity, schedule_id: str, req: RunCreate) -> Run:
        schedule = await self.get_schedule(identity, schedule_id)
        self.access.may_change(identity, schedule.owner, schedule.project)
        self.access.member(identity, schedule.project)  # admins run only in their own projects
        gone = self.access.flavor_problem(schedule.project, schedule.flavor)
        if gone:
            if schedule.cron and not schedule.paused:
                await self._pause(schedule, f"the schedule's flavour is gone: {gone}")
            raise Conflict(f"schedule {schedule_id} cannot run, its flavour is gone: {gone}. Change its flavor first.")
        _, flavor = self.access.authorize(identity, schedule.project, schedule.flavor)
        overrides = validate_parameters(schedule.parameter_specs, req.parameters)
        return await self._new_run(schedule, flavor, overrides, "manual")

    async def reproduce(self, identity: Identity, req: ReproduceCreate) -> Run:
        """Run a recorded MLflow run again: its notebook snapshot, parameters (``req.parameters``
        change some), flavour and environment, in its project, as ``identity`` (not its author).

        The run is read through the MLflow gate with a token of ``identity`` for MLflow only (the
        gate's project check applies), and membership is checked here too. Input files that
        changed or vanished since the original are named: 409 unless ``use_current_data``; an
        environment that differs (local: the Python environment's lock; Kubernetes: no image
        digest) is 409 unless ``environment`` is ``warn``.

        Raises:
            AccessError: 403, not a member of the run's project (the gate's answer or ours).
            NotFound: no such MLflow run. Conflict: see above, or the run is not reproducible.
            Unavailable: no MLflow configured, or it did not answer.
        """
        from labyard_lab.autolog.reproduce import missing

        from .reproduce import GateReader, describe_changes, metrics_of, tags_of
        from .tokens import TokenError

        if not self.mlflow_url or self.run_tokens is None:
            raise Unavailable("this platform has no MLflow server: there are no recorded runs to reproduce")
        try:
            token, token_id = await self.run_tokens.create(identity.username, f"labyard-scheduler reproduce "
                                                           f"{req.reproduce} (MLflow, read)", 600)
        except TokenError as e:
            raise Unavailable(f"cannot get an MLflow token for {identity.username}: {e}") from e
        try:
            gate = GateReader(self.mlflow_url, token)
            original = await gate.run(req.reproduce)
            tags = tags_of(original)
            project = tags.get("labyard.project")
            if not project:
                raise Conflict(f"MLflow run {req.reproduce} was not recorded by Labyard (no labyard.project tag): "
                               "not reproducible")
            if req.project and req.project != project:
                raise BadRequest(f"MLflow run {req.reproduce} is of project {project!r}, not {req.project!r}")
            self.access.member(identity, project)
            gaps = [g for g in missing(tags) if g in ("no notebook snapshot", "no flavour")]
            if gaps:
                raise Conflict(f"MLflow run {req.reproduce} is not reproducible: {', '.join(gaps)}")
            files = [f for f in await gate.artifacts(req.reproduce, "notebook") if f["path"].endswith(".ipynb")]
            raw = await gate.artifact(req.reproduce, files[0]["path"]) if files else None
            if raw is None:
                raise Conflict(f"MLflow run {req.reproduce} is not reproducible: its notebook snapshot is not stored")
            notebook = tags.get("labyard.notebook") or files[0]["path"].split("/")[-1]
            if hashlib.sha256(raw).hexdigest() != tags.get("labyard.notebook_sha256"):
                raise Conflict(f"MLflow run {req.reproduce}: its notebook snapshot does not match its recorded sha256")
            warnings: list[str] = []
            image = await self._reproduction_environment(gate, req, tags, warnings)
            changed_inputs: list[str] = []
            listing = await gate.artifact(req.reproduce, "inputs.json")
            if listing is not None:
                changed_inputs = await self._changed_inputs(project, json.loads(listing).get("files", []), warnings)
            if changed_inputs and not req.use_current_data:
                raise Conflict(f"input files changed since MLflow run {req.reproduce}: {', '.join(changed_inputs)}. "
                               "Labyard does not keep old data: reproduce with use_current_data to run on the files "
                               "as they are now")
        finally:
            try:
                await self.run_tokens.revoke(identity.username, token_id)
            except TokenError as e:
                log.warning("reproduce: could not revoke %s's read token (it expires in 10 minutes): %s",
                            identity.username, e)
        _, flavor = self.access.authorize(identity, project, tags["labyard.flavor"])
        digest, specs = await self.parameters_of(identity, project, notebook, raw)
        recorded = recorded_parameters(tags, original, specs)
        params = validate_parameters(specs, {**recorded, **req.parameters})
        reproduction = Reproduction(
            of=req.reproduce, changes=describe_changes(recorded, req.parameters, req.use_current_data),
            changed_inputs=changed_inputs, warnings=warnings, tolerance=req.tolerance, metrics=metrics_of(original),
            image=image, autolog_libraries=tags.get("labyard.run_kind") != "scheduled")
        t = now()
        schedule = Schedule(
            id=new_id("s"), name=f"reproduce {req.reproduce[:8]}", owner=identity.username, project=project,
            notebook=notebook, notebook_sha256=digest, parameter_specs=specs,
            parameters=params, flavor=flavor.name, cron=None, created=t, updated=t, run_as_uid=identity.uid,
            run_as_gid=self.access.member(identity, project).gid,
        )
        (await self._referenced_snapshots()).add(digest)
        await self._save_schedule(schedule)
        return await self._new_run(schedule, flavor, {}, "once", reproduction)

    async def _reproduction_environment(self, gate, req: ReproduceCreate, tags: dict[str, str],
                                        warnings: list[str]) -> str | None:
        """Check the recorded environment against this backend's; the image to pin (Kubernetes)
        or None. Appends to ``warnings`` what differs when ``req.environment`` is ``warn``.

        Raises:
            Conflict: it differs and ``req.environment`` is ``refuse``.
        """
        raise NotImplementedError

    async def _changed_inputs(self, project: str, files: list[dict], warnings: list[str]) -> list[str]:
        """The recorded input files that changed or vanished, ``"<path> (changed)"``."""
        return []

    def _environment_differs(self, req: ReproduceCreate, what: str, warnings: list[str]) -> None:
        if req.environment == "refuse":
            raise Conflict(f"{what}. Reproduce with environment 'warn' to run anyway")
        warnings.append(what)

    async def _new_run(self, schedule: Schedule, flavor: Flavor, overrides: dict[str, Any], trigger: str,
                       reproduce: Reproduction | None = None) -> Run:
        """Record a run of ``schedule`` and start it (the caller has decided that it may run)."""
        run = Run(
            id=new_id("r"), schedule_id=schedule.id, owner=schedule.owner, project=schedule.project,
            notebook=schedule.notebook, notebook_sha256=schedule.notebook_sha256,
            parameters={**schedule.parameters, **overrides}, flavor=flavor.name, trigger=trigger, created=now(),
            timeout_seconds=schedule.timeout_seconds, retries=schedule.retries, reproduce=reproduce,
        )
        await self._save_run(run)
        return await self._start_run(schedule, run, flavor)

    async def get_run(self, identity: Identity, run_id: str) -> Run:
        run = await self._load_run(run_id, identity.project_names)
        if run is None:
            raise NotFound(f"no run {run_id!r}")
        self.access.may_see(identity, run.project)
        return run

    async def list_runs(self, identity: Identity, schedule_id: str | None = None, project: str | None = None) -> list[Run]:
        if schedule_id:
            await self.get_schedule(identity, schedule_id)
        if project:
            self.access.may_see(identity, project)
        visible = self.access.visible_projects(identity)
        projects = [project] if project else (sorted(visible) if visible is not None else None)
        return await self._list_runs(schedule_id=schedule_id, projects=projects)

    async def cancel_run(self, identity: Identity, run_id: str) -> Run:
        run = await self.get_run(identity, run_id)
        self.access.may_change(identity, run.owner, run.project)
        if run.status.finished:
            raise BadRequest(f"run {run_id} already {run.status.value}")
        return await self._cancel_run(run)

    async def run_output(self, identity: Identity, run_id: str) -> bytes:
        run = await self.get_run(identity, run_id)
        data = await self._output(run)
        if data is None:
            raise NotFound(f"run {run_id} has no output notebook (yet)")
        return data

    async def run_input(self, identity: Identity, run_id: str) -> bytes:
        """The notebook a run executed (the snapshot taken when it was scheduled)."""
        run = await self.get_run(identity, run_id)
        try:
            return await self._in_thread(self.snapshots.read, run.notebook_sha256)
        except FileNotFoundError as e:
            raise NotFound(f"the input notebook of run {run_id} is no longer stored") from e

    async def run_log(self, identity: Identity, run_id: str) -> str:
        run = await self.get_run(identity, run_id)
        return await self._log(run) or ""

    # ---- to implement ----------------------------------------------------------------
    async def _save_schedule(self, schedule: Schedule) -> None:
        raise NotImplementedError

    async def _load_schedule(self, schedule_id: str, projects_first: list[str] = ()) -> Schedule | None:
        """The schedule ``schedule_id`` in any project (``projects_first`` are searched first)."""
        raise NotImplementedError

    async def _list_schedules(self, projects: list[str] | None) -> list[Schedule]:
        raise NotImplementedError

    async def _delete_schedule(self, schedule: Schedule) -> None:
        raise NotImplementedError

    async def _save_run(self, run: Run) -> None:
        raise NotImplementedError

    async def _load_run(self, run_id: str, projects_first: list[str] = ()) -> Run | None:
        raise NotImplementedError

    async def _list_runs(self, schedule_id: str | None = None, projects: list[str] | None = None) -> list[Run]:
        raise NotImplementedError

    async def _start_run(self, schedule: Schedule, run: Run, flavor: Flavor) -> Run:
        raise NotImplementedError

    async def _cancel_run(self, run: Run) -> Run:
        raise NotImplementedError

    async def _output(self, run: Run) -> bytes | None:
        raise NotImplementedError

    async def _log(self, run: Run) -> str | None:
        raise NotImplementedError


def recorded_parameters(tags: dict[str, str], run: dict, specs: list[Parameter]) -> dict[str, Any]:
    """The parameters a recorded run ran with: its ``labyard.parameters`` tag; for a scheduled run
    recorded before that tag existed, its MLflow params that name a parameter of the notebook
    (the papermill wrapper logged them as JSON, strings as they are)."""
    try:
        recorded = json.loads(tags["labyard.parameters"]) if "labyard.parameters" in tags else None
    except ValueError:
        recorded = None
    if isinstance(recorded, dict):
        return recorded
    if tags.get("labyard.run_kind") != "scheduled":
        return {}
    names = {s.name: s for s in specs}
    out: dict[str, Any] = {}
    for p in run.get("data", {}).get("params", []):
        if p["key"] in names:
            try:
                out[p["key"]] = json.loads(p["value"]) if names[p["key"]].type != "str" else p["value"]
            except ValueError:
                out[p["key"]] = p["value"]
    return out


def dumps(model) -> str:
    return json.dumps(model.model_dump(mode="json"))


__all__ = ["Backend", "BadRequest", "Conflict", "NotFound", "ParameterError", "AccessError", "log", "dumps"]
