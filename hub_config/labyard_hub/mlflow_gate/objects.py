"""Which project an MLflow object belongs to, and who owns it: the facts the gate decides on.

* An **experiment** belongs to the project its name starts with: ``<project>/<anything>``
  (autolog names them ``<project>/<notebook path>``). Its owner is the user who created it
  through the gate (tag ``labyard.user``, set by the gate).
* A **run**, **logged model** or **trace** belongs to the project of its experiment. A run's
  owner is its ``user_id`` (set by the gate from the authenticated user); a logged model's is
  its ``labyard.user`` tag (set by the gate).
* A **registered model** (and prompt) belongs to the project its name starts with:
  ``<project>.<name>`` (MLflow does not allow ``/`` in model names).
* A **proxied artifact** path (``mlflow-artifacts:/<experiment id>/...``) belongs to the project of
  the experiment named by its first segment.

Objects without a project (the ``Default`` experiment, models named otherwise) are for admins.
Lookups go through MLflow's own server-side stores (the ones its handlers use), so they are
blocking: call :class:`Objects` from a worker thread.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from ..projects import PROJECT_NAME_RE

#: tag the gate sets on experiments and logged models it creates: the authenticated user
OWNER_TAG = "labyard.user"
#: run tags that name the run's user: set by the gate from the authenticated user, never by clients
RUN_USER_TAGS = ("mlflow.user", "labyard.user")


class Refused(Exception):
    """A request the gate answers itself: ``status`` and a message for the client."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or {400: "INVALID_PARAMETER_VALUE", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                             404: "RESOURCE_DOES_NOT_EXIST", 413: "REQUEST_LIMIT_EXCEEDED"}.get(status, "INTERNAL_ERROR")


def project_of_experiment(name: str | None) -> str | None:
    """``"vision/analysis/fit.ipynb"`` → ``"vision"``; None for names outside the convention."""
    project, sep, rest = (name or "").partition("/")
    return project if sep and rest and PROJECT_NAME_RE.match(project) else None


def project_of_model(name: str | None) -> str | None:
    """``"vision.classifier"`` → ``"vision"``; None for registered model names outside the convention."""
    project, sep, rest = (name or "").partition(".")
    return project if sep and rest and PROJECT_NAME_RE.match(project) else None


@dataclass(frozen=True)
class Obj:
    """An MLflow object as the gate sees it."""

    kind: str  # "experiment", "run", "logged model", "trace", "registered model", "artifact"
    id: str
    project: str | None
    owner: str | None = None
    experiment_id: str | None = None
    #: members (not only the owner) may write it: traces and their artifacts
    shared: bool = False

    def describe(self) -> str:
        return f"{self.kind} {self.id}"


class _Cache:
    """A small LRU with an optional age limit (thread-safe)."""

    def __init__(self, size: int, max_age: float | None):
        self.size, self.max_age = size, max_age
        self._d: OrderedDict[str, tuple[float, object]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str):
        with self._lock:
            hit = self._d.get(key)
            if hit is None or (self.max_age is not None and time.monotonic() - hit[0] > self.max_age):
                return None
            self._d.move_to_end(key)
            return hit[1]

    def put(self, key: str, value) -> None:
        with self._lock:
            self._d[key] = (time.monotonic(), value)
            self._d.move_to_end(key)
            while len(self._d) > self.size:
                self._d.popitem(last=False)


class Objects:
    """Resolves ids to :class:`Obj` through MLflow's tracking store (blocking).

    What never changes is cached for good (a run's, trace's or logged model's experiment and a
    run's user); an experiment's name, which an admin may change, for ``experiment_max_age``
    seconds.
    """

    def __init__(self, experiment_max_age: float = 10.0, store=None):
        self._store = store
        self._experiments = _Cache(10_000, experiment_max_age)
        self._fixed = _Cache(100_000, None)

    @property
    def store(self):
        if self._store is None:
            from mlflow.server.handlers import _get_tracking_store

            self._store = _get_tracking_store()
        return self._store

    def _lookup(self, what: str, ident: str, fn):
        from mlflow.exceptions import MlflowException

        try:
            return fn(ident)
        except MlflowException as e:
            status = e.get_http_status_code()
            if status == 404 or e.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise Refused(404, f"{what} {ident!r} not found") from e
            if status == 400:
                raise Refused(400, f"invalid {what} id {ident!r}: {e.message}") from e
            raise

    def experiment(self, experiment_id: str) -> Obj:
        hit = self._experiments.get(experiment_id)
        if hit is None:
            exp = self._lookup("experiment", experiment_id, self.store.get_experiment)
            hit = Obj("experiment", experiment_id, project_of_experiment(exp.name), owner=exp.tags.get(OWNER_TAG),
                      experiment_id=experiment_id)
            self._experiments.put(experiment_id, hit)
        return hit

    def _in_experiment(self, kind: str, ident: str, load, shared: bool = False) -> Obj:
        key = f"{kind}:{ident}"
        fixed = self._fixed.get(key)
        if fixed is None:
            fixed = load()
            self._fixed.put(key, fixed)
        experiment_id, owner = fixed
        return Obj(kind, ident, self.experiment(experiment_id).project, owner=owner, experiment_id=experiment_id, shared=shared)

    def run(self, run_id: str) -> Obj:
        def load():
            info = self._lookup("run", run_id, self.store.get_run).info
            return info.experiment_id, info.user_id or None

        return self._in_experiment("run", run_id, load)

    def logged_model(self, model_id: str) -> Obj:
        def load():
            model = self._lookup("logged model", model_id, self.store.get_logged_model)
            return model.experiment_id, (model.tags or {}).get(OWNER_TAG)

        return self._in_experiment("logged model", model_id, load)

    def trace(self, trace_id: str) -> Obj:
        def load():
            info = self._lookup("trace", trace_id, self.store.get_trace_info)
            return info.experiment_id, None

        return self._in_experiment("trace", trace_id, load, shared=True)

    def registered_model(self, name: str) -> Obj:
        return Obj("registered model", name, project_of_model(name))

    def artifact(self, path: str, owner: bool = False) -> Obj:
        """A proxied artifact path: ``<experiment id>/<run id>/artifacts/...``,
        ``<experiment id>/models/<model id>/...``, ``<experiment id>/traces/<trace id>/...``.

        With ``owner``, also the owner of the run or logged model the path belongs to; a trace's
        artifacts are ``shared`` (members write them); other paths under an experiment have no
        owner (only admins may write there).
        """
        parts = path.split("/")
        if any(p in ("", ".", "..") for p in parts) or "\\" in path or "\x00" in path:
            raise Refused(400, f"invalid artifact path {path!r}")
        if not parts[0].isdigit():
            raise Refused(404, f"artifact path {path!r} does not belong to an experiment")
        exp = self.experiment(parts[0])
        owner_of = None
        if owner and len(parts) >= 3 and parts[1] == "models":
            owner_of = self.logged_model(parts[2])
        elif owner and len(parts) >= 3 and parts[1] != "traces":
            owner_of = self.run(parts[1])
        if owner_of is not None and owner_of.experiment_id != exp.id:
            raise Refused(403, f"artifact path {path!r} mixes experiment {exp.id} with {owner_of.describe()} of experiment "
                               f"{owner_of.experiment_id}")
        return Obj("artifact", path, exp.project, owner=owner_of.owner if owner_of else None, experiment_id=exp.id,
                   shared=len(parts) >= 3 and parts[1] == "traces")
