"""The scheduler's data model: what the REST API accepts and answers.

A *schedule* is a snapshot of a notebook (by content hash) with parameters, a flavour and a
timetable (cron + timezone, or run-once); a *run* is one papermill execution of it.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timezone
from enum import Enum
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from ..projects import ProjectName


def now() -> datetime:
    return datetime.now(timezone.utc)


def new_id(prefix: str) -> str:
    """``s-1f3a...`` / ``r-...``: short, DNS-label safe, unique."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class RunStatus(str, Enum):
    pending = "pending"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (RunStatus.succeeded, RunStatus.failed, RunStatus.cancelled)


ConcurrencyPolicy = Literal["allow", "forbid", "replace"]
MissedRunsPolicy = Literal["skip", "run_once"]


#: one cron field as both croniter and Kubernetes' CronJob controller read it: numbers or
#: names, ranges, steps and lists (no L, W, #, ? or H extensions)
_CRON_ITEM = r"(\*|([0-9]+|[a-z]{3})(-([0-9]+|[a-z]{3}))?)(/[0-9]+)?"
_CRON_FIELD = re.compile(rf"^{_CRON_ITEM}(,{_CRON_ITEM})*$")


def check_cron(expr: str | None) -> str | None:
    """A 5-field cron expression that fires at least once; ValueError saying what is wrong."""
    if expr is None:
        return None
    expr = " ".join(expr.lower().split())
    fields = expr.split(" ")
    if len(fields) != 5 or not all(_CRON_FIELD.match(f) for f in fields) or not croniter.is_valid(expr):
        raise ValueError(f"invalid cron expression {expr!r}: expected 5 fields of numbers, names, ranges (1-5), "
                         "steps (*/15) and lists (1,3), e.g. '0 3 * * *'")
    try:
        croniter(expr, now()).get_next(datetime)
    except CroniterBadDateError as e:
        raise ValueError(f"cron expression {expr!r} never fires (no such date, e.g. 30 February)") from e
    return expr


def check_timezone(tz: str) -> str:
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as e:
        raise ValueError(f"unknown timezone {tz!r}") from e
    return tz


def check_notebook_path(path: str) -> str:
    parts = path.replace("\\", "/").split("/")
    if not path.endswith(".ipynb") or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"notebook must be a relative .ipynb path inside the project, not {path!r}")
    return "/".join(parts)


