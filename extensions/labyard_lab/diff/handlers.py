"""REST handlers of notebook diffs: ``POST /labyard/diff`` and nbdime's own API, served by the engine.

Every diff runs in a worker process (:mod:`labyard_lab.diff.worker`), never on the server's event
loop, within the limits of :class:`LabyardDiff`. nbdime's JupyterLab buttons (diff against the
checkpoint, against git HEAD) call ``/nbdime/api/diff``, ``/nbdime/api/gitdiff`` and
``/nbdime/api/isgit``: those routes are answered here too, because nbdime's handlers compute the
diff (and run git) on the event loop and read any path or URL they are given. Our extension loads
before nbdime's (jupyter_server loads extensions in name order), so its routes come first.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import tornado
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from pydantic import ValidationError
from traitlets import Bool, Float, Int
from traitlets.config import Configurable

from .sources import CheckpointSource, DiffRequest, GitSource, PathSource, Resolver, SourceError
from .worker import DiffFailed, DiffJob, DiffRunner

RUN_KINDS = ("scheduled", "mlflow")
#: bytes of a diff's answer written per flush
SEND_CHUNK = 1 << 20


class LabyardDiff(Configurable):
    """Notebook diffs in a Labyard server: ``POST /labyard/diff`` and nbdime's buttons.

    Set in the server's config, e.g. ``c.LabyardDiff.time_budget = 120`` in
    ``jupyter_server_config.py`` of the single-user image.
    """

    max_notebook_bytes = Int(
        200 * 10**6,
        help="""Largest notebook (bytes, each side) a diff accepts; larger ones get 413. Default 200 MB.""",
    ).tag(config=True)
    time_budget = Float(
        60.0,
        help="""Seconds a diff may take in its worker before it is stopped (413, reason ``time_budget``).
        The edited re-run of a 400-cell, 20 MB notebook takes well under a second.""",
    ).tag(config=True)
    memory_limit = Int(
        4 * 2**30,
        help="""Address space (bytes) of a diff worker; a diff that needs more fails with 413, reason
        ``memory``, instead of taking memory from the server and its kernels. 0: no limit.""",
    ).tag(config=True)
    max_concurrent = Int(
        2, help="""Diffs computed at once by one server; further requests wait for a free worker.""",
    ).tag(config=True)
    replace_nbdime_api = Bool(
        True,
        help="""Answer nbdime's ``/nbdime/api/diff``, ``/gitdiff`` and ``/isgit`` (its JupyterLab buttons)
        with the Labyard engine in a worker, confined to the project. False leaves nbdime's own handlers,
        which compute diffs on the server's event loop.""",
    ).tag(config=True)
    git_drivers = Bool(
        True,
        help="""Give git in this server (terminals, kernels, jupyterlab-git) notebook-aware diff and merge
        drivers for ``*.ipynb`` through ``GIT_CONFIG_SYSTEM`` (docs/admin/diff.md). Only in a
        Labyard server (``LABYARD_PROJECT`` set).""",
    ).tag(config=True)


def _fail(handler: APIHandler, status: int, reason: str, message: str) -> None:
    handler.set_status(status)
    handler.set_header("Content-Type", "application/json")
    handler.finish(json.dumps({"message": message, "reason": reason}))


