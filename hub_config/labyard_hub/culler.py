"""GPU-aware idle culling: jupyterhub-idle-culler with a shorter limit for servers holding GPUs.

``labyard up`` (and the Helm chart) run ``python -m jupyterhub_idle_culler --config=FILE`` where
FILE sets::

    from labyard_hub.culler import gpu_aware_arbiter
    c.IdleCuller.cull_arbiter_hook = gpu_aware_arbiter(gpu_timeout=900)

The spawner records the flavour's GPU count in the server state (``state["gpus"]``), which the
culler reads through the hub API (its role needs ``admin:server_state``).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta


def gpu_aware_arbiter(gpu_timeout: int) -> Callable[..., bool]:
    """A cull arbiter: servers with GPUs go after ``gpu_timeout`` seconds idle, others after the culler's --timeout."""

    def arbiter(inactive: timedelta, inactive_limit: int, server: dict, **_) -> bool:
        gpus = ((server or {}).get("state") or {}).get("gpus") or 0
        limit = min(gpu_timeout, inactive_limit) if gpus else inactive_limit
        return inactive.total_seconds() >= limit

    return arbiter


def culler_config(gpu_timeout: int) -> str:
    """The culler's config file text."""
    return (
        "from labyard_hub.culler import gpu_aware_arbiter\n"
        f"c.IdleCuller.cull_arbiter_hook = gpu_aware_arbiter(gpu_timeout={int(gpu_timeout)})\n"
    )
