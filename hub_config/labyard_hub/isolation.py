"""Local mode as root: every user process runs as the user's LDAP uid with the project's gid.

When ``labyard up`` runs as root (and not in Kubernetes mode), users are isolated from each
other and from the platform (docs/admin/local.md):

* each single-user server (and so each kernel) and each scheduled run's papermill and kernel is
  started through the launcher of this module (``python -m labyard_hub.isolation``, the way
  SystemdSpawner and sudospawner switch identity): supplementary groups, gid and uid set for
  good, ``no_new_privs``, umask 007, HOME/USER/LOGNAME of the user, the working directory
  entered as the user; nothing else of the caller's environment than what it passed;
* project directories are owned by root and the project's gid, mode 2770 (members share
  files through the group; new files keep it); homes are the user's, mode 0700;
* everything else in the data dir (settings, secrets, databases, logs, run state) is the
  platform's alone: its children run with umask 077, its directories are 0700.

Without root there is nobody to switch to: local mode is then a single-person demo in which
every server runs as the platform's own system user, and it says so at start-up.

This module is deliberately standard library only: the launcher starts before every server.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

#: umask of the platform's own processes: what they create is theirs alone
PLATFORM_UMASK = 0o077
#: umask of users' processes: shared with the project's group (the process gid), nobody else
USER_UMASK = 0o007
#: directories of the data dir that users' processes must traverse (never list)
SHARED_DIRS = ("projects", "homes", "run-files")
#: exit status of the launcher when it fails before the command runs
LAUNCH_FAILED = 126
_PR_SET_NO_NEW_PRIVS = 38


def enabled() -> bool:
    """Whether local mode isolates users: it does exactly when the platform runs as root."""
    return os.geteuid() == 0


@dataclass(frozen=True)
class RunAs:
    """Who a user's process runs as: the user's uid, the project's gid, the user's home."""

    username: str
    uid: int
    gid: int
    home: Path

    def command(self, argv: list[str], cwd: Path | str) -> list[str]:
        """``argv`` behind the launcher: run it as this user, in ``cwd``."""
        return [sys.executable, "-m", "labyard_hub.isolation", "--user", self.username, "--uid", str(self.uid),
                "--gid", str(self.gid), "--home", str(self.home), "--cwd", str(cwd), "--", *argv]

    def environment(self, env: dict[str, str]) -> dict[str, str]:
        """``env`` as the user's process gets it: the user's HOME, USER and LOGNAME (the launcher
        sets them again), without the platform's TMPDIR (the user may not be able to write it)."""
        env = {k: v for k, v in env.items() if k not in ("TMPDIR", "XDG_RUNTIME_DIR")}
        return {**env, "HOME": str(self.home), "USER": self.username, "LOGNAME": self.username}

    def to_json(self) -> dict:
        return {"username": self.username, "uid": self.uid, "gid": self.gid, "home": str(self.home)}

    @classmethod
    def from_json(cls, data: dict | None) -> RunAs | None:
        return cls(data["username"], int(data["uid"]), int(data["gid"]), Path(data["home"])) if data else None


# ---- directories ------------------------------------------------------------------------------
def _real_dir(path: Path, mode: int) -> None:
    """``path`` as a directory (created with ``mode`` if missing), never a symlink."""
    if not path.parent.exists():
        os.makedirs(path.parent, 0o711, exist_ok=True)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(f"{path} is not a directory")


def secure_data_dir(data_dir: Path) -> None:
    """The data dir's modes: traversable (0711) by users where they must pass, private elsewhere.

    The data dir and :data:`SHARED_DIRS` are 0711 (users may pass, never list); every other
    entry at its top (settings, secrets, hub and MLflow databases, logs, the scheduler's state,
    the demo directory, anything an admin put there) loses every right of group and others, so
    nothing below it can be reached by a user's process whatever its own mode.
    """
    _real_dir(data_dir, 0o711)
    os.chmod(data_dir, 0o711)
    for name in SHARED_DIRS:
        _real_dir(data_dir / name, 0o711)
        os.chmod(data_dir / name, 0o711)
    for entry in os.scandir(data_dir):
        if entry.name in SHARED_DIRS or entry.is_symlink():
            continue
        mode = stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode)
        if mode & 0o077:
            os.chmod(entry.path, mode & ~0o077)


