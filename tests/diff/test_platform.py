"""Diffs of runs in a real ``labyard up --demo``: scheduled runs (labyard-scheduler), MLflow runs,
checkpoints through the hub, and bob, from his vision server, refused everything of nlp."""

from __future__ import annotations

import json
import re
import time

import nbformat
import pytest
import requests
from nbformat.v4 import new_code_cell, new_notebook

from ..scheduler.test_service import wait_run, wait_service
from ..support.stack import Stack
from .support import patched, plain

pytestmark = pytest.mark.slow


def training() -> dict:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        new_code_cell("lr = 0.01\nepochs = 2", metadata={"tags": ["parameters"]}),
        new_code_cell("import mlflow\naccuracy = round(1 - lr, 4)\nmlflow.log_metric('accuracy', accuracy)\n"
                      "print('trained with lr', lr, 'accuracy', accuracy)"),
        new_code_cell("print('done')"),
    ]
    return nb


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("labyard-diff")).start(timeout=240)
    for project in ("vision", "nlp"):
        (s.data_dir / "projects" / project).mkdir(parents=True, exist_ok=True)
        nbformat.write(nbformat.from_dict(training()), str(s.data_dir / "projects" / project / "train.ipynb"))
    yield s
    s.stop()


def wait_recorded(api: requests.Session, base: str, run_id: str, timeout: float = 180) -> dict:
    """The run, once succeeded and recorded in MLflow with its metric (the papermill wrapper syncs)."""
    run = wait_run(api, base, run_id, timeout)
    assert run["status"] == "succeeded", api.get(f"{base}/runs/{run_id}/log").text[-3000:]
    deadline = time.monotonic() + timeout
    mlflow = base.replace("/services/labyard-scheduler/api", "/services/mlflow/api/2.0/mlflow")
    while time.monotonic() < deadline:
        run = api.get(f"{base}/runs/{run_id}", timeout=10).json()
        if run.get("mlflow_run_id"):
            got = api.get(f"{mlflow}/runs/get", params={"run_id": run["mlflow_run_id"]}, timeout=30)
            if got.status_code == 200 and got.json()["run"]["data"].get("metrics") and got.json()["run"]["info"]["status"] == "FINISHED":
                return run
        time.sleep(1)
    raise TimeoutError(f"run {run_id} not in MLflow with its metric: {run}")


@pytest.fixture(scope="module")
def runs(stack):
    """Two vision runs of train.ipynb (lr 0.1 and 0.5) and one nlp run, all of alice."""
    alice = stack.api("alice")
    base = wait_service(stack, alice)
    first = alice.post(f"{base}/schedules", json={"project": "vision", "notebook": "train.ipynb", "parameters": {"lr": 0.1}})
    assert first.status_code == 201, first.text
    second = alice.post(f"{base}/schedules/{first.json()['id']}/runs", json={"parameters": {"lr": 0.5}})
    nlp = alice.post(f"{base}/schedules", json={"project": "nlp", "notebook": "train.ipynb", "parameters": {"lr": 0.2}})
    assert second.status_code == 201 and nlp.status_code == 201, (second.text, nlp.text)
    return {"vision-1": wait_recorded(alice, base, first.json()["run"]["id"]),
            "vision-2": wait_recorded(alice, base, second.json()["id"]),
            "nlp": wait_recorded(alice, base, nlp.json()["run"]["id"])}


def _runs_of(stack: Stack, experiment: str) -> list[dict]:
    """What MLflow holds for an experiment, for an assertion's message."""
    api = stack.api("alice")
    mlflow = f"{stack.url}/services/mlflow/api/2.0/mlflow"
    exp = api.get(f"{mlflow}/experiments/get-by-name", params={"experiment_name": experiment}, timeout=30).json()["experiment"]
    found = api.post(f"{mlflow}/runs/search", json={"experiment_ids": [exp["experiment_id"]]}, timeout=30).json().get("runs", [])
    return [{"id": r["info"]["run_id"], "status": r["info"]["status"], "start": r["info"]["start_time"],
             "tags": {t["key"]: t["value"] for t in r["data"].get("tags", []) if t["key"].startswith(("labyard.", "mlflow.user"))}}
            for r in found]


