"""Start one pod container as a local process: ``python3 podexec.py SPEC.json``.

The pod runner starts this helper as ``unshare --mount --propagation private python3
podexec.py SPEC``, so it runs as root in a private mount namespace of its own. It then

1. bind-mounts every volume directory onto its ``mountPath`` (read-only where asked), so the
   process sees the real paths (``/home/jovyan``, ``/srv/project``, ...); the mounts exist in
   this namespace only, the host sees at most an empty mount-point directory;
2. hides ``/root`` behind an empty tmpfs when the process will not run as root and ``/root``
   is not traversable, re-exposing read-only only the paths listed in ``expose`` (the Python
   installation that the repo venv links to lives under ``/root/.pyenv`` on our machines);
3. switches to the pod's uid, gid and supplementary groups (real setgroups/setgid/setuid),
   sets no_new_privs when ``allowPrivilegeEscalation: false``, changes to the working
   directory and ``exec``s the command, so the pid the runner holds is the process itself.

Standard library only; it must not import anything from the repo.
"""

from __future__ import annotations

import ctypes
import json
import os
import stat
import sys

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MNT_DETACH = 2
PR_SET_NO_NEW_PRIVS = 38

_libc = ctypes.CDLL(None, use_errno=True)


def _mount(src: str, dst: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    rc = _libc.mount(
        src.encode(), dst.encode(), fstype.encode() if fstype else None, flags,
        data.encode() if data else None,
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {src} -> {dst}: {os.strerror(err)}")


def _bind(src: str, dst: str, read_only: bool) -> None:
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if not os.path.exists(dst):
            open(dst, "a").close()
    _mount(src, dst, None, MS_BIND | MS_REC)
    if read_only:
        _mount("none", dst, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_REC)


def _hide_root(expose: list[str], stage_base: str) -> None:
    """Cover /root with an empty tmpfs and bind the ``expose`` paths back, read-only."""
    staged = []
    for i, path in enumerate(p for p in expose if p.startswith("/root/") and os.path.exists(p)):
        stage = os.path.join(stage_base, str(i))
        os.makedirs(stage, exist_ok=True)
        _mount(path, stage, None, MS_BIND | MS_REC)
        staged.append((path, stage))
    _mount("tmpfs", "/root", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    for path, stage in staged:
        _bind(stage, path, read_only=True)
        _libc.umount2(stage.encode(), MNT_DETACH)
        os.rmdir(stage)
    if staged:  # made only when something under /root is exposed
        os.rmdir(stage_base)


def main(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    uid, gid, groups = spec["uid"], spec["gid"], spec["groups"]
    if os.geteuid() == 0:
        # Make the namespace's mounts private so nothing propagates back to the host.
        _mount("none", "/", None, MS_REC | (1 << 18))  # MS_PRIVATE
        # Hold every source open first: a mount at e.g. /work would hide sources under a state
        # dir in /work/... (volumes are mounted from /proc/self/fd/N, which still leads there).
        mounts = [(os.open(src, os.O_PATH), dst, ro) for src, dst, ro in spec["mounts"]]
        for fd, dst, ro in sorted(mounts, key=lambda m: m[1].count("/")):
            _bind(f"/proc/self/fd/{fd}", dst, ro)
            os.close(fd)
        root_mode = os.stat("/root").st_mode
        if uid != 0 and not root_mode & stat.S_IXOTH:
            _hide_root(spec.get("expose", []), f"/tmp/.labyard-stage-{os.getpid()}")
        os.setgroups(groups)
        os.setgid(gid)
        os.setuid(uid)
    if spec.get("no_new_privs"):
        _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    os.umask(0o022)
    os.chdir(spec["cwd"])
    env = spec["env"]
    argv = spec["argv"]
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as e:
        # The same words a container runtime uses, so logs read alike.
        print(f'exec: "{argv[0]}": {e.strerror}', file=sys.stderr, flush=True)
        os._exit(127 if e.errno == 2 else 126)


if __name__ == "__main__":
    main(sys.argv[1])
