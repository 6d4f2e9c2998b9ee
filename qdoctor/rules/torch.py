"""PyTorch rules (QD3xx): is torch there, is it a CUDA build, does it carry code for every GPU."""

from __future__ import annotations

from qdoctor.arch import by_cc, split_arch_list
from qdoctor.findings import Finding
from qdoctor.rules import rule
from qdoctor.rules.common import (
    TORCH_INDEX,
    arch_runs,
    arch_span,
    cc_tuple,
    cited,
    cuda_str,
    driver_min,
    group_label,
    is_windows,
    pick_wheel,
    pip_torch,
    python_version,
    sm,
    torch_cuda,
    torch_version,
    visible_gpus,
    wheel_entry,
)

AREA = "torch"


def _t(facts):
    return facts.get("torch") or {}


def _installed(facts) -> bool | None:
    t = _t(facts)
    if t.get("installed") is not None:
        return bool(t["installed"])
    if t.get("version") or (facts.get("packages") or {}).get("torch"):
        return True
    return None


def _archs(facts, matrix):
    """(sass, ptx, origin): the build's own arch list when observed, else the matrix row of this wheel."""
    t = _t(facts)
    if t.get("arch_list"):
        sass, ptx = split_arch_list(t["arch_list"])
        return sass, by_cc([*(t.get("ptx") or []), *ptx]), "torch.arch_list"
    w = wheel_entry(matrix, torch_version(facts), torch_cuda(facts))
    if w:
        return w.get("sass"), w.get("ptx"), f"torch_wheels {w['variant']} row{cited(w)}"
    return None, None, None


def _wheel_fix(facts, matrix, ccs, tv, python):
    """A paste-able torch install for these GPUs on this driver; if the driver runs none, the wheel that
    has the code plus the driver it needs."""
    pick = pick_wheel(facts, matrix, ccs, tv, python)
    if pick:
        w, m, mode = pick
        note = f"  # CUDA {w['cuda']}" + (
            ", by minor-version compatibility" if mode == "minor-compat" else ""
        )
        return pip_torch(w, m, tv) + note, w
    nodrv = dict(
        facts,
        nvidia={k: v for k, v in (facts.get("nvidia") or {}).items() if k not in ("driver", "cuda_driver")},
    )
    pick = pick_wheel(nodrv, matrix, ccs, tv, python)
    if pick:
        w, m, _ = pick
        need = driver_min(matrix, w["cuda"], is_windows(facts))
        return (
            f"upgrade the NVIDIA driver to >= {need or 'one for CUDA ' + w['cuda']}, then "
            f"{pip_torch(w, m, tv)}"
        ), w
    return None, None


@rule("QD300", "torch-summary", AREA, summary=True)
def torch_summary(facts, matrix):
    """One line with the torch version, its CUDA and the GPU code it carries, shown when nothing is wrong."""
    t = _t(facts)
    tv = torch_version(facts)
    if not tv:
        return []
    sass, ptx, origin = _archs(facts, matrix)
    if t.get("cuda"):
        kind = f"CUDA {t['cuda']}" + (f"; {arch_span(sass, ptx)}" if sass is not None else "")
    elif t.get("hip"):
        kind = f"ROCm {t['hip']}"
    else:
        kind = "CPU-only build"
    ev = [f"torch.version = {tv}", f"torch.cuda = {t.get('cuda') or 'none (no CUDA in this build)'}"]
    if origin:
        ev.append(f"GPU code: {arch_span(sass, ptx)} (from {origin})")
    if t.get("cuda_available") is not None:
        ev.append(f"torch.cuda_available = {t['cuda_available']}, device_count = {t.get('device_count')}")
    return [Finding("QD300", "ok", f"torch {tv} ({kind})", ev, None, AREA)]


@rule("QD301", "torch-not-installed", AREA)
def torch_missing(facts, matrix):
    """torch is not installed: nothing can train. Error; the fix is the wheel for this driver and GPUs."""
    if _installed(facts) is not False:
        return []
    gpus = visible_gpus(facts)
    ccs = [g["compute_capability"] for g in gpus if cc_tuple(g.get("compute_capability"))]
    if gpus:
        fix, _ = _wheel_fix(facts, matrix, ccs, None, python_version(facts))
    else:
        fix = f"pip install torch --index-url {TORCH_INDEX.format(variant='cpu')}"
    return [
        Finding(
            "QD301",
            "error",
            "torch is not installed",
            ["torch.installed = false"]
            + ([f"torch.error = {_t(facts)['error']}"] if _t(facts).get("error") else []),
            fix or "pip install torch",
            AREA,
        )
    ]


@rule("QD302", "torch-without-cuda", AREA)
def torch_cpu_with_gpu(facts, matrix):
    """A CPU-only (or ROCm) torch on a machine with NVIDIA GPUs: training silently runs on the CPU and
    bitsandbytes loads its CPU library. Error; the fix is the CUDA wheel of the same torch version that
    this driver runs and that has code for every GPU (pinned with +cuXYZ so pip really replaces +cpu)."""
    t = _t(facts)
    gpus = visible_gpus(facts)
    if not gpus or _installed(facts) is not True or t.get("cuda") or "cuda" not in t:
        return []
    tv = torch_version(facts)
    ccs = [g["compute_capability"] for g in gpus if cc_tuple(g.get("compute_capability"))]
    fix, _ = _wheel_fix(facts, matrix, ccs, tv, python_version(facts))
    kind = f"a ROCm build (HIP {t['hip']})" if t.get("hip") else "a CPU-only build"
    return [
        Finding(
            "QD302",
            "error",
            f"torch {tv} is {kind} but this machine has NVIDIA GPUs: {group_label(gpus)}",
            [f"torch.version = {tv}", "torch.cuda = null (no CUDA in this build)"]
            + ([f"torch.hip = {t['hip']}"] if t.get("hip") else [])
            + [f"nvidia.driver = {(facts.get('nvidia') or {}).get('driver')}"],
            fix or "pip install torch --index-url https://download.pytorch.org/whl/cu126",
            AREA,
        )
    ]


