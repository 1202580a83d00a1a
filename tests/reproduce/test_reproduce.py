"""Issue 15 "done when", on a real ``labyard up --demo`` (hub, proxy, slapd, the MLflow gate,
labyard-scheduler, alice's server and kernels): alice fits a seeded scikit-learn model
interactively (an autolog run) and in a scheduled run; a week of other work later (the notebook
edited, another package installed, then the input CSV changed) "Reproduce" gives ``reproduced``
with identical metrics while the data is unchanged and names the changed CSV when it is not;
"Reproduce with changes" gives a linked run whose comparison shows the parameter and metric
differences; bob cannot reproduce an nlp run; malformed requests are 400 with a message.

"Another package installed" is a ``.dist-info`` directory written into this venv's
site-packages (what ``pip install`` leaves and what the environment lock, the sha256 of the pip
freeze, reads), removed at the end: a real ``pip install`` would need the network.
"""

from __future__ import annotations

import json
import shutil
import sysconfig
import time
from pathlib import Path

import nbformat
import numpy as np
import pytest
import requests
from nbformat.v4 import new_code_cell, new_notebook

from ..diff.test_platform import Lab, wait_recorded
from ..mlflow.support import tags_of, wait_for
from ..scheduler.test_service import wait_run, wait_service
from ..support.kernel import Kernel
from ..support.stack import Stack

pytestmark = pytest.mark.slow

FIT = ('import numpy as np, pandas as pd, mlflow\nfrom sklearn.linear_model import Ridge\n'
       'data = pd.read_csv("data/train.csv")\nX, y = data[["x1", "x2"]], data["y"]\n'
       'with mlflow.start_run():\n'
       '    model = Ridge(alpha=alpha, random_state=0).fit(X, y)\n'
       '    rmse = float(np.sqrt(np.mean((model.predict(X) - y) ** 2)))\n'
       '    mlflow.log_metric("rmse", rmse)\n'
       'print("rmse", rmse)')
FAKE_PACKAGE = "labyard_repro_test_pkg-1.0.dist-info"


def notebook() -> dict:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [new_code_cell("alpha = 1.0", metadata={"tags": ["parameters"]}), new_code_cell(FIT)]
    return nb


def write_csv(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(80, 2))
    y = x @ [1.5, -2.0] + rng.normal(scale=0.3, size=80)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x1,x2,y\n" + "".join(f"{a:.6f},{b:.6f},{c:.6f}\n" for (a, b), c in zip(x, y)))


def results(run: dict) -> dict[str, float]:
    return {m["key"]: m["value"] for m in run["data"]["metrics"] if not m["key"].startswith("system/")}


class Mlflow:
    def __init__(self, stack: Stack, api: requests.Session):
        self.api, self.base = api, f"{stack.url}/services/mlflow/api/2.0/mlflow"

    def run(self, run_id: str) -> dict:
        r = self.api.get(f"{self.base}/runs/get", params={"run_id": run_id}, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["run"]

    def runs(self, experiment: str) -> list[dict]:
        r = self.api.get(f"{self.base}/experiments/get-by-name", params={"experiment_name": experiment}, timeout=30)
        if r.status_code != 200:
            return []
        exp = r.json()["experiment"]["experiment_id"]
        return self.api.post(f"{self.base}/runs/search", json={"experiment_ids": [exp]}, timeout=30).json().get("runs", [])


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("labyard-reproduce")).start(timeout=240)
    for project in ("vision", "nlp"):
        d = s.data_dir / "projects" / project
        d.mkdir(parents=True, exist_ok=True)
        nbformat.write(nbformat.from_dict(notebook()), str(d / "fit.ipynb"))
        write_csv(d / "data" / "train.csv", seed=7)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def alice(stack):
    """alice's API session, with the scheduler's API URL (once it answers) as ``alice.scheduler``."""
    session = stack.api("alice")
    session.scheduler = wait_service(stack, session)
    return session


@pytest.fixture(scope="module")
def base(alice):
    return alice.scheduler


@pytest.fixture(scope="module")
def alice_vision(stack):
    return Lab(stack, "alice", "vision")