def prepare_project_dir(path: Path, gid: int | None, isolate: bool) -> None:
    """A project's shared directory: isolated, owned by root and ``gid`` with mode 2770."""
    _real_dir(path, 0o770)
    if isolate:
        os.chown(path, 0, gid, follow_symlinks=False)
        os.chmod(path, 0o2770)


def prepare_private_dir(path: Path, owner: RunAs | None, mode: int = 0o700) -> None:
    """A directory of one user (a home, a run's files): theirs (``owner``'s uid) with ``mode``."""
    _real_dir(path, mode)
    if owner is not None:
        os.chown(path, owner.uid, owner.gid, follow_symlinks=False)
        os.chmod(path, mode)


def give(path: Path, owner: RunAs | None) -> None:
    """Hand a file the platform wrote to ``owner`` (none: it stays the platform's)."""
    if owner is not None:
        os.chown(path, owner.uid, owner.gid, follow_symlinks=False)


def read_user_file(path: Path, owner: RunAs | None, limit: int = 1 << 30) -> bytes | None:
    """Read a file a user's process wrote, as the platform, safely: None if it does not exist.

    The user controls the directory: the file may have been replaced by a symlink to a
    platform secret, a FIFO or a hard link. Only a regular file (no symlink followed) owned by
    ``owner``'s uid, with one link and at most ``limit`` bytes is read; anything else raises
    ``PermissionError``.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise PermissionError(f"{path}: not a regular file of the run ({e.strerror})") from e
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or (owner is not None and st.st_uid != owner.uid):
            raise PermissionError(f"{path}: not a regular file of the run's owner")
        if st.st_size > limit:
            raise PermissionError(f"{path}: larger than {limit} bytes")
        return f.read(limit + 1)[:limit]


# ---- can users run the platform's Python? -------------------------------------------------------
def closed_ancestor(path: Path) -> Path | None:
    """The first directory on the way to ``path`` (itself included) that others may not traverse."""
    path = Path(path).absolute()
    for p in [*reversed(path.parents), path]:
        try:
            st = os.stat(p)
        except FileNotFoundError:
            return None
        if stat.S_ISDIR(st.st_mode) and not st.st_mode & stat.S_IXOTH:
            return p
    return None


def unusable_by_users(data_dir: Path, probe_uid: int = 65534, timeout: float = 60) -> str | None:
    """Why users' processes could not run here, or None: the data dir must be reachable and the
    Python environment (``sys.prefix``, the interpreter, Labyard's packages) readable and
    executable by every user. Checked by running the interpreter as ``probe_uid`` (nobody)."""
    for what, path in (("the data dir", data_dir), ("the Python environment", Path(sys.prefix)),
                       ("the Python interpreter", Path(os.path.realpath(sys.executable)).parent)):
        closed = closed_ancestor(path)
        if closed is not None:
            mode = stat.S_IMODE(os.stat(closed).st_mode)
            return (f"{what} {path} is not reachable by other users: {closed} has mode {mode:04o}. As root, "
                    "labyard up runs every server and run as the user's own uid, which must read it; "
                    f"move it (e.g. to /opt/labyard or /srv/labyard; from a checkout, `rm -rf .venv && make setup` "
                    f"makes .venv from a python3 everyone can run), or `chmod o+x {closed}`, "
                    "or run labyard up as a normal user for a single-person demo (docs/admin/local.md)")
    nobody = RunAs("nobody", probe_uid, probe_uid, Path("/"))
    # find (without importing: that takes seconds) and open what servers and runs start from
    code = ("import importlib.util\n"
            "for name in ('labyard_hub', 'labyard_lab', 'jupyterhub', 'jupyter_server', 'ipykernel', 'papermill'):\n"
            "    spec = importlib.util.find_spec(name)\n"
            "    if spec is None or not spec.origin:\n"
            "        raise SystemExit(f'ModuleNotFoundError: {name} is not importable')\n"
            "    open(spec.origin, 'rb').close()\n")
    try:
        proc = subprocess.run(nobody.command([sys.executable, "-c", code], "/"), env=nobody.environment(
            {k: os.environ[k] for k in ("PATH", "LANG", "PYTHONPATH") if k in os.environ}),
            capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"the Python environment {sys.prefix} did not start as uid {probe_uid} within {timeout:.0f}s"
    if proc.returncode != 0:
        err = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        return (f"the Python environment {sys.prefix} is not usable by other users (as uid {probe_uid}: {err}). "
                "As root, labyard up runs every server and run as the user's own uid: make the environment "
                "readable by everyone (e.g. install it under /opt with umask 022), or run labyard up as a "
                "normal user for a single-person demo (docs/admin/local.md)")
    return None


# ---- the launcher -----------------------------------------------------------------------------
def _fail(message: str) -> int:
    print(f"labyard launcher: {message}", file=sys.stderr, flush=True)
    return LAUNCH_FAILED


def launch(argv: list[str] | None = None) -> int:
    """``python -m labyard_hub.isolation --user NAME --uid U --gid G --home DIR --cwd DIR -- CMD...``

    Run as root: drops to ``U``/``G`` for good (supplementary groups ``[G]``), sets
    ``no_new_privs`` (setuid programs gain nothing), the umask, HOME/USER/LOGNAME, enters
    ``--cwd`` as the user and executes CMD (looked up on the PATH of the environment it got).
    Returns :data:`LAUNCH_FAILED` with a message on stderr if any step fails; never runs CMD
    with any privilege left.
    """
    p = argparse.ArgumentParser(prog="python -m labyard_hub.isolation", description="run a command as a user")
    p.add_argument("--user", required=True)
    p.add_argument("--uid", type=int, required=True)
    p.add_argument("--gid", type=int, required=True)
    p.add_argument("--home", required=True)
    p.add_argument("--cwd", required=True)
    p.add_argument("--umask", type=lambda s: int(s, 8), default=USER_UMASK)
    p.add_argument("command", nargs="+")
    args = p.parse_args(argv)
    if args.uid <= 0 or args.gid <= 0:
        return _fail(f"refusing to run as uid {args.uid} / gid {args.gid}: users never run as root")
    if os.geteuid() != 0:
        return _fail(f"must be started as root to run as uid {args.uid} (running as uid {os.geteuid()})")
    # no_new_privs first (it survives the switch and every exec): setuid programs gain nothing
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return _fail(f"prctl(PR_SET_NO_NEW_PRIVS) failed: {os.strerror(ctypes.get_errno())}")
    try:
        os.setgroups([args.gid])
        os.setresgid(args.gid, args.gid, args.gid)
        os.setresuid(args.uid, args.uid, args.uid)
    except OSError as e:
        return _fail(f"cannot switch to uid {args.uid} / gid {args.gid}: {e}")
    if os.getresuid() != (args.uid,) * 3 or os.getresgid() != (args.gid,) * 3 or os.getgroups() != [args.gid]:
        return _fail("the identity switch did not take")
    try:
        os.setresuid(0, 0, 0)
    except PermissionError:
        pass
    else:
        return _fail("root could be regained after the switch; not running anything")
    os.umask(args.umask)
    try:
        os.chdir(args.cwd)
    except OSError as e:
        return _fail(f"{args.user} (uid {args.uid}, gid {args.gid}) cannot enter {args.cwd}: {e.strerror}")
    env = {**os.environ, "HOME": args.home, "USER": args.user, "LOGNAME": args.user}
    exe = shutil.which(args.command[0], path=env.get("PATH")) or args.command[0]
    try:
        os.execve(exe, args.command, env)
    except OSError as e:
        return _fail(f"cannot execute {args.command[0]} as {args.user}: {e.strerror}")
    return LAUNCH_FAILED  # not reached


if __name__ == "__main__":
    sys.exit(launch())
