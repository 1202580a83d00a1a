"""MLflow per project, on a real ``labyard up --demo``: the real ``mlflow server --app-name
labyard`` behind the real hub and proxy, tried as the wrong person.

alice (vision, nlp) keeps experiments, runs, artifacts, a logged model, a trace, a registered
model and a scheduled run's output notebook in project nlp. bob (vision only) tries every
request of issue 10 against them, with his hub token (as the MLflow client sends it) and with
his browser login (the OAuth cookie, as the UI's XHRs send it): each gets 403 or 404 with a
message, never 200, and alice's data stays as it was. Nothing reaches MLflow without a login,
through the proxy or on MLflow's own port; runs are the authenticated user's whatever the
client claims; a project member removed from the project loses access within the platform's
refresh window.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid

import pytest
import requests
import yaml

from ..scheduler import notebooks
from ..support.stack import Stack
from .support import tags_of, wait_for

pytestmark = pytest.mark.slow

SECRET = b"alice's nlp weights"
GET_RUN = ("query GetRun($data: MlflowGetRunInput!) { mlflowGetRun(input: $data) "
           "{ run { info { runName } data { params { key value } } } } }")


def clean_env() -> dict[str, str]:
    """This process's environment without MLflow, Labyard and Jupyter settings (for child processes)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LABYARD_", "JPY_", "JUPYTER"))}


class MLflow:
    """``/services/mlflow/`` as one user: with a hub token (``how="token"``, the REST API at
    ``/api``) or with the browser's OAuth login cookie (``how="cookie"``, the UI's ``/ajax-api``
    with the Fetch Metadata a same-origin XHR carries), or with nothing (``how="none"``)."""

    def __init__(self, stack: Stack, user: str | None, how: str, base: str | None = None):
        self.user, self.how = user, how
        self.base = base or f"{stack.url}/services/mlflow"
        self.api = "/ajax-api" if how == "cookie" else "/api"
        if how == "cookie":
            self.s = stack.login(user)
            r = self.s.get(f"{stack.url}/services/mlflow/", headers={"Accept": "text/html", "Sec-Fetch-Mode": "navigate"},
                           timeout=60)
            assert r.status_code == 200 and "labyard-mlflow" in self.s.cookies, (r.status_code, r.text[:300])
            self.s.headers.update({"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"})
        else:
            self.s = requests.Session()
            if how == "token":
                self.s.headers["Authorization"] = f"Bearer {stack.token(user)}"

    def url(self, path: str) -> str:
        if path.startswith(("/", "{api}")):
            return self.base + path.replace("{api}", self.api)
        return f"{self.base}{self.api}/2.0/mlflow/{path}"

    def get(self, path, **kw):
        return self.s.get(self.url(path), timeout=60, **kw)

    def post(self, path, **kw):
        return self.s.post(self.url(path), timeout=60, **kw)

    def put(self, path, **kw):
        return self.s.put(self.url(path), timeout=60, **kw)

    def delete(self, path, **kw):
        return self.s.delete(self.url(path), timeout=60, **kw)

    def patch(self, path, **kw):
        return self.s.patch(self.url(path), timeout=60, **kw)

    def ok(self, method: str, path: str, **kw) -> dict:
        r = getattr(self, method)(path, **kw)
        assert r.status_code == 200, (method, path, r.status_code, r.text[:500])
        return r.json() if r.content and r.headers.get("content-type", "").startswith("application/json") else {}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("labyard-gate")).start(timeout=240)
    notebooks.write(s.data_dir / "projects" / "nlp" / "report.ipynb", notebooks.training())
    # MLflow (the gate) starts next to the hub; wait until it answers through the proxy
    wait_for(lambda: requests.get(f"{s.url}/services/mlflow/health", timeout=10).status_code == 200, 240, 1,
             what="MLflow through the proxy")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def alice(stack):
    return MLflow(stack, "alice", "token")


