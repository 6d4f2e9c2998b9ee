"""NVIDIA rules (QD2xx): driver, GPUs, and the driver against the torch wheel's CUDA."""

from __future__ import annotations

from qdoctor.findings import Finding
from qdoctor.rules import rule
from qdoctor.rules.common import (
    cap,
    cc_tuple,
    compat_floor,
    cuda_str,
    driver_cuda,
    driver_min,
    driver_runs,
    family,
    gib,
    group_label,
    is_windows,
    pick_wheel,
    pip_torch,
    python_version,
    sm,
    torch_cuda,
    torch_version,
    visible_gpus,
)

AREA = "nvidia"


def _nv(facts):
    return facts.get("nvidia") or {}


@rule("QD200", "nvidia-summary", AREA, summary=True)
def nvidia_summary(facts, matrix):
    """One line with the driver, the CUDA version it supports and every GPU (name, arch, memory), shown
    when nothing is wrong in this area."""
    nv = _nv(facts)
    gpus = [g for g in (nv.get("gpus") or []) if isinstance(g, dict)]
    if not gpus:
        return []
    dc = driver_cuda(facts, matrix)
    head = f"driver {nv.get('driver') or '?'}" + (f" (CUDA {cuda_str(dc)})" if dc else "")
    names = "; ".join(
        f"{g.get('name') or '?'} ({sm(g.get('compute_capability'))}, {gib(g.get('memory_total_mib'))})"
        + ("" if g.get("visible", True) is not False else " hidden")
        for g in gpus
    )
    title = f"{head}, {len(gpus)} GPU{'s' * (len(gpus) != 1)}: {names}"
    ev = [f"nvidia.driver = {nv.get('driver')}", f"nvidia.cuda_driver = {nv.get('cuda_driver')}"]
    for g in gpus:
        fam = family(matrix, g.get("compute_capability"))
        ev.append(
            f"GPU {g.get('index')}: {g.get('name')}, CC {g.get('compute_capability')}"
            + (f" ({fam['name']})" if fam else "")
            + f", {g.get('memory_total_mib')} MiB"
        )
    return [Finding("QD200", "ok", title, ev, None, AREA)]


@rule("QD201", "no-nvidia-gpu", AREA)
def no_gpu(facts, matrix):
    """No NVIDIA GPU, driver or NVML. Not an error by itself: 4-bit QLoRA runs on the CPU with
    bitsandbytes >= 0.46, only slowly (info). An NVML error while a driver is present is a warning."""
    nv = _nv(facts)
    status = nv.get("status")
    if (facts.get("driver") or {}).get("jetson"):
        return []  # a Jetson has no NVML but a GPU (QD207)
    if status in ("no-nvml", "no-driver", "no-gpu"):
        what = {
            "no-nvml": "no NVML library (no NVIDIA driver installed)",
            "no-driver": "no NVIDIA driver loaded",
            "no-gpu": "the NVIDIA driver sees no GPU",
        }[status]
        return [
            Finding(
                "QD201",
                "info",
                f"no NVIDIA GPU: {what}; QLoRA runs on the CPU, slowly",
                [f"nvidia.status = {status}"]
                + ([f"nvidia.error = {nv['error']}"] if nv.get("error") else []),
                "fine for a smoke test (`qdoctor train` on CPU); for real models use a machine with an "
                "NVIDIA GPU and driver",
                AREA,
            )
        ]
    if status == "error":
        return [
            Finding(
                "QD201",
                "warning",
                "NVML failed: GPUs and driver are unknown",
                [f"nvidia.error = {nv.get('error')}"],
                "run `nvidia-smi`; if it fails too, reinstall or reload the NVIDIA driver "
                "(a reboot after a driver upgrade fixes 'Driver/library version mismatch')",
                AREA,
            )
        ]
    return []


@rule("QD202", "driver-too-old-for-torch", AREA)
def driver_vs_torch(facts, matrix):
    """The driver is older than the CUDA runtime of the torch wheel. Another major (driver CUDA 12.x,
    torch cu130), or below the major's minor-version-compatibility floor: torch sees no GPU (error).
    Same major, older minor: runs with a limited feature set, no JIT of newer PTX (warning). The fix
    names the driver minimum for that CUDA and a torch wheel this driver runs that has the GPUs' code."""
    nv = _nv(facts)
    tc = torch_cuda(facts)
    if tc is None or not nv.get("gpus"):
        return []
    runs = driver_runs(facts, matrix, tc)
    if runs in (None, "full"):
        return []
    dc = driver_cuda(facts, matrix)
    win = is_windows(facts)
    tv = torch_version(facts)
    need = driver_min(matrix, tc, win)
    floor = compat_floor(matrix, tc[0], win)
    ev = [
        f"nvidia.driver = {nv.get('driver')} (supports up to CUDA {cuda_str(dc)})",
        f"torch.version = {tv}, torch.cuda = {cuda_str(tc)}",
        f"minimum {'Windows' if win else 'Linux'} driver for CUDA {cuda_str(tc)}: "
        + (need or "not in the table"),
        f"minor-version compatibility for CUDA {tc[0]}.x: driver >= {floor or 'unknown'}",
    ]
    drv = (
        f"upgrade the NVIDIA driver to >= {need}"
        if need
        else f"upgrade the NVIDIA driver to one that supports CUDA {cuda_str(tc)}"
    )
    if runs == "minor-compat":
        return [
            Finding(
                "QD202",
                "warning",
                f"driver {nv.get('driver')} (CUDA {cuda_str(dc)}) is older than torch's CUDA {cuda_str(tc)}: "
                "runs only through minor-version compatibility",
                ev + ["limited feature set: PTX newer than the driver cannot be JIT-compiled"],
                drv,
                AREA,
            )
        ]
    ccs = [g.get("compute_capability") for g in visible_gpus(facts) if cc_tuple(g.get("compute_capability"))]
    pick = pick_wheel(facts, matrix, ccs, tv, python_version(facts))
    fix = drv
    if pick:
        w, m, mode = pick
        fix += f"\nor install a torch wheel this driver runs: {pip_torch(w, m, tv)}"
        if mode == "minor-compat":
            fix += f"  (CUDA {w['cuda']}, by minor-version compatibility)"
    return [
        Finding(
            "QD202",
            "error",
            f"NVIDIA driver {nv.get('driver')} (CUDA {cuda_str(dc)}) is too old for torch {tv} "
            f"(CUDA {cuda_str(tc)}): torch will not see the GPU",
            ev,
            fix,
            AREA,
        )
    ]


