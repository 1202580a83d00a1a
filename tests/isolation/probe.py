"""What a user's process can reach on this machine.

Run inside a kernel or a scheduled run as the user under test (``probe(targets)``): it tries
every target and writes what happened to ``targets["report"]``; it asserts nothing (the test
reads the report afterwards, as root). Standard library only, plus ldap3 if present.

targets: ``read``/``list``/``write``: paths; ``signal``: pids; ``http``: {name: [url, headers,
body or None]} (the header value ``$OWN_TOKEN`` is this process's ``JUPYTERHUB_API_TOKEN``);
``ldap``: {"url", "searches": [[[dn, password] or null (anonymous), base], ...]}; ``zmq``: {"ports":
{name: port}, "seconds"}: subscribe to them; ``report``: a path.
"""

import json
import os
import urllib.error
import urllib.request


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {getattr(e, 'strerror', None) or e}"


def _read(path: str, limit: int = 1 << 20) -> dict:
    try:
        with open(path, "rb") as f:
            return {"ok": True, "data": f.read(limit).decode("utf-8", "replace")}
    except OSError as e:
        return {"ok": False, "error": _err(e), "errno": e.errno}


def _identity() -> dict:
    import getpass

    umask = os.umask(0)
    os.umask(umask)
    status = {k: v.strip() for k, _, v in (line.partition(":") for line in open("/proc/self/status"))}
    return {"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "egid": os.getegid(),
            "groups": os.getgroups(), "user": getpass.getuser(), "home": os.environ.get("HOME"),
            "umask": umask, "cwd": os.getcwd(), "no_new_privs": status.get("NoNewPrivs"),
            "cap_eff": status.get("CapEff")}


def _proc() -> dict:
    """Every process: its owner, command line, and whether its environ and fds can be read."""
    out = {}
    me = os.getpid()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        base = f"/proc/{pid}"
        try:
            uid = os.stat(base).st_uid
        except OSError:
            continue
        entry = {"uid": uid, "cmdline": _read(base + "/cmdline"), "environ": _read(base + "/environ")}
        try:
            entry["fd"] = {"ok": True, "data": sorted(os.listdir(base + "/fd"))}
        except OSError as e:
            entry["fd"] = {"ok": False, "error": _err(e)}
        if int(pid) == me:
            entry["self"] = True
        out[pid] = entry
    return out


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # a redirect (to the login page) is the answer


_OPENER = urllib.request.build_opener(_NoRedirect)


def _http(url: str, headers: dict, body) -> dict:
    token = os.environ.get("JUPYTERHUB_API_TOKEN", "")
    headers = {k: v.replace("$OWN_TOKEN", token) for k, v in (headers or {}).items()}
    data = json.dumps(body).encode() if body is not None else None
    if data is not None:
        headers.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data is not None else "GET")
    try:
        with _OPENER.open(req, timeout=20) as r:
            return {"status": r.status, "body": r.read(1 << 20).decode("utf-8", "replace")}
    except urllib.error.HTTPError as e:
        return {"status": e.code, "body": e.read(1 << 16).decode("utf-8", "replace")}
    except OSError as e:
        return {"status": None, "error": _err(e)}


def _ldap(spec: dict) -> dict:
    """Each search ``[bind or None, base]`` (subtree, every attribute) and what it returned."""
    try:
        import ldap3
    except ImportError as e:
        return {"error": _err(e)}
    out = {}
    for bind, base in spec.get("searches", []):
        name = f"{bind[0] if bind else 'anonymous'} @ {base}"
        try:
            conn = ldap3.Connection(spec["url"], *(bind or []), auto_bind=True, receive_timeout=10)
            conn.search(base, "(objectClass=*)", attributes=["*", "+"])
            out[name] = {"entries": [{"dn": e.entry_dn, "attributes": json.loads(e.entry_to_json())["attributes"]}
                                     for e in conn.entries]}
            conn.unbind()
        except Exception as e:  # noqa: BLE001 - a refused bind or search is a result
            out[name] = {"error": _err(e)}
    return out


def _zmq(spec: dict) -> dict:
    """Subscribe to every given port (all topics) at once, as a SUB socket without any keys, for
    ``seconds``: what an eavesdropper on a kernel's IOPub channel receives."""
    import time

    import zmq

    ctx = zmq.Context.instance()
    poller, sockets = zmq.Poller(), {}
    for name, port in spec["ports"].items():
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(f"tcp://127.0.0.1:{port}")
        poller.register(sock, zmq.POLLIN)
        sockets[sock] = name
    received = {name: "" for name in spec["ports"]}
    deadline = time.monotonic() + spec.get("seconds", 6)
    while time.monotonic() < deadline:
        for sock, _ in poller.poll(200):
            text = b" ".join(sock.recv_multipart()).decode("utf-8", "replace")
            received[sockets[sock]] = (received[sockets[sock]] + text)[:20000]
    for sock in sockets:
        sock.close()
    return received


def probe(targets: dict) -> dict:
    report = {"identity": _identity(), "env": dict(os.environ), "read": {}, "list": {}, "write": {}, "signal": {},
              "http": {}}
    for path in targets.get("read", []):
        report["read"][path] = _read(path)
    for path in targets.get("list", []):
        try:
            report["list"][path] = {"ok": True, "data": sorted(os.listdir(path))}
        except OSError as e:
            report["list"][path] = {"ok": False, "error": _err(e), "errno": e.errno}
    for path in targets.get("write", []):
        try:
            with open(path, "a") as f:
                f.write(f"written by uid {os.getuid()}\n")
            report["write"][path] = {"ok": True}
        except OSError as e:
            report["write"][path] = {"ok": False, "error": _err(e), "errno": e.errno}
    for pid in targets.get("signal", []):
        try:
            os.kill(int(pid), 0)
            report["signal"][str(pid)] = {"ok": True}
        except OSError as e:
            report["signal"][str(pid)] = {"ok": False, "error": _err(e), "errno": e.errno}
    for name, (url, headers, body) in targets.get("http", {}).items():
        report["http"][name] = _http(url, headers, body)
    if targets.get("ldap"):
        report["ldap"] = _ldap(targets["ldap"])
    if targets.get("zmq"):
        report["zmq"] = _zmq(targets["zmq"])
    try:
        os.setuid(0)
        report["setuid_root"] = {"ok": True}
    except OSError as e:
        report["setuid_root"] = {"ok": False, "error": _err(e)}
    report["proc"] = _proc()
    with open(targets["report"], "w") as f:
        json.dump(report, f)
    return report
