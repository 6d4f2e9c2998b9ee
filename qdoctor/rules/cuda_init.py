"""Why CUDA does not initialise (QD205, QD206, QD306, QD610): the causes behind torch seeing no GPU.

torch.cuda.is_available() only says False; the CUDA error code behind it (802, 803, 804, 999, 100) names the
cause, and /proc, /sys and /dev often show it before any CUDA call (facts.driver). The known error texts and
their fixes are rows of matrix/failures.toml whose check_codes name QD306.
"""

from __future__ import annotations

from qdoctor.findings import Finding
from qdoctor.known_failures import match
from qdoctor.rules import rule
from qdoctor.rules.common import (
    all_gpus,
    cuda_str,
    driver_min,
    int_tuple,
    is_windows,
    pick_wheel,
    pip_torch,
    python_version,
    torch_cuda,
    torch_version,
    visible_gpus,
)

FM_GUIDE = "https://docs.nvidia.com/datacenter/tesla/fabric-manager-user-guide/index.html"


def cuda_error_text(facts: dict) -> str:
    """Everything --deep recorded that can carry CUDA's own error: torch's error, the warnings and log of the
    import (torch warns "CUDA initialization: ... Error 802: ..." and returns False), the child's stderr."""
    t = facts.get("torch") or {}
    rt = facts.get("runtime") or {}
    parts = [t.get("error"), t.get("cuda_error")]
    parts += [w for w in (rt.get("warnings") or []) if isinstance(w, str)]
    parts += [rt.get("log"), rt.get("stderr_tail"), rt.get("error")]
    parts += [d.get("error") for d in (t.get("devices") or []) if isinstance(d, dict)]
    return "\n".join(p for p in parts if isinstance(p, str) and p)


def is_cuda_init_error(text: str | None, matrix: dict) -> bool:
    return bool(text) and match(text, matrix, only=lambda kf: "QD306" in kf.check_codes) is not None


def _line(text: str, needle_kf, matrix) -> str:
    import re

    for ln in text.splitlines():
        if re.search(_pattern(matrix, needle_kf.code), ln, re.I):
            return ln.strip()[:300]
    return text.strip().splitlines()[0][:300]


def _pattern(matrix: dict, code: str) -> str:
    for f in (matrix.get("failures") or {}).get("failure", []):
        if f.get("code") == code:
            return f["pattern"]
    return "$^"


def _driver_major(facts) -> str | None:
    d = int_tuple((facts.get("nvidia") or {}).get("driver"))
    return str(d[0]) if d else None


def _fm_fix(facts) -> str:
    major = _driver_major(facts)
    drv = (facts.get("nvidia") or {}).get("driver")
    if major:
        return (f"sudo apt-get install -y nvidia-fabricmanager-{major} && sudo systemctl enable --now "
                f"nvidia-fabricmanager  # its version must equal the driver's ({drv}); RHEL: "
                f"sudo dnf install nvidia-fabric-manager")
    return ("install nvidia-fabricmanager of the driver's exact version, then: "
            "sudo systemctl enable --now nvidia-fabricmanager")


@rule("QD306", "cuda-init-error", "torch")
def cuda_init_error(facts, matrix):
    """--deep: torch reported a known CUDA initialisation error. 802 "system not yet initialized": the
    NVSwitch fabric manager is not running; 804 "forward compatibility was attempted on non supported HW":
    the container's CUDA needs a newer host driver; 803 / "Driver/library version mismatch": the kernel
    module and the user-space driver differ; 999 "unknown error": nvidia_uvm or /dev/nvidia-uvm missing;
    "Found no NVIDIA driver" / "no CUDA-capable device": no GPU reaches the process. Error, with that cause's
    fix (reinstalling torch or bitsandbytes changes none of them)."""
    text = cuda_error_text(facts)
    kf = match(text, matrix, only=lambda kf: "QD306" in kf.check_codes) if text else None
    if kf is None:
        return []
    line = _line(text, kf, matrix)
    ev = [f"torch reported: {line}", f"known failure {kf.code} ({kf.slug}); source: {kf.source}"]
    fix = kf.fix
    if kf.code == "KF43":
        fix = _fm_fix(facts)
    elif kf.code == "KF44":
        tc = torch_cuda(facts)
        need = driver_min(matrix, tc, is_windows(facts)) if tc else None
        if need:
            fix = f"upgrade the host's NVIDIA driver to >= {need} (CUDA {cuda_str(tc)})"
            ccs = [g["compute_capability"] for g in visible_gpus(facts) if g.get("compute_capability")]
            pick = pick_wheel(facts, matrix, ccs, torch_version(facts), python_version(facts))
            if pick:
                w, m, _ = pick
                fix += f"\nor use a torch wheel the driver supports: {pip_torch(w, m, torch_version(facts))}"
    elif kf.code == "KF47" and (facts.get("platform") or {}).get("container"):
        fix = ("start the container with GPU access: docker run --gpus all ... (Kubernetes: resources.limits "
               "nvidia.com/gpu: 1)")
    return [Finding("QD306", "error", f"CUDA cannot initialise: {kf.title}", ev, fix, "torch")]