@rule("QD203", "no-native-bf16", AREA)
def no_bf16(facts, matrix):
    """GPUs below compute capability 8.0 have no bf16 tensor cores. torch.cuda.is_bf16_supported() still
    says True there (emulation, torch >= 2.4), and bf16 training is slow or fails ("Your setup doesn't
    support bf16/gpu"). Warning per GPU: compute in fp16."""
    lim = cap(matrix, "bf16_native_min_cc", "8.0")
    bad = []
    for g in visible_gpus(facts):
        c = cc_tuple(g.get("compute_capability"))
        if c is None:
            continue
        fam = family(matrix, c)
        native = fam.get("bf16_native") if fam else None
        if native is False or (native is None and c < lim):
            bad.append(g)
    if not bad:
        return []
    ev = [
        f"GPU {g.get('index')}: {g.get('name')}, CC {g.get('compute_capability')} < {cuda_str(lim)}"
        for g in bad
    ]
    bf = (facts.get("torch") or {}).get("bf16_supported")
    if bf:
        ev.append("torch.bf16_supported = true is emulation here, not bf16 tensor cores")
    return [
        Finding(
            "QD203",
            "warning",
            f"{group_label(bad)}: no native bf16, train in fp16",
            ev,
            "BitsAndBytesConfig(bnb_4bit_compute_dtype=torch.float16) and TrainingArguments(fp16=True, "
            "bf16=False)",
            AREA,
        )
    ]


@rule("QD208", "gpu-architecture-unknown", AREA)
def cc_unknown(facts, matrix):
    """A visible GPU's compute capability is missing or unreadable (NVML did not answer, or a snapshot
    holds something that is not 'major.minor'): whether torch and bitsandbytes carry code for it cannot
    be checked, so the arch rules (QD303, QD404, QD409) stay silent about it. Warning, not error: the
    GPU may well work, but READY would claim what was not verified (and `--strict` gates on it)."""
    bad = [g for g in visible_gpus(facts) if cc_tuple(g.get("compute_capability")) is None]
    if not bad:
        return []
    ev = [f"GPU {g.get('index', '?')} {g.get('name') or 'unknown GPU'}: compute_capability = "
          f"{g.get('compute_capability')!r}" for g in bad]
    ev.append("kernel coverage of torch and bitsandbytes not verified for "
              + ", ".join(f"GPU {g.get('index', '?')}" for g in bad))
    return [
        Finding(
            "QD208",
            "warning",
            f"{', '.join(gpu_name(g) for g in bad)}: architecture unknown, so kernel coverage cannot be "
            "verified",
            ev,
            "nvidia-smi --query-gpu=index,name,compute_cap --format=csv  # then run `qdoctor smoke`, whose "
            "probes run the kernels on this GPU",
            AREA,
        )
    ]


def gpu_name(g: dict) -> str:
    return f"GPU {g.get('index', '?')} ({g.get('name') or 'unknown GPU'})"


@rule("QD204", "mixed-gpus", AREA)
def mixed_gpus(facts, matrix):
    """The visible GPUs differ in compute capability: settings (dtype, kernels) must suit the weakest, and
    data-parallel training runs at the pace of the slowest. Info; pin one kind with CUDA_VISIBLE_DEVICES."""
    gpus = [g for g in visible_gpus(facts) if cc_tuple(g.get("compute_capability"))]
    kinds = {cc_tuple(g["compute_capability"]) for g in gpus}
    if len(kinds) < 2:
        return []
    best = max(kinds)
    keep = ",".join(str(g.get("index")) for g in gpus if cc_tuple(g["compute_capability"]) == best)
    return [
        Finding(
            "QD204",
            "info",
            f"mixed GPUs: {group_label(gpus)}",
            [f"GPU {g.get('index')}: {g.get('name')}, CC {g.get('compute_capability')}" for g in gpus],
            f"export CUDA_VISIBLE_DEVICES={keep}  # only the {sm(best)} GPUs",
            AREA,
        )
    ]
