"""The ``labyard-gpus`` hub service: who holds which GPU, for how long, and how busy it is.

* :mod:`.inventory`: pure functions from Kubernetes nodes, pods and quotas to the GPU inventory,
  the allocations and the per-project figures;
* :mod:`.usage`: the durable record of GPU intervals (sqlite) and the GPU-hours reports;
* :mod:`.dcgm`: utilisation and memory per GPU from a Prometheus scraping dcgm-exporter;
* :mod:`.cluster`: the periodic read of the cluster that feeds both;
* :mod:`.app`: the tornado handlers (admin page and API, members' project share).

Documented in docs/admin/gpus.md.
"""
