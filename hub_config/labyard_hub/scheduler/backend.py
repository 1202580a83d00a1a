"""What every backend shares: authorization, parameter checks and snapshots.

A backend stores schedules and runs and executes runs; :class:`Backend` does everything that
must be the same whatever executes the run, so that the local and the Kubernetes backends
answer the same request in the same way:

* every request is decided with :func:`labyard_hub.projects.authorize` (not a member of the
  project: 403; flavour unknown or not allowed: 400);
* schedules and runs are visible to the members of their project; only their owner (or a hub
  admin) may change, run, cancel or delete them (403);
* parameters are checked against the notebook's ``parameters`` cell (400 naming the problem).
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from ..projects import AccessError, Flavor, Identity, ProjectPolicy, authorize
from .models import Parameter, Run, RunCreate, Schedule, ScheduleCreate, ScheduleUpdate, new_id, now
from .params import ParameterError, inspect_parameters, validate_parameters
from .snapshots import SnapshotStore

log = logging.getLogger("labyard.scheduler")


class NotFound(Exception):
    """An unknown schedule or run id (HTTP 404)."""


class BadRequest(ValueError):
    """A request that cannot be carried out as sent (HTTP 400)."""


class Backend:
    """Base class of the scheduler backends.

    Subclasses implement storage (``_save_schedule``, ``_load_schedule``, ``_list_schedules``,
    ``_delete_schedule``, ``_save_run``, ``_load_run``, ``_list_runs``) and execution
    (``_start_run``, ``_cancel_run``, ``_output``, ``_log``, and ``start``/``stop`` of any loop).
    """

    def __init__(self, policy: ProjectPolicy, data_dir: Path, projects_dir: Path | None = None,
                 available_flavors: list[Flavor] | None = None, mlflow_url: str | None = None):
        self.policy = policy
        self.data_dir = Path(data_dir)
        self.projects_dir = Path(projects_dir) if projects_dir else None
        self.available_flavors = available_flavors
        self.mlflow_url = mlflow_url
        self.snapshots = SnapshotStore(self.data_dir / "snapshots")

    # ---- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    # ---- checks ----------------------------------------------------------------------
    def _flavors(self, project: str) -> list[Flavor]:
        allowed = self.policy.allowed_flavors(project)
        if self.available_flavors is not None:
            names = {f.name for f in self.available_flavors}
            allowed = [f for f in allowed if f.name in names]
        return allowed

    def flavors_for(self, identity: Identity, project: str) -> list[Flavor]:
        """The flavours ``identity`` may choose for a run in ``project`` (403 if not a member)."""
        authorize(identity, self.policy, project)
        return self._flavors(project)

    def _authorize(self, identity: Identity, project: str, flavor: str | None):
        if flavor is None:
            authorize(identity, self.policy, project)  # 403 before anything else
            offered = self._flavors(project)
            if not offered:
                raise AccessError(400, f"no flavour is available to project {project!r}")
            flavor = offered[0].name
        return authorize(identity, self.policy, project, flavor, available=self._flavors(project))

    def _visible(self, identity: Identity, project: str) -> None:
        if identity.project(project) is None and not identity.admin:
            raise AccessError(403, f"{identity.username} is not a member of project {project!r}")

    def _may_change(self, identity: Identity, owner: str, project: str) -> None:
        self._visible(identity, project)
        if identity.username != owner and not identity.admin:
            raise AccessError(403, f"only {owner} (the owner) may change this")

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
                            content: dict[str, Any] | None = None) -> tuple[str, list[Parameter]]:
        """Snapshot a notebook and inspect its parameters; returns (sha256, parameters)."""
        self._authorize(identity, project, None)
        try:
            if content is not None:
                digest = await self._in_thread(self.snapshots.put_json, content)
            else:
                raw = await self._in_thread(self._read_notebook, project, notebook)
                digest = await self._in_thread(self.snapshots.put, raw)
        except ValueError as e:
            raise BadRequest(f"notebook {notebook!r}: {e}") from e
        try:
            specs = await self._in_thread(inspect_parameters, self.snapshots.path(digest))
        except Exception as e:  # papermill raises various errors on odd notebooks
            raise BadRequest(f"cannot read the parameters of {notebook!r}: {e}") from e
        return digest, specs

    # ---- schedules -------------------------------------------------------------------
    async def create_schedule(self, identity: Identity, req: ScheduleCreate) -> tuple[Schedule, Run | None]:
        """Create a schedule; a run-once schedule (``cron`` null) starts its run at once."""
        project, flavor = self._authorize(identity, req.project, req.flavor)
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
        await self._create_schedule(identity, schedule)
        run = None
        if not req.cron:
            run = await self._new_run(identity, schedule, {}, "once")
        return schedule, run

    async def _create_schedule(self, identity: Identity, schedule: Schedule) -> None:
        await self._save_schedule(schedule)

    async def get_schedule(self, identity: Identity, schedule_id: str) -> Schedule:
        schedule = await self._load_schedule(schedule_id)
        if schedule is None:
            raise NotFound(f"no schedule {schedule_id!r}")
        self._visible(identity, schedule.project)
        return schedule

    async def list_schedules(self, identity: Identity, project: str | None = None) -> list[Schedule]:
        if project is not None:
            self._visible(identity, project)
        projects = [project] if project else identity.project_names
        return [s for s in await self._list_schedules(projects) if identity.admin or identity.project(s.project)]

    async def update_schedule(self, identity: Identity, schedule_id: str, upd: ScheduleUpdate) -> Schedule:
        schedule = await self.get_schedule(identity, schedule_id)
        self._may_change(identity, schedule.owner, schedule.project)
        changes = upd.model_dump(exclude_unset=True)
        if "flavor" in changes:
            _, flavor = self._authorize(identity, schedule.project, changes["flavor"] or None)
            changes["flavor"] = flavor.name
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
        updated.next_run = None if updated.paused else updated.next_fire(updated.last_fire or t)
        await self._save_schedule(updated)
        return updated

    async def set_paused(self, identity: Identity, schedule_id: str, paused: bool) -> Schedule:
        schedule = await self.get_schedule(identity, schedule_id)
        self._may_change(identity, schedule.owner, schedule.project)
        t = now()
        # resuming does not fire the times that passed while paused
        updated = schedule.model_copy(update={"paused": paused, "updated": t,
                                              "last_fire": t if (schedule.cron and not paused) else schedule.last_fire})
        updated.next_run = None if paused else updated.next_fire(t)
        await self._save_schedule(updated)
        return updated

    async def delete_schedule(self, identity: Identity, schedule_id: str) -> None:
        schedule = await self.get_schedule(identity, schedule_id)
        self._may_change(identity, schedule.owner, schedule.project)
        for run in await self._list_runs(schedule_id=schedule_id, projects=[schedule.project]):
            if not run.status.finished:
                await self._cancel_run(run)
        await self._delete_schedule(schedule)

    # ---- runs ------------------------------------------------------------------------
    async def run_now(self, identity: Identity, schedule_id: str, req: RunCreate) -> Run:
        schedule = await self.get_schedule(identity, schedule_id)
        self._may_change(identity, schedule.owner, schedule.project)
        self._authorize(identity, schedule.project, schedule.flavor)  # membership/flavour may have changed
        overrides = validate_parameters(schedule.parameter_specs, req.parameters)
        return await self._new_run(identity, schedule, overrides, "manual")

    async def _new_run(self, identity: Identity | None, schedule: Schedule, overrides: dict[str, Any], trigger: str) -> Run:
        run = Run(
            id=new_id("r"), schedule_id=schedule.id, owner=schedule.owner, project=schedule.project,
            notebook=schedule.notebook, notebook_sha256=schedule.notebook_sha256,
            parameters={**schedule.parameters, **overrides}, flavor=schedule.flavor, trigger=trigger, created=now(),
            timeout_seconds=schedule.timeout_seconds, retries=schedule.retries,
        )
        await self._save_run(run)
        return await self._start_run(schedule, run)

    async def get_run(self, identity: Identity, run_id: str) -> Run:
        run = await self._load_run(run_id)
        if run is None:
            raise NotFound(f"no run {run_id!r}")
        self._visible(identity, run.project)
        return run

    async def list_runs(self, identity: Identity, schedule_id: str | None = None, project: str | None = None) -> list[Run]:
        if schedule_id:
            await self.get_schedule(identity, schedule_id)
        if project:
            self._visible(identity, project)
        runs = await self._list_runs(schedule_id=schedule_id, projects=None if identity.admin else identity.project_names)
        return [r for r in runs if project is None or r.project == project]

    async def cancel_run(self, identity: Identity, run_id: str) -> Run:
        run = await self.get_run(identity, run_id)
        self._may_change(identity, run.owner, run.project)
        if run.status.finished:
            raise BadRequest(f"run {run_id} already {run.status.value}")
        return await self._cancel_run(run)

    async def run_output(self, identity: Identity, run_id: str) -> bytes:
        run = await self.get_run(identity, run_id)
        data = await self._output(run)
        if data is None:
            raise NotFound(f"run {run_id} has no output notebook (yet)")
        return data

    async def run_log(self, identity: Identity, run_id: str) -> str:
        run = await self.get_run(identity, run_id)
        return await self._log(run) or ""

    # ---- to implement ----------------------------------------------------------------
    async def _save_schedule(self, schedule: Schedule) -> None:
        raise NotImplementedError

    async def _load_schedule(self, schedule_id: str) -> Schedule | None:
        raise NotImplementedError

    async def _list_schedules(self, projects: list[str] | None) -> list[Schedule]:
        raise NotImplementedError

    async def _delete_schedule(self, schedule: Schedule) -> None:
        raise NotImplementedError

    async def _save_run(self, run: Run) -> None:
        raise NotImplementedError

    async def _load_run(self, run_id: str) -> Run | None:
        raise NotImplementedError

    async def _list_runs(self, schedule_id: str | None = None, projects: list[str] | None = None) -> list[Run]:
        raise NotImplementedError

    async def _start_run(self, schedule: Schedule, run: Run) -> Run:
        raise NotImplementedError

    async def _cancel_run(self, run: Run) -> Run:
        raise NotImplementedError

    async def _output(self, run: Run) -> bytes | None:
        raise NotImplementedError

    async def _log(self, run: Run) -> str | None:
        raise NotImplementedError


def dumps(model) -> str:
    return json.dumps(model.model_dump(mode="json"))


__all__ = ["Backend", "BadRequest", "NotFound", "ParameterError", "AccessError", "log", "dumps"]
