"""The ``labyard.*`` provenance tags of every run started in a platform kernel: an MLflow run
context provider, registered through MLflow's plugin point (entry point
``mlflow.run_context_provider``, name ``labyard``).

MLflow loads it when it builds its registry of providers, after its own, so these tags override
MLflow's defaults such as ``mlflow.source.name = ipykernel_launcher.py``. Being an entry point,
it is there whichever thread imports MLflow first: a cell may start a run before autolog's
background setup is done (a registration made by that setup would miss the run). Outside a
kernel with autolog on it adds nothing. Only MLflow imports this module (importing it first,
before MLflow, would make MLflow load it half-initialised and skip it with a warning).
"""

from __future__ import annotations

from mlflow.tracking.context.abstract_context import RunContextProvider


class LabyardRunContext(RunContextProvider):
    def in_context(self) -> bool:
        from . import current

        return current() is not None

    def tags(self) -> dict[str, str]:
        from . import current

        autolog = current()
        if autolog is None:
            return {}
        provenance = autolog.provenance
        try:
            return provenance.run_tags()
        except Exception:  # noqa: BLE001 - never break the user's run
            c = provenance.config
            return {"labyard.user": c.user, "labyard.project": c.project, "labyard.notebook": c.notebook_relpath}
