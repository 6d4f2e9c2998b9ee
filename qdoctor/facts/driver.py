"""What CUDA needs from the kernel side before any CUDA call: device nodes, kernel modules, the loaded
driver's version against the user-space libraries, NVSwitches and their fabric manager, /dev/shm, Jetson.

These are the causes behind CUDA's initialisation errors (802, 803, 999, "no CUDA-capable device"), read
from /proc, /sys and /dev: a few stat calls and small reads, no subprocess, no CUDA.
"""

from __future__ import annotations

import os
import re

_NVRM = re.compile(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)")
_SO_VERSION = re.compile(r"\.so\.(\d+\.\d+(?:\.\d+)?)$")


def _read(path: str, limit: int = 4096) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read(limit)
    except OSError:
        return None


def kernel_module_version(text: str | None) -> str | None:
    """'NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.95.05  Thu ...' -> '580.95.05'."""
    m = _NVRM.search(text or "")
    return m.group(1) if m else None


def library_version(path: str | None) -> str | None:
    """libnvidia-ml.so.580.95.05 (the file libnvidia-ml.so.1 links to) -> '580.95.05'."""
    if not path:
        return None
    m = _SO_VERSION.search(os.path.basename(os.path.realpath(path)))
    return m.group(1) if m else None


def device_nodes(dev: str = "/dev") -> list[str]:
    try:
        return sorted(n for n in os.listdir(dev) if n.startswith("nvidia"))
    except OSError:
        return []


def nvswitches(proc: str = "/proc/driver/nvidia-nvswitch/devices") -> int | None:
    """NVSwitch devices the nvswitch kernel module knows (None: the module is not loaded)."""
    try:
        return len([n for n in os.listdir(proc) if not n.startswith(".")])
    except OSError:
        return None


def fabric_manager_running(proc: str = "/proc") -> bool | None:
    """Is an nv-fabricmanager process visible? None when /proc cannot be listed."""
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return None
    for p in pids:
        comm = _read(os.path.join(proc, p, "comm"), 64)
        if comm and comm.strip().startswith("nv-fabricmanage"):
            return True
    return False


def shm_mib(path: str = "/dev/shm") -> int | None:
    try:
        st = os.statvfs(path)
    except (OSError, AttributeError):
        return None
    return st.f_blocks * st.f_frsize // (1 << 20)


def jetson(release_file: str = "/etc/nv_tegra_release",
           model_file: str = "/proc/device-tree/model") -> dict | None:
    """L4T release and board model on an NVIDIA Jetson; None elsewhere."""
    rel = _read(release_file, 512)
    if rel is None:
        return None
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", rel)
    model = (_read(model_file, 256) or "").replace("\x00", "").strip() or None
    return {"l4t": f"{m.group(1)}.{m.group(2)}" if m else rel.strip().splitlines()[0][:80], "model": model}


def collect(ld_cache: dict | None = None, root: str = "") -> dict:
    """`root` prefixes every path (tests point it at a fake tree)."""
    nodes = device_nodes(root + "/dev")
    switches = nvswitches(root + "/proc/driver/nvidia-nvswitch/devices")
    out = {
        "kernel_module": kernel_module_version(_read(root + "/proc/driver/nvidia/version")),
        "uvm_module": os.path.isdir(root + "/sys/module/nvidia_uvm") if os.path.isdir(root + "/sys/module")
        else None,
        "device_nodes": nodes,
        "nvswitches": switches,
        "fabric_manager_running": fabric_manager_running(root + "/proc") if switches else None,
        "shm_mib": shm_mib(root + "/dev/shm"),
        "jetson": jetson(root + "/etc/nv_tegra_release", root + "/proc/device-tree/model"),
        "nvml_library": None,
    }
    cache = ld_cache or {}
    paths = [p for p in cache.get("libnvidia-ml.so.1", []) if os.path.exists(p)]
    if paths:
        out["nvml_library"] = library_version(paths[0])
    return out
