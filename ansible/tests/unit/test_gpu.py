"""GPU driver decisions on recorded nvidia-smi / dkms outputs."""

import pytest
from ansible.errors import AnsibleFilterError

WANT = "535.216.01-1~deb12u1"
KERNEL = "6.1.0-28-amd64"


def state(recorded, **kw):
    base = {
        "wanted_version": WANT,
        "installed_version": WANT,
        "smi_rc": 0,
        "smi_stdout": recorded("nvidia-smi-a100x4.csv"),
        "smi_stderr": "",
        "kernel_release": KERNEL,
        "headers_installed": True,
        "dkms_status": recorded("dkms-built.txt"),
    }
    base.update(kw)
    return base


def test_parse_four_a100(gpu, recorded):
    gpus = gpu.nvidia_smi_gpus(recorded("nvidia-smi-a100x4.csv"))
    assert [g["index"] for g in gpus] == [0, 1, 2, 3]
    assert {g["name"] for g in gpus} == {"NVIDIA A100-SXM4-80GB"}
    assert gpus[2]["uuid"] == "GPU-1c2d3e4f-5a6b-4c7d-8e9f-0a1b2c3d4e52"
    assert gpus[0]["memory_mib"] == 81920
    assert gpus[0]["driver_version"] == "535.216.01"


def test_parse_rejects_other_query(gpu):
    with pytest.raises(AnsibleFilterError):
        gpu.nvidia_smi_gpus("0, NVIDIA A100-SXM4-80GB, 535.216.01\n")


def test_inventory_matches(gpu, recorded):
    gpus = gpu.nvidia_smi_gpus(recorded("nvidia-smi-a100x4.csv"))
    res = gpu.gpu_inventory_check(gpus, "NVIDIA A100-SXM4-80GB", 4, allocatable=4)
    assert res == {"ok": True, "problems": [], "found_count": 4, "models": ["NVIDIA A100-SXM4-80GB"]}


def test_inventory_lost_gpu(gpu, recorded):
    gpus = gpu.nvidia_smi_gpus(recorded("nvidia-smi-a100x3-one-lost.csv"))
    res = gpu.gpu_inventory_check(gpus, "NVIDIA A100-SXM4-80GB", "4")
    assert not res["ok"]
    assert res["problems"] == ["inventory declares 4 GPU(s), nvidia-smi shows 3"]


def test_inventory_wrong_model(gpu, recorded):
    gpus = gpu.nvidia_smi_gpus(recorded("nvidia-smi-rtx4090x2.csv"))
    res = gpu.gpu_inventory_check(gpus, "NVIDIA A100-SXM4-80GB", 2)
    assert not res["ok"]
    assert "GPU 0 is NVIDIA GeForce RTX 4090" in res["problems"][0]


def test_inventory_allocatable_differs(gpu, recorded):
    gpus = gpu.nvidia_smi_gpus(recorded("nvidia-smi-a100x4.csv"))
    res = gpu.gpu_inventory_check(gpus, "NVIDIA A100-SXM4-80GB", 4, allocatable=3)
    assert res["problems"] == ["Kubernetes allocatable nvidia.com/gpu is 3, inventory declares 4"]


def test_plan_nothing_to_do(gpu, recorded):
    plan = gpu.nvidia_driver_plan(state(recorded))
    assert plan == {"action": "none", "reboot_required": False, "install_headers": False, "reasons": []}


def test_plan_fresh_machine_without_headers(gpu, recorded):
    plan = gpu.nvidia_driver_plan(
        state(recorded, installed_version="", smi_rc=None, smi_stdout="", headers_installed=False, dkms_status="")
    )
    assert plan["action"] == "install"
    assert plan["reboot_required"] and plan["install_headers"]
    assert any("headers" in r for r in plan["reasons"])


def test_plan_upgrade_from_older_package(gpu, recorded):
    plan = gpu.nvidia_driver_plan(state(recorded, installed_version="525.147.05-4~deb12u1"))
    assert plan["action"] == "upgrade"
    assert "525.147.05 installed, want 535.216.01" in plan["reasons"][0]


def test_plan_epoch_and_revision_ignored(gpu, recorded):
    plan = gpu.nvidia_driver_plan(state(recorded, installed_version="1:535.216.01-1~deb12u1"))
    assert plan["action"] == "none"


def test_plan_installed_but_old_module_loaded(gpu, recorded):
    plan = gpu.nvidia_driver_plan(state(recorded, smi_stdout=recorded("nvidia-smi-a100x4-old-driver.csv")))
    assert plan["action"] == "reboot"
    assert "525.147.05" in plan["reasons"][0]


def test_plan_library_mismatch_means_reboot(gpu, recorded):
    plan = gpu.nvidia_driver_plan(state(recorded, smi_rc=18, smi_stdout="", smi_stderr=recorded("nvidia-smi-rc18-mismatch.txt")))
    assert plan["action"] == "reboot"
    assert "mismatch" in plan["reasons"][0]


def test_plan_new_kernel_without_module_means_rebuild(gpu, recorded):
    plan = gpu.nvidia_driver_plan(
        state(recorded, smi_rc=9, smi_stdout=recorded("nvidia-smi-rc9-no-driver.txt"),
              dkms_status=recorded("dkms-old-kernel-only.txt"))
    )
    assert plan["action"] == "rebuild"
    assert KERNEL in plan["reasons"][0]


def test_plan_module_built_but_not_loaded_means_reboot(gpu, recorded):
    plan = gpu.nvidia_driver_plan(state(recorded, smi_rc=9, smi_stdout=recorded("nvidia-smi-rc9-no-driver.txt")))
    assert plan["action"] == "reboot"


def test_plan_needs_a_wanted_version(gpu, recorded):
    with pytest.raises(AnsibleFilterError):
        gpu.nvidia_driver_plan(state(recorded, wanted_version=""))