@pytest.fixture(scope="module")
def originals(stack, alice, base, alice_vision):
    """alice's interactive autolog run of fit.ipynb (in a kernel of her vision server, opened as
    the notebook's session), her scheduled run of it, and her scheduled nlp run."""
    scheduled = alice.post(f"{base}/schedules", json={"project": "vision", "notebook": "fit.ipynb",
                                                      "parameters": {"alpha": 1.0}})
    nlp = alice.post(f"{base}/schedules", json={"project": "nlp", "notebook": "fit.ipynb"})
    assert scheduled.status_code == 201 and nlp.status_code == 201, (scheduled.text, nlp.text)
    token = stack.token("alice")
    server = f"{stack.url}/user/alice/vision/"
    r = requests.post(f"{server}api/sessions", json={"path": "fit.ipynb", "name": "fit.ipynb", "type": "notebook",
                                                     "kernel": {"name": "python3"}},
                      headers={"Authorization": f"token {token}"}, timeout=60)
    assert r.status_code == 201, r.text
    kernel = Kernel.__new__(Kernel)
    kernel.server_url, kernel.token, kernel.headers = server, token, {"Authorization": f"token {token}"}
    kernel.id = r.json()["kernel"]["id"]
    for cell in notebook().cells:
        out = kernel.execute(cell.source, timeout=300)
        assert out["status"] == "ok", out
    mlflow = Mlflow(stack, alice)

    def interactive():
        found = [r for r in mlflow.runs("vision/fit.ipynb") if "labyard.run_kind" not in tags_of(r)
                 and r["info"]["status"] == "FINISHED" and "labyard.inputs_sha256" in tags_of(r)
                 and "rmse" in results(r)]
        return found[0] if found else None

    interactive_run = wait_for(interactive, 180, 1, what="alice's interactive run in MLflow")
    kernel.shutdown()
    return {"interactive": interactive_run,
            "scheduled": mlflow.run(wait_recorded(alice, base, scheduled.json()["run"]["id"], 300)["mlflow_run_id"]),
            "nlp": mlflow.run(wait_recorded(alice, base, nlp.json()["run"]["id"], 300)["mlflow_run_id"])}


@pytest.fixture(scope="module")
def week_later(stack, originals):
    """The notebook edited, another package installed (a .dist-info in this venv, removed after)."""
    path = stack.data_dir / "projects" / "vision" / "fit.ipynb"
    nb = nbformat.read(str(path), as_version=4)
    nb.cells[0].source = "alpha = 3.0"
    nb.cells.append(new_code_cell("print('more work')"))
    nbformat.write(nb, str(path))
    dist = Path(sysconfig.get_paths()["purelib"]) / FAKE_PACKAGE
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: labyard-repro-test-pkg\nVersion: 1.0\n")
    yield
    shutil.rmtree(dist, ignore_errors=True)


def reproduce(api: requests.Session, base: str, body: dict) -> requests.Response:
    return api.post(f"{base}/runs", json=body, timeout=120)


def judged(stack: Stack, api: requests.Session, base: str, run: dict) -> dict:
    """The reproduction's MLflow run once finished, with its verdict."""
    done = wait_recorded(api, base, run["id"], 300)
    mlflow = Mlflow(stack, api)
    return wait_for(lambda: (r := mlflow.run(done["mlflow_run_id"])) and "labyard.verdict" in tags_of(r) and r,
                    120, 1, what="the verdict tag")


def test_what_runs_record(originals):
    for kind in ("interactive", "scheduled"):
        tags = tags_of(originals[kind])
        assert tags["labyard.reproducible"] == "yes", (kind, tags)
        assert tags["labyard.flavor"] == "cpu" and tags["labyard.mode"] == "local"
        assert len(tags["labyard.env.lock_sha256"]) == 64 and tags["labyard.requirements"]
        assert tags["labyard.inputs.count"] == "1" and tags["labyard.inputs_sha256"]
    assert json.loads(tags_of(originals["interactive"])["labyard.parameters"]) == {}
    assert json.loads(tags_of(originals["scheduled"])["labyard.parameters"]) == {"alpha": 1.0}
    # the interactive run had sklearn's autolog; the scheduled one the notebook's own metric
    assert "training_score" in results(originals["interactive"]) and "rmse" in results(originals["scheduled"])


