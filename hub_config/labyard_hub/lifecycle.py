"""Nothing outlives ``labyard up``: the session mark, the parent-death tie and the sweep.

Three mechanisms, each a backstop for the one before (docs/admin/install.md, "What survives what"):

* **Process groups**: every child of ``labyard up`` and of the hub runs in its own session, so a
  signal to one component (and its workers) reaches nobody else.
* **The parent-death signal**: :func:`tied` prefixes a command with ``python -m
  labyard_hub.lifecycle --parent PID --``, which sets ``PR_SET_PDEATHSIG`` (SIGTERM) and then
  execs the command, so it is stopped when the process that started it dies, even by SIGKILL.
  ``labyard up`` ties its children (slapd, MLflow, proxy, hub) to itself; the hub ties its
  managed services to itself (``jupyterhub_config.py``: :func:`hub_service` is the hook for
  hub-spawned processes), so a restarted hub never finds an old service on its port.
  Users' servers are *not* tied to the hub: they survive a hub restart on purpose.
* **The session mark**: every process of a platform carries ``LABYARD_SESSION=<data dir>#<token>``
  in its environment (servers, kernels and scheduled runs inherit it). When ``labyard up`` ends,
  however it ends, the *keeper* (a small process started first, which reads a pipe that only
  ``labyard up`` holds) stops every process still carrying the mark; the next ``labyard up`` on the
  data dir stops any marked process of an earlier session before it starts.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from pathlib import Path

SESSION_ENV = "LABYARD_SESSION"
_PR_SET_PDEATHSIG = 1


def new_session(data_dir: Path) -> str:
    return f"{Path(data_dir).absolute()}#{os.getpid()}-{os.urandom(4).hex()}"


def session_env() -> dict[str, str]:
    """The session mark of the platform this process belongs to (empty outside ``labyard up``)."""
    return {SESSION_ENV: os.environ[SESSION_ENV]} if os.environ.get(SESSION_ENV) else {}


def tied(argv: list[str], parent: int | None = None) -> list[str]:
    """``argv`` stopped (SIGTERM) when ``parent`` (default: this process) dies. The process must be
    started from this process's main thread: the kernel ties the signal to the starting thread."""
    return [sys.executable, "-m", "labyard_hub.lifecycle", "--parent", str(parent or os.getpid()), "--", *argv]


def hub_service(command: list[str], environment: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The hook for processes the hub starts itself (managed services): tied to the hub, marked."""
    return tied(command), {**session_env(), **environment}


def marked(prefix: str, exact: bool = False) -> list[int]:
    """Pids of processes whose environment carries a session mark equal to (or starting with) ``prefix``."""
    needle = f"{SESSION_ENV}={prefix}".encode()
    found = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone, or another user's process (not ours to stop unless we are root)
            continue
        if any(v == needle if exact else v.startswith(needle) for v in env):
            try:
                if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
            except (OSError, IndexError):
                continue
            found.append(int(entry.name))
    return found


def sweep(prefix: str, exact: bool = True, timeout: float = 20) -> list[int]:
    """Stop every process marked with session ``prefix``: SIGTERM, then SIGKILL after ``timeout``.
    Returns the pids that were still running."""
    pids = marked(prefix, exact)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and marked(prefix, exact):
        time.sleep(0.2)
    for pid in marked(prefix, exact):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return pids


def start_keeper(session: str) -> int:
    """Fork the keeper: it waits for EOF on a pipe whose write end only this process holds (it is
    closed when this process ends, or by :func:`stop_keeper`), then sweeps the session. Returns the
    write end. Call before any thread or child is started."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the keeper
        try:
            os.close(write)
            os.setsid()  # a Ctrl-C to the terminal's group is not for it
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            while os.read(read, 1):
                pass
            sweep(session)
        finally:
            os._exit(0)
    os.close(read)
    os.set_inheritable(write, False)
    return write


def stop_keeper(write: int) -> None:
    """Let the keeper sweep and exit now (this process goes on)."""
    os.close(write)


def _exec_tied(argv: list[str]) -> None:
    parent = int(argv[argv.index("--parent") + 1])
    command = argv[argv.index("--") + 1:]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        sys.exit(f"labyard: prctl(PR_SET_PDEATHSIG) failed: {os.strerror(ctypes.get_errno())}")
    if os.getppid() != parent:  # the parent died before the tie: do not start at all
        sys.exit(0)
    os.execvp(command[0], command)


if __name__ == "__main__":
    _exec_tied(sys.argv[1:])
