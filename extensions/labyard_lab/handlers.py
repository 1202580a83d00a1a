"""REST handlers of the labyard_lab server extension (every method authenticated)."""

from __future__ import annotations

import json
import os

import tornado
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join


class InfoHandler(APIHandler):
    """``GET /labyard/info``: who and which project this server is for."""

    @tornado.web.authenticated
    def get(self):
        self.finish(
            json.dumps(
                {
                    "user": os.environ.get("JUPYTERHUB_USER") or self.current_user.username,
                    "project": os.environ.get("LABYARD_PROJECT"),
                    "flavor": os.environ.get("LABYARD_FLAVOR"),
                    "mlflow_url": os.environ.get("MLFLOW_TRACKING_URI"),
                }
            )
        )


def setup_handlers(web_app) -> None:
    base = web_app.settings["base_url"]
    web_app.add_handlers(".*$", [(url_path_join(base, "labyard", "info"), InfoHandler)])
    from .runs import runs_handlers  # MLflow runs of a notebook (issue 6)

    web_app.add_handlers(".*$", runs_handlers(base))
    from .scheduling import scheduling_handlers  # the labyard-scheduler service, on the user's behalf (issue 5)

    web_app.add_handlers(".*$", scheduling_handlers(base))
