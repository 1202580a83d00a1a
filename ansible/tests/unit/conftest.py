"""Load the labyard.cluster filter modules straight from their files."""

import importlib.util
import json
from pathlib import Path

import pytest

ANSIBLE_DIR = Path(__file__).resolve().parents[2]
FILTERS = ANSIBLE_DIR / "collections/ansible_collections/labyard/cluster/plugins/filter"
RECORDED = ANSIBLE_DIR / "tests/recorded"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"labyard_filter_{name}", FILTERS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def gpu():
    return _load("gpu")


@pytest.fixture(scope="session")
def k8s():
    return _load("k8s")


@pytest.fixture(scope="session")
def projects():
    return _load("projects")


@pytest.fixture(scope="session")
def recorded():
    def read(name):
        text = (RECORDED / name).read_text()
        return json.loads(text) if name.endswith(".json") else text

    return read
