"""The papermill engine of local scheduled runs: papermill's own, with the kernel's channels
encrypted and authenticated (CurveZMQ), as single-user servers' kernels are in local mode.

A kernel listens on loopback TCP ports that every process of the machine can connect to. The
message signatures keep others from *running* code in it, but not from subscribing to its
IOPub channel and reading every output. With ``KernelManager.transport_encryption =
"required"`` only a client holding the keys of the kernel's connection file (in the owner's
private runtime directory) can talk to it. Registered as the papermill engine ``labyard``
(``papermill --engine labyard``, ``execute_notebook(..., engine_name="labyard")``).
"""

from __future__ import annotations

from papermill.engines import NBClientEngine
from traitlets.config import Config

class EncryptedEngine(NBClientEngine):
    """NBClientEngine whose kernels require CurveZMQ transport encryption."""

    @classmethod
    def execute_managed_notebook(cls, nb_man, kernel_name, **kwargs):
        config = Config(kwargs.pop("config", None) or {})
        config.KernelManager.transport_encryption = "required"
        return super().execute_managed_notebook(nb_man, kernel_name, config=config, **kwargs)
