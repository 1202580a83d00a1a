"""What ``POST /labyard/diff`` can compare, and how each source is found inside this server's project.

A source is one of (the ``kind`` field; see docs/dev/diff.md for the request shape):

``path``        a notebook as saved on this server;
``checkpoint``  its last checkpoint (or a given checkpoint id);
``git``         the notebook at a git ref (``HEAD``, a branch, a commit, or ``INDEX`` for the staged one);
``inline``      a notebook sent in the request (the unsaved state of an editor);
``scheduled``   a scheduled run's ``output`` (default) or ``input`` notebook, from labyard-scheduler;
``mlflow``      an MLflow run's ``notebook`` snapshot (default) or its ``output`` notebook.

Every path is relative to the server's root, normalised, and must stay inside the project
directory after symlinks are resolved; runs are fetched on the user's behalf (the scheduler and
MLflow decide what the user may see) and must also belong to this server's project. Anything
else is refused with :class:`SourceError` (400/403/404 and a message).
"""

from __future__ import annotations

import asyncio
import json
import os
import posixpath
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from jupyter_server.utils import ensure_async
from pydantic import BaseModel, ConfigDict, Field

from .. import runs as mlflow
from ..runs import MlflowUnavailable
from ..scheduling import OUTPUT_DIR, call_scheduler
from .engine import DiffOptions
from .worker import Input

GIT_TIMEOUT = 30
_RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_REF = re.compile(r"^(?!-)[^\s:~^?*\[\\]{1,200}$")


