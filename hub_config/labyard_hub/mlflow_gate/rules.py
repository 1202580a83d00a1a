"""What each MLflow route needs: the rules of the gate's allow-list (see :mod:`.routes`).

A rule names the objects a request touches (:class:`Target`: which request fields carry their
ids, and whether the caller sees, adds to or changes them) and is decided with
:class:`labyard_hub.access.Access`:

* ``see``: members of the object's project (and admins): :meth:`Access.may_see`;
* ``add``: write into the project's shared space (create an experiment, a run, a registered
  model, a trace; tag an experiment): members, :meth:`Access.may_change` with the caller as owner;
* ``change``: change or delete an object that has an owner (a run, a logged model; rename or
  delete an experiment): its owner while a member, or an admin: :meth:`Access.may_change`.

Fields are looked up wherever MLflow might read them (path, query string, JSON body; snake_case
and lowerCamelCase, as protobuf's JSON parser accepts both), and *every* value found is checked,
so the gate never checks one field while MLflow uses another. Admins skip the checks; the
rewrites (authorship) apply to everyone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..access import Access, AccessError
from ..projects import Identity
from .objects import OWNER_TAG, RUN_USER_TAGS, Obj, Objects, Refused, project_of_experiment, project_of_model


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


@dataclass
class Request:
    """What the gate knows of a request before it reaches MLflow."""

    method: str
    path: str
    path_params: dict[str, str] = field(default_factory=dict)
    query: dict[str, list[str]] = field(default_factory=dict)
    body: Any = None  # parsed JSON (rules with needs_body) or None
    headers: dict[str, str] = field(default_factory=dict)

    def values(self, name: str) -> list[str]:
        """Every value of field ``name`` (dotted for nested fields; lists are walked) in the path,
        the query string and the JSON body, under its snake_case and lowerCamelCase names."""
        found: list[Any] = []
        if "." not in name:
            for n in {name, camel(name)}:
                if n in self.path_params:
                    found.append(self.path_params[n])
                found.extend(self.query.get(n, ()))
        for node in _walk(self.body, name.split(".")):
            found.extend(node if isinstance(node, list) else [node])
        out = []
        for v in found:
            if isinstance(v, bool) or not isinstance(v, (str, int)):
                raise Refused(400, f"{name} must be a string, not {type(v).__name__}")
            out.append(str(v))
        return out


def _walk(node: Any, parts: list[str]):
    if not parts:
        yield node
        return
    if isinstance(node, list):
        for item in node:
            yield from _walk(item, parts)
    elif isinstance(node, dict):
        for key in {parts[0], camel(parts[0])}:
            if key in node and node[key] is not None:
                yield from _walk(node[key], parts[1:])


class Decision:
    """One request's decision: the caller, the rules and the objects (runs in a worker thread)."""

    def __init__(self, identity: Identity, access: Access, objects: Objects):
        self.identity = identity
        self.access = access
        self.objects = objects

    def _ask(self, check: Callable[[], None]) -> None:
        try:
            check()
        except AccessError as e:
            raise Refused(e.status, e.message) from e

    def see(self, obj: Obj) -> None:
        if obj.project is None:
            raise Refused(403, f"{obj.describe()} belongs to no project; only admins may see it")
        self._ask(lambda: self.access.may_see(self.identity, obj.project))

    def add(self, obj: Obj) -> None:
        if obj.project is None:
            raise Refused(403, f"{obj.describe()} belongs to no project; only admins may write to it")
        self._ask(lambda: self.access.may_change(self.identity, self.identity.username, obj.project))

    def change(self, obj: Obj) -> None:
        if obj.shared:
            return self.add(obj)
        if obj.project is None:
            raise Refused(403, f"{obj.describe()} belongs to no project; only admins may change it")
        self.see(obj)  # a non-member hears "not a member", not who owns it
        if obj.owner is None:
            raise Refused(403, f"{obj.describe()} has no owner recorded by Labyard; only admins may change it")
        self._ask(lambda: self.access.may_change(self.identity, obj.owner, obj.project))