@pytest.fixture(scope="module")
def nlp(stack, alice):
    """alice's project nlp in MLflow: what bob must never reach."""
    exp = alice.ok("post", "experiments/create", json={"name": "nlp/secret.ipynb"})["experiment_id"]
    run = alice.ok("post", "runs/create", json={"experiment_id": exp, "run_name": "private"})["run"]["info"]["run_id"]
    alice.ok("post", "runs/log-batch", json={"run_id": run, "params": [{"key": "dataset", "value": "s3://nlp/patients.csv"}],
                                             "metrics": [{"key": "loss", "value": 0.25, "timestamp": 1, "step": 0}]})
    artifact = f"{exp}/{run}/artifacts/model/weights.txt"
    alice.ok("put", f"/api/2.0/mlflow-artifacts/artifacts/{artifact}", data=SECRET)
    model = alice.ok("post", "logged-models", json={"experiment_id": exp, "name": "m"})["model"]["info"]["model_id"]
    trace = alice.ok("post", "traces", json={"experiment_id": exp, "timestamp_ms": int(time.time() * 1000)})["trace_info"]["request_id"]
    alice.ok("post", "registered-models/create", json={"name": "nlp.classifier"})
    alice.ok("post", "model-versions/create", json={"name": "nlp.classifier", "source": f"runs:/{run}/model", "run_id": run})

    # a scheduled run of nlp/report.ipynb: recorded through the gate with a run token of alice
    sched = requests.Session()
    sched.headers["Authorization"] = f"token {stack.token('alice')}"
    base = f"{stack.url}/services/labyard-scheduler/api"
    wait_for(lambda: sched.get(f"{base}/whoami", timeout=10).status_code == 200, 120, what="the scheduler")
    r = sched.post(f"{base}/schedules", json={"project": "nlp", "notebook": "report.ipynb"}, timeout=60)
    assert r.status_code == 201, r.text
    run_id = r.json()["run"]["id"]
    done = wait_for(lambda: (lambda x: x if x["status"] in ("succeeded", "failed") else None)(
        sched.get(f"{base}/runs/{run_id}", timeout=10).json()), 300, 1, what="the scheduled run")
    assert done["status"] == "succeeded" and done["mlflow_run_id"], (done, sched.get(f"{base}/runs/{run_id}/log").text)
    scheduled = alice.ok("get", "runs/get", params={"run_id": done["mlflow_run_id"]})["run"]
    outputs = alice.ok("get", "artifacts/list", params={"run_id": done["mlflow_run_id"], "path": "output"})["files"]
    return {
        "exp": exp, "run": run, "artifact": artifact, "model": model, "trace": trace,
        "scheduled": scheduled, "output": f"{scheduled['info']['experiment_id']}/{done['mlflow_run_id']}/artifacts/{outputs[0]['path']}",
        "scheduler": (sched, base, run_id),
    }


def test_scheduled_run_is_recorded_through_the_gate_as_its_owner(nlp):
    tags = tags_of(nlp["scheduled"])
    assert nlp["scheduled"]["info"]["user_id"] == "alice" and tags["labyard.user"] == "alice" == tags["mlflow.user"]
    assert tags["labyard.project"] == "nlp" and tags["labyard.run_kind"] == "scheduled"
    _, _, run_id = nlp["scheduler"]
    assert tags["labyard.scheduled_run"] == run_id and tags["labyard.schedule"]  # leads back to the scheduler's run
    assert nlp["output"].endswith(".ipynb")