@rule("QD303", "torch-arch-missing", AREA)
def torch_arch(facts, matrix):
    """A visible GPU has no code in the torch build: no cubin of its major with a minor <= its own and no
    PTX <= its capability. torch.cuda.is_available() still says True; the first kernel fails with "no
    kernel image is available for execution on the device". Fires for too-new GPUs (sm_120 on cu124) and
    too-old ones (sm_60 on cu128, sm_70 on cu130). Error, with a wheel that has the code."""
    t = _t(facts)
    if not t.get("cuda"):
        return []
    sass, ptx, origin = _archs(facts, matrix)
    if sass is None:
        return []
    gpus = visible_gpus(facts)
    bad = [g for g in gpus if arch_runs(g.get("compute_capability"), sass, ptx) is False]
    if not bad:
        return []
    tv = torch_version(facts)
    ccs = [g["compute_capability"] for g in gpus if cc_tuple(g.get("compute_capability"))]
    fix, w = _wheel_fix(facts, matrix, ccs, tv, python_version(facts))
    if fix is None and len(bad) < len(gpus):
        fix, w = _wheel_fix(facts, matrix, [g["compute_capability"] for g in bad], tv, python_version(facts))
    lows = [cc_tuple(a) for a in sass if cc_tuple(a)]
    ev = [f"torch {tv} (CUDA {t.get('cuda')}) has {arch_span(sass, ptx)} ({origin})"]
    for g in bad:
        c = cc_tuple(g["compute_capability"])
        why = "too new for this build" if lows and c > max(lows) else "too old for this build"
        ev.append(f"GPU {g.get('index')} {g.get('name')}: {sm(c)} ({why})")
    if w:
        ev.append(f"torch {w['variant']} wheels contain {arch_span(w.get('sass'), w.get('ptx'))}{cited(w)}")
    ev.append(
        "torch.cuda.is_available() still returns True; kernels fail with 'no kernel image is available'"
    )
    if fix is None:
        arches = ";".join(sorted({cuda_str(cc_tuple(g["compute_capability"])) for g in bad}))
        fix = f'no prebuilt torch wheel has it: build torch from source with TORCH_CUDA_ARCH_LIST="{arches}"'
    return [Finding("QD303", "error", f"torch {tv} has no kernels for {group_label(bad)}", ev, fix, AREA)]


@rule("QD304", "torch-import-failed", AREA)
def torch_import_failed(facts, matrix):
    """torch is installed but importing it failed in the runtime child (--deep): error with its message. A
    known cause in the message (a glibc/libstdc++ too old, a shadowed CUDA library) gives that fix; a CUDA
    initialisation error is not an import failure (QD306)."""
    from qdoctor.known_failures import match
    from qdoctor.rules.cuda_init import is_cuda_init_error

    t = _t(facts)
    err = t.get("error")
    if not err or _installed(facts) is False or err.startswith("torch.cuda."):
        return []
    if is_cuda_init_error(err, matrix):
        return []
    tv = torch_version(facts)
    ev = [f"torch.error = {err}"]
    kf = match(err, matrix)
    if kf is not None:
        ev.append(f"known failure {kf.code} ({kf.slug}): {kf.title}; source: {kf.source}")
        fix = kf.fix
    elif tv:
        fix = f"reinstall it in a clean environment: pip install --force-reinstall --no-deps 'torch=={tv}'"
    else:
        fix = "pip install --force-reinstall torch"
    return [
        Finding(
            "QD304",
            "error",
            f"torch {tv or ''} is installed but fails to import".replace("  ", " "),
            ev,
            fix,
            AREA,
        )
    ]


@rule("QD305", "torch-cuda-unavailable", AREA)
def torch_cuda_unavailable(facts, matrix):
    """At runtime (--deep) a CUDA build of torch reported torch.cuda.is_available() == False although the
    driver shows GPUs: training would silently use the CPU. Error. Its cause, when the facts show one (a
    CUDA initialisation error QD306, the fabric manager QD205, a driver/module mismatch QD206, a driver
    older than the wheel QD202), is shown instead of a fix of its own."""
    from qdoctor.rules.cuda_init import cuda_error_text

    t = _t(facts)
    gpus = visible_gpus(facts)
    if t.get("cuda_available") is not False or not t.get("cuda") or not gpus:
        return []
    text = cuda_error_text(facts)
    said = [ln.strip()[:300] for ln in text.splitlines() if "cuda" in ln.lower() and ln.strip()][:2]
    if said:
        fix = ("the CUDA error torch reported (above) is not a known one: paste the whole output of "
               "`python -c 'import torch; torch.cuda.init()'` into `qdoctor explain -`; "
               "check that `nvidia-smi` works")
    else:
        fix = ("torch recorded no CUDA error: run `python -c 'import torch; torch.cuda.init()' 2>&1 | "
               "qdoctor explain -` to name the cause; in a container, start it with --gpus all")
    return [
        Finding(
            "QD305",
            "error",
            f"torch {torch_version(facts)} cannot use the GPU (cuda.is_available() is False)",
            [
                f"torch.cuda = {t.get('cuda')}",
                "torch.cuda_available = false",
                f"nvidia.gpus = {group_label(gpus)}",
            ]
            + [f"torch reported: {x}" for x in said],
            fix,
            AREA,
        )
    ]