#: how to turn an id into an object
RESOLVERS: dict[str, Callable[[Objects, str, bool], Obj]] = {
    "experiment": lambda o, v, owner: o.experiment(v),
    "experiment_name": lambda o, v, owner: Obj("experiment", v, project_of_experiment(v)),
    "run": lambda o, v, owner: o.run(v),
    "logged_model": lambda o, v, owner: o.logged_model(v),
    "trace": lambda o, v, owner: o.trace(v),
    "registered_model": lambda o, v, owner: o.registered_model(v),
    "artifact": lambda o, v, owner: o.artifact(v, owner=owner),
}


@dataclass(frozen=True)
class Target:
    """Objects a request touches: their kind, the fields carrying their ids, the action."""

    kind: str
    fields: tuple[str, ...]
    action: str = "see"  # see | add | change
    required: bool = True

    def check(self, req: Request, d: Decision) -> list[Obj]:
        values = [v for f in self.fields for v in req.values(f)]
        if not values:
            if self.required:
                raise Refused(400, f"{' or '.join(self.fields)} is required")
            return []
        objs = []
        for v in dict.fromkeys(values):
            obj = RESOLVERS[self.kind](d.objects, v, self.action == "change")
            getattr(d, self.action)(obj)
            objs.append(obj)
        return objs


def see(kind: str, *fields: str, required: bool = True) -> Target:
    return Target(kind, fields, "see", required)


def add(kind: str, *fields: str, required: bool = True) -> Target:
    return Target(kind, fields, "add", required)


def change(kind: str, *fields: str, required: bool = True) -> Target:
    return Target(kind, fields, "change", required)


# ---- rules -------------------------------------------------------------------------------------
class Rule:
    """The allow-list entry of a route.

    Attributes:
        login: the caller must be a hub user (False only for health checks).
        admin: only hub admins.
        never: refused to everyone (MLflow's same-host-only and assistant endpoints).
        needs_body: the gate reads (and may rewrite) the JSON body before MLflow does.
        filter: a search whose answer the gate filters for non-admins (see :class:`Filter`).
    """

    login = True
    admin = False
    never = False
    filter: Filter | None = None

    def __init__(self, *targets: Target, needs_body: bool | None = None):
        self.targets = targets
        self._needs_body = needs_body

    @property
    def needs_body(self) -> bool:
        return self._needs_body if self._needs_body is not None else bool(self.targets)

    def authorize(self, req: Request, d: Decision) -> None:
        """Raise :class:`Refused` unless ``d.identity`` may make this request (not for admins)."""
        for t in self.targets:
            t.check(req, d)

    def rewrite(self, req: Request, identity: Identity) -> Any:
        """The JSON body MLflow gets (for everyone, admins too); ``req.body`` unchanged by default."""
        return req.body

    def describe(self) -> str:
        if self.never:
            return "never"
        if not self.login:
            return "public"
        if self.admin:
            return "admin"
        return " ".join(f"{t.action}:{t.kind}({','.join(t.fields)})" for t in self.targets) or "user"


class Public(Rule):
    login = False


class User(Rule):
    """Any hub user: the request touches no project's data (the UI's files, server info)."""


class Admin(Rule):
    admin = True


class Never(Rule):
    never = True


def _json_object(req: Request) -> dict:
    if not isinstance(req.body, dict):
        raise Refused(400, "the request body must be a JSON object")
    return req.body


def _tags_without(tags: Any, keys: tuple[str, ...]) -> list:
    return [t for t in (tags or []) if not (isinstance(t, dict) and t.get("key") in keys)]


def _owned_by(req: Request, identity: Identity) -> dict:
    """The body with the caller as the owner tag (whatever the client put there)."""
    body = dict(_json_object(req))
    tags = _tags_without(body.pop("tags", None), (OWNER_TAG,))
    body["tags"] = [*tags, {"key": OWNER_TAG, "value": identity.username}]
    return body


class CreateExperiment(Rule):
    """``experiments/create``: the name puts it in a project the caller is a member of; the
    artifact location is the server's; the caller is recorded as its owner."""

    def __init__(self):
        super().__init__(add("experiment_name", "name"))

    def authorize(self, req, d):
        super().authorize(req, d)
        if req.values("artifact_location"):
            raise Refused(400, "artifact_location is chosen by the server (only admins may set it)")

    def rewrite(self, req, identity):
        return _owned_by(req, identity)