class _DiffHandler(APIHandler):
    @property
    def diff_settings(self) -> LabyardDiff:
        return self.settings["labyard_diff"]

    @property
    def runner(self) -> DiffRunner:
        return self.settings["labyard_diff_runner"]

    def resolver(self) -> Resolver:
        root = getattr(self.contents_manager, "root_dir", None) or os.getcwd()
        project_dir = os.environ.get("LABYARD_PROJECT_DIR") or root
        return Resolver(self.contents_manager, os.environ.get("LABYARD_PROJECT"), project_dir, root,
                        self.diff_settings.max_notebook_bytes)

    def body_json(self) -> dict:
        try:
            body = json.loads(self.request.body or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SourceError(400, f"the request body is not JSON: {e}") from e
        if not isinstance(body, dict):
            raise SourceError(400, "the request body must be a JSON object")
        return body

    async def diff(self, req: DiffRequest) -> None:
        t0 = time.monotonic()
        resolver = self.resolver()
        try:
            async with asyncio.TaskGroup() as tg:
                base = tg.create_task(resolver.resolve(req.base, "base"))
                remote = tg.create_task(resolver.resolve(req.remote, "remote"))
        except ExceptionGroup as eg:  # the first failure says what is wrong
            raise eg.exceptions[0] from None
        (base_input, base_desc), (remote_input, remote_desc) = base.result(), remote.result()
        job = DiffJob(base_input, remote_input, req.options.engine(), self.diff_settings.max_notebook_bytes,
                      extra={"sources": {"base": base_desc, "remote": remote_desc},
                             "options": req.options.model_dump()},
                      header=req.base.kind in RUN_KINDS or req.remote.kind in RUN_KINDS)
        t1 = time.monotonic()
        body = await self.runner.run(job)
        t2 = time.monotonic()
        self.set_header("Content-Type", "application/json")
        self.set_header("Server-Timing", f"resolve;dur={(t1 - t0) * 1000:.0f}, worker;dur={(t2 - t1) * 1000:.0f}")
        # tens of MB for output-heavy notebooks: sent a piece at a time, each flushed to the socket
        # before the next, so the loop answers other requests meanwhile (one write of the whole
        # body would hold it while the client reads)
        view = memoryview(body)
        for i in range(0, len(view), SEND_CHUNK):
            self.write(bytes(view[i:i + SEND_CHUNK]))
            await self.flush()
        self.finish()

    async def guarded(self, make_request) -> None:
        """Build the request and diff it; every failure answered with a status and a message."""
        try:
            await self.diff(make_request())
        except ValidationError as e:
            _fail(self, 400, "bad_request", _validation_message(e))
        except SourceError as e:
            _fail(self, e.status, "source", e.message)
        except DiffFailed as e:
            if e.status >= 500:
                self.log.error("diff failed: %s", e.message)
            _fail(self, e.status, e.reason, e.message)
        except tornado.web.HTTPError as e:  # e.g. no scheduler configured
            _fail(self, e.status_code, "service", e.log_message or str(e))


def _validation_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"])
        parts.append(f"{where}: {err['msg']}" if where else err["msg"])
    return "invalid diff request: " + "; ".join(parts)


class DiffHandler(_DiffHandler):
    """``POST /labyard/diff``: see docs/dev/diff.md for the request and the response."""

    @tornado.web.authenticated
    async def post(self):
        await self.guarded(lambda: DiffRequest.model_validate(self.body_json()))


class NbdimeDiffHandler(_DiffHandler):
    """``POST /nbdime/api/diff`` as nbdime's frontend sends it: ``{"base": "checkpoint:<path>" |
    "git:<path>" | "<path>", "remote": "<path>"}``."""

    @tornado.web.authenticated
    async def post(self):
        def request() -> DiffRequest:
            body = self.body_json()
            base, remote = body.get("base"), body.get("remote") or None
            if not isinstance(base, str) or (remote is not None and not isinstance(remote, str)):
                raise SourceError(400, "base (and remote) must be notebook paths")
            if base.startswith("git:"):
                path = base[4:]
                return DiffRequest(base=GitSource(kind="git", path=path), remote=PathSource(kind="path", path=remote or path))
            if base.startswith("checkpoint:"):
                path = base[len("checkpoint:"):]
                return DiffRequest(base=CheckpointSource(kind="checkpoint", path=path), remote=PathSource(kind="path", path=remote or path))
            if remote is None:
                raise SourceError(400, "remote is required unless base is git:<path> or checkpoint:<path>")
            return DiffRequest(base=PathSource(kind="path", path=base), remote=PathSource(kind="path", path=remote))

        req = None
        try:
            req = request()
        except SourceError as e:
            return _fail(self, e.status, "source", e.message)
        if req.base.kind == "checkpoint":
            # nbdime shows a notebook without checkpoints as unchanged
            try:
                await self.resolver().resolve(req.base, "base")
            except SourceError as e:
                if e.status == 404:
                    req = DiffRequest(base=req.remote, remote=req.remote)
        await self.guarded(lambda: req)


class NbdimeGitDiffHandler(_DiffHandler):
    """``POST /nbdime/api/gitdiff``: ``{"ref_local": {"git": ref} | {"special": "index"},
    "ref_remote": {"git": ref} | {"special": "index" | "working"}, "file_path": path}``."""

    @tornado.web.authenticated
    async def post(self):
        def side(ref, path: str, allowed: tuple[str, ...]):
            if not isinstance(ref, dict) or ("git" in ref) == ("special" in ref):
                raise SourceError(400, "a ref is {'git': <ref>} or {'special': 'index'|'working'}")
            if "git" in ref:
                return GitSource(kind="git", path=path, ref=str(ref["git"]))
            special = str(ref["special"]).lower()
            if special not in allowed:
                raise SourceError(400, f"special ref {special!r} is not allowed here (allowed: {', '.join(allowed)})")
            return GitSource(kind="git", path=path, ref="INDEX") if special == "index" else PathSource(kind="path", path=path)

        def request() -> DiffRequest:
            body = self.body_json()
            path = body.get("file_path")
            if not isinstance(path, str):
                raise SourceError(400, "file_path is required")
            return DiffRequest(base=side(body.get("ref_local"), path, ("index",)),
                               remote=side(body.get("ref_remote"), path, ("index", "working")))

        await self.guarded(request)


class NbdimeIsGitHandler(_DiffHandler):
    """``POST /nbdime/api/isgit``: ``{"path": path}`` → ``{"is_git": bool}`` (git runs off the loop)."""

    @tornado.web.authenticated
    async def post(self):
        from .sources import _git

        try:
            body = self.body_json()
            _, full = self.resolver().os_path(body.get("path") or "")
            await _git(full if full.is_dir() else full.parent, "rev-parse", "--is-inside-work-tree")
            is_git = True
        except SourceError as e:
            if e.status in (400, 403):
                return _fail(self, e.status, "source", e.message)
            is_git = False
        self.finish(json.dumps({"is_git": is_git}))


def diff_handlers(server_app) -> list[tuple]:
    """Routes of the diff API; also puts the settings and the worker runner into the app's settings."""
    settings = LabyardDiff(parent=server_app)
    web_app = server_app.web_app
    web_app.settings["labyard_diff"] = settings
    web_app.settings["labyard_diff_runner"] = DiffRunner(settings.time_budget, settings.memory_limit or None, settings.max_concurrent)
    base = web_app.settings["base_url"]
    routes = [(url_path_join(base, "labyard", "diff"), DiffHandler)]
    if settings.replace_nbdime_api:
        routes += [
            (url_path_join(base, "nbdime", "api", "diff"), NbdimeDiffHandler),
            (url_path_join(base, "nbdime", "api", "gitdiff"), NbdimeGitDiffHandler),
            (url_path_join(base, "nbdime", "api", "isgit"), NbdimeIsGitHandler),
        ]
    if settings.git_drivers and os.environ.get("LABYARD_PROJECT"):
        from .gitconfig import install

        install(server_app.log)
    return routes
