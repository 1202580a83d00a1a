"""``POST /labyard/diff`` and nbdime's routes on a real Jupyter server with the Labyard extension."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time

import pytest
import requests

from bench.diff.notebooks import edited_rerun, executed
from labyard_lab.diff import load_notebook

from ..support.jupyter import JupyterServer
from .conftest import terminal
from .support import patched, plain


def path(p: str) -> dict:
    return {"kind": "path", "path": p}


def test_path_diff_has_what_nbdimes_widgets_need(server, small_pair):
    r = server.diff(base=path("fit.ipynb"), remote=path("fit-v2.ipynb"))
    assert r.status_code == 200, r.text
    body = r.json()
    remote = load_notebook(json.dumps(small_pair[1]))[0]
    assert patched(body["base"], body["diff"]) == plain(remote)
    assert body["summary"]["cells_added"] == 2 and body["summary"]["cells_removed"] == 1
    assert body["sources"]["base"] == {"kind": "path", "path": "fit.ipynb", "label": "fit.ipynb"}
    assert body["header"] is None  # no run on either side
    assert set(body["timing"]) == {"load_seconds", "diff_seconds"}


def test_options_leave_parts_out(server, small_pair):
    full = server.diff(base=path("fit.ipynb"), remote=path("fit-v2.ipynb")).json()
    only = server.diff(base=path("fit.ipynb"), remote=path("fit-v2.ipynb"), options={"sources_only": True}).json()

    def patched_keys(diff):
        cells = next(e["diff"] for e in diff if e["key"] == "cells")
        return {x["key"] for c in cells if c["op"] == "patch" for x in c["diff"]}

    assert {"outputs", "execution_count", "source"} <= patched_keys(full["diff"])
    assert patched_keys(only["diff"]) == {"source"}
    assert only["options"]["sources_only"] is True
    assert server.diff(base=path("fit.ipynb"), remote=path("fit-v2.ipynb"), options={"ignore_everything": True}).status_code == 400


def test_cookie_sessions_need_the_xsrf_token(server, small_pair):
    body = {"base": path("fit.ipynb"), "remote": path("fit-v2.ipynb")}
    browser = server.browser()
    assert browser.post(f"{server.url}/labyard/diff", json=body, timeout=60).status_code == 403
    xsrf = browser.cookies.get("_xsrf")
    ok = browser.post(f"{server.url}/labyard/diff", json=body, headers={"X-XSRFToken": xsrf}, timeout=120)
    assert ok.status_code == 200, ok.text
    assert requests.post(f"{server.url}/labyard/diff", json=body, timeout=60).status_code == 403
    assert requests.post(f"{server.url}/nbdime/api/diff", json={"base": "checkpoint:fit.ipynb"}, timeout=60).status_code == 403


def test_sources_outside_the_project_are_refused(server, small_pair):
    secret = server.root.parent / "nlp" / "secret.ipynb"
    link = server.root / "link.ipynb"
    if not link.exists():
        link.symlink_to(secret)
    (server.root / "linkdir").mkdir(exist_ok=True)
    if not (server.root / "linkdir" / "nlp").exists():
        (server.root / "linkdir" / "nlp").symlink_to(secret.parent)
    cases = [
        ({"base": path("../nlp/secret.ipynb"), "remote": path("fit.ipynb")}, 403, "leaves the project"),
        ({"base": path("fit.ipynb"), "remote": path("a/../../nlp/secret.ipynb")}, 403, "leaves the project"),
        ({"base": path("link.ipynb"), "remote": path("fit.ipynb")}, 403, "outside project 'vision'"),
        ({"base": path("linkdir/nlp/secret.ipynb"), "remote": path("fit.ipynb")}, 403, "outside project"),
        ({"base": {"kind": "checkpoint", "path": "../nlp/secret.ipynb"}, "remote": path("fit.ipynb")}, 403, "leaves"),
        ({"base": {"kind": "git", "path": "link.ipynb"}, "remote": path("fit.ipynb")}, 403, "outside project"),
        ({"base": {"kind": "inline", "content": {}, "path": "../nlp/x.ipynb"}, "remote": path("fit.ipynb")}, 403, "leaves"),
        # an absolute path is taken relative to the project root, where the nlp notebook is not
        ({"base": path(str(secret)), "remote": path("fit.ipynb")}, 404, "does not exist"),
    ]
    for body, status, words in cases:
        r = server.diff(**body)
        assert r.status_code == status and words in r.json()["message"], (body, r.status_code, r.text)
    r = server.api().post(f"{server.url}/nbdime/api/diff", json={"base": "../nlp/secret.ipynb", "remote": "fit.ipynb"}, timeout=60)
    assert r.status_code == 403, r.text
    r = server.api().post(f"{server.url}/nbdime/api/isgit", json={"path": "../nlp/secret.ipynb"}, timeout=60)
    assert r.status_code == 403, r.text


HERE = {"kind": "path", "path": "fit.ipynb"}


@pytest.mark.parametrize("body,words", [
    (b"not json", "not JSON"),
    (b"[]", "JSON object"),
    ({"base": HERE}, "remote"),
    ({"base": {"kind": "url", "path": "http://x"}, "remote": HERE}, "kind"),
    ({"base": {"kind": "path", "path": ""}, "remote": HERE}, "path is required"),
    ({"base": {"kind": "git", "path": "fit.ipynb", "ref": "--output=/tmp/x"}, "remote": HERE}, "not a git ref"),
    ({"base": {"kind": "scheduled", "run_id": "../../x"}, "remote": HERE}, "not a run id"),
])
def test_malformed_requests_get_400(server, small_pair, body, words):
    raw = body if isinstance(body, bytes) else json.dumps(body)
    r = server.api().post(f"{server.url}/labyard/diff", data=raw, timeout=60)
    assert r.status_code == 400 and words in r.json()["message"], r.text


@pytest.mark.parametrize("content,status,words", [
    (b"", 400, "is empty"),
    (b"{broken", 400, "not JSON"),
    (b'{"a": 1}', 400, "not a notebook"),
    (b'{"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [{"cell_type": "code", "source": 3}]}', 400, "'source'"),
])
def test_bad_notebooks_get_a_clear_error(server, small_pair, content, status, words):
    (server.root / "bad.ipynb").write_bytes(content)
    r = server.diff(base=path("bad.ipynb"), remote=path("fit.ipynb"))
    assert r.status_code == status and words in r.json()["message"] and "bad.ipynb" in r.json()["message"], r.text
    assert server.diff(base=path("missing.ipynb"), remote=path("fit.ipynb")).status_code == 404
    (server.root / "folder.ipynb").mkdir(exist_ok=True)
    assert server.diff(base=path("folder.ipynb"), remote=path("fit.ipynb")).status_code == 400


def test_services_that_are_not_configured_fail_fast(server):
    r = server.diff(base={"kind": "scheduled", "run_id": "r-123"}, remote=path("fit.ipynb"))
    assert r.status_code == 503 and "scheduler" in r.json()["message"]
    r = server.diff(base={"kind": "mlflow", "run_id": "abc"}, remote=path("fit.ipynb"))
    assert r.status_code == 502 and "MLflow" in r.json()["message"]


def test_many_cells_and_a_100_mb_output_give_results(server):
    many = {"nbformat": 4, "nbformat_minor": 5, "metadata": {},
            "cells": [{"cell_type": "code", "id": f"c{i}", "metadata": {}, "execution_count": None, "outputs": [],
                       "source": f"x_{i} = {i}"} for i in range(2000)]}
    (server.root / "many.ipynb").write_text(json.dumps(many))
    many["cells"] = many["cells"][::-1]
    (server.root / "many-reversed.ipynb").write_text(json.dumps(many))
    r = server.diff(base=path("many.ipynb"), remote=path("many-reversed.ipynb"))
    assert r.status_code == 200 and r.json()["summary"]["cells_unchanged"] >= 1, r.text[:300]
    big = executed(2, 0, seed=4)
    big["cells"][1]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "0123456789abcdef\n" * 6_000_000}]
    (server.root / "big.ipynb").write_text(json.dumps(big))
    big["cells"][1]["outputs"][0]["text"] += "one more line\n"
    (server.root / "big-2.ipynb").write_text(json.dumps(big))
    r = server.diff(base=path("big.ipynb"), remote=path("big-2.ipynb"))
    assert r.status_code == 200, r.text[:300]
    assert r.json()["summary"]["cells_modified"] == 1


def test_checkpoint_diffs_for_nbdime_and_for_us(server):
    nb = executed(4, 2000, seed=3)
    (server.root / "ckpt.ipynb").write_text(json.dumps(nb))  # written outside Jupyter: no checkpoint yet
    api = server.api()
    # nbdime's button with no checkpoint yet: the notebook is unchanged; our API says there is none
    r = api.post(f"{server.url}/nbdime/api/diff", json={"base": "checkpoint:ckpt.ipynb"}, timeout=120)
    assert r.status_code == 200 and r.json()["diff"] == [], r.text[:300]
    r = server.diff(base={"kind": "checkpoint", "path": "ckpt.ipynb"}, remote=path("ckpt.ipynb"))
    assert r.status_code == 404 and "no checkpoint" in r.json()["message"]
    assert api.post(f"{server.url}/api/contents/ckpt.ipynb/checkpoints", timeout=60).status_code == 201
    nb["cells"][1]["source"] += "\nprint('edited after the checkpoint')"
    server.put_notebook("ckpt.ipynb", nb)
    r = api.post(f"{server.url}/nbdime/api/diff", json={"base": "checkpoint:ckpt.ipynb"}, timeout=120)
    assert r.status_code == 200, r.text[:300]
    assert "edited after the checkpoint" in json.dumps(r.json()["diff"])
    ours = server.diff(base={"kind": "checkpoint", "path": "ckpt.ipynb"}, remote=path("ckpt.ipynb")).json()
    assert ours["diff"] == r.json()["diff"] and ours["summary"]["cells_modified"] == 1
    assert ours["sources"]["base"]["kind"] == "checkpoint" and ours["sources"]["base"]["checkpoint_id"]


def _git(cwd, *args):
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@x"}
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True, env=env).stdout


def test_git_sources_and_nbdimes_git_routes(server):
    repo = server.root / "repo"
    repo.mkdir(exist_ok=True)
    nb = executed(5, 2000, seed=5)
    (repo / "model.ipynb").write_text(json.dumps(nb))
    _git(repo, "init", "-q")
    _git(repo, "add", "model.ipynb")
    _git(repo, "commit", "-q", "-m", "first")
    nb["cells"][2]["source"] = "print('changed in the working tree')"
    (repo / "model.ipynb").write_text(json.dumps(nb))
    api = server.api()
    r = api.post(f"{server.url}/nbdime/api/diff", json={"base": "git:repo/model.ipynb"}, timeout=120)
    assert r.status_code == 200 and "changed in the working tree" in json.dumps(r.json()["diff"]), r.text[:300]
    r2 = api.post(f"{server.url}/nbdime/api/gitdiff", timeout=120,
                  json={"ref_local": {"git": "HEAD"}, "ref_remote": {"special": "working"}, "file_path": "repo/model.ipynb"})
    assert r2.status_code == 200 and r2.json()["diff"] == r.json()["diff"]
    staged = api.post(f"{server.url}/nbdime/api/gitdiff", timeout=120,
                      json={"ref_local": {"special": "index"}, "ref_remote": {"special": "working"}, "file_path": "repo/model.ipynb"})
    assert staged.status_code == 200 and staged.json()["diff"] == r.json()["diff"]
    ours = server.diff(base={"kind": "git", "path": "repo/model.ipynb", "ref": "HEAD"}, remote=path("repo/model.ipynb")).json()
    assert ours["diff"] == r.json()["diff"] and len(ours["sources"]["base"]["commit"]) == 40
    assert api.post(f"{server.url}/nbdime/api/isgit", json={"path": "repo/model.ipynb"}, timeout=60).json() == {"is_git": True}
    assert api.post(f"{server.url}/nbdime/api/isgit", json={"path": "fit.ipynb"}, timeout=60).json() == {"is_git": False}
    r = server.diff(base={"kind": "git", "path": "repo/model.ipynb", "ref": "no-such-branch"}, remote=path("repo/model.ipynb"))
    assert r.status_code == 404 and "no commit 'no-such-branch'" in r.json()["message"]
    r = server.diff(base={"kind": "git", "path": "fit.ipynb"}, remote=path("fit.ipynb"))
    assert r.status_code == 404 and "not in a git repository" in r.json()["message"]


def test_git_in_a_terminal_of_the_server_is_notebook_aware(server):
    """The issue's check, in a real terminal of the server: git init, commit, edit, git diff."""
    work = server.root / "terminal-repo"
    work.mkdir(exist_ok=True)
    (work / "analysis.ipynb").write_text(json.dumps(executed(4, 3000, seed=8)))
    script = (f"cd {work} && git init -q && git add analysis.ipynb && "
              "git -c user.name=t -c user.email=t@x commit -q -m first && "
              "python3 -c \"import json; p='analysis.ipynb'; nb=json.load(open(p)); "
              "nb['cells'][1]['source']='print(42)'; json.dump(nb, open(p, 'w'))\" && "
              "printf '=%s=\\n' DIFF && git diff && printf '=%s=\\n' LOG && "
              "git -c user.name=t -c user.email=t@x commit -qam second && git log -p -1 && "
              "printf '=%s=\\n' CONFIG && git config --show-origin diff.jupyternotebook.command")
    out = terminal(server, script)
    diff = out.split("=DIFF=", 1)[1].split("=LOG=", 1)[0]
    assert "## modified /cells/1/source:" in diff and "+  print(42)" in diff, out[-3000:]
    assert '"cell_type"' not in diff  # not the raw JSON
    log = out.split("=LOG=", 1)[1].split("=CONFIG=", 1)[0]
    assert "## cell 1 [code]" in log and "+print(42)" in log, log[-2000:]  # textconv
    assert "labyard_lab.diff.cli --git-driver" in out.split("=CONFIG=", 1)[1]


