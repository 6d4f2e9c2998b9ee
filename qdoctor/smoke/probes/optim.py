"""Probe `optim8bit`: one bnb AdamW8bit step against torch.optim.AdamW; on CUDA a paged step too."""

from __future__ import annotations

from qdoctor.smoke.probes.common import rel_err

# bitsandbytes keeps 32-bit state for tensors under min_8bit_size (4096) and pages state only
# for tensors of at least 1e5 elements (optim/optimizer.py, get_state_buffer): sizes chosen above both.
SHAPE = (512, 256)
STEPS = 3


def optim8bit(ctx) -> dict:
    import bitsandbytes as bnb
    import torch

    dev = ctx.torch_device()
    g = torch.Generator(device="cpu").manual_seed(ctx.seed)
    w0 = torch.randn(*SHAPE, generator=g)
    grads = [torch.randn(*SHAPE, generator=g) for _ in range(STEPS)]
    m: dict = {"device": ctx.device, "numel": w0.numel(), "steps": STEPS}

    def step(opt_cls, **kw):
        p = torch.nn.Parameter(w0.clone().to(dev))
        opt = opt_cls([p], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, **kw)
        for gr in grads:  # the first step is exact; later ones read the 8-bit state back
            p.grad = gr.to(dev)
            opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return (p.detach() - w0.to(dev)), opt, p

    ref, _, _ = step(torch.optim.AdamW)
    upd, opt8, p8 = step(bnb.optim.AdamW8bit)
    upd = ctx.corrupt(upd)
    st = opt8.state[p8]
    m["state1_dtype"] = str(st["state1"].dtype).replace("torch.", "") if "state1" in st else None
    m["update_rel_err"] = rel_err(upd, ref)
    m["update_finite"] = bool(torch.isfinite(upd).all())
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        need = 4 * w0.numel() * 4  # two state buffers, generous
        if free < 4 * need:
            m["paged"] = f"skipped: only {free // 2**20} MiB free on {ctx.device}"
        else:
            try:
                upd_p, opt_p, pp = step(bnb.optim.PagedAdamW8bit)
            except Exception as e:  # managed memory refused (vGPU, some WSL): plain 8-bit may still work
                m["paged"] = "failed"
                m["paged_ok"] = False
                m["paged_error"] = f"{type(e).__name__}: {e}"[:500]
            else:
                st_p = opt_p.state[pp]
                m["paged"] = "ran"
                m["paged_ok"] = True
                m["paged_state_is_managed"] = bool(getattr(st_p.get("state1"), "is_paged", False))
                m["paged_update_rel_err"] = rel_err(ctx.corrupt(upd_p), ref)
    else:
        m["paged"] = "skipped: paged optimizers need CUDA managed memory (bitsandbytes falls back on CPU)"
    return {"measurements": m}
