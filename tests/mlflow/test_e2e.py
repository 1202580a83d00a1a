"""Issue 6 "done when", on the real ``labyard up --demo`` in Chromium: alice runs a notebook that
fits a scikit-learn model with no MLflow code; the Runs panel shows the run with its params,
metrics, user and project and a working link into the MLflow UI at /services/mlflow/; the MLflow
REST API (through the hub) shows the labyard.* tags and the notebook artifact."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import requests

from ..support.stack import Stack
from .support import tags_of, wait_for

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent.parent / "artifacts"
FIT = ('import pandas as pd\nfrom sklearn.linear_model import LogisticRegression\n'
       'df = pd.read_csv("train.csv")\nmodel = LogisticRegression(C=0.5, max_iter=200).fit(df[["a", "b"]], df["y"])\nprint("fitted")')
FIT_AGAIN = 'model = LogisticRegression(C=2.0, max_iter=200).fit(df[["a", "b"]], df["y"])\nprint("fitted again")'


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("labyard-mlflow")).start(timeout=240)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is missing: run `make test` as root (it installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                                               "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield b
        b.close()


def put_file(session: requests.Session, base: str, path: str, content: str, kind: str = "file") -> None:
    model = {"type": kind, "format": "text" if kind == "file" else "json", "content": content if kind == "file" else json.loads(content)}
    r = session.put(f"{base}/api/contents/{path}", json=model, timeout=30)
    assert r.status_code in (200, 201), r.text


def test_alice_fit_shows_in_runs_panel_and_mlflow(stack, browser):
    token = stack.token("alice")
    api = requests.Session()
    api.headers["Authorization"] = f"token {token}"
    api.base = f"{stack.url}/hub/api"
    r = api.post(f"{stack.url}/hub/api/users/alice/servers/vision", json={}, timeout=30)
    assert r.status_code in (201, 202), r.text
    stack.wait_ready(api, "alice", "vision", timeout=180)
    server = f"{stack.url}/user/alice/vision"
    rows = "\n".join(f"{i % 7},{(i * 3) % 11},{int(i % 7 > 3)}" for i in range(60))
    put_file(api, server, "train.csv", "a,b,y\n" + rows + "\n")
    nb = {"nbformat": 4, "nbformat_minor": 5, "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
          "cells": [{"cell_type": "code", "id": f"fit{i}", "metadata": {}, "execution_count": None, "outputs": [], "source": src}
                    for i, src in enumerate([FIT, FIT_AGAIN])]}
    put_file(api, server, "fit.ipynb", json.dumps(nb), kind="notebook")
    # the notebook's session (and kernel) exists before the page opens: JupyterLab then reuses it
    # instead of sometimes starting two kernels and dropping one mid-run
    r = api.post(f"{server}/api/sessions", json={"path": "fit.ipynb", "name": "fit.ipynb", "type": "notebook",
                                                 "kernel": {"name": "python3"}}, timeout=60)
    assert r.status_code == 201, r.text

    # MLflow behind the hub: no login, no access
    assert requests.get(f"{stack.url}/services/mlflow/api/2.0/mlflow/experiments/search?max_results=1", timeout=30).status_code == 401

    context = browser.new_context()
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    page.goto(f"{stack.url}/hub/login")
    page.fill("#username_input", "alice")
    page.fill("#password_input", "labyard-demo")
    page.click("#login_submit")
    page.wait_for_url("**/hub/home")
    page.goto(f"{server}/lab/tree/fit.ipynb")
    page.locator(".jp-Notebook").wait_for(timeout=120_000)
    page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=60_000)
    ARTIFACTS.mkdir(exist_ok=True)
    fitted = page.locator(".jp-OutputArea-output", has_text="fitted again")
    deadline = time.monotonic() + 240
    dialogs: list[str] = []
    page.locator("#jp-main-statusbar", has_text="Idle").first.wait_for(timeout=120_000)
    clicked = False
    last_click = 0.0
    last_prompts: list[str] = []
    while not fitted.is_visible():
        prompts = page.locator(".jp-Notebook .jp-Cell .jp-InputPrompt").all_inner_texts()
        assert time.monotonic() < deadline, f"the cells did not run; prompts {prompts}; dialogs {dialogs}"
        dialog = page.locator(".jp-Dialog")
        if dialog.count() and dialog.first.is_visible():  # e.g. a kernel choice: take the default
            dialogs.append(dialog.first.inner_text())
            page.screenshot(path=str(ARTIFACTS / "e2e-dialog.png"))
            dialog.first.locator(".jp-mod-accept").first.click()
            clicked = any(p.strip() not in ("[ ]:", "") for p in prompts)  # run again only if nothing ran
            continue
        if prompts != last_prompts:
            last_prompts, last_click = prompts, time.monotonic()
        elif clicked and not any("*" in p for p in prompts) and time.monotonic() - last_click > 30:
            clicked = False  # nothing queued or running, and no progress: run the cells again
        if not clicked:  # Run > Run All Cells, once (each run of the cells makes two MLflow runs)
            page.locator(".jp-Notebook .jp-Cell").first.click()
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
            clicked, last_click = True, time.monotonic()
        time.sleep(2)
    outputs = page.locator(".jp-OutputArea-output").all_inner_texts()
    assert not any("Traceback" in o for o in outputs), outputs

    # the MLflow REST API, through the hub with alice's token
    mlflow = f"{stack.url}/services/mlflow"

    def finished_run():
        r = api.get(f"{mlflow}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": "vision/fit.ipynb"}, timeout=30)
        if r.status_code != 200:
            return None
        exp_id = r.json()["experiment"]["experiment_id"]
        runs = api.post(f"{mlflow}/api/2.0/mlflow/runs/search", json={"experiment_ids": [exp_id]}, timeout=30).json().get("runs", [])
        cs = {p["value"] for r in runs for p in r["data"]["params"] if p["key"] == "C"}
        if not {"0.5", "2.0"} <= cs or any(r["info"]["status"] != "FINISHED" for r in runs):
            return None
        for r in runs:
            files = api.get(f"{mlflow}/api/2.0/mlflow/artifacts/list", params={"run_id": r["info"]["run_id"], "path": "notebook"}, timeout=30).json()
            if not files.get("files"):
                return None
        return exp_id, next(r for r in runs if {"key": "C", "value": "0.5"} in r["data"]["params"]), runs

    exp_id, run, runs = wait_for(finished_run, 120, 1, what="two runs with notebook artifacts through /services/mlflow/")
    time.sleep(3)  # the syncer has finished the runs: nothing it printed may be in the notebook
    outputs = page.locator(".jp-OutputArea-output").all_inner_texts()
    assert not any("View run" in o or "Traceback" in o for o in outputs), outputs
    tags = tags_of(run)
    assert tags["labyard.user"] == "alice" and tags["labyard.project"] == "vision" and tags["labyard.notebook"] == "fit.ipynb"
    assert len(tags["labyard.notebook_sha256"]) == 64

    # the Runs panel
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "runs-panel-console.log").write_text("\n".join(console))
    page.click("[title='MLflow runs of this notebook']")
    page.locator(".labyard-runs-row").first.wait_for(timeout=60_000)
    wait_for(lambda: page.locator(".labyard-runs-row").count() == len(runs), 60, what="every run in the Runs panel")
    other = next(r for r in runs if {"key": "C", "value": "2.0"} in r["data"]["params"])
    row = page.locator(f".labyard-runs-row[data-run-id='{run['info']['run_id']}']")
    assert row.locator(".labyard-runs-user").inner_text() == "alice"
    assert "C=0.5" in row.locator(".labyard-runs-params").inner_text()
    assert "training_" in row.locator(".labyard-runs-metrics").inner_text()
    assert "FINISHED" in row.inner_text()
    for rid in (run["info"]["run_id"], other["info"]["run_id"]):
        page.locator(f".labyard-runs-row[data-run-id='{rid}'] input[type=checkbox]").check()
    differs = page.locator(".labyard-runs-compare tr[data-key='Params:C']")
    assert "labyard-runs-differs" in differs.get_attribute("class")
    assert differs.locator("td").all_inner_texts()[1:] in (["0.5", "2.0"], ["2.0", "0.5"])
    assert "labyard-runs-differs" not in (page.locator(".labyard-runs-compare tr[data-key='Params:max_iter']").get_attribute("class") or "")
    page.screenshot(path=str(ARTIFACTS / "runs-panel-alice.png"))
    # the panel's API refuses paths outside the project
    assert api.get(f"{server}/labyard/runs", params={"notebook": "../nlp/x.ipynb"}, timeout=30).status_code == 400
    href = row.locator(".labyard-runs-link").get_attribute("href")
    assert href == f"/services/mlflow/#/experiments/{exp_id}/runs/{run['info']['run_id']}"

    # the link works: the MLflow UI loads behind the hub login and shows the run
    ui = context.new_page()
    response = ui.goto(f"{stack.url}{href}")
    assert response.status == 200
    ui.wait_for_url("**/services/mlflow/**")
    ui.get_by_text(run["info"]["run_name"]).first.wait_for(timeout=90_000)
    ui.screenshot(path=str(ARTIFACTS / "mlflow-ui-run.png"))
    # the UI's own XHRs work with the login cookie; the same request from another site is refused
    cookies = {c["name"]: c["value"] for c in context.cookies() if c["path"].startswith("/services/mlflow")}
    assert cookies, context.cookies()
    search = f"{stack.url}/services/mlflow/ajax-api/2.0/mlflow/experiments/search"
    for site, expected in (("cross-site", 403), ("same-origin", 200)):
        r = requests.post(search, json={"max_results": 1}, cookies=cookies, timeout=30,
                          headers={"Sec-Fetch-Site": site, "Sec-Fetch-Mode": "cors"})
        assert r.status_code == expected, (site, r.status_code, r.text[:200])
    cross = ui.evaluate("""async () => (await fetch('ajax-api/2.0/mlflow/experiments/search', {method: 'POST',
        headers: {'Content-Type': 'application/json'}, body: JSON.stringify({max_results: 1})})).status""")
    assert cross == 200  # same-origin XHR of the UI itself works
    context.close()
