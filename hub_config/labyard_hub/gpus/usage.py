"""GPU-hours: a durable record of who held how many GPUs from when to when (sqlite).

Every read of the cluster (:mod:`.cluster`) is given to :meth:`UsageStore.observe`: a pod that
holds GPUs and is new opens an *interval* (its start time as the API server reports it, its
GPUs, project, user, server or run); an interval stays open while its pod is seen holding them
(``last_seen`` is kept up to date); it is closed at the pod's end as the API server reports it
(the finish time of its containers, or the start of its deletion), or, for a pod that vanished
between two reads, at the last time it was seen. The same rules apply on a restart of the
service to pods that ended while it was down; a pod that ran entirely while it was down and is
still shown by the API (a finished run's pod) is recorded whole, from its start to its end. An
interval is keyed by the pod's uid, so seeing a pod again never counts it twice.

Reports (:meth:`UsageStore.report`) add up GPU-hours per project or user and per UTC day, ISO
week (from Monday) or calendar month; open intervals count up to the report's ``as_of``.
SQLite runs in one worker thread (never on the event loop).
"""

from __future__ import annotations

import asyncio
import csv
import io
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

from pydantic import BaseModel

from .inventory import Allocation

PERIODS = ("day", "week", "month")
GROUPINGS = ("project", "user")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS intervals (
    uid TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    pod TEXT NOT NULL,
    kind TEXT NOT NULL,
    project TEXT,
    user TEXT,
    server TEXT,
    schedule TEXT,
    run TEXT,
    gpus INTEGER NOT NULL,
    resources TEXT NOT NULL,
    start REAL NOT NULL,
    end REAL,
    last_seen REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS intervals_open ON intervals (end);
"""


class UsageRow(BaseModel):
    period: str  # the period's first day, ISO (2026-12-01)
    key: str  # the project or user
    gpu_hours: float


class Report(BaseModel):
    by: str
    period: str
    as_of: datetime
    rows: list[UsageRow]

    def csv(self) -> str:
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow(["period", self.by, "gpu_hours"])
        for r in self.rows:
            w.writerow([r.period, r.key, f"{r.gpu_hours:.6f}"])
        return out.getvalue()


def period_start(moment: datetime, period: str) -> datetime:
    """The UTC start of the day, ISO week (Monday) or month ``moment`` is in."""
    day = moment.astimezone(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day
    if period == "week":
        return day - timedelta(days=day.weekday())
    if period == "month":
        return day.replace(day=1)
    raise ValueError(f"period must be one of {', '.join(PERIODS)}, not {period!r}")


def next_period(start: datetime, period: str) -> datetime:
    if period == "day":
        return start + timedelta(days=1)
    if period == "week":
        return start + timedelta(days=7)
    return (start.replace(day=28) + timedelta(days=4)).replace(day=1)


def split(start: datetime, end: datetime, period: str) -> list[tuple[datetime, float]]:
    """``[start, end)`` cut at period boundaries: (period start, seconds in it) each."""
    pieces = []
    cursor = start
    while cursor < end:
        first = period_start(cursor, period)
        stop = min(end, next_period(first, period))
        pieces.append((first, (stop - cursor).total_seconds()))
        cursor = stop
    return pieces


def _ts(moment: datetime) -> float:
    return moment.timestamp()


def _dt(value: float) -> datetime:
    return datetime.fromtimestamp(value, timezone.utc)


class UsageStore:
    """The GPU intervals in ``<path>`` (sqlite; created on first use).

    Methods ending in ``_sync`` block: the async ones run them in the store's own thread.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="labyard-gpus-usage")
        self._local = threading.local()

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=10)
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            self._local.db = db
        return db

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- recording -----------------------------------------------------------------------------
    def observe_sync(self, now: datetime, held: list[Allocation], ended: list[tuple[Allocation, datetime]]) -> dict[str, int]:
        """One read of the cluster at ``now``: ``held`` the pods holding GPUs; ``ended`` the pods
        the API still shows that let go of their GPUs (finished, being deleted), with that time:
        their interval is closed there, or recorded whole if it was never seen open. Open
        intervals of pods in neither are closed at their ``last_seen``."""
        db = self._db()
        closed = 0

        def row(a: Allocation, end: datetime | None):
            return (a.uid, a.namespace, a.pod, a.kind, a.project, a.user, a.server, a.schedule, a.run, a.gpus,
                    ",".join(f"{k}={v}" for k, v in sorted(a.resources.items())), _ts(a.since),
                    _ts(end) if end else None, _ts(now))

        with db:
            for a in held:
                db.execute(
                    "INSERT INTO intervals (uid, namespace, pod, kind, project, user, server, schedule, run, gpus,"
                    " resources, start, end, last_seen) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
                    " ON CONFLICT(uid) DO UPDATE SET last_seen=excluded.last_seen WHERE end IS NULL", row(a, None))
            for a, end in ended:
                closed += db.execute(
                    "INSERT INTO intervals (uid, namespace, pod, kind, project, user, server, schedule, run, gpus,"
                    " resources, start, end, last_seen) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
                    " ON CONFLICT(uid) DO UPDATE SET end=max(start, excluded.end), last_seen=excluded.last_seen"
                    " WHERE end IS NULL", row(a, end)).rowcount
            seen = {a.uid for a in held} | {a.uid for a, _ in ended}
            for (uid,) in db.execute("SELECT uid FROM intervals WHERE end IS NULL").fetchall():
                if uid not in seen:
                    closed += db.execute("UPDATE intervals SET end=max(start, last_seen) WHERE uid=?", (uid,)).rowcount
        return {"closed": closed}

    async def observe(self, now: datetime, held: list[Allocation], ended: list[tuple[Allocation, datetime]]) -> dict[str, int]:
        return await self._run(self.observe_sync, now, held, ended)

    # -- reports -------------------------------------------------------------------------------
    def intervals_sync(self, since: datetime | None = None) -> list[dict]:
        db = self._db()
        rows = db.execute("SELECT uid, namespace, pod, kind, project, user, server, schedule, run, gpus, start, end,"
                          " last_seen FROM intervals WHERE end IS NULL OR end > ? ORDER BY start",
                          (_ts(since) if since else 0,)).fetchall()
        keys = ("uid", "namespace", "pod", "kind", "project", "user", "server", "schedule", "run", "gpus", "start",
                "end", "last_seen")
        return [dict(zip(keys, r)) for r in rows]

    async def intervals(self, since: datetime | None = None) -> list[dict]:
        return await self._run(self.intervals_sync, since)

    def report_sync(self, by: str, period: str, as_of: datetime, since: datetime | None = None,
                    project: str | None = None, user: str | None = None) -> Report:
        """GPU-hours per ``by`` (project|user) and ``period`` (day|week|month) from ``since``
        (None: everything recorded) to ``as_of``; ``project``/``user`` restrict the intervals."""
        if by not in GROUPINGS:
            raise ValueError(f"by must be one of {', '.join(GROUPINGS)}, not {by!r}")
        if period not in PERIODS:
            raise ValueError(f"period must be one of {', '.join(PERIODS)}, not {period!r}")
        sums: dict[tuple[str, str], float] = {}
        for iv in self.intervals_sync(since):
            if (project is not None and iv["project"] != project) or (user is not None and iv["user"] != user):
                continue
            start = max(_dt(iv["start"]), since) if since else _dt(iv["start"])
            end = min(_dt(iv["end"]) if iv["end"] is not None else as_of, as_of)
            key = iv[by] or "(none)"
            for first, seconds in split(start, end, period):
                slot = (first.date().isoformat(), key)
                sums[slot] = sums.get(slot, 0.0) + seconds * iv["gpus"] / 3600
        rows = [UsageRow(period=p, key=k, gpu_hours=h) for (p, k), h in sorted(sums.items())]
        return Report(by=by, period=period, as_of=as_of, rows=rows)

    async def report(self, by: str, period: str, as_of: datetime, since: datetime | None = None,
                     project: str | None = None, user: str | None = None) -> Report:
        return await self._run(self.report_sync, by, period, as_of, since, project, user)

    def close(self) -> None:
        def close_db():
            db = getattr(self._local, "db", None)
            if db is not None:
                db.close()
                self._local.db = None

        self._executor.submit(close_db).result()
        self._executor.shutdown()
