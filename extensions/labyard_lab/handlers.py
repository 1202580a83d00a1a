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
                    # the project's own name in the directory (LABYARD_PROJECT is its slug)
                    "project_display_name": os.environ.get("LABYARD_PROJECT_DISPLAY_NAME") or os.environ.get("LABYARD_PROJECT"),
                    "flavor": os.environ.get("LABYARD_FLAVOR"),
                    "mlflow_url": os.environ.get("MLFLOW_TRACKING_URI"),
                }
            )
        )


def setup_handlers(server_app) -> None:
    web_app = server_app.web_app
    base = web_app.settings["base_url"]
    web_app.add_handlers(".*$", [(url_path_join(base, "labyard", "info"), InfoHandler)])
    from .runs import runs_handlers  # MLflow runs of a notebook (issue 6)

    web_app.add_handlers(".*$", runs_handlers(base))
    from .scheduling import scheduling_handlers  # the labyard-scheduler service, on the user's behalf (issue 5)

    web_app.add_handlers(".*$", scheduling_handlers(base))
    from .diff.handlers import diff_handlers  # notebook diffs, and nbdime's buttons (issue 13)

    web_app.add_handlers(".*$", diff_handlers(server_app))
