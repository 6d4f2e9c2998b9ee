"""The NVIDIA driver and GPUs, through NVML (nvidia-ml-py): no CUDA context, no torch.

NVML sees every GPU regardless of CUDA_VISIBLE_DEVICES, so each GPU also gets `visible`, computed
from that variable the way the CUDA runtime reads it (qdoctor.devices, which also maps CUDA
ordinals to NVML GPUs). `nvml` is injectable: tests pass a fake module to exercise every fallback
on a machine without a GPU.
"""

from __future__ import annotations

import os
import sys

from qdoctor.arch import cc_str
from qdoctor.devices import Unmappable, parse_visible

VIRT_MODES = {0: "none", 1: "passthrough", 2: "vgpu", 3: "host-vgpu", 4: "host-vsga"}
# nvmlGpuFabricState_t: on NVSwitch systems (Hopper+) CUDA waits for "completed" (error 802 until then)
FABRIC_STATES = {0: "not-supported", 1: "not-started", 2: "in-progress", 3: "completed"}


def _text(v):
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else v


def _try(fn):
    """One NVML query; a GPU or driver that does not support it leaves the value null."""
    try:
        return fn()
    except Exception:
        return None


def cuda_driver_version(n) -> str | None:
    """nvmlSystemGetCudaDriverVersion's integer (13000) as '13.0'."""
    try:
        n = int(n)
    except (TypeError, ValueError):
        return None
    return f"{n // 1000}.{(n % 1000) // 10}" if n > 0 else None


def _load_nvml():
    """The pynvml module, or None. On Linux a missing libnvidia-ml.so.1 is detected with one dlopen,
    so a machine without a driver does not pay for importing pynvml (~50 ms)."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libnvidia-ml.so.1")
        except OSError:
            return "no-lib"
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def collect(nvml=None, environ=None) -> dict:
    env = os.environ if environ is None else environ
    out = {"status": None, "error": None, "driver": None, "cuda_driver": None, "gpus": [],
           "cuda_visible_devices": env.get("CUDA_VISIBLE_DEVICES")}
    if nvml is None:
        nvml = _load_nvml()
        if nvml == "no-lib":
            return {**out, "status": "no-nvml", "driver_installed": False,
                    "error": "libnvidia-ml.so.1 not found: no NVIDIA driver is installed "
                             "(or it is not on the loader path)"}
        if nvml is None:
            return {**out, "status": "no-nvml", "error": "nvidia-ml-py (pynvml) is not installed"}
    err = getattr(nvml, "NVMLError", Exception)
    try:
        nvml.nvmlInit()
    except err as e:
        name = type(e).__name__
        if name == "NVMLError_DriverNotLoaded":
            return {**out, "status": "no-driver", "error": f"NVIDIA driver not loaded: {e}"}
        if name in ("NVMLError_LibraryNotFound", "NVMLError_FunctionNotFound"):
            return {**out, "status": "no-nvml", "error": f"NVML library not usable: {e}"}
        return {**out, "status": "error", "error": f"nvmlInit failed: {name}: {e}"}
    except Exception as e:  # a broken binding must not break check
        return {**out, "status": "error", "error": f"nvmlInit failed: {type(e).__name__}: {e}"}
    try:
        out["driver"] = _try(lambda: _text(nvml.nvmlSystemGetDriverVersion()))
        out["cuda_driver"] = _try(lambda: cuda_driver_version(nvml.nvmlSystemGetCudaDriverVersion()))
        try:
            count = nvml.nvmlDeviceGetCount()
        except Exception as e:
            return {**out, "status": "error", "error": f"nvmlDeviceGetCount failed: {type(e).__name__}: {e}"}
        for i in range(count):
            out["gpus"].append(_gpu(nvml, i))
    finally:
        _try(nvml.nvmlShutdown)
    if not out["gpus"]:
        return {**out, "status": "no-gpu", "error": "the NVIDIA driver reports no GPU"}
    try:
        visible = parse_visible(out["cuda_visible_devices"], out["gpus"])
    except Unmappable:  # a MIG instance: not modelled, every GPU counts as visible (qdoctor.devices)
        visible = None
    for g in out["gpus"]:
        g["visible"] = True if visible is None else g["index"] in visible
    out["status"] = "ok"
    return out


def fabric_state(nvml, handle) -> str | None:
    """The GPU's NVLink fabric registration (nvmlDeviceGetGpuFabricInfo), as a FABRIC_STATES word."""
    import ctypes

    info = nvml.c_nvmlGpuFabricInfo_t()
    nvml.nvmlDeviceGetGpuFabricInfo(handle, ctypes.byref(info))
    return FABRIC_STATES.get(int(info.state))


def _gpu(nvml, i: int) -> dict:
    g = {"index": i, "name": None, "uuid": None, "compute_capability": None, "memory_total_mib": None,
         "memory_free_mib": None, "virtualization": None}
    try:
        h = nvml.nvmlDeviceGetHandleByIndex(i)
    except Exception as e:
        g["error"] = f"{type(e).__name__}: {e}"
        return g
    g["name"] = _try(lambda: _text(nvml.nvmlDeviceGetName(h)))
    g["uuid"] = _try(lambda: _text(nvml.nvmlDeviceGetUUID(h)))
    g["compute_capability"] = _try(lambda: cc_str(tuple(nvml.nvmlDeviceGetCudaComputeCapability(h))))
    g["virtualization"] = _try(lambda: VIRT_MODES.get(nvml.nvmlDeviceGetVirtualizationMode(h)))
    g["fabric_state"] = _try(lambda: fabric_state(nvml, h))
    mem = _try(lambda: nvml.nvmlDeviceGetMemoryInfo(h))
    g["memory_total_mib"] = _try(lambda: int(mem.total) // (1 << 20))
    g["memory_free_mib"] = _try(lambda: int(mem.free) // (1 << 20))
    return g
