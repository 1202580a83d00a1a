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

c.JupyterHub.services = services
c.JupyterHub.load_roles = roles
