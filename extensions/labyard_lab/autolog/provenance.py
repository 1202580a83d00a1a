"""Provenance of a run: who, which project and notebook (and its content), code version, image,
GPUs, Python packages and the input files the kernel has read.

Expensive facts (packages, GPUs) are gathered once per kernel, in the background; per-run facts
(notebook hash, git state, list of files read) are cheap. Input files are *listed* when the run
starts (path, size, mtime) and *hashed* later by the syncer thread, never in the user's cell.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path

from .config import AutologConfig

#: files bigger than this are fingerprinted by size + the sha256 of their first and last 4 MiB
FULL_HASH_LIMIT = 64 * 1024 * 1024
PARTIAL_CHUNK = 4 * 1024 * 1024
MAX_INPUTS = 2000


class InputTracker:
    """Records files opened for reading under the project directory, with a Python audit hook.

    Sees every ``open()`` made through Python (pandas, numpy, PIL, csv, json...); reads done by C
    libraries on their own (h5py, some Arrow readers) are not seen. Audit hooks cannot be removed,
    so the hook checks ``active`` and does as little as possible.
    """

    def __init__(self, root: Path, exclude: tuple[Path, ...] = ()):
        self.root = str(root.resolve()) + os.sep
        self.exclude = tuple(str(p.resolve()) for p in exclude)
        self.files: dict[str, None] = {}  # insertion-ordered set
        self.active = True
        self._lock = threading.Lock()

    def install(self) -> None:
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple) -> None:
        if event != "open" or not self.active:
            return
        try:
            path, mode, flags = args
            if isinstance(path, int) or path is None:
                return
            if mode is not None and any(c in mode for c in "wax+"):
                return
            if mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                return
            path = os.fsdecode(path)
            if not os.path.isabs(path):
                path = os.path.join(os.getcwd(), path)
            path = os.path.normpath(path)
            if not path.startswith(self.root) or path.endswith(".ipynb") or path.startswith(self.exclude):
                return
            rel = path[len(self.root):]
            if any(part.startswith(".") for part in rel.split(os.sep)):
                return
            if len(self.files) < MAX_INPUTS and path not in self.files:
                with self._lock:
                    self.files[path] = None
        except Exception:  # an audit hook must never break the user's open()
            return

    def snapshot(self) -> list[dict]:
        """Files read so far, with their size and mtime (no hashing here)."""
        out = []
        with self._lock:
            paths = list(self.files)
        for p in paths:
            try:
                st = os.stat(p)
            except OSError:
                continue
            out.append({"path": p[len(self.root):], "size": st.st_size, "mtime_ns": st.st_mtime_ns})
        return out


def fingerprint_file(path: Path, size: int, mtime_ns: int) -> dict:
    """sha256 of a file (or of its size, head and tail when large); ``changed`` when the file is no
    longer the one that was read (different size or mtime)."""
    try:
        st = path.stat()
    except OSError:
        return {"missing": True}
    if st.st_size != size or st.st_mtime_ns != mtime_ns:
        return {"changed": True}
    return file_digest(path, size)


def file_digest(path: Path, size: int) -> dict:
    """``{"sha256": ...}`` of a file of ``size`` bytes, or ``{"sha256_head_tail": ...}`` (its size,
    first and last :data:`PARTIAL_CHUNK` bytes) when it is larger than :data:`FULL_HASH_LIMIT`."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= FULL_HASH_LIMIT:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            return {"sha256": h.hexdigest()}
        h.update(str(size).encode())
        h.update(f.read(PARTIAL_CHUNK))
        f.seek(size - PARTIAL_CHUNK)
        h.update(f.read(PARTIAL_CHUNK))
        return {"sha256_head_tail": h.hexdigest()}


def pip_freeze() -> str:
    """``name==version`` of every installed distribution (like ``pip freeze``, without a subprocess)."""
    seen = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata.get("Name")
        if name and name.lower() not in seen:
            seen[name.lower()] = f"{name}=={dist.version}"
    return "\n".join(sorted(seen.values(), key=str.lower)) + "\n"


def gpu_info(env: dict[str, str] | None = None) -> tuple[str, int]:
    """(model, count) of the GPUs this process can use, from ``nvidia-smi``; ("none", 0) without."""
    env = os.environ if env is None else env
    if env.get("NVIDIA_VISIBLE_DEVICES") in ("void", "none", "") and not shutil.which("nvidia-smi"):
        return "none", 0
    smi = shutil.which("nvidia-smi")
    if not smi:
        return "none", 0
    try:
        out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown", 0
    names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    if out.returncode != 0 or not names:
        return "none", 0
    return ", ".join(sorted(set(names))), len(names)


