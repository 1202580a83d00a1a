"""Diffs computed in a worker process, so that a server's event loop never computes one.

:class:`DiffRunner` runs a :class:`DiffJob` in a fresh ``python -m labyard_lab.diff.worker``
(which imports the engine and nothing of the server: it starts in about 0.1 s) and awaits it on
the event loop. The worker parses both notebooks, diffs them, compares the run facts (header)
and serialises the whole response body; the server only writes those bytes. A job that takes
longer than the time budget is killed; one that needs more memory than the limit fails with
MemoryError in the worker. Either way the caller gets :class:`DiffFailed` with the HTTP status
and a message, and the server goes on answering other requests meanwhile.

Not ``multiprocessing``: its spawn and forkserver modes re-import the server's main module in
every child, and forking the server itself (threads, zmq) is unsafe.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .engine import DiffOptions, diff_notebooks
from .loading import NotebookError, load_notebook


class DiffFailed(Exception):
    """A diff that was not computed: ``status`` and ``reason`` for the HTTP answer."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


@dataclass
class Input:
    """One side of a diff: ``data`` (bytes or an already parsed notebook) or a file ``path``.

    ``name`` is used in messages ("base (analysis/fit.ipynb)"); ``facts`` describe where the
    notebook comes from, for the header (see :mod:`labyard_lab.diff.header`).
    """

    name: str
    data: bytes | dict | None = None
    path: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)

    def read(self, max_bytes: int | None) -> bytes | str:
        if self.data is not None:
            return json.dumps(self.data) if isinstance(self.data, dict) else self.data
        try:
            size = os.stat(self.path).st_size
            if max_bytes is not None and size > max_bytes:
                raise NotebookError(f"{self.name} is {size / 1e6:.1f} MB, over the limit of {max_bytes / 1e6:.1f} MB for a diff", 413)
            return Path(self.path).read_bytes()
        except FileNotFoundError as e:
            raise NotebookError(f"{self.name} does not exist", 404) from e
        except IsADirectoryError as e:
            raise NotebookError(f"{self.name} is a directory, not a notebook") from e
        except PermissionError as e:
            raise NotebookError(f"{self.name} cannot be read: permission denied", 403) from e


@dataclass
class DiffJob:
    base: Input
    remote: Input
    options: DiffOptions = field(default_factory=DiffOptions)
    max_bytes: int | None = None
    #: extra keys copied into the response (sources, options as the client sent them)
    extra: dict[str, Any] = field(default_factory=dict)
    #: compare run facts (parameters, metrics, provenance) into a "header"
    header: bool = False


def summarise(diff: list, base_cells: int) -> dict[str, int | bool]:
    """Counts of cells added, removed, modified and unchanged by a notebook diff."""
    added = removed = modified = 0
    for e in diff:
        if e["key"] == "cells":
            if e["op"] != "patch":  # the cells list itself replaced
                return {"cells_added": 0, "cells_removed": 0, "cells_modified": 0, "cells_unchanged": 0, "identical": False}
            for c in e["diff"]:
                if c["op"] == "addrange":
                    added += len(c["valuelist"])
                elif c["op"] == "removerange":
                    removed += c["length"]
                elif c["op"] == "patch":
                    modified += 1
    return {"cells_added": added, "cells_removed": removed, "cells_modified": modified,
            "cells_unchanged": base_cells - removed - modified, "identical": not diff}


