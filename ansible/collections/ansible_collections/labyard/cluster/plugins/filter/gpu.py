"""GPU decisions of the nvidia_driver role, as pure functions over command outputs.

Each function takes what a command printed (recorded outputs of real hosts are in
ansible/tests/recorded/) and returns plain data, so the decision is unit-tested
without a GPU; the role only runs the commands and acts on the result.
"""

from __future__ import annotations

import re

from ansible.errors import AnsibleFilterError

SMI_FIELDS = ("index", "name", "uuid", "driver_version", "memory_mib")
SMI_QUERY = "index,name,uuid,driver_version,memory.total"


def nvidia_smi_gpus(stdout):
    """Return one dict per GPU line of ``nvidia-smi --query-gpu`` (fields SMI_FIELDS)."""
    gpus = []
    for line in (stdout or "").splitlines():
        line = line.strip()
        if not line:
            continue
        cols = [c.strip() for c in line.split(",")]
        if len(cols) != len(SMI_FIELDS):
            raise AnsibleFilterError(f"unexpected nvidia-smi line (want {SMI_QUERY}): {line!r}")
        gpu = dict(zip(SMI_FIELDS, cols))
        gpu["index"] = int(gpu["index"])
        gpu["memory_mib"] = int(float(gpu["memory_mib"])) if gpu["memory_mib"] not in ("", "[N/A]") else None
        gpus.append(gpu)
    return gpus


def gpu_inventory_check(gpus, expected_model, expected_count, allocatable=None):
    """Compare the GPUs a node reports with what the inventory declares.

    Args:
        gpus: output of ``nvidia_smi_gpus``.
        expected_model: model name as nvidia-smi prints it (``NVIDIA A100-SXM4-80GB``).
        expected_count: number of GPUs the inventory declares for the host.
        allocatable: optional ``nvidia.com/gpu`` allocatable count from Kubernetes.

    Returns:
        ``{"ok": bool, "problems": [str], "found_count": int, "models": [str]}``
    """
    expected_count = int(expected_count)
    problems = []
    models = sorted({g["name"] for g in gpus})
    if len(gpus) != expected_count:
        problems.append(f"inventory declares {expected_count} GPU(s), nvidia-smi shows {len(gpus)}")
    wrong = [g for g in gpus if g["name"] != expected_model]
    if wrong:
        problems.append(
            "unexpected model(s): "
            + ", ".join(f"GPU {g['index']} is {g['name']}" for g in wrong)
            + f" (inventory: {expected_model})"
        )
    if allocatable is not None and int(allocatable) != expected_count:
        problems.append(
            f"Kubernetes allocatable nvidia.com/gpu is {int(allocatable)}, inventory declares {expected_count}"
        )
    return {"ok": not problems, "problems": problems, "found_count": len(gpus), "models": models}


def _upstream(version):
    """Debian package version -> upstream part ('1:535.216.01-1~deb12u1' -> '535.216.01')."""
    version = (version or "").strip()
    if ":" in version:
        version = version.split(":", 1)[1]
    return version.rsplit("-", 1)[0] if "-" in version else version


def nvidia_driver_plan(state):
    """Decide what the driver role has to do on one host.

    ``state`` keys (all strings unless said):
      wanted_version: pinned package version (``535.216.01-1~deb12u1`` or ``550.127.05``)
      installed_version: ``dpkg-query -W -f '${Version}'`` of the driver package, '' if absent
      smi_rc (int), smi_stdout, smi_stderr: the nvidia-smi query (rc None if not run / missing)
      kernel_release: ``uname -r``
      headers_installed (bool): kernel headers for kernel_release are installed
      dkms_status: ``dkms status`` output ('' when DKMS is not used)

    Returns ``{"action": install|upgrade|rebuild|reboot|none, "reboot_required": bool,
    "install_headers": bool, "reasons": [str]}``.
    """
    wanted = _upstream(state.get("wanted_version"))
    if not wanted:
        raise AnsibleFilterError("nvidia_driver_plan: wanted_version is empty")
    installed = _upstream(state.get("installed_version"))
    kernel = (state.get("kernel_release") or "").strip()
    reasons = []
    install_headers = not bool(state.get("headers_installed"))
    if install_headers:
        reasons.append(f"kernel headers for {kernel} are missing (DKMS cannot build the module)")

    if not installed:
        reasons.append(f"driver not installed, want {wanted}")
        return {"action": "install", "reboot_required": True, "install_headers": install_headers, "reasons": reasons}
    if installed != wanted:
        reasons.append(f"driver {installed} installed, want {wanted}")
        return {"action": "upgrade", "reboot_required": True, "install_headers": install_headers, "reasons": reasons}

    rc = state.get("smi_rc")
    out = (state.get("smi_stdout") or "") + "\n" + (state.get("smi_stderr") or "")
    if rc == 0:
        running = {g["driver_version"] for g in nvidia_smi_gpus(state.get("smi_stdout"))}
        if running == {wanted}:
            return {"action": "none", "reboot_required": False, "install_headers": install_headers, "reasons": reasons}
        reasons.append(f"loaded driver {', '.join(sorted(running)) or 'unknown'} differs from installed {wanted}")
        return {"action": "reboot", "reboot_required": True, "install_headers": install_headers, "reasons": reasons}
    if re.search(r"version mismatch", out, re.I):
        reasons.append("kernel module and user-space library differ (Driver/library version mismatch)")
        return {"action": "reboot", "reboot_required": True, "install_headers": install_headers, "reasons": reasons}
    dkms = state.get("dkms_status") or ""
    built_for_kernel = any(
        kernel and kernel in line and wanted in line and "installed" in line for line in dkms.splitlines()
    )
    if dkms.strip() and not built_for_kernel:
        reasons.append(f"DKMS has no installed nvidia {wanted} module for kernel {kernel}")
        return {"action": "rebuild", "reboot_required": True, "install_headers": install_headers, "reasons": reasons}
    reasons.append("driver installed but nvidia-smi cannot reach it (module not loaded)")
    return {"action": "reboot", "reboot_required": True, "install_headers": install_headers, "reasons": reasons}


class FilterModule:
    """labyard.cluster GPU filters."""

    def filters(self):
        return {
            "nvidia_smi_gpus": nvidia_smi_gpus,
            "gpu_inventory_check": gpu_inventory_check,
            "nvidia_driver_plan": nvidia_driver_plan,
        }