def test_reproduce_each_original_a_week_later(stack, alice, base, originals, week_later):
    # the environment changed: refused by default, naming the package; "warn" runs it anyway
    refused = reproduce(alice, base, {"reproduce": originals["interactive"]["info"]["run_id"]})
    assert refused.status_code == 409 and "+labyard-repro-test-pkg==1.0" in refused.json()["message"], refused.text
    started = {}
    for kind in ("interactive", "scheduled"):
        r = reproduce(alice, base, {"reproduce": originals[kind]["info"]["run_id"], "environment": "warn"})
        assert r.status_code == 201, r.text
        run = r.json()
        assert run["owner"] == "alice" and run["project"] == "vision" and run["notebook"] == "fit.ipynb"
        assert run["reproduce"]["of"] == originals[kind]["info"]["run_id"] and run["reproduce"]["changed_inputs"] == []
        assert "labyard-repro-test-pkg" in " ".join(run["reproduce"]["warnings"])
        started[kind] = run
    for kind, run in started.items():
        new = judged(stack, alice, base, run)
        tags = tags_of(new)
        assert tags["labyard.verdict"] == "reproduced", (kind, tags.get("labyard.verdict.detail"))
        assert tags["labyard.reproduces"] == originals[kind]["info"]["run_id"]
        assert tags["labyard.reproduce.changes"] == "none" and tags["labyard.reproduce.inputs"] == "unchanged"
        assert results(new) == results(originals[kind]), kind  # identical, not close
        # the snapshot ran, not the edited notebook (alpha 3.0 there now)
        assert tags["labyard.notebook_sha256"] == tags_of(originals[kind])["labyard.notebook_sha256"]


@pytest.mark.browser
def test_reproduce_with_changes_in_chromium(stack, alice, originals, week_later, alice_vision, browser):
    """alice, in Chromium: the Runs panel of fit.ipynb, "Reproduce…" on her scheduled run, alpha
    2.0 in the dialog and "run even if the environment differs"; the comparison view opens on
    original vs reproduction (alpha 1.0 → 2.0 above the cells) and the reproduction is listed under
    its original with its verdict."""
    artifacts = Path(__file__).parent.parent / "artifacts"
    artifacts.mkdir(exist_ok=True)
    original = originals["scheduled"]["info"]["run_id"]
    page = browser.new_page(viewport={"width": 1500, "height": 950})
    stack.browser_login(page, "alice")
    page.goto(f"{alice_vision.url}/lab/tree/fit.ipynb")
    page.locator(".jp-NotebookPanel .jp-Cell").first.wait_for(timeout=180_000)
    if not page.locator("#labyard-runs").is_visible():
        page.locator(".lm-TabBar-tab[data-id='labyard-runs']").click()
    row = page.locator(f"#labyard-runs tr.labyard-runs-row[data-run-id='{original}']")
    row.wait_for(timeout=120_000)
    assert row.locator(".labyard-runs-not-reproducible").count() == 0
    row.locator(".labyard-runs-reproduce").click()
    dialog = page.locator(".jp-Dialog")
    dialog.locator(".labyard-reproduce-parameters").fill('{"alpha": 2.0}')
    dialog.locator(".labyard-reproduce-warn").check()
    dialog.locator(".jp-Dialog-footer button.jp-mod-accept").click()
    page.locator("#labyard-runs .labyard-runs-notice", has_text="Reproducing").wait_for(timeout=60_000)
    alpha = page.locator(".labyard-diff:visible .labyard-diff-header-table[data-section=parameters] tr[data-name=alpha]")
    alpha.wait_for(timeout=420_000)
    assert alpha.locator(".labyard-diff-base").inner_text() == "1.0" and alpha.locator(".labyard-diff-remote").inner_text() == "2.0"
    assert page.locator(".labyard-diff:visible .labyard-diff-header-table[data-section=metrics] tr[data-name=rmse]").count() == 1
    # listed under its original (after the unchanged reproduction of the test before), with its verdict
    reproductions = page.locator(f"#labyard-runs tr.labyard-runs-reproduction[data-reproduces='{original}']")
    changed = reproductions.filter(has=page.locator(".labyard-runs-verdict", has_text="differs: rmse"))
    changed.wait_for(timeout=60_000)
    assert reproductions.filter(has=page.locator(".labyard-runs-verdict", has_text="reproduced")).count() == 1
    order = page.locator("#labyard-runs tr.labyard-runs-row").evaluate_all("rows => rows.map(r => r.dataset.runId)")
    assert order[order.index(original) + 2] == changed.get_attribute("data-run-id"), order
    page.screenshot(path=str(artifacts / "reproduce-comparison.png"), full_page=True)
    page.close()


