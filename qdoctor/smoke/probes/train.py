"""Probes `lora_step`, `save_load` and `precision`: the QLoRA training path, end to end but tiny."""

from __future__ import annotations

import contextlib
import functools
import os

from qdoctor.smoke.probes.common import batch, four_bit_modules, load_4bit, lora_config, save_tiny_llama

LORA_STEPS = 5
LORA_LR = 1e-2


def _amp(ctx, dev, dtype):
    """bf16 autocast; fp16 autocast with a GradScaler; nothing for fp32."""
    import torch

    if dtype == torch.float32:
        return contextlib.nullcontext, None
    ac = functools.partial(torch.autocast, device_type=dev.type, dtype=dtype)
    scaler = torch.amp.GradScaler(dev.type) if dtype == torch.float16 else None
    return ac, scaler


def _snapshot_4bit(model) -> dict:
    snap = {}
    for name, mod in four_bit_modules(model).items():
        w = mod.weight
        snap[name] = (w.data.detach().clone(), w.quant_state.absmax.detach().clone())
    return snap


def lora_step(ctx) -> dict:
    """N LoRA steps on a 4-bit tiny Llama, non-reentrant checkpointing: what moves and what must not."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training

    dev = ctx.torch_device()
    dtype = ctx.dtype()
    path = save_tiny_llama(os.path.join(ctx.workdir, "base"), seed=ctx.seed)
    model = load_4bit(path, dev, dtype)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, lora_config())
    model.train()
    before = _snapshot_4bit(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LORA_LR)
    ac, scaler = _amp(ctx, dev, dtype)
    ids = batch(dev, ctx.seed)
    losses, grads_to, frozen_with_grad, lora_grad_nonzero = [], set(), set(), False
    for step in range(LORA_STEPS):
        opt.zero_grad(set_to_none=True)
        with ac():
            loss = model(input_ids=ids, labels=ids).loss
        (scaler.scale(loss) if scaler else loss).backward()
        if step == 0:
            for n, p in model.named_parameters():
                if p.grad is not None:
                    (grads_to if p.requires_grad else frozen_with_grad).add(n)
                    if "lora_" in n and bool(p.grad.abs().sum() > 0):
                        lora_grad_nonzero = True
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        losses.append(float(ctx.corrupt(loss.detach().float())))
    after = _snapshot_4bit(model)
    unchanged = all(torch.equal(before[k][0], after[k][0]) and torch.equal(before[k][1], after[k][1])
                    for k in before)
    gc_layers = [mod for mod in model.modules() if getattr(mod, "gradient_checkpointing", False) is True]
    gc_func = next((getattr(mod, "_gradient_checkpointing_func", None) for mod in gc_layers), None)
    reentrant = getattr(gc_func, "keywords", {}).get("use_reentrant") if gc_func is not None else None
    m = {
        "compute_dtype": str(dtype).replace("torch.", ""), "device": ctx.device, "steps": LORA_STEPS,
        "losses": [round(x, 5) for x in losses],
        "loss_first": losses[0], "loss_last": losses[-1],
        "loss_ratio": losses[-1] / losses[0] if losses[0] else None,
        "losses_finite": all(x == x and abs(x) != float("inf") for x in losses),
        "loss_falls": losses[-1] < losses[0],
        "four_bit_layers": len(before),
        "trainable_params": len(trainable),
        "grads_only_lora": bool(grads_to) and all("lora_" in n for n in grads_to) and not frozen_with_grad,
        "grads_reach_all_trainable": grads_to == trainable,
        "lora_grad_nonzero": lora_grad_nonzero,
        "base_4bit_unchanged": unchanged and len(before) > 0,
        "checkpointed_modules": len(gc_layers),
        "checkpoint_use_reentrant": reentrant,
    }
    return {"measurements": m}


def save_load(ctx) -> dict:
    """The adapter saved in PEFT format and reloaded onto a fresh 4-bit base gives the same logits.

    The forwards run in train mode (LoRA dropout is 0, so the math is the same as eval): on CPUs with
    AVX512-BF16, bitsandbytes' Linear4bit repacks its weights for an inference kernel on an eval-mode
    forward and unpacks them in state_dict(), which peft calls while saving and loading; each
    pack/unpack cycle moves the logits by ~1e-3 (bitsandbytes nn/modules.py, Linear4bit.forward and
    _save_to_state_dict), which is not a save/load fault.
    """
    import torch
    from peft import PeftModel, get_peft_model

    dev = ctx.torch_device()
    dtype = ctx.dtype()
    path = save_tiny_llama(os.path.join(ctx.workdir, "base"), seed=ctx.seed)
    model = get_peft_model(load_4bit(path, dev, dtype), lora_config())
    torch.manual_seed(ctx.seed + 7)
    with torch.no_grad():  # lora_B starts at zero: give the adapter an effect to preserve
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.train()
    ids = batch(dev, ctx.seed + 1, n=1, seq=16)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float().cpu()
    out_dir = os.path.join(ctx.workdir, "adapter")
    model.save_pretrained(out_dir)
    files = sorted(os.listdir(out_dir))
    del model
    base = load_4bit(path, dev, dtype)
    base.train()
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits.float().cpu()
    again = PeftModel.from_pretrained(base, out_dir)
    again.train()
    with torch.no_grad():
        logits2 = ctx.corrupt(again(input_ids=ids).logits.float().cpu())
    m = {
        "compute_dtype": str(dtype).replace("torch.", ""), "device": ctx.device, "files": files,
        "peft_format": "adapter_config.json" in files and "adapter_model.safetensors" in files,
        "max_abs_diff": float((logits2 - logits).abs().max()),
        "adapter_effect": float((logits - base_logits).abs().max()),
    }
    return {"measurements": m}


def precision(ctx) -> dict:
    """bf16 autocast where the GPU has it natively; fp16 autocast with GradScaler otherwise; fp32 on CPU."""
    import torch

    dev = ctx.torch_device()
    dtype = ctx.dtype()
    torch.manual_seed(ctx.seed)
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64)).to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    g = torch.Generator(device="cpu").manual_seed(ctx.seed + 3)
    x = torch.randn(32, 64, generator=g).to(dev)
    y = torch.randn(32, 64, generator=g).to(dev)
    ac, scaler = _amp(ctx, dev, dtype)
    losses, out_dtype = [], None
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        with ac():
            out = net(x)
            out_dtype = out.dtype
            loss = torch.nn.functional.mse_loss(out.float(), y)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        losses.append(float(ctx.corrupt(loss.detach())))
    finite = all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    m = {
        "compute_dtype": str(dtype).replace("torch.", ""), "device": ctx.device,
        "autocast_dtype": str(out_dtype).replace("torch.", ""),
        "grad_scaler": scaler is not None,
        "scale": float(scaler.get_scale()) if scaler else None,
        "losses": [round(v, 6) for v in losses],
        "loss_finite": all(v == v and abs(v) != float("inf") for v in losses) and bool(finite),
        "loss_falls": losses[-1] < losses[0],
    }
    if dev.type == "cuda":
        m["bf16_native"] = torch.cuda.get_device_capability(dev)[0] >= 8
    return {"measurements": m}
