"""Fixtures for the scheduler: a real local backend on a temporary data dir (real papermill runs)."""

from __future__ import annotations

import asyncio
import time

import pytest

from labyard_hub import demo
from labyard_hub.projects import Identity, Project
from labyard_hub.scheduler.local import LocalBackend

from . import notebooks


@pytest.fixture
def identities():
    vision, nlp = Project(name="vision", gid=20001), Project(name="nlp", gid=20002)
    return {
        "alice": Identity(username="alice", uid=10001, gid=10000, projects=(vision, nlp)),
        "bob": Identity(username="bob", uid=10002, gid=10000, projects=(vision,)),
        "carol": Identity(username="carol", uid=10003, gid=10000, projects=(nlp,)),
    }


def make_backend(tmp_path, **kwargs) -> LocalBackend:
    policy = demo.policy()
    return LocalBackend(policy, tmp_path / "scheduler", tmp_path / "projects",
                        available_flavors=[f for f in policy.flavors.values() if f.gpus == 0], tick=0.3, **kwargs)


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