def test_changed_data_and_reproduce_with_changes(stack, alice, base, originals, week_later, alice_vision):
    write_csv(stack.data_dir / "projects" / "vision" / "data" / "train.csv", seed=8)
    original = originals["scheduled"]["info"]["run_id"]
    refused = reproduce(alice, base, {"reproduce": original, "environment": "warn"})
    assert refused.status_code == 409 and "data/train.csv (changed)" in refused.json()["message"], refused.text
    r = reproduce(alice, base, {"reproduce": original, "environment": "warn", "use_current_data": True,
                                "parameters": {"alpha": 0.5}})
    assert r.status_code == 201, r.text
    assert r.json()["reproduce"]["changed_inputs"] == ["data/train.csv (changed)"]
    assert r.json()["parameters"] == {"alpha": 0.5}
    new = judged(stack, alice, base, r.json())
    tags = tags_of(new)
    assert tags["labyard.reproduces"] == original
    assert tags["labyard.reproduce.changes"] == "parameters: alpha=0.5 (was 1.0); use_current_data"
    assert tags["labyard.reproduce.inputs"] == "data/train.csv (changed)"
    assert tags["labyard.verdict"] == "differs" and "rmse:" in tags["labyard.verdict.detail"], tags
    # the comparison view's request (what the Runs panel opens): parameters and metrics differ
    cmp = alice_vision.diff({"kind": "mlflow", "run_id": original, "artifact": "output"},
                            {"kind": "mlflow", "run_id": new["info"]["run_id"], "artifact": "output"})
    assert cmp.status_code == 200, cmp.text
    header = cmp.json()["header"]
    alpha = {p["name"]: p for p in header["parameters"]}["alpha"]
    assert (alpha["base"], alpha["remote"], alpha["change"]) == ("1.0", "0.5", "changed")  # MLflow params are text
    assert {m["name"]: m for m in header["metrics"]}["rmse"]["change"] == "changed"
    # the Runs panel's data: the reproduction's tags link it to its original
    panel = alice_vision.session.get(f"{alice_vision.url}/labyard/runs", params={"notebook": "fit.ipynb"}, timeout=60)
    rows = {x["run_id"]: x for x in panel.json()["runs"]}
    assert rows[new["info"]["run_id"]]["tags"]["labyard.reproduces"] == original
    assert rows[original]["reproducible"] == [], rows[original]


def test_refusals(stack, alice, base, originals):
    bob = stack.api("bob")
    nlp = originals["nlp"]["info"]["run_id"]
    r = reproduce(bob, base, {"reproduce": nlp})
    assert r.status_code == 403 and "not a member of project 'nlp'" in r.json()["message"], r.text
    for body, words in [
        ({"reproduce": "not-a-run"}, "reproduce"),
        ({"reproduce": nlp, "tolerance": -1}, "tolerance"),
        ({"reproduce": nlp, "environment": "maybe"}, "environment"),
        ({"reproduce": nlp, "surprise": 1}, "surprise"),
        ({"parameters": {}}, "reproduce"),
        ([nlp], "reproduce"),
    ]:
        r = reproduce(alice, base, body)
        assert r.status_code == 400 and words in r.json()["message"], (body, r.text)
    r = alice.post(f"{base}/runs", data=b"{not json", timeout=30)
    assert r.status_code == 400 and "not JSON" in r.json()["message"]
    r = reproduce(alice, base, {"reproduce": "0" * 32})
    assert r.status_code == 404, r.text
    # a parameter the notebook does not have
    r = reproduce(alice, base, {"reproduce": nlp, "parameters": {"beta": 1}, "environment": "warn", "use_current_data": True})
    assert r.status_code == 400 and "beta" in r.json()["message"], r.text