def compute(job: DiffJob) -> bytes:
    """The whole response body of a diff (JSON bytes). Raises NotebookError for bad input."""
    t0 = time.monotonic()
    base, base_warnings = load_notebook(job.base.read(job.max_bytes), job.base.name, job.max_bytes)
    remote, remote_warnings = load_notebook(job.remote.read(job.max_bytes), job.remote.name, job.max_bytes)
    t1 = time.monotonic()
    diff = diff_notebooks(base, remote, job.options)
    t2 = time.monotonic()
    header = None
    if job.header:
        from .header import compare_sides, notebook_facts

        header = compare_sides(notebook_facts(job.base.facts, base), notebook_facts(job.remote.facts, remote))
    body = {
        **job.extra,
        "base": base,
        "diff": diff,
        "summary": summarise(diff, len(base["cells"])),
        "header": header,
        "warnings": base_warnings + remote_warnings,
        "timing": {"load_seconds": round(t1 - t0, 4), "diff_seconds": round(t2 - t1, 4)},
    }
    return json.dumps(body, ensure_ascii=False, default=str).encode()


def _serve(stdin, stdout, memory_limit: int | None) -> None:
    """The worker process: a pickled job on stdin; ``o`` + the body or ``e`` + JSON error on stdout."""
    if memory_limit:
        try:
            _, hard = resource.getrlimit(resource.RLIMIT_AS)
            limit = memory_limit if hard == resource.RLIM_INFINITY else min(memory_limit, hard)
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        except (ValueError, OSError):
            pass
    try:
        job = pickle.load(stdin)
        out = b"o" + compute(job)
    except NotebookError as e:
        reason = {400: "bad_notebook", 413: "too_large"}.get(e.status, "source")
        out = b"e" + json.dumps([e.status, reason, str(e)]).encode()
    except MemoryError:
        out = b"e" + json.dumps([413, "memory", f"the diff needs more memory than the limit of {memory_limit / 1e6:.0f} MB (LabyardDiff.memory_limit)"]).encode()
    except RecursionError:
        out = b"e" + json.dumps([400, "bad_notebook", "the notebooks are nested too deeply to diff"]).encode()
    except Exception as e:  # noqa: BLE001 - reported to the caller, which logs it
        out = b"e" + json.dumps([500, "engine", f"the diff engine failed: {type(e).__name__}: {e}"]).encode()
    stdout.write(out)
    stdout.flush()


class DiffRunner:
    """Runs diff jobs in worker processes (``python -m labyard_lab.diff.worker``, a fresh interpreter
    that imports only the engine): at most ``max_concurrent`` at once, each killed after
    ``time_budget`` seconds, each limited to ``memory_limit`` bytes of address space. Everything
    is awaited on the event loop (subprocess pipes), nothing blocks it."""

    def __init__(self, time_budget: float = 60, memory_limit: int | None = 4 * 2**30, max_concurrent: int = 2):
        import asyncio  # here: the worker process itself has no use for asyncio (0.3 s to import)

        self.time_budget = time_budget
        self.memory_limit = memory_limit
        self._slots = asyncio.Semaphore(max_concurrent)

    async def run(self, job: DiffJob) -> bytes:
        async with self._slots:
            return await self._run(job)

    async def _run(self, job: DiffJob) -> bytes:
        import asyncio

        payload = await asyncio.get_running_loop().run_in_executor(None, pickle.dumps, job, pickle.HIGHEST_PROTOCOL)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "labyard_lab.diff.worker", str(self.memory_limit or 0),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(payload), self.time_budget)
        except asyncio.TimeoutError:
            raise DiffFailed(413, "time_budget", f"the diff took longer than the time budget of {self.time_budget:g} s "
                                                 "(ask your administrator to raise LabyardDiff.time_budget, or ignore outputs)") from None
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        if out[:1] == b"o":
            return out[1:]
        if out[:1] == b"e":
            status, reason, message = json.loads(out[1:])
            raise DiffFailed(status, reason, message)
        tail = err.decode(errors="replace").strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        if "MemoryError" in err.decode(errors="replace") or proc.returncode == -9:
            raise DiffFailed(413, "memory", f"the diff worker ran out of memory ({tail[0]})")
        raise DiffFailed(500, "engine", f"the diff worker failed: {tail[0]}")


if __name__ == "__main__":
    _serve(sys.stdin.buffer, sys.stdout.buffer, int(sys.argv[1]) or None)