class Lab:
    """A user's running server for a project, called as JupyterLab calls it (cookie + xsrf)."""

    def __init__(self, stack: Stack, user: str, project: str):
        api = stack.api(user)
        r = api.post(f"{api.base}/users/{user}/servers/{project}", json={}, timeout=60)
        assert r.status_code in (201, 202, 400), r.text  # 400: already running
        stack.wait_ready(api, user, project, timeout=240)
        self.session = stack.login(user)
        self.url = f"{stack.url}/user/{user}/{project}"
        assert self.session.get(f"{self.url}/lab", timeout=120).status_code == 200
        self.session.headers["X-XSRFToken"] = self.session.cookies.get("_xsrf", path=f"/user/{user}/{project}/")

    def diff(self, base: dict, remote: dict, **options) -> requests.Response:
        return self.session.post(f"{self.url}/labyard/diff", json={"base": base, "remote": remote, "options": options}, timeout=300)


@pytest.fixture(scope="module")
def alice_vision(stack):
    return Lab(stack, "alice", "vision")


@pytest.fixture(scope="module")
def bob_vision(stack):
    return Lab(stack, "bob", "vision")


def scheduled(run: dict, notebook: str = "output") -> dict:
    return {"kind": "scheduled", "run_id": run["id"], "notebook": notebook}


def mlflow_run(run: dict, artifact: str = "notebook") -> dict:
    return {"kind": "mlflow", "run_id": run["mlflow_run_id"], "artifact": artifact}


def _rows(rows: list[dict]) -> dict:
    return {r["name"]: r for r in rows}


def test_compare_with_previous_run(stack, runs, alice_vision):
    r = alice_vision.diff(scheduled(runs["vision-1"]), scheduled(runs["vision-2"]))
    assert r.status_code == 200, r.text
    body = r.json()
    header = body["header"]
    assert _rows(header["parameters"])["lr"] == {"name": "lr", "base": 0.1, "remote": 0.5, "change": "changed"}
    accuracy = _rows(header["metrics"])["accuracy"]
    assert (accuracy["base"], accuracy["remote"], accuracy["change"]) == (0.9, 0.5, "changed")
    assert accuracy["delta"] == pytest.approx(-0.4)
    assert header["packages"]["compared"] and header["packages"]["added"] == header["packages"]["removed"] == []
    assert _rows(header["provenance"])["flavor"]["change"] == "same"
    assert header["base"]["run_id"] == runs["vision-1"]["id"] and header["base"]["kind"] == "run"
    # below the header: the cells whose outputs changed, and a diff that patches run 1 into run 2
    output2 = stack.api("alice").get(f"{stack.url}/services/labyard-scheduler/api/runs/{runs['vision-2']['id']}/output",
                                     timeout=60)
    from labyard_lab.diff import load_notebook

    remote = patched(body["base"], body["diff"])
    assert remote == plain(load_notebook(output2.content)[0])
    k = next(i for i, c in enumerate(body["base"]["cells"]) if "trained with lr" in c["source"])
    assert "trained with lr 0.1 accuracy 0.9" in json.dumps(body["base"]["cells"][k]["outputs"])
    assert "trained with lr 0.5 accuracy 0.5" in json.dumps(remote["cells"][k]["outputs"])
    changed = {e["key"]: {x["key"] for x in e["diff"]} for e in body["diff"][0]["diff"] if e["op"] == "patch"}
    assert "outputs" in changed[k]
    assert body["summary"]["cells_modified"] >= 2 and body["sources"]["remote"]["run"]["parameters"] == {"lr": 0.5}


def test_compare_output_with_input(runs, alice_vision):
    r = alice_vision.diff(scheduled(runs["vision-1"], "input"), scheduled(runs["vision-1"], "output"))
    assert r.status_code == 200, r.text
    text = json.dumps(r.json()["diff"])
    assert "trained with lr 0.1" in text and "injected-parameters" in text  # papermill's cell, added


def test_mlflow_runs_and_a_run_against_the_current_notebook(runs, alice_vision):
    r = alice_vision.diff(mlflow_run(runs["vision-1"], "output"), mlflow_run(runs["vision-2"], "output"))
    assert r.status_code == 200, r.text
    header = r.json()["header"]
    assert _rows(header["parameters"])["lr"]["change"] == "changed"
    assert _rows(header["metrics"])["accuracy"]["delta"] == pytest.approx(-0.4)
    assert _rows(header["provenance"])["python"]["change"] == "same"
    now = alice_vision.diff(mlflow_run(runs["vision-1"]), {"kind": "path", "path": "train.ipynb"})
    assert now.status_code == 200, now.text
    body = now.json()
    assert body["sources"]["base"]["url"].startswith("/services/mlflow/#/experiments/")
    assert body["header"]["remote"]["kind"] == "notebook"
    assert _rows(body["header"]["parameters"])["lr"]["remote"] == 0.01  # the notebook's parameters cell
    assert body["header"]["packages"]["compared"]  # the run's pip freeze against this server's packages
    assert body["summary"]["identical"]  # the run executed a snapshot of this very notebook


