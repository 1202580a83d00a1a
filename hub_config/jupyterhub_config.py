# Labyard's JupyterHub configuration: reads the installation's settings and sets c.*.
# Everything else lives in labyard_hub (documented traitlets); see docs/admin/configuration.md.
import os
import sys

from labyard_hub import TEMPLATES
from labyard_hub.settings import Settings

c = get_config()  # noqa: F821
s = Settings.load()

c.JupyterHub.bind_url = s.bind_url
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = s.hub_port
c.JupyterHub.db_url = f"sqlite:///{s.hub_dir / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(s.hub_dir / "cookie_secret")
c.JupyterHub.pid_file = str(s.hub_dir / "jupyterhub.pid")
c.JupyterHub.template_paths = [TEMPLATES]
c.JupyterHub.allow_named_servers = True
c.JupyterHub.default_url = "/hub/home"
services, roles = [], []
service_env = {"LABYARD_SETTINGS": os.environ["LABYARD_SETTINGS"]}

# the proxy is started and supervised by `labyard up` (or its own pod), so hub restarts keep routes
c.ConfigurableHTTPProxy.should_start = False
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{s.proxy_api_port}"
c.ConfigurableHTTPProxy.auth_token = s.proxy_token_file.read_text().strip()

c.JupyterHub.authenticator_class = "labyard-ldap"
for name, value in s.ldap.items():
    setattr(c.LDAPAuthenticator, name, value)
c.Authenticator.admin_users = set(s.admin_users)

if s.mlflow_url:
    c.Spawner.environment = {"MLFLOW_TRACKING_URI": s.mlflow_url}
    # MLflow UI and API behind the hub login at /services/mlflow/ (docs/admin/mlflow.md)
    services.append({
        "name": "mlflow", "display": True, "oauth_no_confirm": True,
        "url": f"http://127.0.0.1:{s.mlflow_proxy_port}",
        "command": [sys.executable, "-m", "labyard_hub.services.mlflow_proxy"],
        "environment": {"LABYARD_MLFLOW_UPSTREAM": s.mlflow_url},
    })
    roles.append({"name": "user", "scopes": ["self", "access:services!service=mlflow"]})
if s.policy_file:
    c.ProjectSpawnerMixin.policy_file = str(s.policy_file)

k = s.kubernetes
if k is None:
    c.JupyterHub.spawner_class = "labyard-local"
    c.LocalProjectSpawner.projects_dir = str(s.projects_dir)
    c.LocalProjectSpawner.home_dir_template = str(s.homes_dir / "{username}")
    c.LocalProjectSpawner.default_url = "/lab"
else:
    c.JupyterHub.spawner_class = "labyard-kubernetes"
    c.JupyterHub.cleanup_servers = False  # pods outlive hub restarts; the hub re-attaches
    c.ProjectKubeSpawner.image = k.image
    c.ProjectKubeSpawner.image_pull_policy = k.image_pull_policy
    c.ProjectKubeSpawner.extra_labels = k.pod_labels
    c.ProjectKubeSpawner.storage_class = k.storage_class
    c.ProjectKubeSpawner.home_storage = k.home_storage
    c.ProjectKubeSpawner.start_timeout = k.start_timeout
    if k.hub_connect_url:
        c.ProjectKubeSpawner.hub_connect_url = k.hub_connect_url
    if k.kubeconfig:
        service_env["KUBECONFIG"] = str(k.kubeconfig)
    controller_env = {**service_env, **({"KUBECONFIG": str(k.controller_kubeconfig)} if k.controller_kubeconfig else {})}
    services.append(
        {"name": "labyard-controller", "command": [sys.executable, "-m", "labyard_hub.cli", "controller"], "environment": controller_env}
    )

if s.cull.enabled:
    services.append({
        "name": "idle-culler",
        "command": [sys.executable, "-m", "jupyterhub_idle_culler", f"--config={s.data_dir / 'culler_config.py'}",
                    f"--timeout={s.cull.timeout}", f"--cull-every={s.cull.every}"],
    })
    roles.append({"name": "idle-culler", "services": ["idle-culler"],
                  "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers", "admin:server_state"]})

# labyard-scheduler: runs notebooks now or on a timetable (docs/admin/scheduler.md). It reads the
# users' uid/gid/projects from auth_state; users, and their servers' tokens, may call it.
# Backend: Kubernetes (Jobs/CronJobs in the project namespaces) when kubernetes is set, else local.
services.append({
    "name": "labyard-scheduler", "oauth_no_confirm": True, "url": f"http://127.0.0.1:{s.scheduler_port}",
    "command": [sys.executable, "-m", "labyard_hub.scheduler.app"], "environment": {**service_env, "PYTHONUNBUFFERED": "1"},
})
roles.append({"name": "labyard-scheduler", "services": ["labyard-scheduler"], "scopes": ["read:users", "admin:auth_state"]})
for name, scopes in (("user", ["self"]), ("server", ["users:activity!user", "access:servers!server"])):
    if not any(r["name"] == name for r in roles):
        roles.append({"name": name, "scopes": scopes})
    role = next(r for r in roles if r["name"] == name)
    role["scopes"] = [*role["scopes"], "access:services!service=labyard-scheduler"]
# single-user servers reach the scheduler directly (their server extension calls it for the user)
c.Spawner.environment.update({"LABYARD_SCHEDULER_URL": f"http://127.0.0.1:{s.scheduler_port}/services/labyard-scheduler/api/"})

c.JupyterHub.services = services
c.JupyterHub.load_roles = roles