class Rename(Rule):
    """``experiments/update``, ``registered-models/rename``: a new name keeps the object in its
    project, whoever asks (a member of both projects too: only admins move things)."""

    def __init__(self, target: Target, project_of: Callable[[str], str | None], sep: str):
        super().__init__(target)
        self.project_of, self.sep = project_of, sep

    def authorize(self, req, d):
        for obj in self.targets[0].check(req, d):
            for name in req.values("new_name"):
                if self.project_of(name) != obj.project:
                    raise Refused(403, f"renaming {obj.describe()} to {name!r} would move it out of project "
                                       f"{obj.project!r} (names start with '{obj.project}{self.sep}')")


class ExperimentTag(Rule):
    """``set-experiment-tag``/``delete-experiment-tag``: members; the owner tag is the server's."""

    def __init__(self):
        super().__init__(add("experiment", "experiment_id"))

    def authorize(self, req, d):
        super().authorize(req, d)
        if OWNER_TAG in req.values("key"):
            raise Refused(403, f"the tag {OWNER_TAG} is set by the server")


class CreateRun(Rule):
    """``runs/create``: members of the experiment's project; the run's user is the caller,
    whatever the client says (``user_id``, tags ``mlflow.user`` and ``labyard.user``)."""

    def __init__(self, *extra: Target):
        super().__init__(add("experiment", "experiment_id"), *extra)

    def rewrite(self, req, identity):
        body = dict(_json_object(req))
        body.pop("userId", None)
        body["user_id"] = identity.username
        tags = _tags_without(body.pop("tags", None), RUN_USER_TAGS)
        body["tags"] = [*tags, *({"key": k, "value": identity.username} for k in RUN_USER_TAGS)]
        return body


class RunTag(Rule):
    """``runs/set-tag``/``runs/delete-tag``: the run's owner; the user tags are the server's."""

    def __init__(self):
        super().__init__(change("run", "run_id", "run_uuid"))

    def authorize(self, req, d):
        super().authorize(req, d)
        if set(req.values("key")) & set(RUN_USER_TAGS):
            raise Refused(403, f"the tags {', '.join(RUN_USER_TAGS)} name the run's user and are set by the server")


class LogBatch(Rule):
    """``runs/log-batch``: the run's owner; tags naming the run's user are dropped (the server
    set them when the run was created)."""

    def __init__(self):
        super().__init__(change("run", "run_id", "run_uuid"))

    def rewrite(self, req, identity):
        body = dict(_json_object(req))
        if "tags" in body:
            body["tags"] = _tags_without(body["tags"], RUN_USER_TAGS)
        return body


class CreateLoggedModel(Rule):
    """``logged-models`` (create): members of the experiment's project, from a run they can
    see; the caller is recorded as its owner."""

    def __init__(self):
        super().__init__(add("experiment", "experiment_id"), see("run", "source_run_id", required=False))

    def rewrite(self, req, identity):
        return _owned_by(req, identity)


class LoggedModelTags(Rule):
    def __init__(self):
        super().__init__(change("logged_model", "model_id"))

    def authorize(self, req, d):
        super().authorize(req, d)
        keys = set(req.values("tag_key")) | set(req.values("tags.key"))
        if OWNER_TAG in keys:
            raise Refused(403, f"the tag {OWNER_TAG} is set by the server")


class CreateModelVersion(Rule):
    """``model-versions/create``: into a registered model of the caller's project, from a run,
    logged model or artifact location the caller can see (any other source, such as a path on
    the server, only for admins)."""

    def __init__(self):
        super().__init__(add("registered_model", "name"), see("run", "run_id", required=False),
                         see("logged_model", "model_id", required=False))

    def authorize(self, req, d):
        super().authorize(req, d)
        for source in req.values("source"):
            scheme, sep, rest = source.partition(":/")
            rest = rest.lstrip("/")
            if not sep:
                raise Refused(403, f"model source {source!r} is not an MLflow URI (runs:/, models:/, mlflow-artifacts:/)")
            if scheme == "runs":
                see("run", "id").check(Request("", "", {"id": rest.split("/", 1)[0]}), d)
            elif scheme == "models":
                ref = rest.split("/")
                if ref[0].startswith("m-"):
                    see("logged_model", "id").check(Request("", "", {"id": ref[0]}), d)
                else:
                    see("registered_model", "id").check(Request("", "", {"id": ref[0]}), d)
            elif scheme == "mlflow-artifacts":
                see("artifact", "id").check(Request("", "", {"id": rest}), d)
            else:
                raise Refused(403, f"model source {source!r}: only admins may register models from {scheme}:/ locations")