def test_nbdimes_checkpoint_diff_through_the_hub(stack, alice_vision):
    lab, s = alice_vision.url, alice_vision.session
    nb = training()
    assert s.put(f"{lab}/api/contents/edited.ipynb", json={"type": "notebook", "format": "json", "content": nb}, timeout=60).ok
    nb["cells"][2]["source"] = "print('alice edited this')"
    assert s.put(f"{lab}/api/contents/edited.ipynb", json={"type": "notebook", "format": "json", "content": nb}, timeout=60).ok
    r = s.post(f"{lab}/nbdime/api/diff", json={"base": "checkpoint:edited.ipynb"}, timeout=120)
    assert r.status_code == 200 and "alice edited this" in json.dumps(r.json()["diff"]), r.text[:500]


def test_bob_is_refused_everything_of_nlp(stack, runs, bob_vision, alice_vision):
    here = {"kind": "path", "path": "train.ipynb"}
    nlp_file = str(stack.data_dir / "projects" / "nlp" / "train.ipynb")
    refused = [
        (bob_vision.diff({"kind": "path", "path": "../nlp/train.ipynb"}, here), 403, "leaves the project"),
        (bob_vision.diff({"kind": "path", "path": nlp_file}, here), 404, "does not exist"),
        (bob_vision.diff({"kind": "git", "path": "../nlp/train.ipynb"}, here), 403, "leaves the project"),
        (bob_vision.diff(scheduled(runs["nlp"]), here), 403, "not a member of project 'nlp'"),
        (bob_vision.diff(here, scheduled(runs["nlp"], "input")), 403, "not a member of project 'nlp'"),
        # MLflow's gate refuses bob before his server sees the run
        (bob_vision.diff(mlflow_run(runs["nlp"]), here), 403, "not a member of project 'nlp'"),
        (bob_vision.diff(here, mlflow_run(runs["nlp"], "output")), 403, "not a member of project 'nlp'"),
        # alice is in nlp, but her vision server diffs only vision
        (alice_vision.diff(scheduled(runs["nlp"]), here), 403, "belongs to project 'nlp'"),
        (alice_vision.diff(mlflow_run(runs["nlp"]), here), 403, "belongs to project 'nlp'"),
    ]
    for r, status, words in refused:
        assert r.status_code == status and words in r.json()["message"], (r.status_code, r.text[:300])
    nbdime = bob_vision.session.post(f"{bob_vision.url}/nbdime/api/diff", json={"base": "../nlp/train.ipynb", "remote": "train.ipynb"}, timeout=60)
    assert nbdime.status_code == 403
    # and what is his own works
    assert bob_vision.diff(scheduled(runs["vision-1"]), scheduled(runs["vision-2"])).status_code == 200


