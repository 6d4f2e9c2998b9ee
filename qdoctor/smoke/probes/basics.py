"""Probes `imports` and `device`: is the stack really there, and does the GPU compute correctly."""

from __future__ import annotations

import sys

from qdoctor.smoke.preload import RECORD, STACK, import_recorded


def imports(ctx) -> dict:
    """torch, bitsandbytes (its native library really loaded), transformers, peft; warnings kept."""
    for name in STACK:  # already done by the fork server, except bitsandbytes/peft on CUDA
        if name not in RECORD["modules"]:
            import_recorded(name)
    m: dict = {"modules": {k: v for k, v in RECORD["modules"].items() if k in STACK},
               "warnings": RECORD["warnings"][-20:], "logs": RECORD["logs"][-20:]}
    for name in STACK:
        mod = sys.modules.get(name)
        m[f"{name}_version"] = getattr(mod, "__version__", None) if mod else None
        m[f"{name}_ok"] = bool(RECORD["modules"].get(name, {}).get("ok"))
    bnb_lib = None
    if m["bitsandbytes_ok"]:
        from bitsandbytes import cextension

        lib = cextension.lib
        bnb_lib = type(lib).__name__
        m["bnb_library_class"] = bnb_lib
        m["bnb_library_path"] = getattr(getattr(lib, "_lib", None), "_name", None)
        m["bnb_backend"] = getattr(cextension, "BNB_BACKEND", None)
        if bnb_lib == "ErrorHandlerMockBNBNativeLibrary":
            m["bnb_load_error"] = getattr(lib, "error_msg", None)
    m["bnb_native_loaded"] = bnb_lib is not None and bnb_lib != "ErrorHandlerMockBNBNativeLibrary"
    m["bnb_cuda_library"] = bnb_lib == "CudaBNBNativeLibrary"
    m["needs_cuda_library"] = ctx.is_cuda
    if ctx.inject == "wrong":
        m["bnb_native_loaded"] = False
    return {"measurements": m}


def device(ctx) -> dict:
    """Allocation and a matmul on every visible GPU against a float64 CPU reference."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(ctx.seed)
    a = torch.randn(256, 256, generator=g)
    b = torch.randn(256, 256, generator=g)
    ref = a.double() @ b.double()
    m: dict = {"cuda_available": torch.cuda.is_available(), "devices": []}
    targets = ["cpu"]
    if ctx.is_cuda:
        m["device_count"] = torch.cuda.device_count()
        targets = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    worst = 0.0
    for t in targets:
        dev = torch.device(t)
        entry = {"device": t}
        if dev.type == "cuda":
            entry["name"] = torch.cuda.get_device_name(dev)
            major, minor = torch.cuda.get_device_capability(dev)
            entry["capability"] = f"{major}.{minor}"
            free, total = torch.cuda.mem_get_info(dev)
            entry["free_mib"], entry["total_mib"] = free // 2**20, total // 2**20
        out = ctx.corrupt(a.to(dev) @ b.to(dev))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        # fp32 accumulation over 256 terms (TF32 is off by default for matmul)
        entry["rel_err"] = _rel(out, ref)
        worst = max(worst, entry["rel_err"])
        m["devices"].append(entry)
    m["rel_err"] = worst
    m["target"] = ctx.device
    return {"measurements": m}


def _rel(out, ref) -> float:
    import torch

    d = out.detach().to("cpu", torch.float64)
    return float((d - ref).norm() / ref.norm())
