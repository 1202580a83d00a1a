"""The demo in a real Chromium: log in, see the projects, start one, JupyterLab opens in it."""

from __future__ import annotations

from pathlib import Path

import pytest

from .support.stack import Stack

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ARTIFACTS = Path(__file__).parent / "artifacts"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("labyard-browser")).start()
    yield s
    s.stop()


def log_in(page, stack, username):
    page.goto(f"{stack.url}/hub/login")
    page.fill("#username_input", username)
    page.fill("#password_input", "labyard-demo")
    page.click("#login_submit")
    page.wait_for_url("**/hub/home")


def test_alice_starts_vision_and_jupyterlab_opens(browser, stack):
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page()
    log_in(page, stack, "alice")
    rows = page.locator("#labyard-projects tr.home-server-row")
    assert sorted(rows.evaluate_all("rows => rows.map(r => r.dataset.serverName)")) == ["nlp", "vision"]
    page.screenshot(path=str(ARTIFACTS / "home-alice.png"))
    page.click("#start-vision")
    page.wait_for_url("**/user/alice/vision/lab**", timeout=90_000)
    # our extension's status item proves the frontend loaded and talks to the server extension
    status = page.locator(".labyard-status")
    status.wait_for(timeout=60_000)
    assert "vision" in status.inner_text()
    page.screenshot(path=str(ARTIFACTS / "lab-alice-vision.png"))
    page.close()


def test_bob_sees_only_vision(browser, stack):
    page = browser.new_page()
    log_in(page, stack, "bob")
    names = page.locator("#labyard-projects tr.home-server-row").evaluate_all("rows => rows.map(r => r.dataset.serverName)")
    assert names == ["vision"]
    page.goto(f"{stack.url}/hub/spawn/bob/nlp")
    assert "not a member of project 'nlp'" in page.content()
    page.close()
