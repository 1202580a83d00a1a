"""Benchmark: 50 people log in at once through a whole hub against a slow directory; Labyard vs
jupyterhub-ldapauthenticator 2.0.2 (the anchor), in the same run.

For each authenticator a whole Labyard runs (``labyard up``: configurable-http-proxy, JupyterHub
and its services), its LDAP going through a TCP proxy that delivers every answer of a real slapd
``delay`` seconds late (latency, as across a WAN link), at 0, 50 and 200 ms. For the anchor the
hub's config is Labyard's with ``authenticator_class`` set to ldapauthenticator's, doing the
same directory work (service-account lookup, user bind, project groups).

50 users log in as a browser does (GET the login form through the proxy, POST it with the xsrf
token, expect the redirect), all at once, after a first round that creates them in the hub.
Meanwhile another process asks the hub's own port for ``/hub/health`` every 20 ms: its worst
answer time is how long any other request to the hub waited (the hub's event loop stalls).

Run: ``.venv/bin/python bench/ldap_logins.py`` (or ``make bench``); ``--only labyard --delays 0.2
--repeat 20`` for the distribution of issue 14's figure. Writes bench/results/ldap_logins.json.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import logging
import multiprocessing
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from labyard_hub import demo, hub_config_file  # noqa: E402
from labyard_hub.slapd import free_port  # noqa: E402
from tests.support.directory import SERVICE_PASSWORD, authenticator_config, start_directory  # noqa: E402
from tests.support.net import DelayProxy  # noqa: E402

USERS = [f"user{i:03d}" for i in range(1, 51)]
DELAYS = (0.0, 0.05, 0.2)

ANCHOR_CONFIG = """# bench: Labyard's hub with jupyterhub-ldapauthenticator 2.0.2 instead of Labyard's authenticator
c = get_config()  # noqa: F821
load_subconfig({labyard!r})  # noqa: F821
c.JupyterHub.authenticator_class = "ldapauthenticator.LDAPAuthenticator"
c.LDAPAuthenticator.server_address = "127.0.0.1"
c.LDAPAuthenticator.server_port = {port}
c.LDAPAuthenticator.tls_strategy = "insecure"
c.LDAPAuthenticator.lookup_dn = True
c.LDAPAuthenticator.lookup_dn_search_user = {reader!r}
c.LDAPAuthenticator.lookup_dn_search_password = {password!r}
c.LDAPAuthenticator.user_search_base = "ou=people,{suffix}"
c.LDAPAuthenticator.user_attribute = "uid"
c.LDAPAuthenticator.lookup_dn_user_dn_attribute = "uid"
c.LDAPAuthenticator.allowed_groups = ["cn=vision,ou=projects,{suffix}", "cn=nlp,ou=projects,{suffix}"]
"""


# -- the LDAP delay proxy and the health prober, each in its own process -------------------------
def _proxy_main(target_port: int, conn) -> None:
    with DelayProxy(target_port) as proxy:
        conn.send(proxy.port)
        while (delay := conn.recv()) is not None:
            proxy.delay = delay
            conn.send(delay)


def _probe_main(port: int, ready, stop, out) -> None:
    """GET /hub/health every 20 ms on one keep-alive connection; send (start, seconds) pairs.
    ``ready`` is set once the first answer came (a spawned process takes seconds to import us)."""
    samples, errors = [], []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    while not stop.is_set():
        start = time.time()
        try:
            conn.request("GET", "/hub/health")
            conn.getresponse().read()
        except OSError as e:
            errors.append(repr(e))
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            time.sleep(0.02)
            continue
        samples.append((start, time.time() - start))
        ready.set()
        time.sleep(0.02)
    out.send((samples, errors[-3:]))


# -- one whole hub ------------------------------------------------------------------------------
def _serve(data_dir: Path, port: int, config: Path, anchor_config: Path | None) -> int:
    """``labyard up`` (with the anchor's hub config, if given), until SIGTERM. In a subprocess."""
    from labyard_hub.up import Platform

    logging.basicConfig(level=logging.WARNING)
    p = Platform(data_dir, port, False, config)
    p.lock()  # as `labyard up` does: the data dir's lock and the session every child is tied to
    try:
        p.prepare()
        if anchor_config:
            p.child("hub").argv[-1] = str(anchor_config)
        return asyncio.run(p.run())
    finally:
        p.unlock()


class Hub:
    def __init__(self, name: str, workdir: Path, ldap: dict, anchor_proxy_port: int | None):
        self.name = name
        self.data_dir = workdir / name
        self.data_dir.mkdir(parents=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "ldap": ldap, "policy_file": str(demo.POLICY_FILE), "mlflow_url": "http://127.0.0.1:9",
            "cull": {"enabled": False},
            # no group sync pass (another process reading LDAP) in the middle of a measurement
            "group_sync_interval": 3600,
        }
        self.config = self.data_dir / "config.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self.anchor = None
        if anchor_proxy_port:
            self.anchor = self.data_dir / "anchor_config.py"
            self.anchor.write_text(ANCHOR_CONFIG.format(labyard=str(hub_config_file()), port=anchor_proxy_port,
                                                        reader=ldap["lookup_bind_dn"], password=SERVICE_PASSWORD,
                                                        suffix=demo.SUFFIX))
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        argv = [sys.executable, __file__, "--serve", str(self.data_dir), str(self.port), str(self.config)]
        if self.anchor:
            argv.append(str(self.anchor))
        self.proc = subprocess.Popen(argv, stdout=open(self.data_dir / "up.log", "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: labyard up exited: {(self.data_dir / 'up.log').read_text()[-2000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/hub/api/")
                if conn.getresponse().status == 200:
                    settings = yaml.safe_load((self.data_dir / "settings.yaml").read_text())
                    self.hub_port = settings["hub_port"]
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name}: hub not up in 180 s")

    def hub_pid(self) -> int:
        """The JupyterHub process (a child of labyard up)."""
        up = psutil.Process(self.proc.pid)
        return next(p.pid for p in up.children(recursive=True) if any(a.endswith("/jupyterhub") for a in p.cmdline()[:2]))

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(90)


async def _login(session: aiohttp.ClientSession, url: str, username: str) -> tuple[float, bool]:
    start = time.perf_counter()
    async with session.get(f"{url}/hub/login") as r:
        await r.read()
    xsrf = next((c.value for c in session.cookie_jar if c.key == "_xsrf"), "")
    data = {"username": username, "password": demo.PASSWORD, "_xsrf": xsrf}
    async with session.post(f"{url}/hub/login", data=data, allow_redirects=False) as r:
        await r.read()
        ok = r.status == 302
    return time.perf_counter() - start, ok


async def _round(url: str, users: list[str]) -> dict:
    timeout = aiohttp.ClientTimeout(total=600)

    async def one(user: str):
        async with aiohttp.ClientSession(timeout=timeout, cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
            return await _login(session, url, user)

    start = time.perf_counter()
    results = await asyncio.gather(*(one(u) for u in users))
    elapsed = time.perf_counter() - start
    times = sorted(t for t, _ in results)
    ok = sum(1 for _, good in results if good)
    return {"logins": len(users), "succeeded": ok, "seconds": round(elapsed, 3),
            "logins_per_second": round(ok / elapsed, 2), "login_p50_s": round(statistics.median(times), 3),
            "login_max_s": round(times[-1], 3)}


def measure(ctx, hub: Hub, proxy_conn, delay: float, profile: Path | None = None) -> dict:
    proxy_conn.send(delay)
    proxy_conn.recv()
    asyncio.run(_round(hub.url, USERS))  # warm up: users exist in the hub, connections are open
    stop, ready = ctx.Event(), ctx.Event()
    receive, send = ctx.Pipe(duplex=False)
    prober = ctx.Process(target=_probe_main, args=(hub.hub_port, ready, stop, send), daemon=True)
    prober.start()
    if not ready.wait(120):
        raise RuntimeError(f"/hub/health on port {hub.hub_port} did not answer")
    time.sleep(1.0)
    hub_process = psutil.Process(hub.hub_pid())
    cpu = hub_process.cpu_times()
    load = os.getloadavg()[0]
    spy = None
    if profile:  # py-spy (not a dependency: pip install py-spy) samples the hub during the round
        profile.mkdir(parents=True, exist_ok=True)
        out = profile / f"hub-{delay * 1000:.0f}ms.txt"
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        spy = subprocess.Popen([py_spy, "record", "--pid", str(hub_process.pid), "--rate", "500", "--format", "raw",
                                "--output", str(out), "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
    begin = time.time()
    result = asyncio.run(_round(hub.url, USERS))
    end = time.time()
    if spy:
        spy.send_signal(signal.SIGINT)
        spy.wait(60)
    used = hub_process.cpu_times()
    result["hub_cpu_ms_per_login"] = round((used.user + used.system - cpu.user - cpu.system) / len(USERS) * 1000, 1)
    result["load_average"] = round(max(load, os.getloadavg()[0]), 1)
    time.sleep(0.5)
    stop.set()
    samples, errors = receive.recv()
    if errors:
        result["health_errors"] = errors
    prober.join(30)
    timed = [(s, t) for t, s in samples if begin <= t <= end or (t < begin and t + s > begin)]
    during = [s for s, _ in timed]
    result["health_worst_ms"] = round(max(during) * 1000, 1) if during else None
    if timed:  # when, from the start of the round, the worst wait began
        result["health_worst_at_s"] = round(max(timed)[1] - begin, 3)
    result["health_p99_ms"] = round(sorted(during)[int(len(during) * 0.99) - 1] * 1000, 1) if len(during) > 1 else None
    result["health_samples"] = len(during)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ldap_logins.json")
    parser.add_argument("--delays", type=float, nargs="+", default=list(DELAYS), help="seconds added to every LDAP answer")
    parser.add_argument("--only", choices=["labyard", "ldapauthenticator-2.0.2"], help="run one side only")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="measure each side N times at each delay (a warm-up and a measured round each) and "
                             "summarise the worst /hub/health over the N runs")
    parser.add_argument("--profile", type=Path, help="write py-spy samples of the hub during each measured round here")
    parser.add_argument("--serve", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        data_dir, port, config, *anchor = args.serve
        sys.exit(_serve(Path(data_dir), int(port), Path(config), Path(anchor[0]) if anchor else None))

    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "users": len(USERS), "runs": {}}
    with tempfile.TemporaryDirectory(prefix="bench-ldap-") as tmp:
        os.chmod(tmp, 0o711)  # as root, users' processes pass through the data dir (docs/admin/local.md)
        slapd = start_directory(Path(tmp) / "slapd", extra_users=len(USERS))
        ctx = multiprocessing.get_context("spawn")
        here, there = ctx.Pipe()
        proxy = ctx.Process(target=_proxy_main, args=(slapd.port, there), daemon=True)
        proxy.start()
        proxy_port = here.recv()
        try:
            sides = [("labyard", None), ("ldapauthenticator-2.0.2", proxy_port)]
            for name, anchor in sides:
                if args.only and name != args.only:
                    continue
                ldap = {**authenticator_config(slapd), "server_urls": [f"ldap://127.0.0.1:{proxy_port}"],
                        "connect_timeout": 5.0, "receive_timeout": 30.0}
                hub = Hub(name, Path(tmp), ldap, anchor)
                hub.start()
                try:
                    for delay in args.delays:
                        key = f"{name} delay={delay * 1000:.0f}ms"
                        for _ in range(args.repeat):
                            result = measure(ctx, hub, here, delay, args.profile)
                            report["runs"].setdefault(key, result)
                            if args.repeat > 1:
                                report.setdefault("repeats", {}).setdefault(key, []).append(result)
                            print(key, json.dumps(result), flush=True)
                finally:
                    hub.stop()
        finally:
            here.send(None)
            proxy.join(10)
            slapd.stop()

    for delay in args.delays:
        ours = report["runs"].get(f"labyard delay={delay * 1000:.0f}ms")
        theirs = report["runs"].get(f"ldapauthenticator-2.0.2 delay={delay * 1000:.0f}ms")
        if ours and theirs:
            report.setdefault("ratio_throughput", {})[f"{delay * 1000:.0f}ms"] = round(
                ours["logins_per_second"] / theirs["logins_per_second"], 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"\n{len(USERS)} concurrent logins through the whole hub ({report['machine']})")
    print(f"{'run':40} {'ok':>4} {'logins/s':>9} {'p50 s':>7} {'max s':>7} {'worst /hub/health ms':>21} "
          f"{'hub CPU ms/login':>17} {'load':>5}")
    for key, r in report["runs"].items():
        print(f"{key:40} {r['succeeded']:>4} {r['logins_per_second']:>9} {r['login_p50_s']:>7} {r['login_max_s']:>7} "
              f"{r['health_worst_ms']!s:>21} {r['hub_cpu_ms_per_login']:>17} {r['load_average']:>5}")
    for delay, ratio in report.get("ratio_throughput", {}).items():
        print(f"throughput ratio at {delay}: x{ratio}")
    for key, runs in report.get("repeats", {}).items():
        worst = sorted(r["health_worst_ms"] for r in runs if r["health_worst_ms"] is not None)
        rates = [r["logins_per_second"] for r in runs]
        print(f"{key}, {len(runs)} runs: logins/s median {statistics.median(rates):.1f} (min {min(rates)}); worst "
              f"/hub/health median {statistics.median(worst):.1f} ms, max {worst[-1]} ms, over 100 ms in "
              f"{sum(w > 100 for w in worst)}")


if __name__ == "__main__":
    main()
