"""``labyard diff`` on the command line and as git's diff driver, textconv and (nbdime's) merge driver."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from bench.diff.notebooks import edited_rerun, executed
from labyard_lab.diff import load_notebook
from labyard_lab.diff.gitconfig import install

from .support import nbdime_diff, patched, plain


def labyard(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "labyard_hub.cli", "diff", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


@pytest.fixture
def pair(tmp_path):
    a = executed(10, 8000, seed=51)
    b = edited_rerun(a, seed=52, inserted=2, deleted=1, edited=0.3)
    (tmp_path / "a.ipynb").write_text(json.dumps(a))
    (tmp_path / "b.ipynb").write_text(json.dumps(b))
    return tmp_path / "a.ipynb", tmp_path / "b.ipynb"


def test_json_is_the_nbdime_diff(pair):
    r = labyard("--json", *pair)
    assert r.returncode == 0, r.stderr
    a, b = (load_notebook(p.read_bytes())[0] for p in pair)
    diff = json.loads(r.stdout)
    assert patched(a, diff) == plain(b)
    assert diff == nbdime_diff(a, b)


def test_text_output_like_nbdiff(pair):
    r = labyard("--no-color", *pair)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith(f"nbdiff {pair[0]} {pair[1]}\n--- {pair[0]}")
    assert "## inserted before /cells/" in out and "## deleted /cells/" in out and "## modified /cells/" in out
    assert "\x1b[" not in out
    assert "image/png: <" in out  # binary data as size and hash, not base64
    assert "\x1b[3" in labyard("--color", *pair).stdout


def test_ignore_options(pair):
    full = json.dumps(json.loads(labyard("--json", *pair).stdout))
    for flags, gone in ((["--ignore-outputs"], '"key": "outputs"'), (["-D"], '"key": "execution_count"'),
                        (["--sources-only"], '"key": "outputs"')):
        out = json.loads(labyard("--json", *flags, *pair).stdout)
        cells = next(e["diff"] for e in out if e["key"] == "cells")
        patched_keys = {x["key"] for c in cells if c["op"] == "patch" for x in c["diff"]}
        assert gone.split('"')[3] not in patched_keys and gone in full, flags
    assert labyard("--exit-code", pair[0], pair[0]).returncode == 0
    assert labyard("--exit-code", *pair).returncode == 1


def test_bad_input_is_a_message_and_status_2(tmp_path, pair):
    (tmp_path / "empty.ipynb").write_text("")
    (tmp_path / "text.ipynb").write_text("hello")
    for bad, words in (("empty.ipynb", "is empty"), ("text.ipynb", "not JSON"), ("missing.ipynb", "No such file")):
        r = labyard(tmp_path / bad, pair[1])
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = labyard(pair[0])
    assert r.returncode == 2 and "two notebooks" in r.stderr


@pytest.fixture
def repo(tmp_path):
    """A git repository whose git has the platform's config (as in a Labyard server)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(HOME=str(tmp_path / "home"), GIT_AUTHOR_NAME="alice", GIT_AUTHOR_EMAIL="alice@example.org",
               GIT_COMMITTER_NAME="alice", GIT_COMMITTER_EMAIL="alice@example.org", GIT_PAGER="cat", PAGER="cat")
    (tmp_path / "home").mkdir()
    install(logging.getLogger("test"), tmp_path / "git-config", env)
    work = tmp_path / "work"
    work.mkdir()

    def git(*args, check=True):
        r = subprocess.run(["git", *args], cwd=work, env=env, capture_output=True, text=True, timeout=300)
        if check:
            assert r.returncode == 0, r.stderr + r.stdout
        return r

    git("init", "-q", "-b", "main")
    return work, git


def _edit(path, cell: int, source: str):
    nb = json.loads(path.read_text())
    nb["cells"][cell]["source"] = source
    path.write_text(json.dumps(nb, indent=1))


def test_git_diff_log_and_merge_use_notebook_drivers(repo):
    work, git = repo
    nb = executed(6, 4000, seed=61)
    (work / "model.ipynb").write_text(json.dumps(nb, indent=1))
    git("add", "model.ipynb")
    git("commit", "-q", "-m", "first")
    _edit(work / "model.ipynb", 1, "print('working tree')")
    diff = git("diff").stdout
    assert "## modified /cells/1/source:" in diff and "+  print('working tree')" in diff and '"cell_type"' not in diff, diff
    git("commit", "-qam", "second")
    log = git("log", "-p", "-1").stdout
    assert "## cell 1 [code]" in log and "+print('working tree')" in log and '"source"' not in log, log
    assert "## modified /cells/1/source:" in git("log", "-p", "-1", "--ext-diff").stdout
    # a merge of two branches that changed different cells: nbdime's merge driver, no conflict
    git("checkout", "-q", "-b", "other")
    _edit(work / "model.ipynb", 2, "print('from other')")
    git("commit", "-qam", "other")
    git("checkout", "-q", "main")
    _edit(work / "model.ipynb", 4, "print('from main')")
    git("commit", "-qam", "main")
    merged = git("merge", "-q", "--no-edit", "other", check=False)
    assert merged.returncode == 0, merged.stdout + merged.stderr
    cells = json.loads((work / "model.ipynb").read_text())["cells"]
    # written by nbdime's merge driver (nbformat splits sources into lines; git's text merge would not)
    assert cells[2]["source"] == ["print('from other')"] and cells[4]["source"] == ["print('from main')"]
    assert "<<<<<<<" not in (work / "model.ipynb").read_text()


def test_git_driver_handles_added_and_deleted_notebooks(repo):
    work, git = repo
    (work / "README.md").write_text("x\n")
    git("add", "README.md")
    git("commit", "-q", "-m", "first")
    (work / "new.ipynb").write_text(json.dumps(executed(3, 1000, seed=62)))
    git("add", "new.ipynb")
    added = git("diff", "--cached").stdout
    assert "## inserted before /cells/0:" in added, added
    git("commit", "-q", "-m", "add")
    git("rm", "-q", "new.ipynb")
    assert "## deleted /cells/0-2:" in git("diff", "--cached").stdout
