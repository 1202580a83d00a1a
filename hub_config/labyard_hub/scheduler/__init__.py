"""labyard-scheduler: the hub service that turns notebooks into scheduled papermill runs.

Layout: :mod:`.models` (the REST API's pydantic models), :mod:`.params` (notebook parameters:
inspection and validation), :mod:`.snapshots` (notebooks stored by content hash),
:mod:`.runner` (one run: papermill in a child process, with timeout and retries),
:mod:`.local` (the embedded backend: sqlite + subprocesses + croniter), :mod:`.kube`
(Jobs and CronJobs in the project namespace) and :mod:`.app` (the tornado service).
See docs/admin/scheduler.md.
"""
