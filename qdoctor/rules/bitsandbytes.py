"""bitsandbytes rules (QD4xx): installed, which native library it picks, does it exist, load, and carry
code for every GPU. Facts (the library's own fatbinary) win over the matrix; the matrix fills gaps."""

from __future__ import annotations

import re

from qdoctor import bnb_loader
from qdoctor.findings import Finding
from qdoctor.rules import rule
from qdoctor.rules.common import (
    arch_runs,
    arch_span,
    bnb,
    bnb_feature,
    bnb_lib_archs,
    bnb_libs,
    bnb_pick,
    bnb_release,
    bnb_version,
    cap,
    cc_tuple,
    cuda_str,
    cuda_tuple,
    first_bnb_with_lib,
    group_label,
    matches,
    pick_wheel,
    pip_torch,
    python_version,
    sm,
    torch_cuda,
    torch_version,
    visible_gpus,
)

AREA = "bitsandbytes"


def _override(facts):
    b = bnb(facts)
    ov = b.get("override")
    if ov is None:
        ov = (facts.get("env") or {}).get("BNB_CUDA_VERSION")
    return str(ov).strip() if ov not in (None, "") else None


def _state(facts, matrix) -> dict:
    """What bitsandbytes will load here: facts first, the matrix's loader rule when facts are silent."""
    b = bnb(facts)
    ver = bnb_version(facts)
    rel = bnb_release(matrix, ver) if ver else None
    libs = bnb_libs(facts, matrix, ver)
    tc = torch_cuda(facts)
    ov = _override(facts)
    rule = bnb_loader.rule_for(ver, bnb_loader.rules(matrix)) or {}
    loader = rule.get("strategy", "exact")
    installed = b.get("installed")
    if installed is None and ver:
        installed = True
    sel, exists, origin = b.get("selected"), b.get("selected_exists"), "facts"
    if sel is None and installed and tc and libs is not None:
        origin = "matrix"
        if ov:
            sel = f"cuda{ov}"
            exists = sel in libs
        else:
            sel = bnb_pick(matrix, ver, libs, tc)
            exists = sel is not None
            sel = sel or f"cuda{tc[0]}{tc[1]}"
    return {
        "ver": ver,
        "rel": rel,
        "libs": libs,
        "tc": tc,
        "ov": ov,
        "loader": loader,
        "installed": installed,
        "selected": sel,
        "exists": exists,
        "origin": origin,
    }


def _is_cuda_lib(name) -> bool:
    return isinstance(name, str) and name.startswith("cuda") and cuda_tuple(name) is not None


def _libs_text(libs) -> str:
    return ", ".join(libs) if libs else "none"


@rule("QD400", "bitsandbytes-summary", AREA, summary=True)
def bnb_summary(facts, matrix):
    """One line with the bitsandbytes version, the library it loads and the GPU code in it, shown when
    nothing is wrong in this area."""
    s = _state(facts, matrix)
    if not s["installed"]:
        return []
    sel = s["selected"]
    title = f"bitsandbytes {s['ver']}"
    ev = [f"bitsandbytes.version = {s['ver']}", f"bitsandbytes.selected = {sel} ({s['origin']})"]
    if _is_cuda_lib(sel):
        sass, ptx, origin = bnb_lib_archs(facts, matrix, sel)
        title += f", libbitsandbytes_{sel}" + (f" ({arch_span(sass, ptx)})" if sass is not None else "")
        gpus = visible_gpus(facts)
        if gpus:
            title += " covers " + ", ".join(
                f"GPU {g.get('index')} ({sm(g.get('compute_capability'))})" for g in gpus
            )
        if origin:
            ev.append(f"architectures {origin}")
    elif sel:
        title += f", {sel} library"
    if bnb(facts).get("loads") is True:
        ev.append("bitsandbytes.loads = true")
    return [Finding("QD400", "ok", title, ev, None, AREA)]


@rule("QD401", "bitsandbytes-not-installed", AREA)
def bnb_missing(facts, matrix):
    """bitsandbytes is not installed: no 4-bit quantization, so no QLoRA. Error."""
    b = bnb(facts)
    if b.get("installed") is not False:
        return []
    return [
        Finding(
            "QD401",
            "error",
            "bitsandbytes is not installed (needed for 4-bit QLoRA)",
            ["bitsandbytes.installed = false"],
            "pip install -U bitsandbytes",
            AREA,
        )
    ]


