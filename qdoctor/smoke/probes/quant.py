"""Probes `nf4` and `matmul4bit`: 4-bit quantization gives the numbers it should."""

from __future__ import annotations

from qdoctor.smoke.probes.common import rel_err


def nf4(ctx) -> dict:
    """NF4 and FP4 round trips, with and without double quantization, against float64."""
    import bitsandbytes.functional as F
    import torch

    dev = ctx.torch_device()
    g = torch.Generator(device="cpu").manual_seed(ctx.seed)
    ref = torch.randn(256, 512, generator=g, dtype=torch.float64)
    m: dict = {"shape": [256, 512], "blocksize": 64, "device": ctx.device}
    for qt in ("nf4", "fp4"):
        for dq in (False, True):
            q, state = F.quantize_4bit(ref.to(dev, torch.float32), blocksize=64, compress_statistics=dq,
                                       quant_type=qt)
            back = ctx.corrupt(F.dequantize_4bit(q, state))
            m[f"{qt}{'_dq' if dq else ''}_rel_err"] = rel_err(back, ref)
    return {"measurements": m}


def matmul4bit(ctx) -> dict:
    """bnb.nn.Linear4bit forward against x @ dequantize(W).T in the compute dtype the plan would use."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    import torch

    dev = ctx.torch_device()
    dtype = ctx.dtype()
    torch.manual_seed(ctx.seed)
    lin = torch.nn.Linear(512, 256, bias=True)
    q = bnb.nn.Linear4bit(512, 256, bias=True, compute_dtype=dtype, compress_statistics=True,
                          quant_type="nf4")
    q.load_state_dict(lin.state_dict())
    q = q.to(dev)
    x = torch.randn(8, 512, generator=torch.Generator(device="cpu").manual_seed(ctx.seed + 1)).to(dev, dtype)
    with torch.no_grad():
        out = ctx.corrupt(q(x))
        w = F.dequantize_4bit(q.weight.data, q.weight.quant_state).to(dtype)
        ref = torch.nn.functional.linear(x, w, q.bias.to(dtype))
        ref64 = torch.nn.functional.linear(x.double(), w.double(), q.bias.double())
    m = {"compute_dtype": str(dtype).replace("torch.", ""), "device": ctx.device,
         "out_dtype": str(out.dtype).replace("torch.", ""),
         "rel_err": rel_err(out, ref64),  # against the exact product with the same 4-bit weights
         "rel_err_vs_dequant_dtype": rel_err(out, ref),
         "finite": bool(torch.isfinite(out).all())}
    return {"measurements": m}