def test_the_event_loop_answers_while_a_large_diff_runs(server):
    """Requests to the server complete while two diffs of two large notebooks are computed at
    once: ours (``/labyard/diff``) and nbdime's button (``/nbdime/api/diff``, answered by the same
    worker)."""
    a = executed(400, 30_000_000, seed=21)
    (server.root / "large.ipynb").write_text(json.dumps(a))
    (server.root / "large-rerun.ipynb").write_text(json.dumps(edited_rerun(a, seed=22)))
    del a
    done, answered, worst = _concurrent(server, [
        (f"{server.url}/labyard/diff", {"base": path("large.ipynb"), "remote": path("large-rerun.ipynb")}),
        (f"{server.url}/nbdime/api/diff", {"base": "large.ipynb", "remote": "large-rerun.ipynb"}),
    ])
    assert [d["status"] for d in done] == [200, 200], done
    took = max(d["at"] for d in done)
    print(f"{len(answered)} status requests answered while the diffs took {took:.1f} s "
          f"(worst latency {worst * 1000:.0f} ms)")
    assert len(answered) >= 3 and worst < took / 2


def _concurrent(server, posts: list[tuple[str, dict]]):
    """POST diffs, each in a thread; meanwhile GET /api/status every 50 ms. Returns each diff's
    status and time, the latencies of the status requests that completed before the last diff did,
    and the worst latency of any status request sent while a diff ran (how long the event loop was
    blocked)."""
    done: list[dict] = [{} for _ in posts]
    t0 = time.monotonic()

    def post(url, body, into):
        r = server.api().post(url, json=body, timeout=600)
        into.update(status=r.status_code, at=time.monotonic() - t0, body=r.text[:300])

    threads = [threading.Thread(target=post, args=(url, body, into)) for (url, body), into in zip(posts, done)]
    for thread in threads:
        thread.start()
    statuses = []
    session = server.api()
    while any(thread.is_alive() for thread in threads):
        start = time.monotonic()
        r = session.get(f"{server.url}/api/status", timeout=600)
        statuses.append((time.monotonic() - t0, time.monotonic() - start, r.status_code))
        time.sleep(0.05)
    for thread in threads:
        thread.join()
    last = max(d["at"] for d in done)
    before = [latency for at, latency, code in statuses if at < last and code == 200]
    return done, before, max(latency for at, latency, code in statuses)