@rule("QD402", "bitsandbytes-no-library-for-cuda", AREA)
def bnb_no_lib(facts, matrix):
    """bitsandbytes ships no library its loader accepts for torch's CUDA version (releases before 0.50
    need an exact libbitsandbytes_cudaXYZ; 0.50+ only look within the same major). The import fails
    ("Configured CUDA binary not found", 0.46-0.49) or falls back to the CPU library. Error, naming the
    libraries that are there and the first release that has one for this CUDA."""
    s = _state(facts, matrix)
    if (
        not s["installed"]
        or s["ov"]
        or s["exists"] is not False
        or not s["tc"]
        or not _is_cuda_lib(s["selected"])
    ):
        return []
    tc = s["tc"]
    want = f"cuda{tc[0]}{tc[1]}"
    first = first_bnb_with_lib(matrix, tc)
    ev = [
        f"torch.cuda = {cuda_str(tc)} -> bitsandbytes looks for libbitsandbytes_{want}",
        f"libraries in bitsandbytes {s['ver']}: {_libs_text(s['libs'])}",
        f"loader rule of {s['ver']}: "
        + ("exact match only" if s["loader"] == "exact" else "same CUDA major only"),
    ]
    if matches(s["ver"], ">=0.46,<0.50"):
        ev.append(
            f"error users see: RuntimeError: Configured CUDA binary not found at "
            f".../libbitsandbytes_{want}.so"
        )
    elif matches(s["ver"], "<0.46"):
        ev.append("error users see: 'Could not find the bitsandbytes CUDA binary' then the CPU library")
    fixes = []
    if first and matches(first, f">{s['ver']}"):
        fixes.append(f"pip install -U 'bitsandbytes>={first}'")
    same = [x for x in (s["libs"] or []) if cuda_tuple(x) and cuda_tuple(x)[0] == tc[0]]
    if same:
        fixes.append(
            f"or export BNB_CUDA_VERSION={same[-1][4:]}  # use the {same[-1]} library with torch's CUDA "
            f"{cuda_str(tc)} runtime"
        )
    return [
        Finding(
            "QD402",
            "error",
            f"bitsandbytes {s['ver']} has no library for torch's CUDA {cuda_str(tc)}",
            ev,
            "\n".join(fixes) or "pip install -U bitsandbytes",
            AREA,
        )
    ]


@rule("QD403", "bitsandbytes-override-missing", AREA)
def bnb_override_missing(facts, matrix):
    """BNB_CUDA_VERSION names a library that this bitsandbytes does not ship: loading fails (0.46+:
    "Configured CUDA binary not found"; 0.50: "No compatible CUDA library found"). Error; unset it (the
    loader then picks a library for torch's CUDA) or set it to one that exists in torch's CUDA major."""
    s = _state(facts, matrix)
    if not s["installed"] or not s["ov"] or s["exists"] is not False:
        return []
    tc = s["tc"]
    default = bnb_pick(matrix, s["ver"], s["libs"], tc) if tc else None
    ev = [
        f"env BNB_CUDA_VERSION = {s['ov']} -> libbitsandbytes_{s['selected'] or 'cuda' + s['ov']}",
        f"libraries in bitsandbytes {s['ver']}: {_libs_text(s['libs'])}",
    ]
    if tc:
        ev.append(
            f"torch.cuda = {cuda_str(tc)}" + (f" -> without the override: {default}" if default else "")
        )
    if default:
        fix = "unset BNB_CUDA_VERSION"
    else:
        same = [x for x in (s["libs"] or []) if tc and cuda_tuple(x)[0] == tc[0]]
        fix = f"export BNB_CUDA_VERSION={same[-1][4:]}" if same else "unset BNB_CUDA_VERSION"
    return [
        Finding(
            "QD403",
            "error",
            f"BNB_CUDA_VERSION={s['ov']} names a library bitsandbytes {s['ver']} does not ship",
            ev,
            fix,
            AREA,
        )
    ]