# ---- bob against alice's nlp: every request of issue 10, with his token and his browser login ----
def _cases(d: dict) -> dict:
    exp, run, art = d["exp"], d["run"], d["artifact"]
    return {
        "get experiment": ("get", "experiments/get", {"params": {"experiment_id": exp}}),
        "get experiment by name": ("get", "experiments/get-by-name", {"params": {"experiment_name": "nlp/secret.ipynb"}}),
        "search the experiment's runs": ("post", "runs/search", {"json": {"experiment_ids": [exp]}}),
        "read the run with its params": ("get", "runs/get", {"params": {"run_id": run}}),
        "read the run (run_uuid)": ("get", "runs/get", {"params": {"run_uuid": run}}),
        "read the run through GraphQL": ("post", "/graphql", {"json": {"query": GET_RUN, "variables": {"data": {"runId": run}}}}),
        "metric history": ("get", "metrics/get-history", {"params": {"run_id": run, "metric_key": "loss"}}),
        "metric history (bulk interval)": ("get", "metrics/get-history-bulk-interval",
                                           {"params": {"run_ids": [run], "metric_key": "loss"}}),
        "list the run's artifacts": ("get", "artifacts/list", {"params": {"run_id": run}}),
        "download an artifact (get-artifact)": ("get", "/get-artifact", {"params": {"run_uuid": run, "path": "model/weights.txt"}}),
        "download an artifact (proxied)": ("get", f"{{api}}/2.0/mlflow-artifacts/artifacts/{art}", {}),
        "list proxied artifacts": ("get", "{api}/2.0/mlflow-artifacts/artifacts", {"params": {"path": f"{exp}/{run}/artifacts"}}),
        "download the scheduled run's output notebook": ("get", f"{{api}}/2.0/mlflow-artifacts/artifacts/{d['output']}", {}),
        "overwrite an artifact": ("put", f"{{api}}/2.0/mlflow-artifacts/artifacts/{art}", {"data": b"bob was here"}),
        "overwrite an artifact (the UI's upload)": ("post", "/ajax-api/2.0/mlflow/upload-artifact",
                                                    {"params": {"run_uuid": run, "path": "model/weights.txt"}, "data": b"bob"}),
        "delete an artifact": ("delete", f"{{api}}/2.0/mlflow-artifacts/artifacts/{art}", {}),
        "rename the experiment": ("post", "experiments/update", {"json": {"experiment_id": exp, "new_name": "nlp/renamed"}}),
        "tag the experiment": ("post", "experiments/set-experiment-tag", {"json": {"experiment_id": exp, "key": "k", "value": "v"}}),
        "delete the experiment": ("post", "experiments/delete", {"json": {"experiment_id": exp}}),
        "delete the run": ("post", "runs/delete", {"json": {"run_id": run}}),
        "delete the run (camelCase field)": ("post", "runs/delete", {"json": {"runId": run}}),
        "log into the run": ("post", "runs/log-batch", {"json": {"run_id": run, "params": [{"key": "bob", "value": "1"}]}}),
        "tag the run": ("post", "runs/set-tag", {"json": {"run_id": run, "key": "k", "value": "v"}}),
        "create an experiment under nlp/": ("post", "experiments/create", {"json": {"name": "nlp/bob.ipynb"}}),
        "create a run in the experiment, claiming alice": ("post", "runs/create", {"json": {
            "experiment_id": exp, "user_id": "alice", "tags": [{"key": "labyard.user", "value": "alice"}]}}),
        "get the logged model": ("get", f"logged-models/{d['model']}", {}),
        "search logged models": ("post", "logged-models/search", {"json": {"experiment_ids": [exp]}}),
        "get the trace": ("get", f"traces/{d['trace']}/info", {}),
        "search traces": ("get", "traces", {"params": {"experiment_ids": [exp]}}),
        "get the registered model": ("get", "registered-models/get", {"params": {"name": "nlp.classifier"}}),
        "get a model version": ("get", "model-versions/get", {"params": {"name": "nlp.classifier", "version": "1"}}),
        "download a model version's artifact": ("get", "/model-versions/get-artifact",
                                                {"params": {"name": "nlp.classifier", "version": "1", "path": "x"}}),
        "create a registered model in nlp": ("post", "registered-models/create", {"json": {"name": "nlp.bobs"}}),
        "register a version from alice's run": ("post", "model-versions/create", {"json": {
            "name": "vision.bobs", "source": f"runs:/{run}/model", "run_id": run}}),
    }


CASES = list(_cases({k: "x" for k in ("exp", "run", "artifact", "model", "trace", "output")}))


@pytest.fixture(scope="module")
def bobs(stack):
    return {how: MLflow(stack, "bob", how) for how in ("token", "cookie")}


HOW = pytest.mark.parametrize("how", ["token", "cookie"])


@HOW
@pytest.mark.parametrize("case", CASES)
def test_bob_cannot_reach_nlp(bobs, nlp, how, case):
    bob = bobs[how]
    method, path, kw = _cases(nlp)[case]
    r = getattr(bob, method)(path, **kw)
    # refused for the right reason (a wrong URL would give 404 and prove nothing)
    assert r.status_code == 403 and r.json()["message"] == "bob is not a member of project 'nlp'", \
        (case, how, r.status_code, r.text[:300])


@HOW
def test_bob_cannot_rename_his_experiment_into_nlp(bobs, how):
    bob = bobs[how]
    exp = bob.ok("post", "experiments/create", json={"name": f"vision/bob-{bob.how}.ipynb"})["experiment_id"]
    r = bob.post("experiments/update", json={"experiment_id": exp, "new_name": "nlp/mine.ipynb"})
    assert r.status_code == 403 and "out of project 'vision'" in r.json()["message"], r.text
    assert bob.ok("get", "experiments/get", params={"experiment_id": exp})["experiment"]["name"] == f"vision/bob-{bob.how}.ipynb"


@HOW
def test_bob_lists_nothing_of_nlp(bobs, nlp, how):
    bob = bobs[how]
    names = [e["name"] for e in bob.ok("post", "experiments/search", json={"max_results": 1000})["experiments"]]
    assert names and all(n.startswith("vision/") for n in names), names
    names = [e["name"] for e in bob.ok("get", "experiments/search", params={"max_results": 1000})["experiments"]]
    assert all(n.startswith("vision/") for n in names), names
    assert all(m["name"].startswith("vision.") for m in bob.ok("get", "registered-models/search").get("registered_models", []))
    assert not bob.ok("get", "model-versions/search").get("model_versions")


