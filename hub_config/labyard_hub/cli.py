"""The ``labyard`` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from .up import Platform, SetupError


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "labyard"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="labyard", description="Labyard: a JupyterHub platform for ML teams.")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="run the whole platform on this machine (hub, proxy, MLflow, demo LDAP)")
    up.add_argument("--port", type=int, default=8000, help="public port of the proxy on 127.0.0.1 (default 8000)")
    up.add_argument("--data-dir", type=Path, default=None, help="state directory (default ~/.local/share/labyard)")
    up.add_argument("--demo", action="store_true", help="seed and run a demo LDAP directory and project policy")
    up.add_argument("--config", type=Path, help="YAML settings: ldap, policy_file, ... (docs/admin/configuration.md)")
    up.add_argument("--kubernetes", action="store_true", help="spawn servers as pods in a Kubernetes cluster (needs --kubeconfig)")
    up.add_argument("--kubeconfig", type=Path, help="kubeconfig of the cluster to spawn into")
    ctl = sub.add_parser("controller", help="run the project controller (a hub service; reads $LABYARD_SETTINGS)")
    ctl.add_argument("--once", action="store_true", help="one reconcile pass, print what it did, exit")
    args = parser.parse_args(argv)

    if args.command == "controller":
        from .kube.service import run_controller

        return asyncio.run(run_controller(once=args.once))
    if args.command == "up":
        logging.basicConfig(level=logging.INFO, format="[labyard %(asctime)s] %(message)s", datefmt="%H:%M:%S")
        if args.kubernetes != bool(args.kubeconfig):
            parser.error("--kubernetes and --kubeconfig go together")
        platform = Platform(args.data_dir or _default_data_dir(), args.port, args.demo, args.config, args.kubeconfig)
        try:
            platform.prepare()
        except SetupError as e:
            print(f"labyard up: {e}", file=sys.stderr)
            return 2
        return asyncio.run(platform.run())
    return 2


if __name__ == "__main__":
    sys.exit(main())