@pytest.mark.slow
def test_nbdimes_own_handler_blocks_the_loop(tmp_path):
    """The control for the test above: with nbdime's handler (replace_nbdime_api off) the same
    method sees the server stop answering while a (smaller) diff runs on its event loop."""
    s = JupyterServer(tmp_path / "vision", args=["--LabyardDiff.replace_nbdime_api=False"]).start()
    try:
        a = executed(100, 5_000_000, seed=31)
        (s.root / "a.ipynb").write_text(json.dumps(a))
        (s.root / "b.ipynb").write_text(json.dumps(edited_rerun(a, seed=32)))
        [done], answered, worst = _concurrent(s, [(f"{s.url}/nbdime/api/diff", {"base": "a.ipynb", "remote": "b.ipynb"})])
        assert done["status"] == 200, done
        print(f"nbdime's own handler: a status request waited {worst:.1f} s of the diff's {done['at']:.1f} s")
        assert worst > done["at"] / 2
    finally:
        s.stop()


@pytest.mark.slow
def test_size_and_memory_limits_give_413(tmp_path):
    s = JupyterServer(tmp_path / "vision", args=["--LabyardDiff.max_notebook_bytes=12000000",
                                                 "--LabyardDiff.memory_limit=60000000"]).start()
    try:
        a = executed(50, 9_000_000, seed=41)
        (s.root / "a.ipynb").write_text(json.dumps(a))
        (s.root / "b.ipynb").write_text(json.dumps(edited_rerun(a, seed=42)))
        huge = executed(2, 0, seed=43)
        huge["cells"][1]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "x" * 13_000_000}]
        (s.root / "huge.ipynb").write_text(json.dumps(huge))
        r = s.diff(base=path("huge.ipynb"), remote=path("a.ipynb"))
        assert r.status_code == 413 and r.json()["reason"] == "too_large", r.text
        assert "over the limit of 12.0 MB" in r.json()["message"] and "huge.ipynb" in r.json()["message"]
        r = s.diff(base=path("a.ipynb"), remote=path("b.ipynb"))
        assert r.status_code == 413 and r.json()["reason"] == "memory" and "memory_limit" in r.json()["message"], r.text
        assert requests.get(f"{s.url}/api/status", headers=s.headers, timeout=30).status_code == 200
    finally:
        s.stop()


async def test_the_time_budget_stops_the_worker(tmp_path):
    from labyard_lab.diff.worker import DiffFailed, DiffJob, DiffRunner, Input

    a = executed(50, 8_000_000, seed=44)
    (tmp_path / "a.ipynb").write_text(json.dumps(a))
    (tmp_path / "b.ipynb").write_text(json.dumps(edited_rerun(a, seed=45)))
    job = DiffJob(Input("base", path=str(tmp_path / "a.ipynb")), Input("remote", path=str(tmp_path / "b.ipynb")))
    with pytest.raises(DiffFailed) as e:
        await DiffRunner(time_budget=0.01).run(job)
    assert e.value.status == 413 and e.value.reason == "time_budget" and "0.01 s" in e.value.message
    body = json.loads(await DiffRunner(time_budget=600).run(job))
    assert body["summary"]["cells_added"] == 20