@pytest.mark.browser
def test_compare_with_previous_run_in_chromium(stack, runs, alice_vision, browser):
    """alice, in Chromium: Scheduled runs panel, "Compare with previous run" on her second run: the
    main area shows lr 0.1 → 0.5 and accuracy with its delta above the cells, rendered by nbdime's
    own widget, and the cell whose output changed; her nlp run not offered; then the
    same from the Runs panel (MLflow runs of train.ipynb)."""
    from pathlib import Path

    artifacts = Path(__file__).parent.parent / "artifacts"
    artifacts.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    stack.browser_login(page, "alice")
    page.goto(f"{alice_vision.url}/lab")
    tab = page.locator(".lm-TabBar-tab[data-id='labyard-scheduled-runs']")
    tab.wait_for(timeout=180_000)
    tab.click()
    run = page.locator(f"#labyard-scheduled-runs .labyard-run[data-run='{runs['vision-2']['id']}']")
    run.wait_for(timeout=120_000)
    # the first run has no previous one
    assert page.locator(f".labyard-run[data-run='{runs['vision-1']['id']}'] .labyard-run-compare-previous").count() == 0
    run.locator(".labyard-run-compare-previous").click()
    view = page.locator(".labyard-diff")
    lr = view.locator(".labyard-diff-header-table[data-section=parameters] tr[data-name=lr]")
    lr.wait_for(timeout=180_000)
    assert lr.locator(".labyard-diff-base").inner_text() == "0.1" and lr.locator(".labyard-diff-remote").inner_text() == "0.5"
    accuracy = view.locator(".labyard-diff-header-table[data-section=metrics] tr[data-name=accuracy]")
    assert accuracy.locator(".labyard-diff-delta").inner_text() == "\u22120.4"
    assert view.locator("tr[data-name=epochs]").count() == 0  # the same on both sides: not listed
    # the cells below come from nbdime's NotebookDiffWidget; the changed output shows both runs
    changed = view.locator(".jp-Notebook-diff .jp-Cell-diff:not(.jp-Diff-unchanged)", has_text="trained with lr 0.5")
    changed.first.wait_for(timeout=120_000)
    assert "trained with lr 0.1 accuracy 0.9" in changed.first.inner_text()
    assert view.locator(".labyard-diff-error").count() == 0
    page.screenshot(path=str(artifacts / "diff-previous-run.png"), full_page=True)
    # her nlp run is not listed in her vision server's panel (lists are this server's project's)
    assert page.locator(f"#labyard-scheduled-runs .labyard-run[data-run='{runs['nlp']['id']}']").count() == 0
    # the Runs panel (MLflow runs of the open notebook): the later of the two runs compares with the earlier
    page.goto(f"{alice_vision.url}/lab/tree/train.ipynb")
    page.locator(".jp-NotebookPanel .jp-Cell").first.wait_for(timeout=120_000)
    runs_tab = page.locator(".lm-TabBar-tab[data-id='labyard-runs']")
    if not page.locator("#labyard-runs").is_visible():
        runs_tab.click()
    mlflow_ids = {runs["vision-1"]["mlflow_run_id"], runs["vision-2"]["mlflow_run_id"]}
    compare = page.locator("#labyard-runs tr.labyard-runs-row .labyard-runs-compare-previous")
    compare.first.wait_for(timeout=120_000)
    # two runs: only the later one has a previous run
    assert compare.count() == 1, (page.locator("#labyard-runs").count(), page.locator("#labyard-runs tr.labyard-runs-row").count(),
                                  _runs_of(stack, "vision/train.ipynb"))
    row_id = page.locator("#labyard-runs tr.labyard-runs-row", has=page.locator(".labyard-runs-compare-previous")).get_attribute("data-run-id")
    assert row_id in mlflow_ids
    compare.click()
    lr = page.locator(".labyard-diff:visible .labyard-diff-header-table[data-section=parameters] tr[data-name=lr]")
    lr.wait_for(timeout=180_000)
    assert {lr.locator(".labyard-diff-base").inner_text(), lr.locator(".labyard-diff-remote").inner_text()} == {"0.1", "0.5"}
    # two scheduled runs: their output notebooks are compared (the snapshots they started from
    # are the same notebook), so the cell whose output changed is below the header
    changed = page.locator(".labyard-diff:visible .jp-Notebook-diff .jp-Cell-diff:not(.jp-Diff-unchanged)", has_text="trained with lr")
    changed.first.wait_for(timeout=120_000)
    text = changed.first.inner_text()
    assert "accuracy 0.9" in text and "accuracy 0.5" in text
    page.screenshot(path=str(artifacts / "diff-mlflow-runs.png"), full_page=True)
    # "Compare with…", the notebook now (the dialog's first choice): the run executed a snapshot
    # of this very notebook, so nbdime's widget shows every cell unchanged
    row = page.locator("#labyard-runs tr.labyard-runs-row", has=page.locator(".labyard-runs-compare-previous"))
    row.locator(".labyard-runs-compare-with").click()
    dialog = page.locator(".jp-Dialog")
    assert dialog.locator(".labyard-compare-choice option").first.inner_text().startswith("The notebook now")
    dialog.locator(".labyard-compare-choice").select_option("")
    dialog.locator(".jp-Dialog-footer button.jp-mod-accept").click()
    now = page.locator(".labyard-diff:visible", has=page.locator(".labyard-diff-side-remote", has_text=re.compile(r"^train\.ipynb$")))
    now.locator(".labyard-diff-summary").wait_for(timeout=180_000)
    assert now.locator(".labyard-diff-summary").inner_text() == "The notebooks are identical."
    assert "run" in now.locator(".labyard-diff-side-base").inner_text()
    now.locator(".jp-Notebook-diff .jp-Cell-diff").first.wait_for(state="attached", timeout=120_000)
    page.screenshot(path=str(artifacts / "diff-run-vs-notebook.png"), full_page=True)
    page.close()
