"""In Chromium: alice opens a notebook, clicks Schedule, runs it now with epochs=3, opens the output."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ..support.stack import Stack
from . import notebooks

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ARTIFACTS = Path(__file__).parent.parent / "artifacts"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("labyard-schedule-browser")).start()
    nb = s.data_dir / "projects" / "vision" / "train.ipynb"
    notebooks.write(nb, notebooks.training())
    if os.geteuid() == 0:  # alice's, as if she had made it (the Schedule button saves it first)
        os.chown(nb, 10001, 20001)  # alice's uidNumber, vision's gidNumber in the demo directory
        nb.chmod(0o660)
    yield s
    s.stop()


def test_schedule_run_now_and_open_output(browser, stack):
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(f"{stack.url}/hub/login")
    page.fill("#username_input", "alice")
    page.fill("#password_input", "labyard-demo")
    page.click("#login_submit")
    page.wait_for_url("**/hub/home")
    page.click("#start-vision")
    page.wait_for_url("**/user/alice/vision/lab**", timeout=120_000)
    page.goto(f"{stack.url}/user/alice/vision/lab/tree/train.ipynb")
    button = page.locator(".labyard-schedule-button").first
    button.wait_for(timeout=120_000)
    button.click()
    dialog = page.locator(".labyard-schedule-dialog")
    dialog.wait_for(timeout=60_000)
    # parameters come from the server with their types and defaults
    epochs = dialog.locator("input[data-param=epochs]")
    assert epochs.input_value() == "1" and epochs.get_attribute("data-type") == "int"
    assert dialog.locator("input[data-param=layers]").input_value() == "[1,2]"
    epochs.fill("3")
    dialog.locator("select[name=when]").select_option("0 2 * * *")
    assert "every day at 02:00" in dialog.locator(".labyard-cron-preview").inner_text()
    dialog.locator("select[name=when]").select_option("now")
    page.screenshot(path=str(ARTIFACTS / "schedule-dialog.png"))
    page.locator(".jp-Dialog-footer button.jp-mod-accept").click()
    # the side panel opens; the run goes to succeeded
    run = page.locator("#labyard-scheduled-runs .labyard-run[data-status=succeeded]").first
    run.wait_for(timeout=180_000)
    page.screenshot(path=str(ARTIFACTS / "scheduled-runs-panel.png"))
    run.locator(".labyard-run-open").click()
    # the output notebook opens in JupyterLab, with the injected parameters
    tab = page.locator(".lm-TabBar-tab", has_text="r-")
    tab.first.wait_for(timeout=60_000)
    page.locator(".jp-Notebook .jp-Cell", has_text="epochs = 3").first.wait_for(timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "scheduled-run-output.png"))
    outputs = list((stack.data_dir / "projects" / "vision" / "scheduled-runs" / "train").glob("r-*.ipynb"))
    assert len(outputs) == 1
    nb = json.loads(outputs[0].read_text())
    assert any("epochs = 3" in "".join(c["source"]) for c in nb["cells"])
    page.close()
