"""The gate's allow-list: every route of the pinned MLflow server, each with its rule.

A request is matched the way MLflow itself routes it (its native FastAPI routes first, then
the Flask app's URL map) and answered by the rule of that route. A route that is not listed
here is refused (404), so a route a newer MLflow adds stays closed until someone classifies it;
``tests/mlflow/test_gate_routes.py`` lists the installed server's routes and fails on any route
missing here (or listed here but gone).

Keys are ``"METHOD /path"`` in Flask's syntax (``<name>``, ``<path:name>``); FastAPI routes
(``{name}``, ``{name:path}``) are written the same way. ``/api`` and ``/ajax-api`` twins (the
REST API and the UI's copy of it) share one entry: ``{api}``.

What non-admins get (see docs/admin/mlflow.md): experiments, runs, metrics, params, tags,
artifacts, logged models, traces and assessments, registered models and model versions, the UI
and its GraphQL queries, each checked against the project of what it touches. Admin-only: the
AI gateway, GenAI evaluation (scorers, datasets, issues, label schemas, review queues, prompt
optimization, jobs), webhooks, workspaces, MCP servers, OpenTelemetry ingestion, Databricks-only
routes. Nobody: the assistant (it runs tools and writes files on the MLflow host).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .rules import (
    EXPERIMENTS, MODEL_VERSIONS, REGISTERED_MODELS, Admin, CreateExperiment, CreateLoggedModel, CreateModelVersion,
    CreateRun, ExperimentTag, GraphQL, LogBatch, LoggedModelTags, Never, Public, Rename, Rule, RunTag, Search, User, add,
    change, see,
)
from .objects import project_of_experiment, project_of_model

PUBLIC, USER, ADMIN, NEVER = Public(), User(), Admin(), Never()


def R(*targets):
    return Rule(*targets)


EXP_SEE = R(see("experiment", "experiment_id"))
EXP_ADD = R(add("experiment", "experiment_id"))
EXP_CHANGE = R(change("experiment", "experiment_id"))
EXPS_SEE = R(see("experiment", "experiment_ids"))
RUN_SEE = R(see("run", "run_id", "run_uuid"))
RUN_CHANGE = R(change("run", "run_id", "run_uuid"))
RUNS_SEE = R(see("run", "run_ids"))
MODEL_SEE = R(see("logged_model", "model_id"))
MODEL_CHANGE = R(change("logged_model", "model_id"))
TRACE_SEE = R(see("trace", "trace_id"))
TRACE_ADD = R(add("trace", "trace_id"))
REQUEST_SEE = R(see("trace", "request_id"))
REQUEST_ADD = R(add("trace", "request_id"))
REG_SEE = R(see("registered_model", "name"))
REG_ADD = R(add("registered_model", "name"))
ART_SEE = R(see("artifact", "artifact_path"))
ART_CHANGE = R(change("artifact", "artifact_path"))

_ADMIN_FAMILIES = {
    # AI gateway: provider secrets, endpoints, budgets, guardrails (platform-wide configuration)
    "gateway": [
        "POST {api}/3.0/mlflow/gateway/budgets/create", "DELETE {api}/3.0/mlflow/gateway/budgets/delete",
        "GET {api}/3.0/mlflow/gateway/budgets/get", "GET {api}/3.0/mlflow/gateway/budgets/list",
        "POST {api}/3.0/mlflow/gateway/budgets/update", "GET {api}/3.0/mlflow/gateway/budgets/windows",
        "POST {api}/3.0/mlflow/gateway/endpoints/bindings/create", "DELETE {api}/3.0/mlflow/gateway/endpoints/bindings/delete",
        "GET {api}/3.0/mlflow/gateway/endpoints/bindings/list", "POST {api}/3.0/mlflow/gateway/endpoints/create",
        "DELETE {api}/3.0/mlflow/gateway/endpoints/delete", "DELETE {api}/3.0/mlflow/gateway/endpoints/delete-tag",
        "GET {api}/3.0/mlflow/gateway/endpoints/get", "GET {api}/3.0/mlflow/gateway/endpoints/list",
        "POST {api}/3.0/mlflow/gateway/endpoints/models/attach", "POST {api}/3.0/mlflow/gateway/endpoints/models/detach",
        "POST {api}/3.0/mlflow/gateway/endpoints/set-tag", "POST {api}/3.0/mlflow/gateway/endpoints/update",
        "POST {api}/3.0/mlflow/gateway/guardrails/add-to-endpoint", "POST {api}/3.0/mlflow/gateway/guardrails/create",
        "DELETE {api}/3.0/mlflow/gateway/guardrails/delete", "GET {api}/3.0/mlflow/gateway/guardrails/get",
        "GET {api}/3.0/mlflow/gateway/guardrails/list", "GET {api}/3.0/mlflow/gateway/guardrails/list-for-endpoint",
        "DELETE {api}/3.0/mlflow/gateway/guardrails/remove-from-endpoint",
        "PATCH {api}/3.0/mlflow/gateway/guardrails/update-config",
        "POST {api}/3.0/mlflow/gateway/model-definitions/create", "DELETE {api}/3.0/mlflow/gateway/model-definitions/delete",
        "GET {api}/3.0/mlflow/gateway/model-definitions/get", "GET {api}/3.0/mlflow/gateway/model-definitions/list",
        "POST {api}/3.0/mlflow/gateway/model-definitions/update", "POST {api}/3.0/mlflow/gateway/secrets/create",
        "DELETE {api}/3.0/mlflow/gateway/secrets/delete", "GET {api}/3.0/mlflow/gateway/secrets/get",
        "GET {api}/3.0/mlflow/gateway/secrets/list", "POST {api}/3.0/mlflow/gateway/secrets/update",
        "GET /ajax-api/3.0/mlflow/gateway/provider-config", "GET /ajax-api/3.0/mlflow/gateway/secrets/config",
        "GET /ajax-api/3.0/mlflow/gateway/supported-models", "GET /ajax-api/3.0/mlflow/gateway/supported-providers",
        "GET /ajax-api/2.0/mlflow/gateway-proxy", "POST /ajax-api/2.0/mlflow/gateway-proxy",
        "POST /gateway/<endpoint_name>/mlflow/invocations", "POST /gateway/mlflow/v1/chat/completions",
        "GET /gateway/mlflow/v1/models", "POST /gateway/openai/v1/chat/completions", "POST /gateway/openai/v1/embeddings",
        "POST /gateway/typesafe/v1/systemone", "POST /gateway/openai/v1/responses", "POST /gateway/openai/v1/responses/compact",
        "POST /gateway/anthropic/v1/messages", "POST /gateway/gemini/v1beta/models/<endpoint_name>:generateContent",
        "POST /gateway/gemini/v1beta/models/<endpoint_name>:streamGenerateContent",
        "POST /gateway/proxy/<endpoint_name>/<path:path>",
    ],
    # GenAI evaluation: datasets, scorers, issues, labelling, review queues, prompt optimization, jobs
    "genai": [
        "DELETE {api}/3.0/mlflow/datasets/<dataset_id>", "GET {api}/3.0/mlflow/datasets/<dataset_id>",
        "POST {api}/3.0/mlflow/datasets/<dataset_id>/add-experiments", "GET {api}/3.0/mlflow/datasets/<dataset_id>/experiment-ids",
        "DELETE {api}/3.0/mlflow/datasets/<dataset_id>/records", "GET {api}/3.0/mlflow/datasets/<dataset_id>/records",
        "POST {api}/3.0/mlflow/datasets/<dataset_id>/records", "POST {api}/3.0/mlflow/datasets/<dataset_id>/remove-experiments",
        "PATCH {api}/3.0/mlflow/datasets/<dataset_id>/tags", "DELETE {api}/3.0/mlflow/datasets/<dataset_id>/tags/<key>",
        "POST {api}/3.0/mlflow/datasets/create", "GET {api}/3.0/mlflow/datasets/search", "POST {api}/3.0/mlflow/datasets/search",
        "DELETE {api}/3.0/mlflow/scorers/delete", "GET {api}/3.0/mlflow/scorers/get", "GET {api}/3.0/mlflow/scorers/list",
        "PUT {api}/3.0/mlflow/scorers/online-config", "GET {api}/3.0/mlflow/scorers/online-configs",
        "POST {api}/3.0/mlflow/scorers/register", "GET {api}/3.0/mlflow/scorers/versions",
        "POST /ajax-api/3.0/mlflow/scorer/invoke", "POST /ajax-api/3.0/mlflow/genai/evaluate/invoke",
        "POST {api}/3.0/mlflow/issues", "GET {api}/3.0/mlflow/issues/<issue_id>", "PATCH {api}/3.0/mlflow/issues/<issue_id>",
        "POST {api}/3.0/mlflow/issues/search", "POST /ajax-api/3.0/mlflow/issues/invoke",
        "POST {api}/3.0/mlflow/label-schemas/create", "DELETE {api}/3.0/mlflow/label-schemas/delete",
        "GET {api}/3.0/mlflow/label-schemas/get", "GET {api}/3.0/mlflow/label-schemas/get-by-name",
        "GET {api}/3.0/mlflow/label-schemas/list", "PATCH {api}/3.0/mlflow/label-schemas/update",
        "POST {api}/3.0/mlflow/prompt-optimization/jobs", "DELETE {api}/3.0/mlflow/prompt-optimization/jobs/<job_id>",
        "GET {api}/3.0/mlflow/prompt-optimization/jobs/<job_id>", "POST {api}/3.0/mlflow/prompt-optimization/jobs/<job_id>/cancel",
        "GET {api}/3.0/mlflow/prompt-optimization/jobs/search", "POST {api}/3.0/mlflow/prompt-optimization/jobs/search",
        "POST {api}/3.0/mlflow/review-queues/create", "POST {api}/3.0/mlflow/review-queues/delete",
        "GET {api}/3.0/mlflow/review-queues/get", "GET {api}/3.0/mlflow/review-queues/get-by-name",
        "POST {api}/3.0/mlflow/review-queues/get-or-create-user", "POST {api}/3.0/mlflow/review-queues/items/add",
        "GET {api}/3.0/mlflow/review-queues/items/list", "POST {api}/3.0/mlflow/review-queues/items/remove",
        "POST {api}/3.0/mlflow/review-queues/items/set-status", "GET {api}/3.0/mlflow/review-queues/list",
        "POST {api}/3.0/mlflow/review-queues/update",
        "GET /ajax-api/3.0/mlflow/jobs/<job_id>", "PATCH /ajax-api/3.0/mlflow/jobs/cancel/<job_id>",
        "GET /ajax-api/3.0/jobs/<job_id>", "POST /ajax-api/3.0/jobs/", "PATCH /ajax-api/3.0/jobs/cancel/<job_id>",
        "POST /ajax-api/3.0/jobs/search",
        "POST /ajax-api/2.0/mlflow/runs/create-promptlab-run", "POST /ajax-api/3.0/mlflow/demo/delete",
        "POST /ajax-api/3.0/mlflow/demo/generate",
    ],
    # platform-wide configuration and integrations
    "platform": [
        "GET {api}/2.0/mlflow/webhooks", "POST {api}/2.0/mlflow/webhooks", "DELETE {api}/2.0/mlflow/webhooks/<webhook_id>",
        "GET {api}/2.0/mlflow/webhooks/<webhook_id>", "PATCH {api}/2.0/mlflow/webhooks/<webhook_id>",
        "POST {api}/2.0/mlflow/webhooks/<webhook_id>/test",
        "GET {api}/3.0/mlflow/workspaces", "POST {api}/3.0/mlflow/workspaces", "DELETE {api}/3.0/mlflow/workspaces/<workspace_name>",
        "GET {api}/3.0/mlflow/workspaces/<workspace_name>", "PATCH {api}/3.0/mlflow/workspaces/<workspace_name>",
        # OTLP ingestion writes spans into the experiment named by a header, merging with any trace id
        "POST /v1/traces",
        # Databricks-only (inference tables, SQL warehouses)
        "GET {api}/2.0/mlflow/unified-traces", "GET {api}/2.0/mlflow/get-online-trace-details",
        # presigned URLs and multipart uploads: only with cloud artifact stores (not proxied local ones)
        "POST {api}/2.0/mlflow/artifacts/presigned-upload-url", "POST {api}/2.0/mlflow/artifacts/presigned-download-url",
        "GET {api}/2.0/mlflow-artifacts/presigned/<path:artifact_path>",
        "POST {api}/2.0/mlflow-artifacts/mpu/create/<path:artifact_path>",
        "POST {api}/2.0/mlflow-artifacts/mpu/complete/<path:artifact_path>",
        "POST {api}/2.0/mlflow-artifacts/mpu/abort/<path:artifact_path>",
    ],
}
_MCP = ["", "/endpoints", "/<path:name>", "/<path:name>/versions", "/<path:name>/versions/<path:version>",
        "/<path:name>/versions/<path:version>/tags", "/<path:name>/versions/<path:version>/tags/<path:key>",
        "/<path:name>/endpoints", "/<path:name>/endpoints/<endpoint_id>", "/<path:name>/tags", "/<path:name>/tags/<path:key>",
        "/<path:name>/aliases", "/<path:name>/aliases/<path:alias>"]
_MCP_METHODS = {"": "GET POST", "/endpoints": "GET", "/<path:name>": "GET PATCH DELETE", "/<path:name>/versions": "GET POST",
                "/<path:name>/versions/<path:version>": "GET PATCH DELETE", "/<path:name>/versions/<path:version>/tags": "POST",
                "/<path:name>/versions/<path:version>/tags/<path:key>": "DELETE", "/<path:name>/endpoints": "GET POST",
                "/<path:name>/endpoints/<endpoint_id>": "GET PATCH DELETE", "/<path:name>/tags": "POST",
                "/<path:name>/tags/<path:key>": "DELETE", "/<path:name>/aliases": "POST",
                "/<path:name>/aliases/<path:alias>": "GET DELETE"}
_ADMIN_FAMILIES["mcp"] = [f"{m} {{api}}/3.0/mlflow/mcp-servers{p}" for p in _MCP for m in _MCP_METHODS[p].split()]

#: MLflow's assistant: runs tools and writes its config and skills on the MLflow host; it trusts
#: "same host" callers, which behind any proxy are everyone
_ASSISTANT = [
    "POST /ajax-api/3.0/mlflow/assistant/message", "GET /ajax-api/3.0/mlflow/assistant/sessions/<session_id>/stream",
    "PATCH /ajax-api/3.0/mlflow/assistant/sessions/<session_id>",
    "POST /ajax-api/3.0/mlflow/assistant/sessions/<session_id>/permission",
    "POST /ajax-api/3.0/mlflow/assistant/sessions/<session_id>/tool-result",
    "GET /ajax-api/3.0/mlflow/assistant/providers/<provider>/health", "GET /ajax-api/3.0/mlflow/assistant/providers",
    "GET /ajax-api/3.0/mlflow/assistant/config", "PUT /ajax-api/3.0/mlflow/assistant/config",
    "POST /ajax-api/3.0/mlflow/assistant/skills/install", "GET /ajax-api/3.0/mlflow/assistant/providers/<provider>/models",
]

_TABLE: dict[str, Rule] = {
    # ---- no project data ----
    "GET /health": PUBLIC,
    "GET /version": USER,
    "GET /": USER,
    "GET /static-files/<path:path>": USER,
    "GET /build/<path:filename>": USER,
    "GET {api}/3.0/mlflow/server-info": USER,
    "GET /ajax-api/3.0/mlflow/ui-telemetry": USER,
    "POST /ajax-api/3.0/mlflow/ui-telemetry": USER,
    # ---- experiments ----
    "POST {api}/2.0/mlflow/experiments/create": CreateExperiment(),
    "GET {api}/2.0/mlflow/experiments/get": EXP_SEE,
    "GET {api}/2.0/mlflow/experiments/get-by-name": R(see("experiment_name", "experiment_name")),
    "GET {api}/2.0/mlflow/experiments/search": Search(EXPERIMENTS),
    "POST {api}/2.0/mlflow/experiments/search": Search(EXPERIMENTS),
    "POST {api}/2.0/mlflow/experiments/update": Rename(change("experiment", "experiment_id"), project_of_experiment, "/"),
    "POST {api}/2.0/mlflow/experiments/delete": EXP_CHANGE,
    "POST {api}/2.0/mlflow/experiments/restore": EXP_CHANGE,
    "POST {api}/2.0/mlflow/experiments/set-experiment-tag": ExperimentTag(),
    "POST {api}/2.0/mlflow/experiments/delete-experiment-tag": ExperimentTag(),
    "POST /ajax-api/2.0/mlflow/experiments/search-datasets": EXPS_SEE,
    "POST {api}/2.0mlflow/experiments/search-datasets": EXPS_SEE,  # sic: MLflow registers it without the slash too
    # ---- runs ----
    "POST {api}/2.0/mlflow/runs/create": CreateRun(),
    "GET {api}/2.0/mlflow/runs/get": RUN_SEE,
    "POST {api}/2.0/mlflow/runs/search": EXPS_SEE,
    "POST {api}/2.0/mlflow/runs/update": RUN_CHANGE,
    "POST {api}/2.0/mlflow/runs/delete": RUN_CHANGE,
    "POST {api}/2.0/mlflow/runs/restore": RUN_CHANGE,
    "POST {api}/2.0/mlflow/runs/log-metric": R(change("run", "run_id", "run_uuid"), see("logged_model", "model_id", required=False)),
    "POST {api}/2.0/mlflow/runs/log-parameter": RUN_CHANGE,
    "POST {api}/2.0/mlflow/runs/log-batch": LogBatch(),
    "POST {api}/2.0/mlflow/runs/log-model": RUN_CHANGE,
    "POST {api}/2.0/mlflow/runs/log-inputs": R(change("run", "run_id"), see("logged_model", "models.model_id", required=False)),
    "POST {api}/2.0/mlflow/runs/outputs": R(change("run", "run_id"), see("logged_model", "models.model_id", required=False)),
    "POST {api}/2.0/mlflow/runs/set-tag": RunTag(),
    "POST {api}/2.0/mlflow/runs/delete-tag": RunTag(),
    "GET {api}/2.0/mlflow/metrics/get-history": RUN_SEE,
    "GET {api}/2.0/mlflow/metrics/get-history-bulk-interval": RUNS_SEE,
    "GET /ajax-api/2.0/mlflow/metrics/get-history-bulk": R(see("run", "run_id")),
    # ---- run artifacts ----
    "GET {api}/2.0/mlflow/artifacts/list": RUN_SEE,
    "GET /get-artifact": RUN_SEE,
    # the body is the file itself (the run and the path are in the query)
    "POST /ajax-api/2.0/mlflow/upload-artifact": Rule(change("run", "run_uuid", "run_id"), needs_body=False),
    # ---- proxied artifacts (mlflow-artifacts:/<experiment id>/...) ----
    "GET {api}/2.0/mlflow-artifacts/artifacts": R(see("artifact", "path")),
    "GET {api}/2.0/mlflow-artifacts/artifacts/<path:artifact_path>": ART_SEE,
    "PUT {api}/2.0/mlflow-artifacts/artifacts/<path:artifact_path>": Rule(change("artifact", "artifact_path"), needs_body=False),
    "DELETE {api}/2.0/mlflow-artifacts/artifacts/<path:artifact_path>": Rule(change("artifact", "artifact_path"),
                                                                             needs_body=False),
    # ---- logged models ----
    "POST {api}/2.0/mlflow/logged-models": CreateLoggedModel(),
    "GET {api}/2.0/mlflow/logged-models/<model_id>": MODEL_SEE,
    "PATCH {api}/2.0/mlflow/logged-models/<model_id>": MODEL_CHANGE,
    "DELETE {api}/2.0/mlflow/logged-models/<model_id>": MODEL_CHANGE,
    "POST {api}/2.0/mlflow/logged-models/search": EXPS_SEE,
    "PATCH {api}/2.0/mlflow/logged-models/<model_id>/tags": LoggedModelTags(),
    "DELETE {api}/2.0/mlflow/logged-models/<model_id>/tags/<tag_key>": LoggedModelTags(),
    "POST {api}/2.0/mlflow/logged-models/<model_id>/params": MODEL_CHANGE,
    "GET {api}/2.0/mlflow/logged-models/<model_id>/artifacts/directories": MODEL_SEE,
    "GET /ajax-api/2.0/mlflow/logged-models/<model_id>/artifacts/files": MODEL_SEE,
    # ---- traces (v2: request_id, v3: trace_id) and assessments ----
    "POST {api}/2.0/mlflow/traces": EXP_ADD,
    "GET {api}/2.0/mlflow/traces": EXPS_SEE,
    "PATCH {api}/2.0/mlflow/traces/<request_id>": REQUEST_ADD,
    "GET {api}/2.0/mlflow/traces/<request_id>/info": REQUEST_SEE,
    "PATCH {api}/2.0/mlflow/traces/<request_id>/tags": REQUEST_ADD,
    "DELETE {api}/2.0/mlflow/traces/<request_id>/tags": REQUEST_ADD,
    "POST {api}/2.0/mlflow/traces/delete-traces": R(add("experiment", "experiment_id"),
                                                    add("trace", "request_ids", required=False)),
    "POST {api}/2.0/mlflow/traces/link-to-run": R(add("trace", "trace_ids"), change("run", "run_id")),
    "POST {api}/2.0/mlflow/traces/link-prompts": R(add("trace", "trace_id"),
                                                   see("registered_model", "prompt_versions.name", required=False)),
    "POST {api}/3.0/mlflow/traces": R(add("experiment", "trace.trace_info.trace_location.mlflow_experiment.experiment_id")),
    "GET {api}/3.0/mlflow/traces/<trace_id>": TRACE_SEE,
    "GET {api}/3.0/mlflow/traces/get": TRACE_SEE,
    "GET {api}/3.0/mlflow/traces/batchGet": R(see("trace", "trace_ids"), see("experiment", "experiment_ids", required=False)),
    "POST {api}/3.0/mlflow/traces/batchGetInfos": R(see("trace", "trace_ids"),
                                                    see("experiment", "experiment_ids", required=False)),
    "POST {api}/3.0/mlflow/traces/search": R(see("experiment", "locations.mlflow_experiment.experiment_id")),
    "POST {api}/3.0/mlflow/traces/delete-traces": R(add("experiment", "experiment_id"),
                                                    add("trace", "request_ids", required=False)),
    "POST {api}/3.0/mlflow/traces/metrics": EXPS_SEE,
    "POST {api}/3.0/mlflow/traces/calculate-filter-correlation": EXPS_SEE,
    "PATCH {api}/3.0/mlflow/traces/<trace_id>/tags": TRACE_ADD,
    "DELETE {api}/3.0/mlflow/traces/<trace_id>/tags": TRACE_ADD,
    "POST {api}/3.0/mlflow/traces/<trace_id>/assessments": R(add("trace", "trace_id", "assessment.trace_id")),
    "GET {api}/3.0/mlflow/traces/<trace_id>/assessments/<assessment_id>": TRACE_SEE,
    "PATCH {api}/3.0/mlflow/traces/<trace_id>/assessments/<assessment_id>": R(add("trace", "trace_id", "assessment.trace_id")),
    "DELETE {api}/3.0/mlflow/traces/<trace_id>/assessments/<assessment_id>": TRACE_ADD,
    "GET /ajax-api/2.0/mlflow/get-trace-artifact": REQUEST_SEE,
    "GET /ajax-api/3.0/mlflow/get-trace-artifact": REQUEST_SEE,
    # ---- model registry (registered models and prompts are named <project>.<name>) ----
    "POST {api}/2.0/mlflow/registered-models/create": REG_ADD,
    "GET {api}/2.0/mlflow/registered-models/get": REG_SEE,
    "GET {api}/2.0/mlflow/registered-models/search": Search(REGISTERED_MODELS),
    "POST {api}/2.0/mlflow/registered-models/rename": Rename(add("registered_model", "name"), project_of_model, "."),
    "PATCH {api}/2.0/mlflow/registered-models/update": REG_ADD,
    "DELETE {api}/2.0/mlflow/registered-models/delete": REG_ADD,
    "POST {api}/2.0/mlflow/registered-models/set-tag": REG_ADD,
    "DELETE {api}/2.0/mlflow/registered-models/delete-tag": REG_ADD,
    "GET {api}/2.0/mlflow/registered-models/get-latest-versions": REG_SEE,
    "POST {api}/2.0/mlflow/registered-models/get-latest-versions": REG_SEE,
    "POST {api}/2.0/mlflow/registered-models/alias": REG_ADD,
    "DELETE {api}/2.0/mlflow/registered-models/alias": REG_ADD,
    "GET {api}/2.0/mlflow/registered-models/alias": REG_SEE,
    "POST {api}/2.0/mlflow/model-versions/create": CreateModelVersion(),
    "GET {api}/2.0/mlflow/model-versions/get": REG_SEE,
    "GET {api}/2.0/mlflow/model-versions/get-download-uri": REG_SEE,
    "GET {api}/2.0/mlflow/model-versions/search": Search(MODEL_VERSIONS),
    "PATCH {api}/2.0/mlflow/model-versions/update": REG_ADD,
    "DELETE {api}/2.0/mlflow/model-versions/delete": REG_ADD,
    "POST {api}/2.0/mlflow/model-versions/set-tag": REG_ADD,
    "DELETE {api}/2.0/mlflow/model-versions/delete-tag": REG_ADD,
    "POST {api}/2.0/mlflow/model-versions/transition-stage": REG_ADD,
    "GET /model-versions/get-artifact": REG_SEE,
    # ---- the UI's GraphQL ----
    "GET /graphql": GraphQL(),
    "POST /graphql": GraphQL(),
}
for family in _ADMIN_FAMILIES.values():
    _TABLE.update(dict.fromkeys(family, ADMIN))
_TABLE.update(dict.fromkeys(_ASSISTANT, NEVER))


def _expand(table: dict[str, Rule]) -> dict[str, Rule]:
    out: dict[str, Rule] = {}
    for key, rule in table.items():
        for prefix in ("/api", "/ajax-api") if "{api}" in key else ("",):
            k = key.replace("{api}", prefix)
            if k in out:
                raise ValueError(f"route {k} is classified twice")
            out[k] = rule
    return out


#: "METHOD /flask/style/<rule>" -> rule
ROUTES: dict[str, Rule] = _expand(_TABLE)


def normalize(path: str) -> str:
    """FastAPI's ``{name}`` / ``{name:path}`` in Flask's syntax (``<name>`` / ``<path:name>``)."""
    path = re.sub(r"\{(\w+):path\}", r"<path:\1>", path)
    return re.sub(r"\{(\w+)\}", r"<\1>", path)


def _pattern(rule: str) -> re.Pattern:
    out, pos = [], 0
    for m in re.finditer(r"<(?:(\w+):)?(\w+)>", rule):
        out.append(re.escape(rule[pos:m.start()]))
        out.append(f"(?P<{m.group(2)}>.+)" if m.group(1) == "path" else f"(?P<{m.group(2)}>[^/]+)")
        pos = m.end()
    out.append(re.escape(rule[pos:]))
    return re.compile("".join(out) + r"\Z")


@dataclass(frozen=True)
class Match:
    key: str  # "METHOD /rule"
    params: dict[str, str]
    rule: Rule | None  # None: the route exists but is not classified (refused)


class Router:
    """Finds the route MLflow will serve a request with, as MLflow does: its native FastAPI
    routes first (in order), then the Flask URL map (werkzeug's own matching)."""

    def __init__(self, native: list[tuple[str, str]], flask_app):
        self.native = [(method, rule, _pattern(rule)) for method, rule in native]
        self.adapter = flask_app.url_map.bind("localhost")

    def match(self, method: str, path: str) -> Match | None:
        method = "GET" if method == "HEAD" else method
        for m, rule, pat in self.native:
            found = pat.match(path)
            if found and m == method:
                key = f"{m} {rule}"
                return Match(key, found.groupdict(), ROUTES.get(key))
        from werkzeug.exceptions import HTTPException

        try:
            rule, params = self.adapter.match(path, method=method, return_rule=True)
        except HTTPException:  # not found, wrong method, or a redirect to the slash form
            return None
        except Exception:  # werkzeug's RequestRedirect is a routing exception, not an HTTPException in every version
            return None
        key = f"{method} {rule.rule}"
        return Match(key, {k: str(v) for k, v in params.items()}, ROUTES.get(key))


def native_routes(fastapi_app) -> list[tuple[str, str]]:
    """``(method, rule)`` of the FastAPI app's own routes (not the mounted Flask app), in the
    order Starlette tries them."""
    from starlette.routing import Mount

    def walk(routes):
        for r in routes:
            nested = getattr(r, "effective_route_contexts", None)  # FastAPI >= 0.160: included routers
            if nested is not None:
                yield from walk(list(nested()))
            elif isinstance(r, Mount):
                continue
            else:
                yield r

    out = []
    for r in walk(fastapi_app.router.routes):
        for method in sorted(getattr(r, "methods", None) or ()):
            if method != "HEAD":
                out.append((method, normalize(r.path)))
    return out


def installed_routes(fastapi_app, flask_app) -> set[str]:
    """Every ``"METHOD /rule"`` the server answers (what the classification must cover)."""
    keys = {f"{m} {p}" for m, p in native_routes(fastapi_app)}
    for rule in flask_app.url_map.iter_rules():
        for m in rule.methods - {"HEAD", "OPTIONS"}:
            keys.add(f"{m} {rule.rule}")
    return keys
