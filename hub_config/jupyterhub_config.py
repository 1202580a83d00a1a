# Labyard's JupyterHub configuration: reads the installation's settings and sets c.*.
# Everything else lives in labyard_hub (documented traitlets); see docs/admin/configuration.md.
import os
import sys

from labyard_hub import TEMPLATES, hubgc, lifecycle
from labyard_hub.access import Access
from labyard_hub.hubdb import engine_kwargs
from labyard_hub.ldap import ldap_config
from labyard_hub.projects import PolicyError
from labyard_hub.settings import Settings

c = get_config()  # noqa: F821
s = Settings.load()
try:
    # the one place the policy is loaded for the hub: a bad file stops it here, naming file and field
    access = Access.from_settings(s)
except PolicyError as e:
    sys.exit(f"Labyard cannot start: {e}")

c.JupyterHub.bind_url = s.bind_url
# The hub's own address as a whole: from hub_ip/hub_port alone, JupyterHub binds the host of
# hub_connect_url, which in a pod is the hub's Service name (found on the testbed's real node).
c.JupyterHub.hub_bind_url = f"http://{f'[{s.hub_ip}]' if ':' in s.hub_ip else s.hub_ip}:{s.hub_port}"
c.JupyterHub.hub_connect_url = s.hub_connect_url
c.JupyterHub.db_url = s.db_url
c.JupyterHub.db_kwargs = engine_kwargs(s.db_url)  # sqlite: commits that do not wait for the disk
c.JupyterHub.upgrade_db = True  # a new Labyard (helm upgrade) may bring a newer JupyterHub; sqlite is backed up first
c.JupyterHub.cookie_secret_file = str(s.secrets_dir / "cookie-secret")
c.JupyterHub.pid_file = str(s.hub_dir / "jupyterhub.pid")
c.JupyterHub.template_paths = [TEMPLATES]
c.JupyterHub.allow_named_servers = True
c.JupyterHub.default_url = "/hub/home"
services, roles = [], []
service_env = {"LABYARD_SETTINGS": os.environ["LABYARD_SETTINGS"]}


def service(name: str, command: list[str], environment: dict | None = None, **spec) -> None:
    """A hub service. The hub starts it, unless ``external_services`` (the Helm chart runs it as its
    own Deployment): then it is only declared, with its API token (every Labyard service has a URL or
    calls the hub's API)."""
    if not s.external_services:
        # tied to the hub (stopped when it dies, even by SIGKILL) and marked with the platform's session
        command, environment = lifecycle.hub_service(command, environment or {})
        # a loaded machine may take longer than JupyterHub's 30 s to start a service (it exits then)
        services.append({"name": name, "command": command, "environment": environment,
                         **({"timeout": 180} if "url" in spec else {}), **spec})
    else:
        services.append({"name": name, "api_token": s.secret(f"{name}.api-token"), **spec})


# the proxy is started and supervised by `labyard up` (or its own pod), so hub restarts keep routes
c.ConfigurableHTTPProxy.should_start = False
c.ConfigurableHTTPProxy.api_url = s.proxy_api_url
c.ConfigurableHTTPProxy.auth_token = s.secret("proxy-token")

c.JupyterHub.authenticator_class = "labyard-ldap"
c.merge(ldap_config(s.ldap))  # each option to Directory or LDAPAuthenticator (docs/admin/reference.md)
c.Authenticator.admin_users = set(s.admin_users)

c.Spawner.environment = dict(s.server_environment)  # the admin's first: Labyard's own variables below win
# saving a file that does not fit on the disk says so, and leaves no partial file (labyard_lab.contents)
c.Spawner.args = ["--ServerApp.contents_manager_class=labyard_lab.contents.FileManager"]
if s.mlflow_url:
    # MLflow is the hub service `mlflow` at /services/mlflow/: `mlflow server --app-name labyard`, whose gate
    # authenticates every request with the hub and authorizes it per project (docs/admin/mlflow.md). Servers
    # (and their kernels) log through it with their own API token, which may use this service. The hub never
    # starts it (labyard up runs it beside the hub, the Helm chart as its own Deployment): it is only declared.
    c.Spawner.environment.update({"MLFLOW_TRACKING_URI": s.mlflow_gated_uri,
                                  "MLFLOW_TRACKING_TOKEN": lambda spawner: spawner.api_token})
    services.append({
        "name": "mlflow", "display": True, "oauth_no_confirm": True, "url": s.mlflow_url,
        "api_token": s.secret("mlflow.api-token"),
        "oauth_redirect_uri": "/services/mlflow/oauth_callback",
    })
    # the gate reads users' current projects (groups) and admin flag, nothing else
    roles.append({"name": "mlflow", "services": ["mlflow"], "scopes": ["read:users", "list:groups", "read:groups"]})
if s.policy_file:
    c.ProjectSpawnerMixin.policy_file = str(s.policy_file)
c.ProjectSpawnerMixin.policy = access.policy

k = s.kubernetes
if k is None:
    c.JupyterHub.spawner_class = "labyard-local"
    c.LocalProjectSpawner.projects_dir = str(s.projects_dir)
    c.LocalProjectSpawner.allow_gpu_flavors = s.local.allow_gpu_flavors
    c.LocalProjectSpawner.home_dir_template = str(s.homes_dir / "{username}")
    c.LocalProjectSpawner.log_dir = str(s.data_dir / "logs" / "servers")
    c.LocalProjectSpawner.default_url = "/lab"
    # servers, their kernels and terminals carry the platform's session mark: not tied to the hub
    # (they outlive a hub restart and are re-attached), stopped when `labyard up` ends
    c.Spawner.environment.update(lifecycle.session_env())
