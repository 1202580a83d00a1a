"""The gate's rules, decided on a real MLflow store (MLflow's SQL store on sqlite, as the server
uses it) with the real access rules; no server and no hub needed."""

from __future__ import annotations

import pytest

from labyard_hub.access import Access, load_policy
from labyard_hub.mlflow_gate.objects import Objects, Refused, project_of_experiment, project_of_model
from labyard_hub.mlflow_gate.routes import ROUTES
from labyard_hub.mlflow_gate.rules import Decision, Request
from labyard_hub.projects import Identity, Project

VISION, NLP = Project(name="vision", gid=20001), Project(name="nlp", gid=20002)
ALICE = Identity(username="alice", projects=(VISION, NLP))
BOB = Identity(username="bob", projects=(VISION,))
CAROL = Identity(username="carol", projects=(NLP,))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from mlflow.entities import RunTag
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    root = tmp_path_factory.mktemp("store")
    store = SqlAlchemyStore(f"sqlite:///{root / 'mlflow.db'}", str(root / "artifacts"))
    nlp = store.create_experiment("nlp/secret.ipynb", tags=[])
    store.set_experiment_tag(nlp, __import__("mlflow").entities.ExperimentTag("labyard.user", "alice"))
    vision = store.create_experiment("vision/fit.ipynb")
    run = store.create_run(nlp, "alice", 0, [RunTag("mlflow.user", "alice")], "r").info.run_id
    bobs = store.create_run(vision, "bob", 0, [], "b").info.run_id
    return {"store": store, "nlp": nlp, "vision": vision, "run": run, "bobs": bobs, "objects": Objects(store=store)}


def decide(world, who: Identity, key: str, *, params=None, query=None, body=None):
    rule = ROUTES[key]
    req = Request(key.split()[0], key.split()[1], params or {}, {k: v if isinstance(v, list) else [v] for k, v in (query or {}).items()},
                  body)
    rule.authorize(req, Decision(who, Access(load_policy(None)), world["objects"]))
    return rule, req


def refused(world, who, key, **kw) -> Refused:
    with pytest.raises(Refused) as e:
        decide(world, who, key, **kw)
    return e.value


def test_project_of_names():
    assert project_of_experiment("vision/a/b.ipynb") == "vision"
    for name in ("Default", "/x", "vision/", "Vision/x", "vi sion/x", None):
        assert project_of_experiment(name) is None
    assert project_of_model("nlp.classifier") == "nlp" and project_of_model("classifier") is None


def test_every_field_mlflow_may_read_is_checked(world):
    """bob asks for his own run in the query and alice's in the body (or camelCase): refused."""
    e = refused(world, BOB, "GET /api/2.0/mlflow/runs/get", query={"run_id": world["bobs"]}, body={"runUuid": world["run"]})
    assert e.status == 403 and e.message == "bob is not a member of project 'nlp'"
    e = refused(world, BOB, "POST /api/2.0/mlflow/runs/delete", body={"runId": world["run"]})
    assert e.status == 403
    decide(world, BOB, "GET /api/2.0/mlflow/runs/get", query={"run_id": world["bobs"]})  # his own: fine


def test_nested_and_listed_fields(world):
    e = refused(world, BOB, "POST /api/3.0/mlflow/traces/search",
                body={"locations": [{"mlflow_experiment": {"experiment_id": world["vision"]}},
                                    {"mlflowExperiment": {"experimentId": world["nlp"]}}]})
    assert e.status == 403
    decide(world, BOB, "POST /api/3.0/mlflow/traces/search", body={"locations": [{"mlflow_experiment": {"experiment_id": world["vision"]}}]})
    e = refused(world, BOB, "POST /api/3.0/mlflow/traces",
                body={"trace": {"trace_info": {"trace_location": {"mlflow_experiment": {"experiment_id": world["nlp"]}}}}})
    assert e.status == 403
    assert refused(world, BOB, "POST /api/2.0/mlflow/runs/search", body={"experiment_ids": []}).status == 400


def test_malformed_input_is_400_with_a_message(world):
    e = refused(world, BOB, "GET /api/2.0/mlflow/runs/get", body={"run_id": {"$ne": 1}})
    assert e.status == 400 and "must be a string" in e.message
    e = refused(world, BOB, "GET /api/2.0/mlflow/runs/get")
    assert e.status == 400 and "run_id or run_uuid is required" in e.message
    e = refused(world, BOB, "GET /api/2.0/mlflow-artifacts/artifacts/<path:artifact_path>",
                params={"artifact_path": f"{world['vision']}/../{world['nlp']}/x"})
    assert e.status == 400 and "invalid artifact path" in e.message
    assert refused(world, BOB, "GET /api/2.0/mlflow/experiments/get", query={"experiment_id": "999"}).status == 404


