"""The hub's garbage collector, kept from pausing its event loop.

A running hub holds about 320,000 objects that live as long as it does (JupyterHub, SQLAlchemy,
tornado, Jinja and their modules, classes and configuration). Python's full (generation 2)
collection walks all of them: 170-200 ms here, during which the hub answers nothing. Under a
burst of logins one comes every 20 s or so, and it was the longest wait of ``/hub/health`` in
``bench/ldap_logins.py`` (280 ms against 40-90 ms otherwise). :func:`freeze_startup_objects`
moves the objects alive at start-up into the collector's permanent generation, which full
collections skip: they then take 2-15 ms. Objects created later are collected as before; a
start-up object that later becomes cyclic garbage is not freed (start-up objects live as long as
the process anyway). See docs/dev/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import gc

from traitlets.log import get_logger


def freeze_startup_objects(after_start: float = 10.0) -> None:
    """Freeze what is alive now (imports, configuration) and again ``after_start`` seconds later,
    when the hub has started (its users loaded from the database, the proxy and services up).
    Called from the hub's configuration file; without a running event loop (``jupyterhub
    upgrade-db``, a one-off command) it freezes once."""
    gc.collect()
    gc.freeze()
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return

    def again() -> None:
        gc.collect()
        gc.freeze()
        get_logger().info("%d objects alive at start-up are frozen out of the garbage collector", gc.get_freeze_count())

    loop.call_later(after_start, again)