@rule("QD205", "fabric-manager-not-running", "nvidia")
def fabric_manager(facts, matrix):
    """GPUs on NVSwitches need the fabric manager service (of the driver's exact version) before CUDA can
    start: until then every CUDA call fails with error 802 "system not yet initialized". Seen in NVML's
    fabric state (Hopper and newer: "not-started"), or as NVSwitch devices with no nv-fabricmanager process
    (on a host, where its processes are visible). Error."""
    gpus = [g for g in all_gpus(facts) if g.get("fabric_state") in ("not-started", "in-progress")]
    drv = facts.get("driver") or {}
    ev = []
    if gpus:
        ev = [f"GPU {g.get('index')} {g.get('name')}: NVML fabric state = {g['fabric_state']}" for g in gpus]
    elif (drv.get("nvswitches") or 0) > 0 and drv.get("fabric_manager_running") is False \
            and not (facts.get("platform") or {}).get("container"):
        ev = [f"driver.nvswitches = {drv['nvswitches']}", "no nv-fabricmanager process is running"]
    if not ev:
        return []
    ev.append(f"without it CUDA fails with: Error 802: system not yet initialized ({FM_GUIDE})")
    only_progress = gpus and all(g["fabric_state"] == "in-progress" for g in gpus)
    return [Finding("QD205", "warning" if only_progress else "error",
                    "the NVSwitch fabric manager is not running: CUDA cannot start on these GPUs"
                    if not only_progress else "the NVSwitch fabric is still being set up: CUDA waits for it",
                    ev, _fm_fix(facts) if not only_progress else
                    "wait for `nvidia-smi -q | grep -A2 Fabric` to say Completed; if it stays, restart "
                    "nvidia-fabricmanager", "nvidia")]


def _version_of(nv_error: str | None) -> bool:
    return bool(nv_error) and "version mismatch" in nv_error.lower()


@rule("QD206", "driver-module-mismatch", "nvidia")
def driver_mismatch(facts, matrix):
    """The NVIDIA kernel module that is loaded is not the version of the user-space driver libraries (a
    driver upgrade without a reboot): NVML says "Driver/library version mismatch" and CUDA fails (803 or
    999). In a container, /dev/nvidia-uvm missing makes every CUDA call fail with error 999 "unknown
    error". Error; the fix is a reboot (or reloading the modules), or passing the devices."""
    drv = facts.get("driver") or {}
    nv = facts.get("nvidia") or {}
    km, lib = drv.get("kernel_module"), drv.get("nvml_library")
    if (km and lib and km != lib) or _version_of(nv.get("error")):
        ev = [f"kernel module (/proc/driver/nvidia/version) = {km or 'unknown'}",
              f"user-space driver (libnvidia-ml.so) = {lib or 'unknown'}"]
        if nv.get("error"):
            ev.append(f"nvidia.error = {nv['error']}")
        return [Finding("QD206", "error", f"the loaded NVIDIA kernel module ({km or '?'}) differs from the "
                        f"installed driver ({lib or '?'}): CUDA cannot start", ev,
                        "reboot; or, with no GPU process running: "
                        "sudo rmmod nvidia_uvm nvidia_drm nvidia_modeset nvidia && sudo nvidia-smi",
                        "nvidia")]
    nodes = drv.get("device_nodes")
    container = (facts.get("platform") or {}).get("container")
    if container and nodes and "nvidiactl" in nodes and "nvidia-uvm" not in nodes and all_gpus(facts):
        return [Finding("QD206", "error", "/dev/nvidia-uvm is missing in this container: CUDA fails with "
                        "error 999 (unknown error)",
                        [f"driver.device_nodes = {', '.join(nodes)}", f"platform.container = {container}"],
                        "start the container with the NVIDIA runtime (docker run --gpus all ..., which "
                        "passes /dev/nvidia-uvm); on the host: sudo nvidia-modprobe -c 0 -u", "nvidia")]
    return []


@rule("QD610", "container-without-gpu", "environment")
def container_without_gpu(facts, matrix):
    """A container with a CUDA build of torch but no NVIDIA device nodes and no driver: it was started
    without GPU access (docker run without --gpus), so torch says "Found no NVIDIA driver on your system"
    and training runs on the CPU. Warning."""
    p = facts.get("platform") or {}
    drv = facts.get("driver") or {}
    nv = facts.get("nvidia") or {}
    if not p.get("container") or not torch_cuda(facts) or drv.get("device_nodes") != []:
        return []
    if nv.get("status") not in ("no-nvml", "no-driver", "no-gpu") or (drv.get("jetson")):
        return []
    return [Finding("QD610", "warning",
                    f"this {p['container']} container has no GPU passed through, but torch is a CUDA build "
                    f"(CUDA {cuda_str(torch_cuda(facts))})",
                    [f"platform.container = {p['container']}", "no /dev/nvidia* device nodes",
                     f"nvidia.status = {nv.get('status')}", f"torch.cuda = {cuda_str(torch_cuda(facts))}"],
                    "docker run --gpus all ... (Podman: --device nvidia.com/gpu=all; Kubernetes: "
                    "resources.limits nvidia.com/gpu: 1); on a CPU-only machine this warning can be ignored",
                    "environment")]