def _arch_fix(facts, matrix, s, gpus):
    """Find a torch wheel (this driver, these GPUs) whose CUDA makes bitsandbytes load a library with
    code for `gpus`; else a BNB_CUDA_VERSION within torch's major; else a source build."""
    ccs = [g["compute_capability"] for g in gpus]
    covering = []
    for lib in s["libs"] or []:
        sass, ptx, _ = bnb_lib_archs(facts, matrix, lib)
        if sass is not None and all(arch_runs(c, sass, ptx) for c in ccs):
            covering.append(lib)
    tv = torch_version(facts)
    pick = pick_wheel(
        facts,
        matrix,
        ccs,
        tv,
        python_version(facts),
        accept=lambda w: bnb_pick(matrix, s["ver"], s["libs"], w.get("cuda")) in covering,
    )
    if pick:
        w, m, _ = pick
        lib = bnb_pick(matrix, s["ver"], s["libs"], w["cuda"])
        return covering, f"{pip_torch(w, m, tv)}  # then bitsandbytes loads {lib}, which has it"
    tc = s["tc"]
    same = [lib for lib in covering if tc and cuda_tuple(lib)[0] == tc[0]]
    if same:
        return covering, f"export BNB_CUDA_VERSION={same[-1][4:]}"
    arches = ";".join(sorted({f"{cc_tuple(c)[0]}{cc_tuple(c)[1]}" for c in ccs}))
    return covering, (
        f"no prebuilt bitsandbytes library fits: build it from source with "
        f'cmake -DCOMPUTE_BACKEND=cuda -DCOMPUTE_CAPABILITY="{arches}"'
    )


@rule("QD404", "bitsandbytes-arch-missing", AREA)
def bnb_arch(facts, matrix):
    """The library bitsandbytes loads has no code for a visible GPU (no cubin of its major with minor <=
    its own, no PTX <= its capability): 4-bit kernels fail with "no kernel image is available for
    execution on the device" (e.g. a V100, sm_70, with the cuda130 library). Checked per GPU against the
    architectures read from the library itself, the matrix when those are unknown. Error."""
    s = _state(facts, matrix)
    sel = s["selected"]
    if not s["installed"] or not _is_cuda_lib(sel) or s["exists"] is False:
        return []
    sass, ptx, origin = bnb_lib_archs(facts, matrix, sel)
    if sass is None:
        return []
    gpus = [g for g in visible_gpus(facts) if cc_tuple(g.get("compute_capability"))]
    bad = [g for g in gpus if arch_runs(g["compute_capability"], sass, ptx) is False]
    if not bad:
        return []
    covering, fix = _arch_fix(facts, matrix, s, bad)
    ev = [f"libbitsandbytes_{sel} has {arch_span(sass, ptx)} ({origin})"]
    ev += [f"GPU {g.get('index')} {g.get('name')} needs {sm(g['compute_capability'])}" for g in bad]
    ev.append(
        f"libraries here with {', '.join(sorted({sm(g['compute_capability']) for g in bad}))}: "
        f"{_libs_text(covering)}"
    )
    ev.append(
        "error users see: Error no kernel image is available for execution on the device at line N in "
        "file .../csrc/ops.cu"
    )
    return [
        Finding("QD404", "error", f"libbitsandbytes_{sel} has no code for {group_label(bad)}", ev, fix, AREA)
    ]


_PIP_CUDA_LIB = {
    "libcudart": "nvidia-cuda-runtime-cu{m}",
    "libcublas": "nvidia-cublas-cu{m}",
    "libcublaslt": "nvidia-cublas-cu{m}",
    "libcusparse": "nvidia-cusparse-cu{m}",
}


