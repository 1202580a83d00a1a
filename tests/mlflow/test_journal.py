"""The kernel's journal (``labyard-queue://``, an MLflow tracking-store plugin) and its replay:
MLflow's own client against the store, group commit, torn records, exactly-once replay to a
real ``mlflow server``, records the server refuses, and a gate whose token expires."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from labyard_lab.autolog import journal, sync

from .conftest import write_notebook
from .support import Gate, Kernel, platform_env, tags_of, wait_for


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh local store under a queue root, as a kernel makes one."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    queue = tmp_path / "queue"
    path, owner = sync.new_store(queue)
    yield {"queue": queue, "path": path, "uri": journal.store_uri(path), "owner": owner}
    owner.close()


def client_for(store: dict):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=store["uri"], registry_uri=sync.file_uri(store["path"]))


def test_mlflow_finds_the_store_through_its_entry_point(store):
    from mlflow.tracking._tracking_service.utils import _get_store

    s = _get_store(store["uri"])
    assert type(s).__name__ == "JournalStore" and s is _get_store(store["uri"])  # one per URI and process


def test_what_is_logged_reads_back_as_from_mlflow(store):
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException

    c = client_for(store)
    exp = c.create_experiment("vision/a.ipynb")
    run = c.create_run(exp, tags={"created": "yes"})
    rid = run.info.run_id
    for i in range(50):
        c.log_metric(rid, "loss", 1.0 / (i + 1), step=i, timestamp=1000 + i)
    c.log_param(rid, "lr", 0.1)
    c.log_param(rid, "lr", 0.1)  # the same value again is fine, as in MLflow
    c.set_tag(rid, "phase", "warmup")
    c.set_tag(rid, "phase", "train")
    c.log_batch(rid, metrics=[Metric("acc", 0.5, 2000, 0), Metric("acc", 0.7, 2001, 1)],
                params=[Param("bs", "32")], tags=[RunTag("gone", "x")])
    c.delete_tag(rid, "gone")
    got = c.get_run(rid)
    assert got.data.metrics == {"loss": 1.0 / 50, "acc": 0.7}
    assert got.data.params == {"lr": "0.1", "bs": "32"}
    tags = got.data.tags
    assert tags["phase"] == "train" and tags["created"] == "yes" and "gone" not in tags
    history = c.get_metric_history(rid, "loss")
    assert [(m.step, m.value, m.timestamp) for m in history] == [(i, 1.0 / (i + 1), 1000 + i) for i in range(50)]
    assert [r.info.run_id for r in c.search_runs([exp], "metrics.loss < 0.5 and params.bs = '32'")] == [rid]
    assert c.search_runs([exp], "metrics.acc > 0.9") == []
    # MLflow's rules hold: a param keeps its value, names are checked, unknown runs fail
    with pytest.raises(MlflowException, match="Changing param values is not allowed"):
        c.log_param(rid, "lr", 0.2)
    with pytest.raises(MlflowException):
        c.log_metric(rid, "bad name!", 1.0)
    with pytest.raises(MlflowException, match="not found"):
        c.log_metric("0" * 32, "loss", 1.0)
    c.delete_run(rid)
    with pytest.raises(MlflowException, match="active"):
        c.log_metric(rid, "loss", 1.0)
    # nothing of the hot path went into the file store: one journal holds it
    files = list((store["path"] / "journal").glob("*.jsonl"))
    assert len(files) == 1
    records, _, stopped = journal.read_records(files[0])
    assert not stopped and [r[0] for _, r in records].count("m") == 50


def test_async_calls_go_to_the_journal_too(store):
    c = client_for(store)
    exp = c.create_experiment("vision/b.ipynb")
    rid = c.create_run(exp).info.run_id
    ops = [c.log_metric(rid, "m", float(i), step=i, synchronous=False) for i in range(5)]
    for op in ops:
        op.wait()
    c.log_param(rid, "p", "1", synchronous=False).wait()
    assert len(c.get_metric_history(rid, "m")) == 5 and c.get_run(rid).data.params == {"p": "1"}


def test_group_commit_every_n_records(tmp_path):
    """The record boundary: with a timer that never fires, the committer syncs every N records."""
    j = journal.Journal(tmp_path, commit_ms=3_600_000, commit_records=100)

    def append(n):
        for _ in range(n):
            j.append(journal.encode(["m", "r", "k", float(j.records), j.records, j.records]))

    append(100)
    wait_for(lambda: j.synced_records == 100, 60, what="the first group commit")
    append(99)
    assert j.synced_records == 100 and j.fsyncs == 1  # 99 pending: under N, and the timer is an hour
    append(1)
    wait_for(lambda: j.synced_records == 200, 60, what="the second group commit")
    append(50)
    assert j.fsyncs == 2
    j.commit()  # what a cell end, an exit or commit_all does
    assert j.synced_records == 250 and j.fsyncs == 3
    j.commit()  # nothing pending: no fsync
    assert j.fsyncs == 3
    j.close()


def test_group_commit_timer_and_strict_mode(tmp_path):
    j = journal.Journal(tmp_path / "a", commit_ms=5, commit_records=1_000_000)
    j.append(journal.encode(["t", "r", "k", "v"]))
    wait_for(lambda: j.synced_records == 1, 60, what="the timed commit")  # no N reached: the timer commits
    j.close()
    strict = journal.Journal(tmp_path / "b", commit_ms=0)
    for i in range(3):
        strict.append(journal.encode(["t", "r", "k", str(i)]))
        assert strict.synced_records == i + 1  # synced before append returned
    strict.close()


def test_reader_stops_at_a_torn_record(tmp_path):
    j = journal.Journal(tmp_path, commit_ms=0)
    for i in range(3):
        j.append(journal.encode(["m", "r", "k", float(i), i, i]))
    assert journal.writer_alive(j.path)
    j.close()
    assert not journal.writer_alive(j.path)
    whole = j.path.read_bytes()
    with open(j.path, "ab") as f:  # what a power cut can leave: part of a line
        f.write(journal.encode(["m", "r", "k", 3.0, 3, 3])[:20])
    records, offset, stopped = journal.read_records(j.path)
    assert [r[3] for _, r in records] == [0.0, 1.0, 2.0] and offset == len(whole) and stopped
    # a whole line with a wrong checksum stops the reader too
    j.path.write_bytes(whole.replace(b'"m","r","k",1.0', b'"m","r","k",9.0'))
    records, offset, stopped = journal.read_records(j.path)
    assert [r[3] for _, r in records] == [0.0] and stopped


def test_replay_is_exactly_once_even_when_state_is_lost(mlflow_server, store):
    from mlflow.entities import Metric

    c = client_for(store)
    exp = c.create_experiment("vision/replay-once.ipynb")
    rid = c.create_run(exp, run_name="once").info.run_id
    for i in range(2500):
        c.log_metric(rid, "loss", 1.0 / (i + 1), step=i)
    c.log_batch(rid, metrics=[Metric("acc", i / 10, 5000 + i, i) for i in range(10)])
    c.log_param(rid, "lr", "0.1")
    c.set_tag(rid, "phase", "a")
    c.set_tag(rid, "phase", "b")
    c.set_tag(rid, "tmp", "x")
    c.delete_tag(rid, "tmp")
    c.set_terminated(rid)
    syncer = sync.Syncer(store["queue"], mlflow_server.url)
    assert syncer.sync_all() and syncer.sync_all()
    state = json.loads((store["path"] / "sync-state.json").read_text())
    remote = state["runs"][rid]["remote_id"]

    def check():
        run = mlflow_server.api("GET", "runs/get", params={"run_id": remote})["run"]
        assert run["info"]["status"] == "FINISHED" and run["info"]["run_name"] == "once"
        history = mlflow_server.metric_history(remote, "loss")
        assert sorted(m["step"] for m in history) == list(range(2500))
        assert len(mlflow_server.metric_history(remote, "acc")) == 10
        tags = tags_of(run)
        assert tags["phase"] == "b" and "tmp" not in tags and tags["labyard.local_run_id"] == rid
        assert {p["key"]: p["value"] for p in run["data"]["params"]} == {"lr": "0.1"}

    check()
    # the process died after the server answered but before the offsets were saved: it all goes again
    for js in state["journals"].values():
        js.update(offset=0, closed=False)
    state["runs"][rid]["done"] = False
    (store["path"] / "sync-state.json").write_text(json.dumps(state))
    assert sync.Syncer(store["queue"], mlflow_server.url).sync_all()
    check()


def test_no_syncer_finishes_a_held_run_before_its_owner_attached_everything(mlflow_server, tmp_path, monkeypatch):
    """The papermill wrapper's race, seen with three scheduled runs of one user at once: the
    kernel ends the run at exit, then the wrapper attaches the output notebook. Every process
    of the user replays every store, so another run's syncer found the run over in between,
    finished it on the server, and a finished run is never looked at again: the output
    notebook stayed behind. A held store's runs are finished only once its owner releases it."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    queue = tmp_path / "queue"
    path, owner = sync.new_store(queue, hold=True)
    try:
        c = client_for({"uri": journal.store_uri(path), "path": path})
        rid = c.create_run(c.create_experiment("vision/held.ipynb")).info.run_id
        c.log_metric(rid, "accuracy", 0.9)
        c.set_terminated(rid)  # what the kernel's MLflow does at exit
        journal.commit_all()
        other = sync.Syncer(queue, mlflow_server.url)  # another process's: the owner lock is not its own
        assert other.sync_all()
        rs = json.loads((path / "sync-state.json").read_text())["runs"][rid]
        remote = rs["remote_id"]
        assert not rs.get("done")
        assert mlflow_server.api("GET", "runs/get", params={"run_id": remote})["run"]["info"]["status"] == "RUNNING"
        out = tmp_path / "held.ipynb"
        out.write_text(json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
        c.log_artifact(rid, str(out), "output")
        sync.release(path)
        assert other.sync_all()
        run = mlflow_server.api("GET", "runs/get", params={"run_id": remote})["run"]
        assert run["info"]["status"] == "FINISHED" and run["data"]["metrics"][0]["value"] == 0.9
        assert mlflow_server.artifacts(remote, "output") == ["output/held.ipynb"]
    finally:
        owner.close()


def test_a_held_store_whose_owner_died_is_finished(mlflow_server, tmp_path, monkeypatch):
    """The hold lasts only as long as its owner: a wrapper killed before releasing leaves a
    store the next syncer finishes."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    queue = tmp_path / "queue"
    path, owner = sync.new_store(queue, hold=True)
    c = client_for({"uri": journal.store_uri(path), "path": path})
    rid = c.create_run(c.create_experiment("vision/held-dead.ipynb")).info.run_id
    c.log_metric(rid, "accuracy", 0.5)
    c.set_terminated(rid, "FAILED")
    journal.commit_all()
    owner.close()  # the owner is gone
    assert sync.Syncer(queue, mlflow_server.url).sync_all()
    found = mlflow_server.runs(mlflow_server.experiment("vision/held-dead.ipynb")["experiment_id"])
    assert [(r["info"]["status"], r["data"]["metrics"][0]["value"]) for r in found] == [("FAILED", 0.5)]


def test_a_record_the_server_refuses_is_skipped_and_the_rest_arrives(mlflow_server, store):
    """Two processes writing one run (a kernel and the script it started) log different values
    for one param: each journal took its own, the server keeps the first and refuses the other
    (400). The refused record is skipped and counted; it does not hold up anything after it."""
    from mlflow.entities import Metric, Param

    c = client_for(store)
    exp = c.create_experiment("vision/refused.ipynb")
    rid = c.create_run(exp).info.run_id
    c.log_param(rid, "lr", "0.1")
    c.log_metric(rid, "before", 1.0)
    other = journal.make_store(store["uri"])  # a second process's store: a journal of its own
    other.log_param(rid, Param("lr", "0.2"))
    other.log_metric(rid, Metric("after", 2.0, 1000, 0))
    for i in range(5):
        c.log_metric(rid, "later", float(i), step=i)
    c.set_terminated(rid)
    assert sync.Syncer(store["queue"], mlflow_server.url).sync_all()
    state = json.loads((store["path"] / "sync-state.json").read_text())
    remote = state["runs"][rid]["remote_id"]
    assert sum(js.get("rejected", 0) for js in state["journals"].values()) == 1
    run = mlflow_server.api("GET", "runs/get", params={"run_id": remote})["run"]
    assert [p["key"] for p in run["data"]["params"]] == ["lr"]  # whichever journal was sent first
    for key, n in (("before", 1), ("after", 1), ("later", 5)):
        assert len(mlflow_server.metric_history(remote, key)) == n, key
    assert run["info"]["status"] == "FINISHED"


def test_an_expired_token_makes_the_queue_wait_then_replay(mlflow_server, store, monkeypatch):
    """401/403 from the gate is "not now": nothing is dropped, and the next valid token sends all."""
    gate = Gate(mlflow_server.url)
    try:
        c = client_for(store)
        exp = c.create_experiment("vision/token.ipynb")
        rid = c.create_run(exp).info.run_id
        monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "valid-1")
        syncer = sync.Syncer(store["queue"], gate.url)
        for i in range(300):
            c.log_metric(rid, "loss", float(i), step=i)
        assert syncer.sync_all()
        remote = json.loads((store["path"] / "sync-state.json").read_text())["runs"][rid]["remote_id"]
        assert len(mlflow_server.metric_history(remote, "loss")) == 300
        gate.token = "valid-2"  # the kernel's token expired; more points are logged meanwhile
        for i in range(300, 600):
            c.log_metric(rid, "loss", float(i), step=i)
        c.set_terminated(rid)
        assert not syncer.sync_all() and gate.refused > 0
        assert "401" in syncer.status["last_error"] or "UNAUTHENTICATED" in syncer.status["last_error"]
        assert not syncer.sync_all()  # and again: still waiting, still nothing dropped
        assert len(mlflow_server.metric_history(remote, "loss")) == 300
        monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "valid-2")  # the renewed token
        assert syncer.sync_all()
        history = mlflow_server.metric_history(remote, "loss")
        assert sorted(m["step"] for m in history) == list(range(600))
        assert mlflow_server.api("GET", "runs/get", params={"run_id": remote})["run"]["info"]["status"] == "FINISHED"
    finally:
        gate.close()


def test_without_a_tracking_token_the_sender_uses_the_servers_hub_token(mlflow_server, store, monkeypatch):
    """A kernel of a single-user server has the server's hub token (JUPYTERHUB_API_TOKEN); with
    no MLFLOW_TRACKING_TOKEN from the spawner, that is what the sender shows the gate."""
    gate = Gate(mlflow_server.url, token="the-servers-hub-token")
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "unset")
        monkeypatch.delenv("MLFLOW_TRACKING_TOKEN")  # restored (to absent) after the test
        monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "the-servers-hub-token")
        c = client_for(store)
        rid = c.create_run(c.create_experiment("vision/hub-token.ipynb")).info.run_id
        for i in range(20):
            c.log_metric(rid, "loss", float(i), step=i)
        c.set_terminated(rid)
        assert sync.Syncer(store["queue"], gate.url).sync_all() and gate.refused == 0
        remote = json.loads((store["path"] / "sync-state.json").read_text())["runs"][rid]["remote_id"]
        assert len(mlflow_server.metric_history(remote, "loss")) == 20
        monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "a-token-from-the-spawner")  # one given wins
        sync.quiet_client_env()
        assert os.environ["MLFLOW_TRACKING_TOKEN"] == "a-token-from-the-spawner"
    finally:
        gate.close()


def test_a_server_too_slow_for_a_full_batch_still_gets_everything_once(mlflow_server, store):
    """A server too busy to answer a 1000-point batch within the client's timeout stores it
    anyway, and the client hears nothing. Sending the same batch again would fail the same way
    for ever (what the kill -9 test met on a loaded machine: log-batch timing out after 30 s,
    pass after pass); the sender halves its batches after each failure instead and gets the
    whole queue through, each point once, then grows its batches back."""
    gate = Gate(mlflow_server.url, token=None)
    gate.unanswered_batches_over = 100
    try:
        c = client_for(store)
        exp = c.create_experiment("vision/slow.ipynb")
        rid = c.create_run(exp).info.run_id
        for i in range(2500):
            c.log_metric(rid, "loss", 1.0 / (i + 1), step=i)
        c.log_param(rid, "lr", "0.1")
        c.set_terminated(rid)
        syncer = sync.Syncer(store["queue"], gate.url)
        passes = 0
        while not syncer.sync_all():
            passes += 1
            assert passes < 100, syncer.status
        assert gate.unanswered > 0 and passes > 0
        remote = json.loads((store["path"] / "sync-state.json").read_text())["runs"][rid]["remote_id"]
        history = mlflow_server.metric_history(remote, "loss")
        assert sorted(m["step"] for m in history) == list(range(2500))  # all, once
        run = mlflow_server.api("GET", "runs/get", params={"run_id": remote})["run"]
        assert run["info"]["status"] == "FINISHED" and {p["key"]: p["value"] for p in run["data"]["params"]} == {"lr": "0.1"}
        gate.unanswered_batches_over = None  # the server keeps up again: the batches grow back
        seen = len(gate.batches)
        rid2 = c.create_run(exp).info.run_id
        for i in range(5000):
            c.log_metric(rid2, "loss", float(i), step=i)
        c.set_terminated(rid2)
        assert syncer.sync_all()
        grown = gate.batches[seen:]
        assert grown[0] < sync.MAX_ENTITIES and max(grown) == sync.MAX_ENTITIES, grown
    finally:
        gate.close()


LOOP = """
import os, time, mlflow
fd = os.open({progress!r}, os.O_WRONLY | os.O_CREAT, 0o600)
for i in range({steps}):
    mlflow.log_metric("loss", 1.0 / (i + 1), step=i)
    os.pwrite(fd, b"%10d" % i, 0)  # after log_metric returned: this point is committed
    if i == {hold}:
        while True:  # the kill comes while the loop runs; it cannot finish before
            time.sleep(0.05)
"""


@pytest.mark.slow
def test_kill_9_mid_loop_with_the_server_down_loses_nothing(mlflow_server, workspace):
    """kill -9 of the kernel in the middle of a 10,000-step loop while the server is down: the
    next kernel sends every point that log_metric had returned for, exactly once."""
    nb = workspace["project"] / "crash.ipynb"
    write_notebook(nb, [])
    env = platform_env(project_dir=workspace["project"], home=workspace["home"], notebook=nb, mlflow_url=mlflow_server.url)
    progress = workspace["home"] / "progress"
    k = Kernel(env, cwd=workspace["project"])
    mlflow_server.stop()
    try:
        assert k.run("import mlflow\nmlflow.start_run(run_name='crash')\nprint(mlflow.active_run().info.run_id)")["status"] == "ok"
        k.kc.execute(LOOP.format(progress=str(progress), steps=10_000, hold=9_000))
        wait_for(lambda: progress.exists() and int(progress.read_bytes() or 0) >= 2000, 300, interval=0.01, what="the loop at step 2000")
        os.kill(k.km.provisioner.process.pid, signal.SIGKILL)
        k.km.provisioner.process.wait()
        acked = int(progress.read_bytes())
    finally:
        k.kc.stop_channels()
        mlflow_server.start()
    assert 2000 <= acked <= 9000
    other = workspace["project"] / "next.ipynb"
    write_notebook(other, [])
    k2 = Kernel(platform_env(project_dir=workspace["project"], home=workspace["home"], notebook=other,
                             mlflow_url=mlflow_server.url), cwd=workspace["project"])
    try:
        exp = wait_for(lambda: mlflow_server.experiment("vision/crash.ipynb"), 300, what="the dead kernel's experiment")
        run = wait_for(lambda: mlflow_server.runs(exp["experiment_id"]), 120)[0]

        def arrived():
            h = mlflow_server.metric_history(run["info"]["run_id"], "loss")
            return len(h) > acked and h

        wait_for(arrived, 300, interval=3, what="the points of the dead kernel")  # each poll reads the whole history
        time.sleep(3)  # later passes must not send anything twice
        history = mlflow_server.metric_history(run["info"]["run_id"], "loss")
        steps = sorted(m["step"] for m in history)
        # every acknowledged point (0..acked) is there, once; at most the one in flight besides
        assert steps[:acked + 1] == list(range(acked + 1)) and len(steps) == len(set(steps)) and steps[-1] <= acked + 1
        assert all(m["value"] == 1.0 / (m["step"] + 1) for m in history)
        # nothing can log to the dead kernel's run any more: it is KILLED, as MLflow calls it
        wait_for(lambda: mlflow_server.api("GET", "runs/get", params={"run_id": run["info"]["run_id"]})["run"]["info"]["status"]
                 == "KILLED", 120, what="the run marked KILLED")
    finally:
        k2.shutdown()
