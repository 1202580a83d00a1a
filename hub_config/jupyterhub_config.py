# Labyard's JupyterHub configuration: reads the installation's settings and sets c.*.
# Everything else lives in labyard_hub (documented traitlets); see docs/admin/configuration.md.
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

# the proxy is started and supervised by `labyard up` (or its own pod), so hub restarts keep routes
c.ConfigurableHTTPProxy.should_start = False
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{s.proxy_api_port}"
c.ConfigurableHTTPProxy.auth_token = s.proxy_token_file.read_text().strip()

c.JupyterHub.authenticator_class = "labyard-ldap"
for name, value in s.ldap.items():
    setattr(c.LDAPAuthenticator, name, value)
c.Authenticator.admin_users = set(s.admin_users)

if s.spawner == "local":
    c.JupyterHub.spawner_class = "labyard-local"
    c.LocalProjectSpawner.projects_dir = str(s.projects_dir)
    c.LocalProjectSpawner.home_dir_template = str(s.homes_dir / "{username}")
    c.LocalProjectSpawner.default_url = "/lab"
    if s.policy_file:
        c.LocalProjectSpawner.policy_file = str(s.policy_file)
if s.mlflow_url:
    c.Spawner.environment = {"MLFLOW_TRACKING_URI": s.mlflow_url}
