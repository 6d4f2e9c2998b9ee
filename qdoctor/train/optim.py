"""Optimizers by plan name, including a 32-bit AdamW whose states and step live on the CPU, and the flat
layout that lets any of them update every LoRA tensor with one kernel launch.

`CPUOffloadAdamW` is the fallback when the 8-bit optimizer fails or GPU memory is short: the device keeps
only the LoRA params and their grads; fp32 master copies and both Adam moments stay in host RAM. Its
param_groups are the device params, so LR schedulers, GradScaler and grad clipping treat it like any
optimizer.
"""

from __future__ import annotations

import torch


class CPUOffloadAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(list(params), dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self._params = [p for g in self.param_groups for p in g["params"]]
        self._masters = [p.detach().to("cpu", torch.float32, copy=True) for p in self._params]
        self.inner = torch.optim.AdamW(
            self._masters, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False
        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for key in ("lr", "betas", "eps", "weight_decay"):
            self.inner.param_groups[0][key] = self.param_groups[0][key]
        for p, m in zip(self._params, self._masters, strict=True):
            m.grad = None if p.grad is None else p.grad.detach().to("cpu", torch.float32)
        self.inner.step()
        for p, m in zip(self._params, self._masters, strict=True):
            p.copy_(m.to(p.device, p.dtype, non_blocking=True))
        return loss

    def state_dict(self):
        return {
            "inner": self.inner.state_dict(),
            "masters": [m.clone() for m in self._masters],
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
        }

    def load_state_dict(self, sd):
        self.inner.load_state_dict(sd["inner"])
        for m, saved in zip(self._masters, sd["masters"], strict=True):
            m.copy_(saved)
        with torch.no_grad():
            for p, m in zip(self._params, self._masters, strict=True):
                p.copy_(m.to(p.device, p.dtype))
        for g, saved in zip(self.param_groups, sd["param_groups"], strict=True):
            g.update(saved)


# bitsandbytes' 8-bit blockwise optimizers quantize their states in blocks of 256 elements, and keep 32-bit
# states for tensors of fewer than min_8bit_size = 4096 elements (bitsandbytes/optim/optimizer.py)
BLOCK = 256
MIN_8BIT = 4096


class FlatParams:
    """The trainable tensors of at least MIN_8BIT elements as views into one buffer, and their gradients as
    views into a second one, so the optimizer steps one tensor instead of hundreds: a LoRA model has 2 per
    adapted linear layer (308 on a 1.1B Llama), and bitsandbytes' per-tensor Python and launch overhead was
    ~33 ms of a 190 ms step on the H200 (scripts/kernel_profile.py; bench/NOTES.md). Each view starts at a
    multiple of BLOCK, so every quantization block of the optimizer's states covers one tensor, as it does
    per tensor: the same update, element by element; the padding has zero gradient and stays zero. Smaller
    tensors stay separate (bitsandbytes gives them 32-bit states). Autograd accumulates into an existing
    .grad in place, so the gradient views must never be replaced: zero_grad() zeroes the buffer."""

    def __init__(self, params, block: int = BLOCK, min_numel: int = MIN_8BIT):
        params = list(params)
        big = [p for p in params if p.numel() >= min_numel]
        self.small = [p for p in params if p.numel() < min_numel]
        same = len({(p.dtype, p.device) for p in big}) == 1
        if len(big) < 2 or not same:
            self.flat, self.small, self.views = None, params, []
            return
        offsets, n = [], 0
        for p in big:
            offsets.append(n)
            n += -(-p.numel() // block) * block
        buf = torch.zeros(n, dtype=big[0].dtype, device=big[0].device)
        grad = torch.zeros_like(buf)
        with torch.no_grad():
            for p, off in zip(big, offsets, strict=True):
                buf[off : off + p.numel()].copy_(p.detach().reshape(-1))
                p.data = buf[off : off + p.numel()].view_as(p)
                p.grad = grad[off : off + p.numel()].view_as(p)
        self.flat = torch.nn.Parameter(buf)
        self.flat.grad = grad
        self.views = big

    def params(self) -> list:
        return ([self.flat] if self.flat is not None else []) + self.small

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.flat is not None:
            self.flat.grad.zero_()
        for p in self.small:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()


def build(name: str, params, lr: float, weight_decay: float, flat: bool = False):
    """flat: one process's optimizer over a FlatParams layout (not with cpu_adamw, which keeps its own
    copies, nor under DDP/FSDP, which own the gradients)."""
    params = [p for p in params if p.requires_grad]
    layout = FlatParams(params) if flat and name != "cpu_adamw" else None
    if layout is not None:
        params = layout.params()
    opt = _build(name, params, lr, weight_decay)
    if layout is not None and layout.flat is not None:
        opt.zero_grad = layout.zero_grad  # the gradient views must stay: zero the buffer instead
        opt.qdoctor_flat = layout
    return opt


def _build(name: str, params, lr: float, weight_decay: float):
    kw = dict(lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    if name == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, **kw)
    if name == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kw)
    if name == "cpu_adamw":
        return CPUOffloadAdamW(params, **kw)
    if name == "adamw":
        return torch.optim.AdamW(params, **kw)
    raise ValueError(f"unknown optimizer {name!r}")


def schedule(warmup_steps: int):
    """Linear warm-up then constant (QLoRA's schedule); a function of the step alone, so resume is exact."""

    def f(step: int) -> float:
        return min(1.0, (step + 1) / (warmup_steps + 1)) if warmup_steps else 1.0

    return f
