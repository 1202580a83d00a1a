"""GPU-hours recorded from pod lifecycles, in a real sqlite file, across restarts of the store."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import pytest

from labyard_hub.gpus import inventory
from labyard_hub.gpus.usage import UsageStore, split

from .pods import T0, pod


def held(*pods):
    return [inventory.allocation(p) for p in pods]


def test_interval_closed_at_the_pods_end_as_the_api_reports_it(tmp_path):
    store = UsageStore(tmp_path / "usage.sqlite")
    run = pod("run-1", "labyard-nlp", gpus=2, component="scheduled-run", project="nlp", user="carol")
    store.observe_sync(T0 + timedelta(minutes=1), held(run), [])
    end = T0 + timedelta(minutes=90)
    done = pod("run-1", "labyard-nlp", gpus=2, component="scheduled-run", project="nlp", user="carol",
               phase="Succeeded", finished=end)
    store.observe_sync(T0 + timedelta(minutes=95), [], [inventory.ended_allocation(done)])
    report = store.report_sync("project", "day", T0 + timedelta(days=3))
    # 22:00 to 23:30 on 30 Nov, two GPUs: 3 GPU-hours, all on that day
    assert [(r.period, r.key, r.gpu_hours) for r in report.rows] == [("2026-11-30", "nlp", pytest.approx(3.0))]
    store.close()


def test_open_interval_counts_up_to_as_of_and_is_split_at_midnight(tmp_path):
    store = UsageStore(tmp_path / "usage.sqlite")
    store.observe_sync(T0, held(pod("jupyter-alice--vision", "labyard-vision")), [])
    as_of = T0 + timedelta(hours=4)  # 22:00 on 30 Nov to 02:00 on 1 Dec
    days = store.report_sync("user", "day", as_of)
    assert [(r.period, r.key, round(r.gpu_hours, 6)) for r in days.rows] == [("2026-11-30", "alice", 2.0), ("2026-12-01", "alice", 2.0)]
    months = store.report_sync("project", "month", as_of)
    assert [(r.period, round(r.gpu_hours, 6)) for r in months.rows] == [("2026-11-01", 2.0), ("2026-12-01", 2.0)]
    weeks = store.report_sync("project", "week", as_of)  # Mon 30 Nov 2026 starts the ISO week
    assert [(r.period, round(r.gpu_hours, 6)) for r in weeks.rows] == [("2026-11-30", 4.0)]
    store.close()


def test_restart_closes_intervals_of_pods_that_vanished_at_their_last_sighting(tmp_path):
    path = tmp_path / "usage.sqlite"
    store = UsageStore(path)
    a, b = pod("a", "labyard-vision"), pod("b", "labyard-vision", user="bob")
    store.observe_sync(T0 + timedelta(minutes=10), held(a, b), [])
    store.observe_sync(T0 + timedelta(minutes=30), held(a, b), [])
    store.close()
    # the service was down; meanwhile b went away and was never seen ending. After the restart
    # the first read sees a only: b's interval ends when it was last seen, a's stays open
    again = UsageStore(path)
    again.observe_sync(T0 + timedelta(hours=2), held(a), [])
    rows = {iv["pod"]: iv for iv in again.intervals_sync()}
    assert rows["b"]["end"] == (T0 + timedelta(minutes=30)).timestamp()
    assert rows["a"]["end"] is None
    by_user = {r.key: r.gpu_hours for r in again.report_sync("user", "month", T0 + timedelta(hours=2)).rows}
    assert by_user == {"alice": pytest.approx(2.0), "bob": pytest.approx(0.5)}
    again.close()


def test_a_run_that_ended_while_the_service_was_down_is_recorded_whole(tmp_path):
    store = UsageStore(tmp_path / "usage.sqlite")
    done = pod("run-2", "labyard-nlp", component="scheduled-run", project="nlp", user="carol", phase="Failed",
               finished=T0 + timedelta(minutes=30))
    for minutes in (60, 61):  # seen twice after its end: recorded once
        store.observe_sync(T0 + timedelta(minutes=minutes), [], [inventory.ended_allocation(done)])
    assert len(store.intervals_sync()) == 1
    assert store.report_sync("user", "day", T0 + timedelta(hours=2)).rows[0].gpu_hours == pytest.approx(0.5)
    # a pod that never ran on a node (deleted while pending) held nothing
    assert inventory.ended_allocation(pod("never", "labyard-nlp", node_name=None, phase="Failed")) is None
    store.close()


def test_a_pod_seen_again_is_not_counted_twice(tmp_path):
    store = UsageStore(tmp_path / "usage.sqlite")
    p = pod("a", "labyard-vision")
    for minutes in (1, 2, 3):
        store.observe_sync(T0 + timedelta(minutes=minutes), held(p), [])
    assert len(store.intervals_sync()) == 1
    assert store.report_sync("project", "day", T0 + timedelta(hours=1)).rows[0].gpu_hours == pytest.approx(1.0)
    store.close()


def test_since_and_filters_restrict_the_report(tmp_path):
    store = UsageStore(tmp_path / "usage.sqlite")
    store.observe_sync(T0, held(pod("a", "labyard-vision"), pod("b", "labyard-nlp", project="nlp")), [])
    since = datetime(2026, 12, 1, tzinfo=timezone.utc)
    report = store.report_sync("user", "month", since + timedelta(hours=3), since, project="nlp", user="alice")
    assert [(r.period, r.key, round(r.gpu_hours, 6)) for r in report.rows] == [("2026-12-01", "alice", 3.0)]
    assert report.csv().splitlines() == ["period,user,gpu_hours", "2026-12-01,alice,3.000000"]
    store.close()


def test_bad_grouping_or_period_names_the_parameter(tmp_path):
    store = UsageStore(tmp_path / "usage.sqlite")
    with pytest.raises(ValueError, match="by must be"):
        store.report_sync("node", "day", T0)
    with pytest.raises(ValueError, match="period must be"):
        store.report_sync("user", "year", T0)
    store.close()


def test_split_at_month_ends():
    start, end = datetime(2026, 1, 31, 23, tzinfo=timezone.utc), datetime(2026, 2, 1, 1, tzinfo=timezone.utc)
    assert [(p.date().isoformat(), s) for p, s in split(start, end, "month")] == [("2026-01-01", 3600.0), ("2026-02-01", 3600.0)]


def test_async_api_runs_off_the_event_loop(tmp_path):
    store = UsageStore(tmp_path / "usage.sqlite")

    async def go():
        await store.observe(T0, held(pod("a", "labyard-vision")), [])
        return await store.report("project", "day", T0 + timedelta(minutes=30))

    assert asyncio.run(go()).rows[0].gpu_hours == pytest.approx(0.5)
    store.close()


def test_interval_rows_of_the_api(tmp_path):
    from labyard_hub.gpus.app import interval_row

    store = UsageStore(tmp_path / "usage.sqlite")
    store.observe_sync(T0, held(pod("a", "labyard-vision", gpus=2)), [])
    (iv,) = store.intervals_sync()
    row = interval_row(iv, T0 + timedelta(minutes=90))
    assert (row["pod"], row["start"], row["end"], row["gpu_hours"]) == ("a", T0.isoformat(), None, 3.0)
    store.close()