def test_alice_data_is_unchanged(alice, nlp):
    """After all of bob's attempts (the module's tests above)."""
    assert alice.get(f"/api/2.0/mlflow-artifacts/artifacts/{nlp['artifact']}").content == SECRET
    exp = alice.ok("get", "experiments/get", params={"experiment_id": nlp["exp"]})["experiment"]
    assert exp["name"] == "nlp/secret.ipynb" and exp["lifecycle_stage"] == "active" and "k" not in {t["key"] for t in exp.get("tags", [])}
    run = alice.ok("get", "runs/get", params={"run_id": nlp["run"]})["run"]
    assert run["info"]["lifecycle_stage"] == "active"
    assert {p["key"] for p in run["data"]["params"]} == {"dataset"} and "k" not in tags_of(run)
    assert len(alice.ok("post", "runs/search", json={"experiment_ids": [nlp["exp"]]})["runs"]) == 1
    names = [e["name"] for e in alice.ok("post", "experiments/search", json={"max_results": 1000})["experiments"]]
    assert "nlp/secret.ipynb" in names and "nlp/bob.ipynb" not in names
    assert alice.get("registered-models/get", params={"name": "nlp.bobs"}).status_code == 404


def test_the_scheduler_refuses_bob_too(stack, nlp):
    """The scheduler's own answer for the same run, for comparison."""
    _, base, run_id = nlp["scheduler"]
    r = requests.get(f"{base}/runs/{run_id}/output", headers={"Authorization": f"token {stack.token('bob')}"}, timeout=30)
    assert r.status_code == 403


# ---- members, admins, nobody -----------------------------------------------------------------
def test_carol_reads_alices_nlp_run_but_does_not_change_it(stack, nlp):
    carol = MLflow(stack, "carol", "token")
    run = carol.ok("get", "runs/get", params={"run_id": nlp["run"]})["run"]
    assert {p["key"]: p["value"] for p in run["data"]["params"]}["dataset"] == "s3://nlp/patients.csv"
    assert carol.get(f"/api/2.0/mlflow-artifacts/artifacts/{nlp['artifact']}").content == SECRET
    r = carol.post("runs/delete", json={"run_id": nlp["run"]})
    assert r.status_code == 403 and "only alice (the owner)" in r.json()["message"]
    r = carol.put(f"/api/2.0/mlflow-artifacts/artifacts/{nlp['artifact']}", data=b"carol")
    assert r.status_code == 403
    # her own run in the same experiment is hers to change
    mine = carol.ok("post", "runs/create", json={"experiment_id": nlp["exp"]})["run"]["info"]["run_id"]
    carol.ok("post", "runs/set-tag", json={"run_id": mine, "key": "note", "value": "carol's"})
    carol.ok("post", "runs/delete", json={"run_id": mine})


def test_admin_sees_everything(stack, nlp):
    admin = MLflow(stack, "admin", "token")
    names = [e["name"] for e in admin.ok("post", "experiments/search", json={"max_results": 1000})["experiments"]]
    assert "nlp/secret.ipynb" in names and "Default" in names
    assert admin.ok("get", "runs/get", params={"run_id": nlp["run"]})["run"]["info"]["run_id"] == nlp["run"]
    assert admin.get(f"/api/2.0/mlflow-artifacts/artifacts/{nlp['output']}").status_code == 200
    assert admin.ok("get", "/api/2.0/mlflow/webhooks") is not None


def test_nobody_reaches_mlflow_without_a_login(stack, nlp):
    direct = yaml.safe_load((stack.data_dir / "settings.yaml").read_text())["mlflow_url"]  # MLflow's own port: the gate is in the process, there is no way around it
    for base in (f"{stack.url}/services/mlflow", f"{direct}/services/mlflow"):
        anon = MLflow(stack, None, "none", base=base)
        for method, path, kw in _cases(nlp).values():
            r = getattr(anon, method)(path, **kw)
            assert r.status_code == 401 and "log in" in r.json()["message"], (base, path, r.status_code, r.text[:200])
        assert anon.post("experiments/search", json={}).status_code == 401
        r = anon.get("/", headers={"Accept": "text/html", "Sec-Fetch-Mode": "navigate"}, allow_redirects=False)
        assert r.status_code == 302 and "/hub/api/oauth2/authorize" in r.headers["location"]
        bad = requests.get(f"{base}/api/2.0/mlflow/runs/get", params={"run_id": nlp["run"]},
                           headers={"Authorization": "Bearer not-a-token"}, timeout=30)
        assert bad.status_code == 401
    # MLflow without the prefix is not served at all on its port (only the probes' /health)
    assert requests.get(f"{direct}/api/2.0/mlflow/runs/get", params={"run_id": nlp["run"]}, timeout=30).status_code == 404
    assert requests.get(f"{direct}/health", timeout=30).status_code == 200


