"""Fixtures for the scheduler: a real local backend on a temporary data dir (real papermill runs)."""

from __future__ import annotations

import asyncio
import time

import pytest

from labyard_hub import demo
from labyard_hub.access import Access, StaticIdentities
from labyard_hub.projects import Identity, Project
from labyard_hub.scheduler.local import LocalBackend

from . import notebooks


VISION, NLP = Project(name="vision", gid=20001), Project(name="nlp", gid=20002)
DEMO_IDENTITIES = {
    "alice": Identity(username="alice", uid=10001, gid=10000, projects=(VISION, NLP)),
    "bob": Identity(username="bob", uid=10002, gid=10000, projects=(VISION,)),
    "carol": Identity(username="carol", uid=10003, gid=10000, projects=(NLP,)),
}


@pytest.fixture
def identities():
    return dict(DEMO_IDENTITIES)


def make_backend(tmp_path, identities=None, policy=None, **kwargs) -> LocalBackend:
    """A local backend whose users are ``identities`` (a StaticIdentities; the demo's by default)."""
    return LocalBackend(Access(policy or demo.policy(), gpus=False), tmp_path / "scheduler", tmp_path / "projects",
                        tick=0.3, identities=identities or StaticIdentities(DEMO_IDENTITIES), **kwargs)


@pytest.fixture
async def backend(tmp_path):
    notebooks.write(tmp_path / "projects" / "vision" / "train.ipynb", notebooks.training(fail_at_epoch=5))
    b = make_backend(tmp_path)
    await b.start()
    yield b
    await b.stop()


async def wait_finished(backend, identity, run_id, timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = await backend.get_run(identity, run_id)
        if run.status.finished:
            return run
        await asyncio.sleep(0.2)
    raise TimeoutError(f"run {run_id} not finished in {timeout}s: {run}")
