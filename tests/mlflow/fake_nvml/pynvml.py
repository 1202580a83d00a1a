"""A fake NVML for tests, with the API shape of NVIDIA's ``pynvml`` (package ``nvidia-ml-py``).

Our machines and CI have no GPU and no NVIDIA driver, so the real ``pynvml`` cannot answer
here. Put this directory first on ``PYTHONPATH`` and ``import pynvml`` finds this module instead:
it replays the readings in ``$LABYARD_FAKE_NVML`` (default ``readings.json`` beside it), one
sample per call and device, in a loop. Functions, return types (ctypes structures with the same
field names) and the ``NVMLError`` exception are those of ``pynvml``, as far as MLflow's GPU
monitor and Labyard use them: nvmlInit, nvmlShutdown, nvmlSystemGetDriverVersion,
nvmlDeviceGetCount, nvmlDeviceGetHandleByIndex, nvmlDeviceGetName, nvmlDeviceGetMemoryInfo,
nvmlDeviceGetUtilizationRates, nvmlDeviceGetPowerUsage, nvmlDeviceGetEnforcedPowerLimit.

``readings.json`` holds the answers of two A100-SXM4-80GB devices during a training job, in
the units NVML uses (bytes, percent, milliwatts). They were written for these tests in the shape
NVML returns (no GPU was at hand to record them from); the values are plausible, not measured.
"""

from __future__ import annotations

import ctypes
import json
import os
import threading
from pathlib import Path

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_LIBRARY_NOT_FOUND = 12


class NVMLError(Exception):
    def __init__(self, value):
        self.value = value

    def __str__(self):
        return {1: "Uninitialized", 2: "Invalid Argument", 12: "NVML Shared Library Not Found"}.get(self.value, str(self.value))


class c_nvmlMemory_t(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class c_nvmlUtilization_t(ctypes.Structure):
    _fields_ = [("gpu", ctypes.c_uint), ("memory", ctypes.c_uint)]


class _Device:
    def __init__(self, index: int, spec: dict):
        self.index = index
        self.spec = spec
        self.calls: dict[str, int] = {}

    def sample(self, what: str) -> dict:
        n = self.calls.get(what, 0)
        self.calls[what] = n + 1
        samples = self.spec["samples"]
        return samples[n % len(samples)]


_lock = threading.Lock()
_state: dict = {"init": 0, "devices": None}


def _readings() -> dict:
    path = os.environ.get("LABYARD_FAKE_NVML") or str(Path(__file__).with_name("readings.json"))
    return json.loads(Path(path).read_text())


def _devices() -> list[_Device]:
    if not _state["init"]:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)
    return _state["devices"]


def nvmlInit():
    with _lock:
        if _state["devices"] is None:
            data = _readings()
            _state["driver"] = data["driver_version"]
            devices = data["devices"]
            visible = os.environ.get("NVIDIA_VISIBLE_DEVICES", "all")
            if visible not in ("all", ""):
                devices = [devices[int(i)] for i in visible.split(",") if i.strip().isdigit() and int(i) < len(devices)]
            _state["devices"] = [_Device(i, d) for i, d in enumerate(devices)]
        _state["init"] += 1


def nvmlShutdown():
    with _lock:
        if not _state["init"]:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        _state["init"] -= 1


def nvmlSystemGetDriverVersion() -> str:
    _devices()
    return _state["driver"]


def nvmlDeviceGetCount() -> int:
    return len(_devices())


def nvmlDeviceGetHandleByIndex(index: int) -> _Device:
    devices = _devices()
    if not 0 <= index < len(devices):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return devices[index]


def nvmlDeviceGetName(handle: _Device) -> str:
    return handle.spec["name"]


def nvmlDeviceGetMemoryInfo(handle: _Device, version=None) -> c_nvmlMemory_t:
    total = handle.spec["memory_total"]
    used = handle.sample("memory")["memory_used"]
    return c_nvmlMemory_t(total=total, free=total - used, used=used)


def nvmlDeviceGetUtilizationRates(handle: _Device) -> c_nvmlUtilization_t:
    s = handle.sample("utilization")
    return c_nvmlUtilization_t(gpu=s["gpu_util"], memory=s["memory_util"])


def nvmlDeviceGetPowerUsage(handle: _Device) -> int:
    return handle.sample("power")["power_mw"]


def nvmlDeviceGetEnforcedPowerLimit(handle: _Device) -> int:
    return handle.spec["power_limit_mw"]
