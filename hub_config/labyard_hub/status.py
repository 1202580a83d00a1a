"""``labyard status``: which components of the ``labyard up`` on a data dir answer.

It reads ``<data dir>/run/status.json`` (written by ``labyard up`` at each start and restart of a
component) and probes every component itself: a component answers when its process runs and its
port answers (HTTP below 500; slapd: a TCP connection). Exit code 0 only when all answer.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

#: how each component is probed: an HTTP path, or None for a TCP connection
_PROBES = {"slapd": None, "mlflow": "/health", "proxy": "/hub/api/", "hub": "/hub/api/",
           "labyard-scheduler": "/"}


def running(data_dir: Path) -> bool:
    """Whether a ``labyard up`` holds the data dir's lock (``run/up.lock``)."""
    try:
        fd = os.open(data_dir / "run" / "up.lock", os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _alive(pid: int | None) -> bool:
    if not pid:
        return True  # hub services: the hub owns their processes; the port says it all
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def probe(name: str, port: int | None, timeout: float = 3) -> str | None:
    """None when the component answers on ``port``, else why not."""
    if not port:
        return "no port"
    path = _PROBES.get(name, "/")
    if path is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout).close()
            return None
        except OSError as e:
            return f"port {port}: {e.strerror or e}"
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return None if r.status < 500 else f"HTTP {r.status}"
    except urllib.error.HTTPError as e:
        return None if e.code < 500 else f"HTTP {e.code}"
    except OSError as e:
        return f"port {port}: {getattr(e, 'reason', None) or e}"


def status(data_dir: Path) -> tuple[int, dict]:
    """(exit code, report) for the platform on ``data_dir``."""
    data_dir = data_dir.absolute()
    path = data_dir / "run" / "status.json"
    if not running(data_dir) or not path.exists():
        body = {"state": "not running", "data_dir": str(data_dir), "components": []}
        try:  # the last labyard up's end: why it gave up, if it did
            last = json.loads(path.read_text())
        except (OSError, ValueError):
            last = {}
        if last.get("given_up"):
            body["given_up"] = last["given_up"]
        return 3, body
    body = json.loads(path.read_text())
    rows = [*body["components"], *({"restarts": None, "pid": None, "last_error": None, **s} for s in body.get("services", []))]
    with ThreadPoolExecutor(8) as pool:
        why = list(pool.map(lambda r: None if _alive(r.get("pid")) else "process not running", rows))
        probed = list(pool.map(lambda r: probe(r["name"], r.get("port")), rows))
    for row, dead, down in zip(rows, why, probed):
        row["answers"] = not (dead or down)
        row["problem"] = dead or down
    body["components"] = rows
    body["data_dir"] = str(data_dir)
    ok = body["state"] == "up" and all(r["answers"] for r in rows)
    return (0 if ok else 1), body


def render(body: dict) -> str:
    lines = [f"labyard on {body['data_dir']}: {body['state']}" + (f" (pid {body['pid']}, {body['public_url']})" if body.get("pid") else "")]
    if body.get("given_up"):
        lines.append(f"  given up: {body['given_up']}")
    if body["components"]:
        lines.append(f"  {'component':<18} {'state':<5} {'pid':>7} {'port':>6} {'restarts':>8}  last error / problem")
        for r in body["components"]:
            note = "; ".join(x for x in (r.get("problem"), r.get("last_error")) if x) or "-"
            restarts = "-" if r.get("restarts") is None else str(r["restarts"])
            lines.append(f"  {r['name']:<18} {'up' if r['answers'] else 'DOWN':<5} {r.get('pid') or '-':>7} "
                         f"{r.get('port') or '-':>6} {restarts:>8}  {note}")
    return "\n".join(lines)
