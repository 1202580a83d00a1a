"""The hub's own SQLite database, set up so that JupyterHub's commits do not stall its event loop.

JupyterHub writes its database synchronously on the event loop, several commits per login. With
SQLite's defaults (rollback journal, ``synchronous=FULL``) every commit waits for the disk to
flush (about 5 ms on our machines, far more on network storage): 50 people logging in at once
then hold every other request of the hub for a second or more. In write-ahead-log mode with
``synchronous=NORMAL`` a commit writes to the log without waiting for the disk; the database
stays consistent, and after a power cut (not a crash of the hub) the last commits may be lost.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any


def engine_kwargs(db_url: str) -> dict[str, Any]:
    """``c.JupyterHub.db_kwargs`` for the hub database ``db_url``: for an SQLite file, connections
    in write-ahead-log mode; any other database (e.g. PostgreSQL) as SQLAlchemy opens it."""
    if not db_url.startswith("sqlite:///") or db_url == "sqlite:///:memory:":
        return {}
    path = Path(db_url.removeprefix("sqlite:///"))

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(str(path), check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    return {"creator": connect}