Cron = Annotated[str | None, AfterValidator(check_cron)]
TimeZone = Annotated[str, AfterValidator(check_timezone)]
NotebookPath = Annotated[str, AfterValidator(check_notebook_path)]
TimeoutSeconds = Annotated[int, Field(ge=1, le=7 * 24 * 3600)]
Retries = Annotated[int, Field(ge=0, le=10)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScheduleCreate(_In):
    """``POST schedules``."""

    project: ProjectName
    notebook: NotebookPath = Field(description="path of the notebook inside the project")
    notebook_content: dict[str, Any] | None = Field(
        None, description="the notebook (nbformat JSON) as it is now; read from the project directory when absent")
    name: str | None = Field(None, max_length=200, description="display name; default: the notebook's name")
    parameters: dict[str, Any] = {}
    flavor: str | None = Field(None, description="compute flavour; default: the project's first allowed one")
    cron: Cron = Field(None, description="5-field cron expression; null: run once, now")
    timezone: TimeZone = "UTC"
    timeout_seconds: TimeoutSeconds = 3600
    retries: Retries = 0
    concurrency: ConcurrencyPolicy = "forbid"
    missed_runs: MissedRunsPolicy = "run_once"


class ScheduleUpdate(_In):
    """``PATCH schedules/{id}``: only the fields given change."""

    name: str | None = Field(None, max_length=200)
    parameters: dict[str, Any] | None = None
    flavor: str | None = None
    cron: Cron = None
    timezone: TimeZone | None = None
    timeout_seconds: TimeoutSeconds | None = None
    retries: Retries | None = None
    concurrency: ConcurrencyPolicy | None = None
    missed_runs: MissedRunsPolicy | None = None


class RunCreate(_In):
    """``POST schedules/{id}/runs``: run now, optionally with some parameters changed."""

    parameters: dict[str, Any] = {}


#: an MLflow run id (32 hex digits)
MLFLOW_RUN_ID = r"^[0-9a-f]{32}$"


class ReproduceCreate(_In):
    """``POST runs`` with ``reproduce``: run a recorded MLflow run again (docs/admin/scheduler.md)."""

    reproduce: str = Field(pattern=MLFLOW_RUN_ID, description="the MLflow run id to reproduce")
    parameters: dict[str, Any] = Field({}, description="parameters to change (default: the recorded ones)")
    use_current_data: bool = Field(False, description="run on the input files as they are now, even if they changed")
    tolerance: float = Field(0.0, ge=0, le=1, description="relative difference of a metric still counted as the "
                                                          "same (0: exact)")
    environment: Literal["refuse", "warn"] = Field(
        "refuse", description="local mode: when the Python environment's lock differs from the recorded one, refuse "
                              "(409) or run anyway with a warning; Kubernetes: when no image digest was recorded")
    project: ProjectName | None = Field(None, description="the project the caller expects the run in (a server "
                                                          "sends its own); the run's project decides")


class Reproduction(BaseModel):
    """What a reproduction run reproduces and what it changed (kept with the run)."""

    of: str = Field(description="the original MLflow run id")
    changes: list[str] = Field([], description="what differs from the original on purpose: parameters, use_current_data")
    changed_inputs: list[str] = Field([], description="input files that changed or vanished since the original")
    warnings: list[str] = Field([], description="what may keep it from reproducing (environment differences)")
    tolerance: float = 0.0
    metrics: dict[str, float] = Field({}, description="the original's metrics (latest values), for the verdict")
    image: str | None = Field(None, description="Kubernetes: the recorded image, pinned by digest")
    autolog_libraries: bool = Field(False, description="the original was interactive: mlflow.autolog() on in the kernel")


class Parameter(BaseModel):
    """A parameter of the notebook's ``parameters`` cell."""

    name: str
    type: str = Field(description="int, float, bool, str, list, dict or any")
    default: Any = None
    default_source: str = Field("", description="the default as written in the notebook")
    help: str = ""


class Schedule(BaseModel):
    id: str
    name: str
    owner: str
    project: str
    notebook: str
    notebook_sha256: str
    parameter_specs: list[Parameter] = []
    parameters: dict[str, Any] = {}
    flavor: str
    cron: str | None = None
    timezone: str = "UTC"
    timeout_seconds: int = 3600
    retries: int = 0
    concurrency: ConcurrencyPolicy = "forbid"
    missed_runs: MissedRunsPolicy = "run_once"
    paused: bool = False
    paused_reason: str | None = Field(
        None, description="why the schedule is paused: who paused it, or what the scheduler found (owner left the "
                          "project, flavour gone); shown to the owner and the project")
    run_as_uid: int | None = Field(None, description="the owner's uidNumber when scheduled (runs execute as it)")
    run_as_gid: int | None = Field(None, description="the project's gidNumber when scheduled")
    created: datetime
    updated: datetime
    last_fire: datetime | None = Field(None, description="the last cron time handled (fired or skipped)")
    next_run: datetime | None = None

    def next_fire(self, after: datetime) -> datetime | None:
        """The first cron time strictly after ``after``, in UTC (None for run-once schedules)."""
        if not self.cron:
            return None
        tz = ZoneInfo(self.timezone)
        try:
            return croniter(self.cron, after.astimezone(tz)).get_next(datetime).astimezone(timezone.utc)
        except CroniterBadDateError:  # never again (refused when scheduled; kept safe for old records)
            return None


class Run(BaseModel):
    id: str
    schedule_id: str
    owner: str
    project: str
    notebook: str
    notebook_sha256: str
    parameters: dict[str, Any] = {}
    flavor: str
    trigger: Literal["manual", "cron", "once"] = "manual"
    status: RunStatus = RunStatus.pending
    created: datetime
    started: datetime | None = None
    finished: datetime | None = None
    exit_code: int | None = None
    attempts: int = 0
    timeout_seconds: int = 3600
    retries: int = 0
    failed_cell: int | None = Field(None, description="index of the cell that raised (0-based, in the notebook)")
    error: str | None = Field(None, description="the failing cell's exception (name: value), or why the run failed")
    mlflow_run_id: str | None = Field(None, description="the MLflow run this execution was recorded as")
    reproduce: Reproduction | None = Field(None, description="set when the run reproduces a recorded MLflow run")
    pid: int | None = Field(None, exclude=True)
    pid_started: float | None = Field(None, exclude=True)
