"""A LoRA SwiGLU MLP as one autograd function that keeps only what its backward needs.

Through peft and bitsandbytes, a LoRA MLP block (gate, up, down; each a 4-bit base plus LoRA A/B) keeps for
backward its input x, the gate and up outputs e and g, silu(e), and h = silu(e) * g (the down projection's
LoRA A needs its input): four intermediate-sized tensors per token and layer. Here the block keeps x, e and g
and recomputes silu(e) and h in backward (two element-wise ops), as the QLoRA memory-saving trainers do.
The 4-bit weights are dequantized again in backward, as bitsandbytes' own matmul does. The forward pass is
the same arithmetic in the same order as peft's (base output + (x A^T) B^T * scaling, in the compute dtype),
so the loss is unchanged; only which tensors are kept differs.

Applied only where it is exactly peft's computation: one active adapter, no dropout, no bias, no DoRA,
unmerged, SiLU activation, 4-bit (bitsandbytes Params4bit) base weights. `eligible` says why not otherwise.
"""

from __future__ import annotations

import types


def _proj_why_not(proj) -> str | None:
    base = getattr(proj, "base_layer", None)
    if base is None or not hasattr(proj, "lora_A"):
        return "not a LoRA layer"
    if len(getattr(proj, "active_adapters", [])) != 1 or getattr(proj, "merged", False):
        return "several or merged adapters"
    name = proj.active_adapters[0]
    if any(getattr(proj, a, {}) and name in getattr(proj, a, {}) and getattr(proj, a)[name]
           for a in ("use_dora",)):
        return "DoRA"
    drop = proj.lora_dropout[name]
    if type(drop).__name__ != "Identity":
        return "LoRA dropout > 0"
    if getattr(base, "bias", None) is not None:
        return "a bias"
    if getattr(base.weight, "quant_state", None) is None:
        return "base weights not 4-bit"
    return None


def eligible(mlp) -> str | None:
    """None when `mlp` can run as one fused LoRA function; else why not."""
    for p in ("gate_proj", "up_proj", "down_proj"):
        if not hasattr(mlp, p):
            return "not a gate/up/down MLP"
    act = getattr(mlp, "act_fn", None)
    if type(act).__name__ not in ("SiLU", "SiLUActivation"):
        return f"activation {type(act).__name__}, not SiLU"
    for p in ("gate_proj", "up_proj", "down_proj"):
        why = _proj_why_not(getattr(mlp, p))
        if why:
            return why
    return None


def _parts(proj):
    name = proj.active_adapters[0]
    w = proj.base_layer.weight
    return w, proj.lora_A[name].weight, proj.lora_B[name].weight, float(proj.scaling[name])


def _dequant(w, dtype):
    import bitsandbytes.functional as BF

    return BF.dequantize_4bit(w.data, w.quant_state).to(dtype)


def _function():
    import torch
    import torch.nn.functional as F

    class LoraMLP(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, gw, ga, gb, uw, ua, ub, dw, da, db, sg, su, sd):
            dt = x.dtype
            X = x.reshape(-1, x.shape[-1])
            xg = X @ ga.to(dt).t()
            xu = X @ ua.to(dt).t()
            e = X @ _dequant(gw, dt).t() + (xg @ gb.to(dt).t()) * sg
            g = X @ _dequant(uw, dt).t() + (xu @ ub.to(dt).t()) * su
            h = F.silu(e) * g
            hd = h @ da.to(dt).t()
            out = h @ _dequant(dw, dt).t() + (hd @ db.to(dt).t()) * sd
            ctx.save_for_backward(X, e, g, xg, xu, hd, ga, gb, ua, ub, da, db)
            ctx.quant = (gw, uw, dw)
            ctx.scales = (sg, su, sd)
            return out.view(*x.shape[:-1], out.shape[-1])

        @staticmethod
        def backward(ctx, dout):
            X, e, g, xg, xu, hd, ga, gb, ua, ub, da, db = ctx.saved_tensors
            gw, uw, dw = ctx.quant
            sg, su, sd = ctx.scales
            dt = X.dtype
            D = dout.reshape(-1, dout.shape[-1]).to(dt)
            sig = torch.sigmoid(e)
            silu = e * sig
            h = silu * g
            d_db = (D.t() @ hd) * sd
            d_hd = (D @ db.to(dt)) * sd
            d_da = d_hd.t() @ h
            del h
            dh = D @ _dequant(dw, dt) + d_hd @ da.to(dt)
            f32 = dh.float()
            dg = (f32 * silu.float()).to(dt)
            de = (f32 * g.float() * (sig.float() * (1 + e.float() * (1 - sig.float())))).to(dt)
            del dh, f32, sig, silu
            d_gb = (de.t() @ xg) * sg
            d_xg = (de @ gb.to(dt)) * sg
            d_ga = d_xg.t() @ X
            d_ub = (dg.t() @ xu) * su
            d_xu = (dg @ ub.to(dt)) * su
            d_ua = d_xu.t() @ X
            dx = None
            if ctx.needs_input_grad[0]:
                dx = de @ _dequant(gw, dt) + d_xg @ ga.to(dt)
                dx += dg @ _dequant(uw, dt) + d_xu @ ua.to(dt)
                dx = dx.view(*dout.shape[:-1], X.shape[-1])
            return (dx, None, d_ga.to(ga.dtype), d_gb.to(gb.dtype), None, d_ua.to(ua.dtype),
                    d_ub.to(ub.dtype), None, d_da.to(da.dtype), d_db.to(db.dtype), None, None, None)

    return LoraMLP


_FN = None


def _forward(self, x):
    gw, ga, gb, sg = _parts(self.gate_proj)
    uw, ua, ub, su = _parts(self.up_proj)
    dw, da, db, sd = _parts(self.down_proj)
    return _FN.apply(x, gw, ga, gb, uw, ua, ub, dw, da, db, sg, su, sd)


def decoder_mlps(model) -> list:
    from qdoctor.train.speed import decoder_layers

    return [layer.mlp for layer in decoder_layers(model) if hasattr(layer, "mlp")]


def apply(model) -> tuple[int, str | None]:
    """Route every eligible decoder MLP through the fused function. Returns (how many, why not for the
    first one that is not). The autograd function's class is built here, not in the first forward, which
    torch.compile would trace (a class definition is a graph break)."""
    global _FN
    if _FN is None:
        _FN = _function()
    n, why = 0, None
    for mlp in decoder_mlps(model):
        w = eligible(mlp)
        if w:
            why = why or w
            continue
        mlp.forward = types.MethodType(_forward, mlp)
        n += 1
    return n, why