@rule("QD405", "bitsandbytes-missing-deps", AREA)
def bnb_missing_deps(facts, matrix):
    """Shared libraries the selected bitsandbytes library needs do not resolve (e.g. libcusparse.so.11
    for cuda118 on a CUDA 12 system): "Could not load bitsandbytes native library ... cannot open shared
    object file". Error; match the library to torch's CUDA or install the runtime it needs."""
    s = _state(facts, matrix)
    sel = s["selected"]
    bins = bnb(facts).get("binaries") or {}
    deps = (bins.get(sel) or {}).get("missing_deps") if isinstance(bins, dict) and sel else None
    if not deps:
        return []
    tc, lc = s["tc"], cuda_tuple(sel)
    ev = [f"libbitsandbytes_{sel} needs: {', '.join(deps)} (not found)"]
    if tc:
        ev.append(f"torch.cuda = {cuda_str(tc)}")
    if s["ov"] and tc and lc and lc[0] != tc[0]:
        fix = (
            f"unset BNB_CUDA_VERSION  # it selects a CUDA {lc[0]} library; torch ships CUDA {tc[0]} runtimes"
        )
    elif lc:
        pkgs = sorted(
            {
                _PIP_CUDA_LIB[d.split(".so")[0].lower()].format(m=lc[0])
                for d in deps
                if d.split(".so")[0].lower() in _PIP_CUDA_LIB
            }
        )
        fix = (
            f"pip install {' '.join(pkgs)}"
            if pkgs
            else f"install the CUDA {lc[0]} runtime libraries and add their directory to LD_LIBRARY_PATH"
        )
    else:
        fix = "install the missing libraries and add their directory to LD_LIBRARY_PATH"
    return [
        Finding(
            "QD405", "error", f"libbitsandbytes_{sel} cannot load: missing {', '.join(deps)}", ev, fix, AREA
        )
    ]


@rule("QD406", "bitsandbytes-does-not-load", AREA)
def bnb_not_loaded(facts, matrix):
    """The native library did not load at runtime (--deep). Since 0.46 `import bitsandbytes` still
    succeeds and installs a placeholder, so 4-bit dies only at the first kernel call. Error with the
    loader's own message, and the fix of the known failure it matches (a missing CUDA runtime library
    names the pip wheel that provides it). A static cause (QD402-QD405, QD104/QD105) is shown instead."""
    from qdoctor.known_failures import match

    b = bnb(facts)
    if b.get("loads") is not False:
        return []
    err = b.get("error") or "no error text recorded"
    ev = [
        "bitsandbytes.loads = false",
        f"bitsandbytes.error = {err}",
        f"bitsandbytes.selected = {b.get('selected')}",
    ]
    text = "\n".join(x for x in (b.get("error"), b.get("error_detail")) if isinstance(x, str))
    kf = match(text, matrix)
    lib = b.get("selected")
    if kf is not None:
        ev.append(f"known failure {kf.code} ({kf.slug}): {kf.title}; source: {kf.source}")
        fix = kf.fix
        missing = re.findall(r"(lib\w+)\.so\.(\d+)\S*: cannot open shared object file", text)
        pkgs = sorted({_PIP_CUDA_LIB[n.lower()].format(m=major) for n, major in missing
                       if n.lower() in _PIP_CUDA_LIB})
        if pkgs:
            fix = (f"pip install {' '.join(pkgs)}  # provides "
                   + ", ".join(f"{n}.so.{m}" for n, m in missing) + f" for libbitsandbytes_{lib}")
    else:
        fix = (f"the loader's error (above) is not a known failure: it names the file it tried "
               f"(libbitsandbytes_{lib}) and why it failed; `qdoctor explain` on the full "
               f"`python -c 'import bitsandbytes'` output matches it against every known failure")
    return [
        Finding(
            "QD406",
            "error",
            f"bitsandbytes {bnb_version(facts) or ''} native library does not load".replace("  ", " "),
            ev,
            fix,
            AREA,
        )
    ]


@rule("QD407", "bitsandbytes-cpu-library-with-gpu", AREA)
def bnb_cpu_lib(facts, matrix):
    """bitsandbytes picked its CPU library although torch is a CUDA build and GPUs are visible: 8-bit
    optimizers and GPU quantization are unavailable ("compiled without GPU support" / "not available in
    CPU-only version of bitsandbytes"). Error. (A CPU-only torch is reported by QD302 instead.)"""
    s = _state(facts, matrix)
    if s["selected"] != "cpu" or not s["tc"] or not visible_gpus(facts):
        return []
    return [
        Finding(
            "QD407",
            "error",
            f"bitsandbytes {s['ver']} selected its CPU library although torch is "
            f"built for CUDA {cuda_str(s['tc'])}",
            [
                f"bitsandbytes.selected = cpu ({bnb(facts).get('selected_reason') or 'no reason recorded'})",
                f"torch.cuda = {cuda_str(s['tc'])}",
                f"libraries: {_libs_text(s['libs'])}",
            ],
            "pip install -U --force-reinstall bitsandbytes",
            AREA,
        )
    ]


