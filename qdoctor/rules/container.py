"""Build tools and containers (QD611, QD612): what Triton needs to compile its launcher, and the shared
memory a container gives DataLoader workers and NCCL."""

from __future__ import annotations

from qdoctor.findings import Finding
from qdoctor.rules import rule
from qdoctor.rules.common import python_version, torch_cuda

SHM_MIN_MIB = 1024  # docker's default is 64 MB; DataLoader workers and NCCL need far more


def _pk(facts) -> dict:
    return facts.get("packages") or {}


@rule("QD611", "triton-cannot-compile", "environment")
def triton_cannot_compile(facts, matrix):
    """Triton (used by torch.compile, bitsandbytes' and unsloth's Triton kernels) builds a small C launcher
    at run time: without a C compiler it fails with "Failed to find C compiler. Please specify via CC
    environment variable.", without the Python headers with "Python.h: No such file or directory". Warning
    when triton is installed with a CUDA torch and either is missing (an error when unsloth, which always
    compiles Triton kernels, is installed)."""
    pk = _pk(facts)
    nat = facts.get("native") or {}
    plat = facts.get("platform") or {}
    if not any(n in pk for n in ("triton", "pytorch-triton")) or not torch_cuda(facts):
        return []
    no_cc = "c_compiler" in plat and plat["c_compiler"] is None
    missing = []
    if no_cc:
        missing.append("a C compiler (gcc or clang, or $CC)")
    if nat.get("python_headers") is False:
        missing.append(f"the Python {python_version(facts) or ''} headers (Python.h)".replace("  ", " "))
    if not missing:
        return []
    py = python_version(facts) or ""
    dev = f"python{'.'.join(py.split('.')[:2])}-dev" if py else "python3-dev"
    pkgs = (["build-essential"] if no_cc else []) + (
        [dev] if nat.get("python_headers") is False else [])
    sev = "error" if "unsloth" in pk else "warning"
    return [Finding("QD611", sev, f"Triton cannot build its kernels here: no {' and no '.join(missing)}",
                    [f"triton {pk.get('triton') or pk.get('pytorch-triton')} installed",
                     f"platform.c_compiler = {plat.get('c_compiler')}",
                     f"native.python_headers = {nat.get('python_headers')}",
                     "error users see: Failed to find C compiler. Please specify via CC environment "
                     "variable."],
                    f"sudo apt-get install -y {' '.join(pkgs)}  # or export CC=/path/to/gcc", "environment")]


@rule("QD612", "container-shm-too-small", "environment")
def shm_too_small(facts, matrix):
    """A container with a small /dev/shm (docker's default is 64 MB): DataLoader workers die with "bus error
    ... insufficient shared memory (shm)" and NCCL fails with "unhandled system error". Warning."""
    p = facts.get("platform") or {}
    shm = (facts.get("driver") or {}).get("shm_mib")
    if not p.get("container") or not isinstance(shm, (int, float)) or shm >= SHM_MIN_MIB:
        return []
    return [Finding("QD612", "warning", f"/dev/shm is only {shm} MiB in this {p['container']} container",
                    [f"driver.shm_mib = {shm}", f"platform.container = {p['container']}",
                     "error users see: This might be caused by insufficient shared memory (shm)."],
                    "docker run --ipc=host ... (or --shm-size=16g); Kubernetes: mount an emptyDir with "
                    "medium: Memory at /dev/shm; or DataLoader(num_workers=0)", "environment")]