def test_a_token_without_mlflow_access_is_refused(stack, nlp):
    s = stack.login("alice")
    r = s.post(f"{stack.url}/hub/api/users/alice/tokens", json={"scopes": ["read:users:name!user=alice"]},
               headers={"X-XSRFToken": s.cookies.get("_xsrf"), "Referer": f"{stack.url}/hub/"}, timeout=30)
    r.raise_for_status()
    r = requests.get(f"{stack.url}/services/mlflow/api/2.0/mlflow/runs/get", params={"run_id": nlp["run"]},
                     headers={"Authorization": f"token {r.json()['token']}"}, timeout=30)
    assert r.status_code == 403 and "access:services!service=mlflow" in r.json()["message"]


def test_assistant_and_same_host_endpoints_are_closed_to_everyone(stack):
    admin = MLflow(stack, "admin", "token")
    for method, path in (("get", "/ajax-api/3.0/mlflow/assistant/config"), ("put", "/ajax-api/3.0/mlflow/assistant/config"),
                         ("post", "/ajax-api/3.0/mlflow/assistant/skills/install"), ("get", "/ajax-api/3.0/mlflow/assistant/providers")):
        r = getattr(admin, method)(path, headers={"X-Forwarded-For": "127.0.0.1", "X-Real-IP": "127.0.0.1"}, json={})
        assert r.status_code == 403 and "assistant" in r.json()["message"], (path, r.status_code, r.text[:200])


