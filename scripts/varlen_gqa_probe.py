"""Does this torch's variable-length attention take fewer key/value heads than query heads (GQA) without
copying them, and what does repeating them cost? Prints the signature, the largest difference between the
native and the repeated path, and fwd+bwd milliseconds of each on a 1.1B Llama layer's shapes (2 x 4096 packed
tokens, 32 query heads, 4 key/value heads, head_dim 64)."""

from __future__ import annotations

import inspect
import json
import time

import torch
from torch.nn.attention import varlen

fn = varlen.varlen_attn
params = inspect.signature(fn).parameters
out = {"torch": torch.__version__, "params": list(params)}
T, H, HK, D = 8192, 32, 4, 64
g = torch.Generator(device="cuda").manual_seed(0)
q = torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
k = torch.randn(T, HK, D, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
v = torch.randn(T, HK, D, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
cu = torch.tensor([0, 1000, 2600, 4096, 5000, 6500, 8192], device="cuda", dtype=torch.int32)
kw = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}


def run(native: bool):
    kk, vv = (k, v) if native else (k.repeat_interleave(H // HK, 1), v.repeat_interleave(H // HK, 1))
    extra = {"enable_gqa": True} if native and "enable_gqa" in params else {}
    o = fn(q, kk, vv, cu, cu, 1600, 1600, **kw, **extra)
    o.float().square().sum().backward()
    return o


try:
    ref = run(False)
    grads_ref = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    nat = run(True)
    out["native_ok"] = True
    out["max_abs_diff_out"] = float((nat.detach().float() - ref.detach().float()).abs().max())
    out["max_abs_diff_grads"] = [float((t.grad.float() - r.float()).abs().max())
                                 for t, r in zip((q, k, v), grads_ref, strict=True)]
    out["max_abs_grads_repeat"] = [float(r.float().abs().max()) for r in grads_ref]  # the scale of those
except Exception as e:  # noqa: BLE001 - report what this torch does
    out["native_ok"] = False
    out["native_error"] = repr(e)[:300]
for name, native in (("repeat", False), ("native", True)):
    if native and not out["native_ok"]:
        continue
    for _ in range(3):
        run(native)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(20):
        run(native)
    torch.cuda.synchronize()
    out[f"{name}_ms_fwd_bwd"] = round((time.perf_counter() - t0) / 20 * 1000, 3)
print(json.dumps(out))
