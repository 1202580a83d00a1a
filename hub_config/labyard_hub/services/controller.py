"""``labyard controller``: the controller hub service (or a one-shot command).

It always runs the group sync (:mod:`labyard_hub.services.group_sync`: hub groups follow the
directory's projects, every ``group_sync_interval`` seconds) and, in Kubernetes mode, the
project namespaces (:mod:`labyard_hub.kube.controller`, every ``kubernetes.controller_interval``
seconds). It reads the same settings as the hub ($LABYARD_SETTINGS) and reaches the hub's REST
API with the token the hub gives its managed services ($JUPYTERHUB_API_URL,
$JUPYTERHUB_API_TOKEN); its role's scopes are in hub_config/jupyterhub_config.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from collections.abc import Awaitable, Callable

from ..directory import Directory, DirectoryError
from ..ldap import ldap_config
from ..access import load_policy
from ..settings import Settings
from .group_sync import GroupSync, HubClient, HubError

log = logging.getLogger("labyard.controller")


def make_directory(settings: Settings) -> Directory:
    return Directory(config=ldap_config(settings.ldap))


def make_group_sync(directory: Directory) -> GroupSync:
    url, token = os.environ.get("JUPYTERHUB_API_URL"), os.environ.get("JUPYTERHUB_API_TOKEN")
    if not url or not token:
        raise SystemExit("labyard controller: the group sync needs the hub's API: run it as a hub service, "
                         "or set JUPYTERHUB_API_URL and JUPYTERHUB_API_TOKEN")
    return GroupSync(directory, HubClient(url, token))


async def make_namespaces(settings: Settings, directory: Directory):
    """The Kubernetes project controller and its API client (Kubernetes mode only)."""
    from kubernetes_asyncio import config as kube_config
    from kubernetes_asyncio.client import ApiClient

    from ..kube.controller import Grant, ProjectController

    k = settings.kubernetes
    kubeconfig = k.controller_kubeconfig or k.kubeconfig
    if kubeconfig:
        await kube_config.load_kube_config(config_file=str(kubeconfig))
    else:
        kube_config.load_incluster_config()
    api = ApiClient()
    policy = load_policy(settings.policy_file)
    grants = [
        Grant("labyard-hub", "labyard-hub-project", k.hub_service_account, k.hub_namespace),
        Grant("labyard-scheduler", "labyard-scheduler-project", k.scheduler_service_account, k.hub_namespace),
    ]
    controller = ProjectController(
        api, directory.list_projects, policy, k.hub_namespace, grants,
        storage_class=k.storage_class, delete_orphaned_namespaces=k.delete_orphaned_namespaces,
        project_egress=k.project_egress,
    )
    return controller, api


async def _every(name: str, interval: float, one_pass: Callable[[], Awaitable[dict]], stop: asyncio.Event, once: bool) -> bool:
    """Run ``one_pass`` now and then every ``interval`` s until ``stop``; a failed pass is retried
    sooner (the hub may still be starting). Returns whether the last pass succeeded."""
    while True:
        ok = False
        try:
            done = await one_pass()
            ok = not done.get("failed")
            log.info("%s: %s", name, json.dumps(done) if done else "nothing to change")
            if once:
                print(json.dumps({name: done}), flush=True)
        except DirectoryError as e:
            log.error("%s: LDAP unavailable, nothing changed this pass: %s", name, e)
        except HubError as e:
            log.error("%s: the hub did not answer, nothing changed this pass: %s", name, e)
        if once:
            return ok
        try:
            await asyncio.wait_for(stop.wait(), interval if ok else min(interval, 5))
            return ok
        except asyncio.TimeoutError:
            pass


async def run_controller(once: bool = False) -> int:
    logging.basicConfig(level=logging.WARNING, format="[labyard-controller %(asctime)s] %(message)s")
    log.setLevel(logging.INFO)
    logging.getLogger("labyard.directory").setLevel(logging.INFO)
    settings = Settings.load()
    directory = make_directory(settings)
    sync = make_group_sync(directory)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def sync_pass() -> dict:
        return (await sync.run_once()).as_dict()

    loops = [_every("group sync", settings.group_sync_interval, sync_pass, stop, once)]
    api = None
    if settings.kubernetes:
        controller, api = await make_namespaces(settings, directory)
        loops.append(_every("namespaces", settings.kubernetes.controller_interval, controller.reconcile_all, stop, once))
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(one) for one in loops]
        return 0 if all(t.result() for t in tasks) or not once else 1
    finally:
        if api is not None:
            await api.close()
        await directory.close()
