"""``labyard controller``: the project controller as a hub service (or a one-shot command).

It reads the same settings as the hub ($LABYARD_SETTINGS): LDAP (to list every project, with the
authenticator's own service account), the project policy, and the Kubernetes settings.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal

from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio.client import ApiClient

from ..ldap import DirectoryError, LDAPAuthenticator
from ..projects import ProjectPolicy
from ..settings import Settings
from .controller import Grant, ProjectController

log = logging.getLogger("labyard.controller")


async def _api_client(kubeconfig) -> ApiClient:
    if kubeconfig:
        await kube_config.load_kube_config(config_file=str(kubeconfig))
    else:
        kube_config.load_incluster_config()
    return ApiClient()


def make_controller(settings: Settings, api: ApiClient) -> ProjectController:
    k = settings.kubernetes
    assert k is not None, "the project controller needs `kubernetes:` settings"
    ldap = LDAPAuthenticator(**settings.ldap)
    policy = ProjectPolicy.from_yaml(settings.policy_file) if settings.policy_file else ProjectPolicy()
    grants = [
        Grant("labyard-hub", "labyard-hub-project", k.hub_service_account, k.hub_namespace),
        Grant("labyard-scheduler", "labyard-scheduler-project", k.scheduler_service_account, k.hub_namespace),
    ]
    return ProjectController(
        api, ldap.list_projects, policy, k.hub_namespace, grants,
        storage_class=k.storage_class, delete_orphaned_namespaces=k.delete_orphaned_namespaces,
    )


async def run_controller(once: bool = False) -> int:
    logging.basicConfig(level=logging.WARNING, format="[labyard-controller %(asctime)s] %(message)s")
    log.setLevel(logging.INFO)
    settings = Settings.load()
    k = settings.kubernetes
    api = await _api_client((k.controller_kubeconfig or k.kubeconfig) if k else None)
    controller = make_controller(settings, api)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        while True:
            try:
                done = await controller.reconcile_all()
                log.info("pass: %s", json.dumps(done))
                if once:
                    print(json.dumps(done))
                    return 1 if done["failed"] else 0
            except DirectoryError as e:
                log.error("LDAP unavailable, nothing changed this pass: %s", e)
                if once:
                    return 1
            try:
                await asyncio.wait_for(stop.wait(), settings.kubernetes.controller_interval)
                return 0
            except asyncio.TimeoutError:
                pass
    finally:
        await api.close()
