"""Benchmark: 50 concurrent logins against one slapd made slow, Labyard vs jupyterhub-ldapauthenticator.

Both authenticators run in this process on one asyncio event loop, exactly as the hub calls
them (``await authenticator.get_authenticated_user(None, data)``), against the same real slapd
behind a TCP proxy that delays every answer by ``--delay`` seconds. Meanwhile a ticker on the
same loop measures how late it wakes up: that lateness is what every other request to the hub
would wait (the hub's event-loop lag).

Run: ``.venv/bin/python bench/ldap_logins.py`` (or ``make bench``). Writes bench/results/ldap_logins.json.
Both sides do the same directory work: find the user with a service account, bind as the user,
read the groups that are projects.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ldapauthenticator import LDAPAuthenticator as UpstreamLDAPAuthenticator  # noqa: E402

from labyard_hub import demo  # noqa: E402
from labyard_hub.ldap import LDAPAuthenticator  # noqa: E402
from tests.support.directory import SERVICE_PASSWORD, authenticator_config, start_directory  # noqa: E402
from tests.support.net import DelayProxy  # noqa: E402

USERS = ["alice", "bob", "carol"]


def labyard(proxy_url: str, slapd) -> LDAPAuthenticator:
    config = authenticator_config(slapd)
    config.update(server_urls=[proxy_url], connect_timeout=5.0, receive_timeout=30.0)
    return LDAPAuthenticator(**config)


def upstream(proxy_port: int, slapd) -> UpstreamLDAPAuthenticator:
    return UpstreamLDAPAuthenticator(
        server_address="127.0.0.1",
        server_port=proxy_port,
        tls_strategy="insecure",
        lookup_dn=True,
        lookup_dn_search_user=slapd.reader_dn,
        lookup_dn_search_password=SERVICE_PASSWORD,
        user_search_base=f"ou=people,{demo.SUFFIX}",
        user_attribute="uid",
        lookup_dn_user_dn_attribute="uid",
        allowed_groups=[f"cn={g},ou=projects,{demo.SUFFIX}" for g in ("vision", "nlp")],
        allow_all=True,
    )


async def run(auth, n: int) -> dict:
    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker():
        while not stop.is_set():
            t = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append(time.perf_counter() - t - 0.01)

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    start = time.perf_counter()
    results = await asyncio.gather(
        *(auth.get_authenticated_user(None, {"username": USERS[i % 3], "password": demo.PASSWORD}) for i in range(n))
    )
    elapsed = time.perf_counter() - start
    stop.set()
    await tick
    ok = sum(1 for r in results if r)
    lags.sort()
    return {
        "logins": n,
        "succeeded": ok,
        "seconds": round(elapsed, 3),
        "logins_per_second": round(ok / elapsed, 2),
        "loop_lag_max_ms": round(lags[-1] * 1000, 1),
        "loop_lag_p99_ms": round(lags[int(len(lags) * 0.99) - 1] * 1000, 1) if len(lags) > 1 else None,
        "loop_lag_median_ms": round(statistics.median(lags) * 1000, 2),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logins", type=int, default=50)
    parser.add_argument("--delay", type=float, default=0.02, help="seconds added to every LDAP answer (default 0.02)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ldap_logins.json")
    args = parser.parse_args()
    logging.disable(logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        slapd = start_directory(Path(tmp) / "slapd")
        try:
            report = {"machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores", "delay_s": args.delay, "runs": {}}
            for delay in (0.0, args.delay):
                with DelayProxy(slapd.port, delay=delay) as proxy:
                    for name, make in (("labyard", lambda: labyard(proxy.url, slapd)), ("ldapauthenticator-2.0.2", lambda: upstream(proxy.port, slapd))):
                        auth = make()
                        await run(auth, 3)  # warm up: connections, imports
                        report["runs"][f"{name} delay={delay}"] = await run(auth, args.logins)
        finally:
            slapd.stop()

    d = args.delay
    ours, theirs = report["runs"][f"labyard delay={d}"], report["runs"][f"ldapauthenticator-2.0.2 delay={d}"]
    report["ratio_throughput"] = round(ours["logins_per_second"] / theirs["logins_per_second"], 1)
    report["ratio_loop_lag_max"] = round(theirs["loop_lag_max_ms"] / max(ours["loop_lag_max_ms"], 0.1), 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"{args.logins} concurrent logins, LDAP answers delayed by 0 and {d * 1000:.0f} ms ({report['machine']})")
    print(f"{'run':40} {'ok':>4} {'s':>7} {'logins/s':>9} {'lag max ms':>11} {'lag p99 ms':>11}")
    for key, r in report["runs"].items():
        print(f"{key:40} {r['succeeded']:>4} {r['seconds']:>7} {r['logins_per_second']:>9} {r['loop_lag_max_ms']:>11} {r['loop_lag_p99_ms']!s:>11}")
    print(f"with {d * 1000:.0f} ms delay: throughput x{report['ratio_throughput']}, worst event-loop lag /{report['ratio_loop_lag_max']}")


if __name__ == "__main__":
    asyncio.run(main())
