"""The operating system, Python and machine: cheap reads only (no subprocesses, no psutil on Linux)."""

from __future__ import annotations

import os
import platform
import sys


def libc() -> str | None:
    """'glibc 2.39' via confstr (instant); platform.libc_ver (scans the interpreter binary) as a fallback."""
    try:
        val = os.confstr("CS_GNU_LIBC_VERSION")
        if val:
            return val
    except (AttributeError, ValueError, OSError):
        pass
    if not sys.platform.startswith("linux"):
        return None
    name, ver = platform.libc_ver()
    return f"{name} {ver}" if name else None


def _read(path: str, limit: int = 65536) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read(limit)
    except OSError:
        return ""


def wsl(environ) -> bool:
    if environ.get("WSL_DISTRO_NAME") or environ.get("WSL_INTEROP"):
        return True
    return "microsoft" in _read("/proc/version").lower()


def container(environ, exists=os.path.exists, read=_read) -> str | None:
    if environ.get("KUBERNETES_SERVICE_HOST"):
        return "kubernetes"
    if exists("/run/.containerenv"):
        return "podman"
    if exists("/.dockerenv"):
        return "docker"
    if environ.get("container"):  # systemd's convention: lxc, podman, docker, systemd-nspawn, ...
        return environ["container"]
    cg = read("/proc/1/cgroup")
    for marker, name in (("kubepods", "kubernetes"), ("docker", "docker"), ("libpod", "podman"),
                         ("lxc", "lxc"), ("containerd", "containerd")):
        if marker in cg:
            return name
    return None


def memory_total_mib() -> int | None:
    text = _read("/proc/meminfo", 4096)
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            try:
                return int(line.split()[1]) // 1024
            except (IndexError, ValueError):
                break
    try:
        import psutil

        return int(psutil.virtual_memory().total) // (1 << 20)
    except Exception:
        return None


def c_compiler(environ) -> str | None:
    """The C compiler Triton would use (its rule: $CC, else cc, gcc, clang on PATH), as a name; None if
    none. Triton builds a small launcher with it the first time a kernel runs (torch.compile on a GPU)."""
    import shutil

    path = environ.get("PATH")
    for cand in ([environ["CC"]] if environ.get("CC") else []) + ["cc", "gcc", "clang"]:
        if shutil.which(cand, path=path):
            return os.path.basename(cand)
    return None


def collect(environ=None) -> dict:
    env = os.environ if environ is None else environ
    uname = platform.uname()
    return {
        "system": uname.system or None,
        "release": uname.release or None,
        "machine": uname.machine or None,
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "python_executable": sys.executable or None,
        "libc": libc() if uname.system == "Linux" else None,
        "wsl": wsl(env) if uname.system == "Linux" else False,
        "container": container(env) if uname.system == "Linux" else None,
        "cpu_count": os.cpu_count(),
        "memory_total_mib": memory_total_mib(),
        "c_compiler": c_compiler(env),
    }