@dataclass(frozen=True)
class Filter:
    """A search whose answer lists objects of every project: non-admins get theirs only.

    Attributes:
        items: key of the list in the answer (``experiments``, ``registered_models`` ...).
        project_of: the project of one listed item.
    """

    items: str
    project_of: Callable[[dict], str | None]


class Search(Rule):
    """A search the gate filters (and refills up to ``max_results``) for non-admins."""

    def __init__(self, flt: Filter):
        super().__init__(needs_body=True)
        self.filter = flt

    def describe(self):
        return f"filter:{self.filter.items}"


EXPERIMENTS = Filter("experiments", lambda e: project_of_experiment(e.get("name")))
REGISTERED_MODELS = Filter("registered_models", lambda m: project_of_model(m.get("name")))
MODEL_VERSIONS = Filter("model_versions", lambda v: project_of_model(v.get("name")))


class GraphQL(Rule):
    """``/graphql`` (the UI's run page): each root field checked like its REST twin.

    Allowed root fields: ``mlflowGetExperiment``, ``mlflowGetRun``, ``mlflowListArtifacts``,
    ``mlflowGetMetricHistoryBulkInterval``, ``mlflowSearchRuns``, ``mlflowSearchDatasets``
    (and ``__typename``); anything else only for admins.
    """

    FIELDS = {
        "mlflowGetExperiment": see("experiment", "experiment_id"),
        "mlflowGetRun": see("run", "run_id", "run_uuid"),
        "mlflowListArtifacts": see("run", "run_id", "run_uuid"),
        "mlflowGetMetricHistoryBulkInterval": see("run", "run_ids"),
        "mlflowSearchRuns": see("experiment", "experiment_ids"),
        "mlflowSearchDatasets": see("experiment", "experiment_ids"),
    }

    def __init__(self):
        super().__init__(needs_body=True)

    def describe(self):
        return "graphql:" + ",".join(self.FIELDS)

    def authorize(self, req, d):
        from graphql import GraphQLError, parse
        from graphql.language import FieldNode, FragmentDefinitionNode, FragmentSpreadNode, InlineFragmentNode, OperationDefinitionNode
        from graphql.utilities import value_from_ast_untyped

        body = req.body if isinstance(req.body, dict) else {}
        queries = {q for q in [body.get("query"), *req.query.get("query", ())] if q}
        if len(queries) != 1:
            raise Refused(400, "a GraphQL request carries exactly one query")
        variables = body.get("variables") if "variables" in body else None
        if variables is None and req.query.get("variables"):
            import json

            try:
                variables = json.loads(req.query["variables"][0])
            except ValueError as e:
                raise Refused(400, f"variables are not JSON: {e}") from e
        if variables is not None and not isinstance(variables, dict):
            raise Refused(400, "variables must be a JSON object")
        try:
            doc = parse(next(iter(queries)))
        except GraphQLError as e:
            raise Refused(400, f"invalid GraphQL query: {e.message}") from e
        fragments = {f.name.value: f for f in doc.definitions if isinstance(f, FragmentDefinitionNode)}

        def roots(selection_set, seen=()):
            for sel in selection_set.selections:
                if isinstance(sel, FieldNode):
                    yield sel
                elif isinstance(sel, InlineFragmentNode):
                    yield from roots(sel.selection_set, seen)
                elif isinstance(sel, FragmentSpreadNode):
                    name = sel.name.value
                    if name in seen or name not in fragments:
                        raise Refused(400, f"unknown or recursive fragment {name!r}")
                    yield from roots(fragments[name].selection_set, (*seen, name))

        for op in doc.definitions:
            if not isinstance(op, OperationDefinitionNode):
                continue
            for node in roots(op.selection_set):
                name = node.name.value
                if name == "__typename":
                    continue
                target = self.FIELDS.get(name)
                if target is None:
                    raise Refused(403, f"GraphQL field {name!r} is only for admins through Labyard")
                args = {a.name.value: value_from_ast_untyped(a.value, variables or {}) for a in node.arguments}
                target.check(Request("", "", body=args.get("input")), d)
