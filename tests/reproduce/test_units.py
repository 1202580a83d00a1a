"""The pure parts of reproductions: what a run lacks, input fingerprints, the verdict, recorded parameters."""

from __future__ import annotations

import hashlib

from labyard_hub.scheduler.backend import recorded_parameters
from labyard_hub.scheduler.models import Parameter
from labyard_lab.autolog.reproduce import (compare_inputs, freeze_difference, freeze_lock, missing, reproducible_tag,
                                           verdict)

COMPLETE = {"labyard.notebook_sha256": "a" * 64, "labyard.parameters": "{}", "labyard.flavor": "cpu",
            "labyard.requirements": "environment/requirements.txt", "labyard.mode": "local",
            "labyard.env.lock_sha256": "b" * 64, "labyard.inputs.count": "1", "labyard.inputs_sha256": "c" * 64}


def test_what_a_run_lacks():
    assert missing(COMPLETE) == [] and reproducible_tag(COMPLETE) == "yes"
    k8s = {**COMPLETE, "labyard.mode": "kubernetes"}
    assert missing(k8s) == ["no image digest"]
    assert missing({**k8s, "labyard.image_digest": "sha256:" + "d" * 64}) == []
    gone = {k: v for k, v in COMPLETE.items() if k not in ("labyard.flavor", "labyard.inputs_sha256")}
    assert reproducible_tag({**gone, "labyard.notebook_sha256": "none"}) == \
        "no: no notebook snapshot, no flavour, no input fingerprints"
    assert missing({**COMPLETE, "labyard.inputs.count": "0", "labyard.inputs_sha256": ""}) == []


def test_input_fingerprints_against_the_files_now(tmp_path):
    (tmp_path / "data").mkdir()
    same, edited = tmp_path / "data" / "a.csv", tmp_path / "data" / "b.csv"
    same.write_text("x\n1\n")
    edited.write_text("x\n2\n")
    files = [{"path": "data/a.csv", "size": 4, "sha256": hashlib.sha256(b"x\n1\n").hexdigest()},
             {"path": "data/b.csv", "size": 4, "sha256": hashlib.sha256(b"x\n1\n").hexdigest()},
             {"path": "data/gone.csv", "size": 1, "sha256": "0" * 64},
             {"path": "data/busy.csv", "size": 1, "changed": True},
             {"path": "../outside.csv", "size": 1, "sha256": "0" * 64}]
    assert compare_inputs(files, tmp_path) == {"changed": ["data/b.csv"], "vanished": ["data/gone.csv"],
                                               "unknown": ["data/busy.csv"]}


def test_the_verdict():
    assert verdict({"rmse": 0.25, "system/cpu": 3.0}, {"rmse": 0.25, "system/cpu": 9.0}) == ("reproduced", "1 metrics identical")
    v, detail = verdict({"rmse": 0.25, "r2": 0.9}, {"rmse": 0.26, "acc": 1.0})
    assert v == "differs" and detail == "acc: new (1.0); r2: missing (0.9); rmse: 0.25 -> 0.26 (+0.01, 3.85%)"
    assert verdict({"rmse": 0.25}, {"rmse": 0.26}, tolerance=0.05)[0] == "reproduced"
    assert verdict({"rmse": 0.25}, {}, failed=True)[0] == "failed"


def test_the_environment_lock():
    a = "numpy==2.4.6\nPandas==3.1.1\n"
    assert freeze_lock(a) == freeze_lock("pandas==3.1.1\nnumpy==2.4.6") != freeze_lock(a + "extra==1\n")
    assert freeze_difference(a, "numpy==2.4.7\npandas==3.1.1\nextra==1\n") == ["-numpy==2.4.6", "+extra==1", "+numpy==2.4.7"]


def test_recorded_parameters():
    specs = [Parameter(name="alpha", type="float"), Parameter(name="name", type="str")]
    run = {"data": {"params": [{"key": "alpha", "value": "0.5"}, {"key": "name", "value": "x"},
                               {"key": "fit_intercept", "value": "True"}]}}
    assert recorded_parameters({"labyard.parameters": '{"alpha": 2}'}, run, specs) == {"alpha": 2}
    # a scheduled run recorded before the tag: its params that are the notebook's
    assert recorded_parameters({"labyard.run_kind": "scheduled"}, run, specs) == {"alpha": 0.5, "name": "x"}
    # an interactive run ran the notebook's own values
    assert recorded_parameters({}, run, specs) == {}
