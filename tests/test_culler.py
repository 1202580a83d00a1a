"""The GPU-aware cull arbiter, as jupyterhub-idle-culler calls it."""

from datetime import timedelta

from labyard_hub.culler import culler_config, gpu_aware_arbiter


def test_gpu_servers_are_culled_sooner():
    arbiter = gpu_aware_arbiter(gpu_timeout=600)
    gpu = {"state": {"flavor": "gpu-1", "gpus": 1}}
    cpu = {"state": {"flavor": "cpu", "gpus": 0}}
    assert arbiter(timedelta(minutes=11), 3600, gpu) is True
    assert arbiter(timedelta(minutes=9), 3600, gpu) is False
    assert arbiter(timedelta(minutes=11), 3600, cpu) is False
    assert arbiter(timedelta(minutes=61), 3600, cpu) is True
    assert arbiter(timedelta(minutes=61), 3600, {"state": {}}) is True


def test_config_file_loads_in_the_culler(tmp_path):
    from jupyterhub_idle_culler import IdleCuller

    path = tmp_path / "culler_config.py"
    path.write_text(culler_config(gpu_timeout=300))
    app = IdleCuller()
    app.load_config_file(str(path))
    assert app.cull_arbiter_hook(inactive=timedelta(seconds=301), inactive_limit=3600, server={"state": {"gpus": 2}})


def test_activity_reports_must_come_sooner_than_the_timeouts():
    """A server reporting its activity less often than its timeout would be stopped while busy."""
    import pytest
    from pydantic import ValidationError

    from labyard_hub.settings import CullSettings

    assert CullSettings(gpu_timeout=30, activity_interval=5).activity_interval == 5
    with pytest.raises(ValidationError, match=r"cull.activity_interval \(900 s\) must be shorter than cull.timeout"):
        CullSettings(gpu_timeout=900, activity_interval=900)
    assert CullSettings(enabled=False, gpu_timeout=60).activity_interval == 300  # no culler: nothing to miss