def test_owner_rules(world):
    # carol (nlp) sees alice's run but does not change it; alice does
    decide(world, CAROL, "GET /api/2.0/mlflow/runs/get", query={"run_id": world["run"]})
    e = refused(world, CAROL, "POST /api/2.0/mlflow/runs/update", body={"run_id": world["run"]})
    assert e.status == 403 and "only alice (the owner)" in e.message
    decide(world, ALICE, "POST /api/2.0/mlflow/runs/update", body={"run_id": world["run"]})
    # an artifact's owner is its run's; its path must agree with the run's experiment
    path = f"{world['nlp']}/{world['run']}/artifacts/x.txt"
    assert refused(world, CAROL, "PUT /api/2.0/mlflow-artifacts/artifacts/<path:artifact_path>", params={"artifact_path": path}).status == 403
    decide(world, ALICE, "PUT /api/2.0/mlflow-artifacts/artifacts/<path:artifact_path>", params={"artifact_path": path})
    e = refused(world, BOB, "PUT /api/2.0/mlflow-artifacts/artifacts/<path:artifact_path>",
                params={"artifact_path": f"{world['vision']}/{world['run']}/artifacts/x.txt"})
    assert e.status == 403 and "mixes experiment" in e.message
    # the experiment's owner renames it, within the project only
    decide(world, ALICE, "POST /api/2.0/mlflow/experiments/update", body={"experiment_id": world["nlp"], "new_name": "nlp/other"})
    e = refused(world, ALICE, "POST /api/2.0/mlflow/experiments/update", body={"experiment_id": world["nlp"], "new_name": "vision/x"})
    assert e.status == 403 and "out of project 'nlp'" in e.message
    assert "owner" in refused(world, CAROL, "POST /api/2.0/mlflow/experiments/delete", body={"experiment_id": world["nlp"]}).message


def test_objects_of_no_project_are_for_admins(world):
    e = refused(world, ALICE, "POST /api/2.0/mlflow/runs/create", body={"experiment_id": "0"})
    assert e.status == 403 and "belongs to no project" in e.message
    assert refused(world, ALICE, "POST /api/2.0/mlflow/registered-models/create", body={"name": "classifier"}).status == 403


def test_authorship_rewrites(world):
    rule, req = decide(world, BOB, "POST /api/2.0/mlflow/runs/create", body={
        "experiment_id": world["vision"], "userId": "alice", "user_id": "alice",
        "tags": [{"key": "mlflow.user", "value": "alice"}, {"key": "labyard.user", "value": "alice"}, {"key": "x", "value": "1"}]})
    body = rule.rewrite(req, BOB)
    assert body["user_id"] == "bob" and "userId" not in body
    assert sorted((t["key"], t["value"]) for t in body["tags"]) == [("labyard.user", "bob"), ("mlflow.user", "bob"), ("x", "1")]
    rule, req = decide(world, BOB, "POST /api/2.0/mlflow/runs/log-batch",
                       body={"run_id": world["bobs"], "tags": [{"key": "labyard.user", "value": "alice"}, {"key": "y", "value": "2"}]})
    assert rule.rewrite(req, BOB)["tags"] == [{"key": "y", "value": "2"}]
    assert refused(world, BOB, "POST /api/2.0/mlflow/runs/set-tag",
                   body={"run_id": world["bobs"], "key": "mlflow.user", "value": "alice"}).status == 403
    rule, req = decide(world, BOB, "POST /api/2.0/mlflow/experiments/create", body={"name": "vision/new", "tags": [
        {"key": "labyard.user", "value": "alice"}]})
    assert rule.rewrite(req, BOB)["tags"] == [{"key": "labyard.user", "value": "bob"}]
    assert refused(world, BOB, "POST /api/2.0/mlflow/experiments/create",
                   body={"name": "vision/new", "artifact_location": "/etc"}).status == 400


def test_model_version_sources(world):
    key = "POST /api/2.0/mlflow/model-versions/create"
    decide(world, BOB, key, body={"name": "vision.m", "source": f"runs:/{world['bobs']}/model"})
    decide(world, BOB, key, body={"name": "vision.m", "source": f"mlflow-artifacts:/{world['vision']}/{world['bobs']}/artifacts/m"})
    assert refused(world, BOB, key, body={"name": "vision.m", "source": f"runs:/{world['run']}/model"}).status == 403
    assert refused(world, BOB, key, body={"name": "vision.m", "source": "models:/nlp.classifier/1"}).status == 403
    for source in ("file:///etc", "/srv/data/model", "s3://bucket/model"):
        assert refused(world, BOB, key, body={"name": "vision.m", "source": source}).status == 403


def test_graphql_fields(world):
    key = "POST /graphql"
    q = "query Q($d: MlflowGetRunInput!) { mlflowGetRun(input: $d) { run { info { runName } } } }"
    decide(world, BOB, key, body={"query": q, "variables": {"d": {"runId": world["bobs"]}}})
    assert refused(world, BOB, key, body={"query": q, "variables": {"d": {"runId": world["run"]}}}).status == 403
    # inline input, a fragment, an alias: all root fields are found
    q2 = ('query { a: mlflowGetRun(input: {runId: "%s"}) { run { info { runName } } } ...F } '
          'fragment F on Query { mlflowGetExperiment(input: {experimentId: "%s"}) { experiment { name } } }') % (world["bobs"], world["nlp"])
    assert refused(world, BOB, key, body={"query": q2}).status == 403
    assert refused(world, BOB, key, body={"query": "{ mlflowSearchModelVersions(input: {}) { modelVersions { name } } }"}).status == 403
    assert refused(world, BOB, key, body={"query": "{ not graphql"}).status == 400
    assert refused(world, BOB, key, body={"query": q}, query={"query": ["{ __typename }"]}).status == 400


def test_a_file_body_is_not_read_as_json(world):
    """The UI's upload sends the file itself; the run is in the query."""
    assert ROUTES["POST /ajax-api/2.0/mlflow/upload-artifact"].needs_body is False
    assert refused(world, BOB, "POST /ajax-api/2.0/mlflow/upload-artifact", query={"run_uuid": world["run"], "path": "x"}).status == 403
    decide(world, BOB, "POST /ajax-api/2.0/mlflow/upload-artifact", query={"run_uuid": world["bobs"], "path": "x"})
