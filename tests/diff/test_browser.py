"""nbdime's own JupyterLab button ("Notebook checkpoint diff") in Chromium: its widget renders the
diff our engine serves at /nbdime/api/diff."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.diff.notebooks import executed

from ..support.jupyter import JupyterServer

pytestmark = [pytest.mark.browser, pytest.mark.slow]
ARTIFACTS = Path(__file__).parent.parent / "artifacts"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    s = JupyterServer(tmp_path_factory.mktemp("diff-browser") / "vision").start()
    yield s
    s.stop()


def test_nbdime_checkpoint_diff_renders_our_diff(lab, browser):
    nb = executed(6, 3000, seed=71)
    lab.put_notebook("edited.ipynb", nb)  # the first save creates the checkpoint
    nb["cells"][2]["source"] = "answer = 42\nprint('alice changed this cell')"
    del nb["cells"][4]
    lab.put_notebook("edited.ipynb", nb)
    page = browser.new_context().new_page()
    diff_requests = []
    page.on("request", lambda r: diff_requests.append(r.url) if "/nbdime/api/diff" in r.url else None)
    page.goto(f"{lab.url}/lab/tree/edited.ipynb?token={lab.token}")
    page.locator(".jp-NotebookPanel .jp-Cell").first.wait_for(timeout=180_000)
    page.locator(".jp-NotebookPanel-toolbar .action-notebook-diff-checkpoint").first.click()
    widget = page.locator(".nbdime-Widget")
    # unchanged cells are rendered hidden (nbdime's "hide unchanged cells" is on by default)
    widget.locator(".jp-Cell-diff:not(.jp-Diff-unchanged)").first.wait_for(timeout=120_000)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "nbdime-checkpoint-diff.png"), full_page=True)
    assert diff_requests, "nbdime's widget did not call /nbdime/api/diff"
    # the changed cell shows both versions, the deleted cell is marked deleted
    changed = widget.locator(".jp-Cell-diff", has_text="alice changed this cell")
    assert changed.count() == 1
    assert widget.locator(".jp-Diff-deleted").count() >= 1
    assert "alice changed this cell" in widget.inner_text()
    errors = page.locator(".nbdime-Widget .jp-Dialog, .nbdime-Widget .nbdime-error")
    assert errors.count() == 0
    # the same diff through our API, for the record
    body = lab.api().post(f"{lab.url}/nbdime/api/diff", json={"base": "checkpoint:edited.ipynb"}, timeout=120).json()
    assert "alice changed this cell" in json.dumps(body["diff"]) and body["summary"]["cells_removed"] == 1