@rule("QD408", "bitsandbytes-slow-int8", AREA)
def bnb_int8(facts, matrix):
    """GPUs below compute capability 7.5 have no fast LLM.int8 path ("Only slow 8-bit matmul is supported
    for your GPU"). 4-bit QLoRA is unaffected. Info, per GPU."""
    lim = cap(matrix, "int8_matmul_min_cc", "7.5")
    nf4 = cap(matrix, "nf4_min_cc", "6.0")
    bad = [g for g in visible_gpus(facts) if (c := cc_tuple(g.get("compute_capability"))) and nf4 <= c < lim]
    if not bad or not bnb_version(facts):
        return []
    return [
        Finding(
            "QD408",
            "info",
            f"{group_label(bad)}: 8-bit matmul is slow below {sm(lim)}; 4-bit is fine",
            [f"GPU {g.get('index')}: CC {g.get('compute_capability')} < {cuda_str(lim)}" for g in bad],
            "use 4-bit (BitsAndBytesConfig(load_in_4bit=True)), not load_in_8bit",
            AREA,
        )
    ]


@rule("QD409", "gpu-too-old-for-4bit", AREA)
def bnb_nf4_cc(facts, matrix):
    """GPUs below compute capability 6.0 (Kepler, Maxwell) cannot run bitsandbytes' 4-bit kernels in
    current releases (0.48+ ship nothing below sm_60). Error per GPU; hide them or use another GPU."""
    lim = cap(matrix, "nf4_min_cc", "6.0")
    gpus = visible_gpus(facts)
    bad = [g for g in gpus if (c := cc_tuple(g.get("compute_capability"))) and c < lim]
    if not bad:
        return []
    good = [str(g.get("index")) for g in gpus if g not in bad]
    fix = (
        f"export CUDA_VISIBLE_DEVICES={','.join(good)}  # only the GPUs that can run 4-bit"
        if good
        else "use a GPU with compute capability >= 6.0 (7.5+ recommended), or train on the CPU"
    )
    return [
        Finding(
            "QD409",
            "error",
            f"{group_label(bad)}: too old for 4-bit QLoRA (needs {sm(lim)}+)",
            [f"GPU {g.get('index')}: CC {g.get('compute_capability')} < {cuda_str(lim)}" for g in bad],
            fix,
            AREA,
        )
    ]


@rule("QD410", "bitsandbytes-too-old-for-qlora", AREA)
def bnb_too_old(facts, matrix):
    """bitsandbytes older than 0.39 has no 4-bit layers and no paged optimizers ("module
    'bitsandbytes.nn' has no attribute 'Linear4bit'", "no attribute 'PagedAdam'"). Error."""
    ver = bnb_version(facts)
    need = bnb_feature(matrix, "qlora_min", "0.39.0")
    if not ver or matches(ver, f"<{need}") is not True:
        return []
    return [
        Finding(
            "QD410",
            "error",
            f"bitsandbytes {ver} is too old for QLoRA (needs {need}+)",
            [
                f"bitsandbytes.version = {ver}",
                "error users see: AttributeError: module 'bitsandbytes.nn' has no attribute 'Linear4bit'",
            ],
            "pip install -U bitsandbytes",
            AREA,
        )
    ]


@rule("QD411", "torch-below-bitsandbytes-minimum", AREA)
def bnb_torch_min(facts, matrix):
    """The installed torch is outside the range this bitsandbytes release declares (e.g. 0.50 needs torch
    >= 2.4; 0.46+ register torch.library custom ops that older torch lacks). Error."""
    ver = bnb_version(facts)
    rel = bnb_release(matrix, ver) if ver else None
    tv = torch_version(facts)
    if not rel or not rel.get("torch") or not tv or matches(tv, rel["torch"]) is not False:
        return []
    return [
        Finding(
            "QD411",
            "error",
            f"bitsandbytes {ver} needs torch {rel['torch']}, found {tv}",
            [
                f"bitsandbytes {ver} declares torch{rel['torch']} ({rel.get('source')})",
                f"torch.version = {tv}",
            ],
            f"pip install -U 'torch{rel['torch'].split(',')[0]}'  # or an older bitsandbytes",
            AREA,
        )
    ]