def image_name(env: dict[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return env.get("LABYARD_IMAGE") or env.get("JUPYTER_IMAGE_SPEC") or env.get("JUPYTER_IMAGE") or "local"


def image_digest(env: dict[str, str] | None = None) -> str | None:
    """The image's digest (``sha256:...``): ``$LABYARD_IMAGE_DIGEST`` (a pod whose image the
    platform pinned by digest gets it), else the digest of an image reference ``name@sha256:...``."""
    env = os.environ if env is None else env
    if env.get("LABYARD_IMAGE_DIGEST"):
        return env["LABYARD_IMAGE_DIGEST"]
    name = image_name(env)
    return name.split("@", 1)[1] if "@sha256:" in name else None


def platform_mode(env: dict[str, str] | None = None) -> str:
    """``kubernetes`` in a pod (the image is the environment), else ``local`` (the Python environment is)."""
    env = os.environ if env is None else env
    return "kubernetes" if env.get("KUBERNETES_SERVICE_HOST") else "local"


#: a dirty tree's diff is kept with the run up to this size
MAX_GIT_DIFF = 64 * 1024


def git_state(path: Path) -> dict[str, str]:
    """Commit, branch and dirty state of the repository holding ``path`` (empty if none)."""
    d = path if path.is_dir() else path.parent
    for parent in (d, *d.parents):
        if (parent / ".git").exists():
            break
    else:
        return {}
    git = shutil.which("git")
    if not git:
        return {}

    def run(*args: str) -> str | None:
        try:
            r = subprocess.run([git, "-C", str(d), *args], capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = run("rev-parse", "HEAD")
    if not commit:
        return {}
    status = run("status", "--porcelain", "--untracked-files=no")
    tags = {"mlflow.source.git.commit": commit, "labyard.git.commit": commit,
            "labyard.git.dirty": "unknown" if status is None else str(bool(status)).lower()}
    branch = run("rev-parse", "--abbrev-ref", "HEAD")
    if branch:
        tags["mlflow.source.git.branch"] = branch
    return tags


def git_diff(path: Path) -> str | None:
    """``git diff HEAD`` of the repository holding ``path`` (None if it cannot be had)."""
    git = shutil.which("git")
    if not git:
        return None
    d = path if path.is_dir() else path.parent
    try:
        r = subprocess.run([git, "-C", str(d), "diff", "HEAD", "--no-color"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.decode(errors="replace") if r.returncode == 0 else None


class Provenance:
    """Facts about this kernel; ``run_tags()`` is called for every run that starts in it."""

    def __init__(self, config: AutologConfig, inputs: InputTracker | None):
        self.config = config
        self.inputs = inputs
        self.spool = config.queue_dir / "provenance"
        self._kernel_facts: dict[str, str] = {}
        self._requirements: str | None = None
        self._ready = threading.Event()

    def gather_kernel_facts(self) -> None:
        """The slow part, run once in the background: packages and GPUs."""
        try:
            from .reproduce import freeze_lock

            self._requirements = pip_freeze()
            model, count = gpu_info()
            self._kernel_facts = {
                "labyard.image": image_name(),
                "labyard.gpu.model": model,
                "labyard.gpu.count": str(count),
                "labyard.python": sys.version.split()[0],
                "labyard.mode": platform_mode(),
                "labyard.env.lock_sha256": freeze_lock(self._requirements),
                "labyard.requirements": "environment/requirements.txt",
            }
            digest = image_digest()
            if digest:
                self._kernel_facts["labyard.image_digest"] = digest
        finally:
            self._ready.set()

    def run_tags(self, parameters: dict | None = None) -> dict[str, str]:
        """Tags for a run starting now; also spools the notebook, packages and input list for the
        syncer, which attaches them to the run as artifacts.

        Args:
            parameters: the notebook's parameters (papermill's); None: an interactive run, which
                runs the notebook with its own values (recorded as ``{}``).
        """
        c = self.config
        self._ready.wait(10)
        pid = uuid.uuid4().hex
        tags = {
            "labyard.user": c.user,
            "labyard.project": c.project,
            "labyard.notebook": c.notebook_relpath,
            "labyard.provenance_id": pid,
            "labyard.parameters": json.dumps(parameters or {}, sort_keys=True, default=str)[:8000],
            "mlflow.user": c.user,
            "mlflow.source.name": c.notebook_relpath,
            "mlflow.source.type": "NOTEBOOK",
            **self._kernel_facts,
        }
        if os.environ.get("LABYARD_FLAVOR"):
            tags["labyard.flavor"] = os.environ["LABYARD_FLAVOR"]
        spool = self.spool / pid
        spool.mkdir(parents=True, exist_ok=True)
        nb = c.notebook_path
        if nb is not None:
            try:
                data = nb.read_bytes()
            except OSError:
                data = None
            if data is not None:
                tags["labyard.notebook_sha256"] = hashlib.sha256(data).hexdigest()
                (spool / "notebook").mkdir(exist_ok=True)
                (spool / "notebook" / nb.name).write_bytes(data)
            tags.update(git_state(nb))
            if tags.get("labyard.git.dirty") == "true":
                diff = git_diff(nb)
                if diff is not None and len(diff.encode()) <= MAX_GIT_DIFF:
                    (spool / "git").mkdir(exist_ok=True)
                    (spool / "git" / "diff.patch").write_text(diff)
                    tags["labyard.git.diff"] = "git/diff.patch"
                elif diff is not None:
                    tags["labyard.git.diff"] = f"not kept: {len(diff.encode())} bytes (more than {MAX_GIT_DIFF})"
        else:
            tags["labyard.notebook_sha256"] = "none"
        if self._requirements:
            (spool / "environment").mkdir(exist_ok=True)
            (spool / "environment" / "requirements.txt").write_text(self._requirements)
        if self.inputs is not None:
            files = self.inputs.snapshot()
            tags["labyard.inputs.count"] = str(len(files))
            (spool / "inputs.pending.json").write_text(json.dumps({"root": str(c.project_dir), "files": files}))
        if not self._requirements:
            tags.pop("labyard.requirements", None)
        from .reproduce import reproducible_tag

        # labyard.inputs_sha256 follows when the syncer has hashed the files: counted as there
        tags["labyard.reproducible"] = reproducible_tag({**tags, "labyard.inputs_sha256": "pending"})
        return tags