else:
    c.JupyterHub.spawner_class = "labyard-kubernetes"
    c.JupyterHub.cleanup_servers = False  # pods outlive hub restarts; the hub re-attaches
    c.ProjectKubeSpawner.image = k.image
    c.ProjectKubeSpawner.image_pull_policy = k.image_pull_policy
    c.ProjectKubeSpawner.extra_labels = k.pod_labels
    c.ProjectKubeSpawner.storage_class = k.storage_class
    c.ProjectKubeSpawner.home_storage = k.home_storage
    c.ProjectKubeSpawner.start_timeout = k.start_timeout
    if k.kubeconfig:
        service_env["KUBECONFIG"] = str(k.kubeconfig)

# labyard-controller: the group sync (hub groups and their properties follow LDAP projects for every
# user, logged in or not; servers of removed members stop), and in Kubernetes mode the project
# namespaces. Its role: manage groups, list users and their servers, stop servers; nothing else.
controller_env = {**service_env, "PYTHONUNBUFFERED": "1"}
if k is not None and k.controller_kubeconfig:
    controller_env["KUBECONFIG"] = str(k.controller_kubeconfig)
service("labyard-controller", [sys.executable, "-m", "labyard_hub.cli", "controller"], controller_env)
roles.append({"name": "labyard-controller", "services": ["labyard-controller"],
              "scopes": ["admin:groups", "list:users", "read:servers", "delete:servers"]})

if s.cull.enabled:
    # activity reaches the hub from the servers (jupyterhub-singleuser, every JUPYTERHUB_ACTIVITY_INTERVAL
    # seconds; a busy kernel counts: labyard_lab.activity) and from the proxy (traffic, read as often)
    c.Spawner.environment["JUPYTERHUB_ACTIVITY_INTERVAL"] = str(s.cull.activity_interval)
    c.JupyterHub.last_activity_interval = s.cull.activity_interval
    service("idle-culler", [sys.executable, "-m", "jupyterhub_idle_culler", f"--config={s.data_dir / 'culler_config.py'}",
                            f"--timeout={s.cull.timeout}", f"--cull-every={s.cull.every}"])
    roles.append({"name": "idle-culler", "services": ["idle-culler"],
                  "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers", "admin:server_state"]})

# labyard-scheduler: runs notebooks now or on a timetable (docs/admin/scheduler.md). It reads the
# users' uid/gid/projects from auth_state; users, and their servers' tokens, may call it.
# Backend: Kubernetes (Jobs/CronJobs in the project namespaces) when kubernetes is set, else local.
service("labyard-scheduler", [sys.executable, "-m", "labyard_hub.scheduler.app"], {**service_env, "PYTHONUNBUFFERED": "1"},
        oauth_no_confirm=True, url=s.scheduler_url)
# identities are read from the hub (labyard_hub.access.HubIdentities): users, auth_state, groups;
# tokens: a scheduled run gets a token of its owner for MLflow only (labyard_hub.scheduler.tokens)
roles.append({"name": "labyard-scheduler", "services": ["labyard-scheduler"],
              "scopes": ["read:users", "admin:auth_state", "list:groups", "read:groups", *(["tokens"] if s.mlflow_url else [])]})
# labyard-gpus (Kubernetes mode only; local mode has no GPU inventory): the admins' GPU page and API, GPU-hours,
# and each member's project share on the home page (docs/admin/gpus.md). Its role: list users and read their
# servers' last activity (idle time), read users and groups (who is an admin, who is a member); nothing else.
if k is not None:
    gpus_env = {**service_env, "PYTHONUNBUFFERED": "1"}
    if k.gpus_kubeconfig:
        gpus_env["KUBECONFIG"] = str(k.gpus_kubeconfig)
    service("labyard-gpus", [sys.executable, "-m", "labyard_hub.gpus.app"], gpus_env, oauth_no_confirm=True, url=s.gpus_url)
    roles.append({"name": "labyard-gpus", "services": ["labyard-gpus"],
                  "scopes": ["list:users", "read:users", "read:servers", "list:groups", "read:groups"]})
    # the home page fetches each project's GPU share from it
    c.JupyterHub.template_vars = {"labyard_gpus_prefix": "/services/labyard-gpus/"}

# users, and their servers' tokens, may use the scheduler and MLflow (and, in Kubernetes mode, see their GPU share)
services_for_users = ["labyard-scheduler", *(["mlflow"] if s.mlflow_url else []), *(["labyard-gpus"] if k is not None else [])]
for name, scopes in (("user", ["self"]), ("server", ["users:activity!user", "access:servers!server"])):
    roles.append({"name": name, "scopes": [*scopes, *(f"access:services!service={n}" for n in services_for_users)]})
# single-user servers reach the scheduler directly (their server extension calls it for the user)
c.Spawner.environment.update({"LABYARD_SCHEDULER_URL": f"{s.scheduler_url}/services/labyard-scheduler/api/"})

# labyard-up: `labyard up` itself, which asks the hub to add every route again to a proxy it restarted
# (a new proxy has none); nothing else
if not s.external_services and (s.secrets_dir / "labyard-up.api-token").exists():
    services.append({"name": "labyard-up", "api_token": s.secret("labyard-up.api-token")})
    roles.append({"name": "labyard-up", "services": ["labyard-up"], "scopes": ["proxy"]})

c.JupyterHub.services = services
c.JupyterHub.load_roles = roles

# the hub's start-up objects out of the garbage collector's full passes (200 ms pauses of the event loop)
hubgc.freeze_startup_objects()
