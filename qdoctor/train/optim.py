"""Optimizers by plan name, including a 32-bit AdamW whose states and step live on the CPU.

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


def build(name: str, params, lr: float, weight_decay: float):
    params = [p for p in params if p.requires_grad]
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
