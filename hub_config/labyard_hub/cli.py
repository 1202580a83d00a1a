"""The ``labyard`` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path


def _default_data_dir() -> Path:
    if os.geteuid() == 0:  # users' processes must reach projects and homes: not under /root
        return Path("/var/lib/labyard")
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "labyard"


#: the committed copy of the policy's JSON schema, in the Ansible collection that validates with it
POLICY_SCHEMA = "ansible/collections/ansible_collections/labyard/cluster/schemas/project-policy.schema.json"


def policy_schema_text() -> str:
    """The project policy's JSON schema, generated from :class:`labyard_hub.projects.ProjectPolicy`."""
    import json

    from .projects import ProjectPolicy

    return json.dumps(ProjectPolicy.json_schema(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="labyard", description="Labyard: a JupyterHub platform for ML teams.")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="run the whole platform on this machine (hub, proxy, MLflow, demo LDAP)")
    up.add_argument("--port", type=int, default=8000, help="public port of the proxy on 127.0.0.1 (default 8000)")
    up.add_argument("--data-dir", type=Path, default=None, help="state directory (default ~/.local/share/labyard; as root /var/lib/labyard)")
    up.add_argument("--demo", action="store_true", help="seed and run a demo LDAP directory and project policy")
    up.add_argument("--config", type=Path, help="YAML settings: ldap, policy_file, ... (docs/admin/configuration.md)")
    up.add_argument("--kubernetes", action="store_true", help="spawn servers as pods in a Kubernetes cluster (needs --kubeconfig)")
    up.add_argument("--kubeconfig", type=Path, help="kubeconfig of the cluster to spawn into")
    ctl = sub.add_parser("controller", help="run the controller: group sync, and project namespaces in Kubernetes mode "
                                            "(a hub service; reads $LABYARD_SETTINGS)")
    ctl.add_argument("--once", action="store_true", help="one pass of each, print what it did, exit")
    ready = sub.add_parser("ready", help="wait until the hub, the proxy's routes and every service answer (reads $LABYARD_SETTINGS)")
    ready.add_argument("--public-url", required=True, help="the proxy's public address, e.g. http://proxy-public.labyard.svc")
    ready.add_argument("--timeout", type=float, default=300, help="seconds to wait (default 300)")
    diff = sub.add_parser("diff", help="diff two notebooks (text like nbdiff, or --json); also git's diff driver",
                          description="Diff two notebooks with Labyard's engine (nbdime's format, docs/user/diff.md).")
    from labyard_lab.diff.cli import add_arguments

    add_arguments(diff)
    schema = sub.add_parser("policy-schema", help="print the project policy's JSON schema (Ansible validates projects.yml with it)")
    schema.add_argument("--output", type=Path, help=f"write it to this file instead (the committed copy: {POLICY_SCHEMA})")
    st = sub.add_parser("status", help="which components of the labyard up on a data dir answer (exit 0 only when all do)")
    st.add_argument("--data-dir", type=Path, default=None, help="state directory (default ~/.local/share/labyard)")
    st.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)

    if args.command == "diff":
        from labyard_lab.diff.cli import run

        return run(args)
    if args.command == "policy-schema":
        text = policy_schema_text()
        if args.output:
            args.output.write_text(text)
        else:
            sys.stdout.write(text)
        return 0
    if args.command == "status":
        import json

        from .status import render, status

        code, body = status(args.data_dir or _default_data_dir())
        print(json.dumps(body, indent=1) if args.json else render(body))
        return code
    if args.command == "controller":
        from .services.controller import run_controller

        return asyncio.run(run_controller(once=args.once))
    if args.command == "ready":
        from .ready import wait_ready
        from .settings import Settings

        try:
            asyncio.run(wait_ready(Settings.load(), args.public_url, args.timeout))
        except (TimeoutError, ValueError) as e:
            print(f"labyard ready: {e}", file=sys.stderr)
            return 1
        print("labyard ready: the hub, the proxy's routes and every service answer")
        return 0
    if args.command == "up":
        from .up import Platform, SetupError

        logging.basicConfig(level=logging.INFO, format="[labyard %(asctime)s] %(message)s", datefmt="%H:%M:%S")
        if args.kubernetes != bool(args.kubeconfig):
            parser.error("--kubernetes and --kubeconfig go together")
        platform = Platform(args.data_dir or _default_data_dir(), args.port, args.demo, args.config, args.kubeconfig)
        # SIGTERM before the supervisor runs (while the data dir is prepared) stops as Ctrl-C does
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            platform.lock()
            platform.prepare()
        except SetupError as e:
            print(f"labyard up: {e}", file=sys.stderr)
            platform.unlock()
            return 2
        except KeyboardInterrupt:
            platform.unlock()
            return 0
        try:
            return asyncio.run(platform.run())
        finally:
            platform.unlock()
    return 2


if __name__ == "__main__":
    sys.exit(main())