def test_cross_site_browser_requests_are_refused(stack):
    bob = MLflow(stack, "bob", "cookie")
    r = bob.post("experiments/create", json={"name": "vision/csrf.ipynb"}, headers={"Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 403 and "cross-site" in r.json()["message"]
    r = bob.post("experiments/create", json={"name": "vision/csrf.ipynb"}, headers={"Sec-Fetch-Site": None})
    assert r.status_code == 403
    assert bob.get("experiments/get-by-name", params={"experiment_name": "vision/csrf.ipynb"}).status_code == 404


def test_refused_requests_leave_the_connection_usable(stack):
    """Issue 10's failure under load: a same-origin request right after a refused cross-site
    one got 503 from the proxy. The old proxy answered 403 without reading the body and then
    closed the connection without saying so; the proxy reused it ("socket hang up"). The gate
    (uvicorn) answers and keeps the connection sound, whatever the body: never a 503."""
    bob = MLflow(stack, "bob", "cookie")
    body = {"max_results": 1, "filter": "x" * 300_000}
    for i in range(25):
        r = bob.post("experiments/search", json=body, headers={"Sec-Fetch-Site": "cross-site"})
        assert r.status_code == 403, (i, r.status_code, r.text[:200])
        r = bob.post("experiments/search", json={"max_results": 1})
        assert r.status_code == 200, (i, r.status_code, r.text[:200])
        r = bob.put("{api}/2.0/mlflow-artifacts/artifacts/999999/x/artifacts/big.bin", data=b"0" * 2_000_000)
        assert r.status_code in (403, 404), (i, r.status_code, r.text[:200])
        assert bob.get("experiments/search", params={"max_results": 1}).status_code == 200


# ---- authorship --------------------------------------------------------------------------------
def test_a_run_is_the_authenticated_users_whatever_the_client_claims(stack):
    bob = MLflow(stack, "bob", "token")
    exp = bob.ok("post", "experiments/create", json={"name": "vision/claims.ipynb"})["experiment_id"]
    claims = [{"key": "labyard.user", "value": "alice"}, {"key": "mlflow.user", "value": "alice"}]
    run = bob.ok("post", "runs/create", json={"experiment_id": exp, "user_id": "alice", "tags": claims})["run"]
    rid = run["info"]["run_id"]
    assert run["info"]["user_id"] == "bob"
    bob.ok("post", "runs/log-batch", json={"run_id": rid, "tags": claims + [{"key": "note", "value": "kept"}]})
    for key in ("labyard.user", "mlflow.user"):
        r = bob.post("runs/set-tag", json={"run_id": rid, "key": key, "value": "alice"})
        assert r.status_code == 403 and "set by the server" in r.json()["message"]
        assert bob.post("runs/delete-tag", json={"run_id": rid, "key": key}).status_code == 403
    tags = tags_of(bob.ok("get", "runs/get", params={"run_id": rid})["run"])
    assert tags["labyard.user"] == "bob" == tags["mlflow.user"] and tags["note"] == "kept"
    # the MLflow client (what notebooks use) gets the same answers
    env = {**clean_env(), "MLFLOW_TRACKING_URI": f"{stack.url}/services/mlflow", "MLFLOW_TRACKING_TOKEN": stack.token("bob"),
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    code = ("import mlflow\nc = mlflow.MlflowClient()\nr = c.create_run('%s', tags={'mlflow.user': 'alice'})\n"
            "print(c.get_run(r.info.run_id).data.tags['mlflow.user'])\n"
            "try:\n    c.create_experiment('nlp/from-client')\nexcept mlflow.exceptions.MlflowException as e:\n"
            "    print(e.get_http_status_code(), e.message)\n") % exp
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "bob" and lines[1].startswith("403") and "not a member of project 'nlp'" in lines[1]


def test_the_runs_panel_shows_who_really_made_a_run(stack):
    """bob makes a run in the experiment of alice's vision notebook, claiming to be alice:
    alice's Runs panel shows it as bob's."""
    hub = stack.api("alice")
    r = hub.post(f"{stack.url}/hub/api/users/alice/servers/vision", json={}, timeout=60)
    # (a 500 here was seen once in a full run under load: the hub's log says why)
    assert r.status_code in (201, 202), (r.text, stack.hub_log()[-4000:])
    stack.wait_ready(hub, "alice", "vision", timeout=240)
    bob = MLflow(stack, "bob", "token")
    exp = bob.post("experiments/create", json={"name": "vision/fit.ipynb"}).json().get("experiment_id") or \
        bob.ok("get", "experiments/get-by-name", params={"experiment_name": "vision/fit.ipynb"})["experiment"]["experiment_id"]
    bob.ok("post", "runs/create", json={"experiment_id": exp, "run_name": "not-alice", "user_id": "alice",
                                        "tags": [{"key": "labyard.user", "value": "alice"}]})
    panel = hub.get(f"{stack.url}/user/alice/vision/labyard/runs", params={"notebook": "fit.ipynb"}, timeout=60)
    assert panel.status_code == 200, panel.text
    users = {r["name"]: r["user"] for r in panel.json()["runs"]}
    assert users["not-alice"] == "bob"
    hub.delete(f"{stack.url}/hub/api/users/alice/servers/vision", timeout=60)


# ---- searches are filtered and still page ---------------------------------------------------
def test_filtered_search_pages_through_only_the_callers_experiments(stack):
    alice = MLflow(stack, "alice", "token")
    mine = {f"vision/page-{i}.ipynb" for i in range(3)}
    for name in sorted(mine) + [f"nlp/page-{i}.ipynb" for i in range(7)]:
        alice.ok("post", "experiments/create", json={"name": name})
    bob = MLflow(stack, "bob", "token")
    seen, token, pages = [], None, 0
    while True:
        body = {"max_results": 2, "filter": "name LIKE '%page-%'", **({"page_token": token} if token else {})}
        page = bob.ok("post", "experiments/search", json=body)
        assert len(page.get("experiments", [])) <= 2
        seen += [e["name"] for e in page.get("experiments", [])]
        token, pages = page.get("next_page_token"), pages + 1
        if not token:
            break
        assert pages < 10
    assert sorted(seen) == sorted(mine)  # all of vision, none of nlp, none twice


# ---- a token that stops working while records are queued ----------------------------------
def test_runs_wait_in_the_queue_for_a_valid_token_and_replay(stack, tmp_path):
    """A scheduled run whose token no longer works (revoked; an expired one answers the same)
    keeps its records queued; the next valid token of the same user replays them, once."""
    from .test_papermill import make_notebook

    project, home = tmp_path / "vision", tmp_path / "home"
    project.mkdir()
    nb = project / "queued.ipynb"
    make_notebook(nb)
    s = stack.login("alice")
    headers = {"X-XSRFToken": s.cookies.get("_xsrf"), "Referer": f"{stack.url}/hub/"}
    made = s.post(f"{stack.url}/hub/api/users/alice/tokens", json={"scopes": ["access:services!service=mlflow"]},
                  headers=headers, timeout=30).json()
    assert s.delete(f"{stack.url}/hub/api/users/alice/tokens/{made['id']}", headers=headers, timeout=30).status_code == 204
    env = {**clean_env(), "LABYARD_PROJECT": "vision", "LABYARD_PROJECT_DIR": str(project), "JUPYTERHUB_USER": "alice",
           "HOME": str(home), "MLFLOW_TRACKING_URI": f"{stack.url}/services/mlflow", "MLFLOW_TRACKING_TOKEN": made["token"]}
    r = subprocess.run([sys.executable, "-m", "labyard_lab.autolog.papermill", str(nb), str(project / "out.ipynb"),
                        "--sync-timeout", "5"], env=env, capture_output=True, text=True, timeout=300, cwd=project)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["run_id"] is None  # nothing reached MLflow, nothing was dropped
    queue = home / ".labyard" / "mlflow-queue"
    assert list(queue.glob(f"stores/*/mlruns/*/{result['local_run_id']}/meta.yaml"))
    alice = MLflow(stack, "alice", "token")
    assert alice.get("experiments/get-by-name", params={"experiment_name": "vision/queued.ipynb"}).status_code == 404

    env["MLFLOW_TRACKING_TOKEN"] = stack.token("alice")  # e.g. the next run's token, or a kernel of alice
    replay = ("import sys, pathlib\nfrom labyard_lab.autolog.sync import Syncer\n"
              "s = Syncer(pathlib.Path(sys.argv[1]), sys.argv[2])\nprint(s.sync_all() and s.sync_all())")
    out = subprocess.run([sys.executable, "-c", replay, str(queue), env["MLFLOW_TRACKING_URI"]], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "True", out.stderr
    exp = alice.ok("get", "experiments/get-by-name", params={"experiment_name": "vision/queued.ipynb"})["experiment"]
    runs = alice.ok("post", "runs/search", json={"experiment_ids": [exp["experiment_id"]]})["runs"]
    assert len(runs) == 1 and runs[0]["info"]["status"] == "FINISHED" and runs[0]["info"]["user_id"] == "alice"
    assert tags_of(runs[0])["labyard.local_run_id"] == result["local_run_id"]


# ---- removal (last: it changes the directory) -------------------------------------------------
def test_removal_from_a_project_takes_effect_within_the_refresh_window(stack, nlp):
    """carol leaves nlp in LDAP; the directory sync updates the hub's group (done here by hand,
    as the sync does); within the platform's window (60 s) MLflow refuses her nlp's runs."""
    carol = MLflow(stack, "carol", "token")
    assert carol.get("runs/get", params={"run_id": nlp["run"]}).status_code == 200
    import ldap3

    from labyard_hub import demo

    conn = stack.demo_ldap()
    conn.modify(f"cn=nlp,ou=projects,{demo.SUFFIX}", {"memberUid": [(ldap3.MODIFY_DELETE, ["carol"])]})
    admin = stack.api("admin")
    r = admin.delete(f"{stack.url}/hub/api/groups/nlp/users", json={"users": ["carol"]}, timeout=30)
    assert r.status_code == 200, r.text
    t0 = time.monotonic()
    wait_for(lambda: carol.get("runs/get", params={"run_id": nlp["run"]}).status_code == 403, 60, 1,
             what="carol refused nlp's run after leaving the project")
    print(f"removal took effect in MLflow after {time.monotonic() - t0:.1f}s")
    assert carol.get(f"/api/2.0/mlflow-artifacts/artifacts/{nlp['artifact']}").status_code == 403
    names = [e["name"] for e in carol.ok("post", "experiments/search", json={"max_results": 1000})["experiments"]]
    assert not any(n.startswith("nlp/") for n in names)


# ---- the MLflow UI in Chromium ----------------------------------------------------------------
#: what the UI asks for and gets refused by design on every Labyard (it carries on without): the
#: assistant (closed to everyone) and basic-auth's current user (that app is not installed: 404,
#: as from MLflow without it)
_UI_PROBES = re.compile(r"/ajax-api/3\.0/mlflow/assistant/|/ajax-api/2\.0/mlflow/users/current$")


def _ui(browser, stack, user: str):
    context = browser.new_context()
    context.set_default_navigation_timeout(180_000)  # the UI's bundles take a while on a busy machine
    page = context.new_page()
    failed: list[str] = []
    page.on("response", lambda r: failed.append(f"{r.status} {r.request.method} {r.url}")
            if "/services/mlflow/" in r.url and r.status >= 400 and not _UI_PROBES.search(r.url) else None)
    page.goto(f"{stack.url}/hub/login")
    page.fill("#username_input", user)
    page.fill("#password_input", "labyard-demo")
    page.click("#login_submit")
    page.wait_for_url("**/hub/home")
    return context, page, failed


@pytest.mark.browser
def test_the_mlflow_ui_works_for_alice_and_shows_bob_nothing_of_nlp(browser, stack, nlp):
    from pathlib import Path

    artifacts = Path(__file__).parent.parent / "artifacts"
    artifacts.mkdir(exist_ok=True)
    root = f"{stack.url}/services/mlflow/"

    def listed(page) -> list[str]:
        """The experiment list the UI fetched (its own XHR, with the login cookie)."""
        with page.expect_response(lambda r: "/ajax-api/2.0/mlflow/experiments/search" in r.url, timeout=180_000) as found:
            response = page.goto(root, wait_until="domcontentloaded")  # through the hub's OAuth, back to the UI
        assert response.status == 200 and response.url == root
        assert found.value.status == 200, found.value.text()[:300]
        return [e["name"] for e in found.value.json().get("experiments", [])]

    # the UI's home page fetches only the few most recently changed experiments: each user makes one
    # right before (other tests of this stack make more)
    mine = f"nlp/alice-ui-{uuid.uuid4().hex[:8]}.ipynb"
    MLflow(stack, "alice", "token").ok("post", "experiments/create", json={"name": mine})
    context, page, failed = _ui(browser, stack, "alice")
    assert mine in listed(page)
    page.goto(f"{root}#/experiments/{nlp['exp']}/runs/{nlp['run']}", wait_until="domcontentloaded")
    page.get_by_text("private").first.wait_for(timeout=180_000)  # the run's name (GraphQL)
    page.get_by_text("s3://nlp/patients.csv").first.wait_for(timeout=120_000)  # its param
    page.screenshot(path=str(artifacts / "mlflow-gate-alice-run.png"))
    assert not failed, failed
    context.close()

    his = f"vision/bob-ui-{uuid.uuid4().hex[:8]}.ipynb"
    MLflow(stack, "bob", "token").ok("post", "experiments/create", json={"name": his})
    context, page, failed = _ui(browser, stack, "bob")
    names = listed(page)
    assert his in names and not any(n.startswith("nlp/") for n in names), names
    page.goto(f"{root}#/experiments/{nlp['exp']}/runs/{nlp['run']}", wait_until="domcontentloaded")
    deadline = time.monotonic() + 180
    while not any(f.startswith("403 ") for f in failed):  # Playwright delivers events while it waits
        assert time.monotonic() < deadline, f"the UI's requests for nlp were not refused: {failed}"
        page.wait_for_timeout(500)
    page.wait_for_timeout(2000)  # let the page render whatever it got before looking for what it must not show
    assert page.get_by_text("s3://nlp/patients.csv").count() == 0
    page.screenshot(path=str(artifacts / "mlflow-gate-bob-refused.png"))
    assert all(f.startswith("403 ") for f in failed), failed
    context.close()


# ---- a large artifact streams through -----------------------------------------------------------
def test_a_1gb_artifact_goes_up_and_down_through_the_gate_in_little_memory(stack):
    """1 GiB up and down through the proxy and the gate, as alice's MLflow client would: the
    gate's process (MLflow's uvicorn) grows by less than 100 MB either way."""
    import hashlib

    from .support import PeakRss, gate_server_pid, serving_process, stream

    alice = MLflow(stack, "alice", "token")
    exp = alice.ok("post", "experiments/create", json={"name": "vision/big.ipynb"})["experiment_id"]
    run = alice.ok("post", "runs/create", json={"experiment_id": exp})["run"]["info"]["run_id"]
    path = f"/api/2.0/mlflow-artifacts/artifacts/{exp}/{run}/artifacts/big.bin"
    gate = serving_process(gate_server_pid(stack.data_dir))
    block = os.urandom(1 << 20)
    sent = hashlib.sha256()
    for chunk in stream(1024, block):
        sent.update(chunk)
    with PeakRss(gate) as up:
        r = alice.s.put(alice.url(path), data=stream(1024, block), timeout=3600)
    assert r.status_code == 200, r.text[:300]
    got, n = hashlib.sha256(), 0
    with PeakRss(gate) as down:
        with alice.s.get(alice.url(path), stream=True, timeout=3600) as r:
            assert r.status_code == 200
            for chunk in r.iter_content(1 << 20):
                got.update(chunk)
                n += len(chunk)
    assert n == 1 << 30 and got.hexdigest() == sent.hexdigest()
    print(f"gate RSS growth: upload {up.growth_mb:.1f} MB, download {down.growth_mb:.1f} MB")
    assert up.growth_mb < 100 and down.growth_mb < 100, (up.growth_mb, down.growth_mb)
    alice.delete(path)