class SourceError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class _Source(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PathSource(_Source):
    kind: Literal["path"]
    path: str = Field(description="notebook path relative to the server's root, inside the project")


class CheckpointSource(_Source):
    kind: Literal["checkpoint"]
    path: str
    checkpoint_id: str | None = Field(None, description="a checkpoint id; default: the last one")


class GitSource(_Source):
    kind: Literal["git"]
    path: str
    ref: str = Field("HEAD", description="a commit-ish (HEAD, a branch, a tag, a sha) or INDEX (the staged notebook)")


class InlineSource(_Source):
    kind: Literal["inline"]
    content: dict[str, Any] = Field(description="an nbformat notebook")
    name: str = Field("unsaved notebook", max_length=200)
    path: str | None = Field(None, description="where it belongs (for the header: git state, environment)")


class ScheduledSource(_Source):
    kind: Literal["scheduled"]
    run_id: str
    notebook: Literal["output", "input"] = "output"


class MlflowSource(_Source):
    kind: Literal["mlflow"]
    run_id: str
    artifact: Literal["notebook", "output"] = Field("notebook", description="notebook: the snapshot the run started "
                                                    "from; output: the executed notebook of a scheduled run")


Source = Annotated[PathSource | CheckpointSource | GitSource | InlineSource | ScheduledSource | MlflowSource,
                   Field(discriminator="kind")]


class Options(_Source):
    """What to leave out of the diff (cells are still aligned on everything, as nbdime does)."""

    ignore_outputs: bool = False
    ignore_metadata: bool = False
    ignore_id: bool = False
    ignore_attachments: bool = False
    ignore_details: bool = Field(False, description="execution counts")
    sources_only: bool = Field(False, description="only sources: everything above at once")

    def engine(self) -> DiffOptions:
        if self.sources_only:
            return DiffOptions.sources_only()
        return DiffOptions(outputs=not self.ignore_outputs, metadata=not self.ignore_metadata, identifier=not self.ignore_id,
                           attachments=not self.ignore_attachments, details=not self.ignore_details)


class DiffRequest(_Source):
    base: Source
    remote: Source
    options: Options = Field(default_factory=Options)


def clean_path(path: str) -> str:
    """A relative, normalised path; SourceError 400 for one that is empty or leaves the root."""
    if not isinstance(path, str) or not path.strip() or "\x00" in path:
        raise SourceError(400, "path is required")
    norm = posixpath.normpath(path.replace("\\", "/").lstrip("/"))
    if norm in (".", "..") or norm.startswith("../"):
        raise SourceError(403, f"path {path!r} leaves the project")
    return norm


class Resolver:
    """Turns sources into worker inputs for one server: its root, project and contents manager."""

    def __init__(self, contents_manager, project: str | None, project_dir: str | Path, root_dir: str | Path,
                 max_bytes: int | None):
        self.cm = contents_manager
        self.project = project
        self.project_dir = Path(project_dir).resolve()
        self.root_dir = Path(root_dir).resolve()
        self.max_bytes = max_bytes

    # ---- paths -----------------------------------------------------------------------------
    def os_path(self, path: str) -> tuple[str, Path]:
        """(normalised path, real file path) of a path of this server; SourceError if it is not
        inside the project once symlinks are resolved."""
        rel = clean_path(path)
        full = (self.root_dir / rel).resolve()
        if full != self.project_dir and self.project_dir not in full.parents:
            raise SourceError(403, f"path {path!r} is outside project {self.project!r}")
        return rel, full

    async def resolve(self, source, side: str) -> tuple[Input, dict]:
        """The worker input for a source and a description of it (for the response)."""
        method = getattr(self, f"_{source.kind}")
        return await method(source, side)

    async def _path(self, s: PathSource, side: str):
        rel, full = self.os_path(s.path)
        name = f"{side} ({rel})"
        return (Input(name, path=str(full), facts=_notebook_facts(rel, str(full), environment="server")),
                {"kind": "path", "path": rel, "label": rel})

    async def _inline(self, s: InlineSource, side: str):
        facts = {"kind": "notebook", "label": s.name, "environment": "server"}
        if s.path:
            rel, full = self.os_path(s.path)
            facts.update(path=str(full))
        return Input(f"{side} ({s.name})", data=s.content, facts=facts), {"kind": "inline", "label": s.name, "path": s.path}

    async def _checkpoint(self, s: CheckpointSource, side: str):
        rel, full = self.os_path(s.path)
        try:
            checkpoints = await ensure_async(self.cm.list_checkpoints(rel))
        except Exception as e:  # noqa: BLE001 - the contents manager's own errors (missing file...)
            raise SourceError(404, f"no checkpoints of {rel!r}: {getattr(e, 'log_message', None) or e}") from e
        if s.checkpoint_id:
            checkpoints = [c for c in checkpoints if c.get("id") == s.checkpoint_id]
        if not checkpoints:
            raise SourceError(404, f"{rel!r} has no checkpoint{' ' + repr(s.checkpoint_id) if s.checkpoint_id else ''} yet (save it once)")
        cp = checkpoints[-1]
        label = f"{rel} (checkpoint {cp.get('last_modified', '')})".replace(" ()", "")
        desc = {"kind": "checkpoint", "path": rel, "checkpoint_id": cp.get("id"), "last_modified": str(cp.get("last_modified") or ""),
                "label": label}
        facts = _notebook_facts(label, str(full), environment="server")
        checkpoints_impl = self.cm.checkpoints
        if hasattr(checkpoints_impl, "checkpoint_path"):  # file checkpoints: the worker reads the file
            cp_path = Path(await ensure_async(checkpoints_impl.checkpoint_path(cp["id"], rel))).resolve()
            if self.project_dir not in cp_path.parents:
                raise SourceError(403, f"the checkpoint of {rel!r} is outside project {self.project!r}")
            return Input(f"{side} ({label})", path=str(cp_path), facts=facts), desc
        model = await ensure_async(checkpoints_impl.get_notebook_checkpoint(cp["id"], rel))
        return Input(f"{side} ({label})", data=json.loads(json.dumps(model["content"])), facts=facts), desc

    async def _git(self, s: GitSource, side: str):
        rel, full = self.os_path(s.path)
        if not _REF.match(s.ref):
            raise SourceError(400, f"{s.ref!r} is not a git ref")
        folder = full.parent
        if not folder.is_dir():
            raise SourceError(404, f"folder of {rel!r} does not exist")
        top = (await _git(folder, "rev-parse", "--show-toplevel")).decode().strip()
        inside = full.relative_to(Path(top).resolve()).as_posix()
        if s.ref.upper() == "INDEX":
            spec, commit, label = f":{inside}", None, f"{rel} (staged)"
        else:
            commit = (await _git(folder, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{s.ref}^{{commit}}",
                                 missing=f"no commit {s.ref!r} in the repository of {rel!r}")).decode().strip()
            spec, label = f"{commit}:{inside}", f"{rel} @ {s.ref}" + ("" if s.ref.startswith(commit[:7]) else f" ({commit[:8]})")
        size = await _git(folder, "cat-file", "-s", spec, missing=f"{rel!r} is not in git at {s.ref}")
        if self.max_bytes is not None and int(size) > self.max_bytes:
            raise SourceError(413, f"{rel!r} at {s.ref} is {int(size) / 1e6:.1f} MB, over the limit of {self.max_bytes / 1e6:.1f} MB")
        data = await _git(folder, "cat-file", "blob", spec)
        facts = _notebook_facts(label, str(full), environment=None)
        facts["git_commit"] = commit
        return Input(f"{side} ({label})", data=data, facts=facts), {"kind": "git", "path": rel, "ref": s.ref, "commit": commit,
                                                                  "label": label}

    # ---- runs -------------------------------------------------------------------------------
    def _check_run_id(self, run_id: str) -> None:
        if not _RUN_ID.match(run_id or ""):
            raise SourceError(400, f"{run_id!r} is not a run id")

    def _check_project(self, what: str, project: str | None) -> None:
        if project != self.project:
            raise SourceError(403, f"{what} belongs to project {project!r}, not to this server's project {self.project!r}")

    async def _scheduled(self, s: ScheduledSource, side: str):
        self._check_run_id(s.run_id)
        resp = await call_scheduler("GET", f"runs/{s.run_id}")
        if resp.code != 200:
            raise SourceError(resp.code if resp.code in (400, 403, 404) else 502, f"scheduled run {s.run_id}: {_message(resp)}")
        run = json.loads(resp.body)
        self._check_project(f"scheduled run {s.run_id}", run.get("project"))
        limit = _Limit(self.max_bytes, f"the {s.notebook} notebook of run {s.run_id}")
        got = await limit.run(call_scheduler("GET", f"runs/{s.run_id}/{s.notebook}", **limit.kwargs()))
        label = f"{posixpath.basename(run['notebook'])} run {s.run_id} ({s.notebook})"
        desc = {"kind": "scheduled", "run_id": s.run_id, "notebook": s.notebook, "label": label, "run": run}
        facts = await self._scheduled_facts(run, label)
        if got.code == 200:
            return Input(f"{side} ({label})", data=limit.body(), facts=facts), desc
        if got.code == 404 and s.notebook == "output":
            # Kubernetes mode: the run wrote its output into the project volume
            stem = posixpath.splitext(posixpath.basename(run["notebook"]))[0]
            rel, full = self.os_path(posixpath.join(OUTPUT_DIR, stem, f"{s.run_id}.ipynb"))
            if full.is_file():
                return Input(f"{side} ({label})", path=str(full), facts=facts), desc
        raise SourceError(got.code if got.code in (400, 403, 404) else 502,
                          f"scheduled run {s.run_id}: {_message(got, limit.body())}")

    async def _scheduled_facts(self, run: dict, label: str) -> dict:
        facts: dict[str, Any] = {"kind": "run", "label": label, "run_kind": "scheduled", "run_id": run["id"],
                                 "status": run.get("status"), "started": run.get("started"), "finished": run.get("finished"),
                                 "mlflow_run_id": run.get("mlflow_run_id"),
                                 "parameters": run.get("parameters") or {}, "metrics": None,
                                 "provenance": {"flavor": run.get("flavor")}, "requirements": None, "inputs": None}
        if run.get("mlflow_run_id"):
            try:
                found = await mlflow.get_run(run["mlflow_run_id"])
                if found and await self._mlflow_project(found) == self.project:
                    extra = await self._mlflow_facts(found, label)
                    facts.update(metrics=extra["metrics"], requirements=extra["requirements"], inputs=extra["inputs"])
                    facts["provenance"] = {**extra["provenance"], "flavor": run.get("flavor")}
            except MlflowUnavailable as e:
                facts["warnings"] = [f"MLflow facts of run {run['id']} are missing: {e}"]
        return facts

    async def _mlflow_project(self, run: dict) -> str | None:
        """The project of an MLflow run: its ``labyard.project`` tag, else the experiment's prefix."""
        tags = {t["key"]: t["value"] for t in run.get("data", {}).get("tags", [])}
        if "labyard.project" in tags:
            return tags["labyard.project"]
        exp = await mlflow.get_experiment(run["info"]["experiment_id"])
        name = (exp or {}).get("name", "")
        return name.split("/", 1)[0] if "/" in name else None

    async def _mlflow(self, s: MlflowSource, side: str):
        self._check_run_id(s.run_id)
        try:
            run = await mlflow.get_run(s.run_id)
            if run is None:
                raise SourceError(404, f"no MLflow run {s.run_id!r}")
            self._check_project(f"MLflow run {s.run_id}", await self._mlflow_project(run))
            files = [f for f in await mlflow.list_artifacts(s.run_id, s.artifact) if f["path"].endswith(".ipynb")]
            if not files:
                raise SourceError(404, f"MLflow run {s.run_id} has no {s.artifact} notebook"
                                       + (" (only scheduled runs have an output notebook)" if s.artifact == "output" else ""))
            info = run["info"]
            name = info.get("run_name") or s.run_id[:8]
            label = f"MLflow run {name} ({posixpath.basename(files[0]['path'])}, {s.artifact})"
            facts = await self._mlflow_facts(run, label)
            limit = _Limit(self.max_bytes, f"the {s.artifact} notebook of MLflow run {s.run_id}")
            data = await limit.run(mlflow.download_artifact(s.run_id, files[0]["path"], **limit.kwargs()))
            if data is None:
                raise SourceError(404, f"MLflow run {s.run_id}: artifact {files[0]['path']} is missing")
        except MlflowUnavailable as e:  # MLflow's own refusal (its gate: not a member) is passed on
            raise SourceError(e.status if e.status in (400, 403, 404) else 502, str(e)) from e
        desc = {"kind": "mlflow", "run_id": s.run_id, "artifact": s.artifact, "label": label, "run_name": name,
                "status": info.get("status"), "start_time": info.get("start_time"), "artifact_path": files[0]["path"],
                "url": f"{mlflow.ui_base()}#/experiments/{info['experiment_id']}/runs/{s.run_id}"}
        return Input(f"{side} ({label})", data=limit.body(), facts=facts), desc

    async def _mlflow_facts(self, run: dict, label: str) -> dict:
        info, data = run["info"], run.get("data", {})
        tags = {t["key"]: t["value"] for t in data.get("tags", [])}
        rid = info["run_id"]
        requirements = await mlflow.download_artifact(rid, "environment/requirements.txt")
        inputs_raw = await mlflow.download_artifact(rid, "inputs.json")
        inputs = None
        if inputs_raw:
            try:
                inputs = [{"path": f["path"], "fingerprint": _fingerprint(f)} for f in json.loads(inputs_raw).get("files", [])]
            except (ValueError, KeyError, TypeError, AttributeError):
                inputs = None
        gpu = tags.get("labyard.gpu.model")
        return {
            "kind": "run", "label": label, "run_kind": tags.get("labyard.run_kind", "interactive"), "mlflow_run_id": rid,
            "status": info.get("status"), "start_time": info.get("start_time"), "end_time": info.get("end_time"),
            "user": tags.get("labyard.user") or tags.get("mlflow.user"),
            "parameters": {p["key"]: p["value"] for p in data.get("params", [])},
            "metrics": {m["key"]: m["value"] for m in data.get("metrics", [])},
            "provenance": {"image": tags.get("labyard.image"), "python": tags.get("labyard.python"),
                           "git_commit": tags.get("labyard.git.commit") or tags.get("mlflow.source.git.commit"),
                           "git_dirty": tags.get("labyard.git.dirty"),
                           "gpu": f"{tags.get('labyard.gpu.count', '0')} × {gpu}" if gpu and gpu != "none" else gpu},
            "requirements": requirements.decode(errors="replace") if requirements else None,
            "inputs": inputs,
        }


def _fingerprint(f: dict) -> str:
    for key in ("sha256", "sha256_head_tail"):
        if f.get(key):
            return f"{key}:{f[key]}"
    return "changed after the run" if f.get("changed") else "missing" if f.get("missing") else f"size:{f.get('size')}"


def _notebook_facts(label: str, path: str, environment: str | None) -> dict:
    return {"kind": "notebook", "label": label, "path": path, "environment": environment}


def _message(resp, body: bytes | None = None) -> str:
    """The message of an error answer of a Labyard service (JSON ``message``), or its text."""
    body = resp.body if body is None else body
    try:
        return json.loads(body).get("message") or resp.reason
    except (ValueError, AttributeError, TypeError):
        return (body or b"").decode(errors="replace")[:300] or str(resp.reason)


class _Limit:
    """Receives a download in chunks and stops it once it is larger than ``max_bytes``."""

    class TooLarge(Exception):
        pass

    def __init__(self, max_bytes: int | None, what: str):
        self.max_bytes, self.what = max_bytes, what
        self.chunks: list[bytes] = []
        self.size = 0
        self.exceeded = False

    def kwargs(self) -> dict:
        return {"streaming_callback": self._chunk}

    def _chunk(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.max_bytes is not None and self.size > self.max_bytes:
            self.exceeded = True
            self.chunks = []
            raise _Limit.TooLarge(self.what)
        self.chunks.append(chunk)

    async def run(self, download):
        """Await a download made with :meth:`kwargs`; SourceError 413 if it was too large."""
        try:
            result = await download
        except _Limit.TooLarge:
            result = None
        self.check()
        return result

    def check(self) -> None:
        if self.exceeded:
            raise SourceError(413, f"{self.what} is over the limit of {self.max_bytes / 1e6:.1f} MB for a diff")

    def body(self) -> bytes:
        self.check()
        return b"".join(self.chunks)


async def _git(cwd: Path, *args: str, missing: str | None = None) -> bytes:
    """Run git (no shell, no pager, a timeout); SourceError with git's message when it fails."""
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_OPTIONAL_LOCKS": "0"}
    try:
        proc = await asyncio.create_subprocess_exec("git", "-C", str(cwd), "--no-pager", *args, env=env,
                                                    stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
    except FileNotFoundError as e:
        raise SourceError(501, "git is not installed on this server") from e
    try:
        out, err = await asyncio.wait_for(proc.communicate(), GIT_TIMEOUT)
    except asyncio.TimeoutError as e:
        proc.kill()
        raise SourceError(504, f"git {args[0]} took longer than {GIT_TIMEOUT} s") from e
    if proc.returncode != 0:
        text = err.decode(errors="replace").strip()
        if "not a git repository" in text:
            raise SourceError(404, f"{cwd.name or cwd} is not in a git repository")
        raise SourceError(404, missing or f"git {args[0]} failed: {text[:300]}")
    return out
