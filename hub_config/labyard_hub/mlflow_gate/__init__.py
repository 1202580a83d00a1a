"""MLflow per project: the ``labyard`` app of ``mlflow server`` (entry point group ``mlflow.app``).

``mlflow server --app-name labyard ...`` serves MLflow wrapped in :class:`.app.Gate`, in
MLflow's own process: every request, from browsers, API clients, kernels and scheduled runs,
is authenticated against JupyterHub and authorized per project before MLflow sees it, and
nothing listens that bypasses it. See docs/admin/mlflow.md.

- :mod:`.routes`: the allow-list, one rule per MLflow route;
- :mod:`.rules`: what each rule checks, decided with :class:`labyard_hub.access.Access`;
- :mod:`.objects`: which project an experiment, run, model, trace or artifact belongs to;
- :mod:`.hub`: hub tokens and the browser's OAuth login;
- :mod:`.app`: the ASGI gate and its settings.
"""

from .app import Gate, GateConfig, create_app

__all__ = ["Gate", "GateConfig", "create_app"]
