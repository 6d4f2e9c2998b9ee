"""Optional speed means for the training path. Each one is detected, then applied; none is required.

- fused kernels from liger-kernel (RMSNorm, SwiGLU, RoPE, and a fused linear + cross-entropy that never
  materialises the full-vocabulary logits): https://github.com/linkedin/Liger-Kernel
- torch.compile of each decoder layer (one graph reused by every layer), recomputing its pointwise work
  in backward rather than keeping it (RECOMPUTE_POINTWISE)

The plan decides which to use and records why (a missing library, no CUDA, no Triton); this module only
says what is possible here and applies what the plan chose. Nothing here imports torch at import time.
"""

from __future__ import annotations

import importlib.util

# model types whose liger patch function we call (liger_kernel.transformers.apply_liger_kernel_to_<type>)
LIGER_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")


def liger_missing(device: str, model_type: str | None, packages: dict | None = None) -> str | None:
    """Why liger kernels can't be used here, or None when they can. `packages`: the facts' installed
    distributions (name -> version); None means look in this interpreter."""

    def has(dist: str, module: str) -> bool:
        if packages is not None:
            return dist in packages
        return importlib.util.find_spec(module) is not None

    if not device.startswith("cuda"):
        return "liger-kernel's Triton kernels need a CUDA GPU"
    if not has("liger-kernel", "liger_kernel"):
        return "liger-kernel is not installed (pip install liger-kernel)"
    if not has("triton", "triton"):
        return "Triton is not installed"
    if model_type not in LIGER_MODEL_TYPES:
        return f"no liger-kernel patch for model type {model_type!r}"
    return None


LIGER_PARTS = ("rope", "rms_norm", "swiglu", "fused_linear_cross_entropy")


def apply_liger(model, model_type: str, parts=LIGER_PARTS) -> None:
    """Patch the loaded (peft-wrapped) model in place with liger's fused kernels.

    LoRA stays where peft put it: SwiGLU fuses only the activation between the (LoRA) projections, and the
    fused linear cross-entropy reads lm_head's weight, which QLoRA neither quantizes nor adapts.
    """
    import liger_kernel.transformers as lk

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    patch = getattr(lk, f"apply_liger_kernel_to_{model_type}")
    patch(cross_entropy=False, model=base, **{p: p in parts for p in LIGER_PARTS})


def decoder_layers(model) -> list:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, base.base_model_prefix, base)
    return list(getattr(inner, "layers", []))


# What the compiled layers keep for backward. torch's min-cut partitioner recomputes only pointwise work,
# and even that not when its output must also exist in backward (it feeds a matmul there), when it is far
# from backward, or in a long chain. Lifting those three bans (its "more aggressive" cut, still limited to
# its allowlist of cheap ops: never a matmul, attention or a custom op such as bitsandbytes' 4-bit GEMM)
# recomputes the norms' outputs, SiLU x up (the down projection's input) and layout copies instead of
# keeping them. H200, 1.1B: 11.47 -> 8.39 GiB at 8x1024; speed the same within noise on unpacked rows,
# 7-20% lower on packed ones (bench/NOTES.md). The bans are lifted directly rather than through an
# activation memory budget below 1: where this cut does not meet a budget, the partitioner goes on to
# recompute ops outside its allowlist, custom ones included (torch's choose_saved_values_set).
# (scripts/bench_train.py's variants replace it: {} for the partitioner's default cut)
RECOMPUTE_POINTWISE = {"ban_recompute_used_far_apart": False, "ban_recompute_long_fusible_chains": False,
                       "ban_recompute_materialized_backward": False}


def compile_layers(model, backend: str = "inductor", cudagraphs: bool = False) -> int:
    """torch.compile each decoder layer in place; returns how many. Parameters are graph inputs (not
    guards), so all layers share one compiled graph instead of recompiling per layer. Sets the process's
    partitioner options (RECOMPUTE_POINTWISE), read when the graphs are first run: train owns its process.
    `cudagraphs`: inductor replays each layer's forward and backward as CUDA graphs (mode="reduce-overhead"),
    one launch instead of one per kernel and library call; the loop then marks each iteration's start
    (mark_iteration). `backend`: tests on CPU use "aot_eager_decomp_partition" (the same partitioner, no C
    compiler)."""
    import torch
    import torch._functorch.config as functorch_config

    for name, value in RECOMPUTE_POINTWISE.items():
        if hasattr(functorch_config, name):  # an older torch without it keeps the default cut
            setattr(functorch_config, name, value)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    layers = decoder_layers(model)
    mode = {"mode": "reduce-overhead"} if cudagraphs else {}
    for layer in layers:
        layer.compile(dynamic=False, backend=backend, **mode)
    return len(layers)


def uses_cudagraphs(plan) -> bool:
    """Whether the plan's compiled layers replay as CUDA graphs: on one CUDA GPU, without gradient
    checkpointing (which reruns the forward inside backward) or offloading (layer inputs on the host), as
    measured (H200, 1.1B, 8x1024: 55.1k -> 77.6k tok/s at the same peak; bench/NOTES.md). A graph inductor
    cannot capture (a CPU tensor input, a mutated input) runs as compiled code without one: torch's
    fallback, counted in its cudagraph_skips."""
    world = getattr(_setting(plan, "parallel"), "world", 1)
    return bool(_setting(plan, "compile") and str(_setting(plan, "device", "")).startswith("cuda")
                and world == 1 and not _setting(plan, "gradient_checkpointing"))


def _setting(plan, name: str, default=None):
    """The plan's value for `name`, or `default` for a plan (or stand-in) without that setting."""
    return getattr(getattr(plan, name, None), "value", default)


def padded_len(n: int, seq_len: int) -> int:
    """The row length a compiled model gets for a micro-batch whose longest row has `n` tokens: `n` rounded
    up to a multiple of an eighth of the sequence length (itself rounded up, at least 64), never beyond it.
    Compiled layers specialise on the length (dynamic=False) and CUDA graphs record one graph per length,
    so rows padded to the longest example would compile and record once per distinct length (up to the
    recompile limit, then run uncompiled); this gives at most eight. Padding sits after each row's last
    token: attention is causal and its labels are ignored, so the loss does not change."""
    step = max(64, -(-seq_len // 8))  # rounded up: eight steps reach seq_len, so eight lengths at most
    return max(n, min(seq_len, -(-n // step) * step))


def row_length(plan, n: int) -> int:
    """padded_len where the plan compiles the layers; `n` (pad to the longest) elsewhere."""
    seq = _setting(plan, "seq_len")
    return padded_len(n, seq) if _setting(plan, "compile") and seq else n


def mark_iteration() -> None:
    """Tell torch's CUDA-graph trees that a new forward/backward starts: the outputs of the previous one may
    be reused. Without it, a step whose packed rows have a new number of documents (another recorded graph)
    finds the previous one's backward "pending" and re-records instead of replaying (H200, 1.1B, 2x4096:
    38.6k tok/s instead of the uncaptured 49.3k; marked, 70.9k in a later call)."""
    import torch

    mark = getattr(getattr(torch, "compiler", None), "cudagraph_mark_step_begin", None)
    if mark is not None:
        mark()


# --- variable-length attention for packed rows -------------------------------------------------------------
# Packed rows hold several documents; each must attend only within itself. With SDPA that takes a dense
# micro_batch x heads x seq x seq mask, which leaves the flash kernel (H200, 1.1B, 2x4096: 25% slower than
# 8x1024 and +2.0-2.6 GiB, bench/NOTES.md). torch.nn.attention.varlen (torch 2.10+) runs flash attention on
# the documents laid end to end, delimited by cumulative lengths: no mask at all.
# https://docs.pytorch.org/docs/stable/nn.attention.varlen.html
VARLEN = "qdoctor_varlen"  # the name registered with transformers' AttentionInterface
VARLEN_MIN_TORCH = (2, 10)


def varlen_missing(device: str, dtype: str, torch_version: str | None, cc) -> str | None:
    """Why variable-length attention can't be used here, or None when it can (it is then self-checked on
    the device when the model loads). `cc`: the GPU's compute capability tuple, or None if unknown."""
    from packaging.version import InvalidVersion, Version

    if not device.startswith("cuda"):
        return "CPU: variable-length flash attention needs a CUDA GPU"
    try:
        ok = torch_version is not None and Version(torch_version).release[:2] >= VARLEN_MIN_TORCH
    except InvalidVersion:
        ok = False
    if not ok:
        return f"torch {torch_version or '(unknown)'} has no torch.nn.attention.varlen (2.10+)"
    if cc is None or tuple(cc) < (8, 0):
        return "flash attention needs compute capability 8.0 or newer"
    if dtype not in ("bf16", "fp16"):
        return f"flash attention needs bf16 or fp16 compute, not {dtype}"
    return None


def cu_seqlens(position_ids):
    """Cumulative document boundaries of packed rows, from their restarting position ids (a document starts
    where its position is 0; each row starts one). Computed on the host from the collated batch, so no
    device sync. Padded with the total length (empty trailing documents) to a power of two, so compiled
    layers see a handful of shapes instead of one per document count."""
    import torch

    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten().to(torch.int32)
    total = flat.numel()
    n = starts.numel() + 1
    size = 1 << (n - 1).bit_length()
    cu = torch.full((size,), total, dtype=torch.int32)
    cu[: n - 1] = starts
    return cu


def varlen_kwargs(position_ids) -> dict:
    """Keyword arguments that carry packed rows' boundaries through the model to varlen_attention
    (transformers passes unknown model kwargs down to the attention function). The maximum length is
    the row length, an upper bound that stays constant, so compiled layers never recompile for it."""
    cu = cu_seqlens(position_ids)
    return {"cu_seq_lens_q": cu, "max_length_q": int(position_ids.shape[-1])}


def varlen_kwargs_from_mask(attention_mask) -> dict:
    """The same for right-padded rows of one example each: a row is one document and its padding another
    (padding attends only to padding; its labels are ignored), so every row goes to the varlen kernel."""
    import torch

    s = attention_mask.shape[-1]
    idx = torch.arange(s).expand_as(attention_mask)
    lens = attention_mask.sum(-1, keepdim=True)
    return varlen_kwargs(torch.where(idx < lens, idx, idx - lens))


# Whether the kernel takes fewer key/value heads than query heads as they are (flash attention does; some
# torch versions have no `enable_gqa` flag to say so). Set by varlen_self_check, which tries that first:
# repeating the heads instead keeps heads/kv_heads copies of K and V for backward (1.1B, 2x4096: ~1.15 GiB).
_gqa = {"native": False}


def _varlen_fn():
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    return varlen_attn, params


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """transformers attention function (query/key/value: batch x heads x seq x head_dim). Without the
    packed boundaries (an unpacked batch) it is plain causal SDPA: rows are right-padded, so a causal mask
    already keeps real tokens off the padding."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    fn, params = _varlen_fn()
    b, h, s, d = query.shape
    hk = key.shape[1]
    q = query.transpose(1, 2).reshape(b * s, h, d)
    k = key.transpose(1, 2).reshape(b * s, hk, d)
    v = value.transpose(1, 2).reshape(b * s, hk, d)
    kw = {"scale": scaling}
    if "is_causal" in params:
        kw["is_causal"] = True
    else:
        kw["window_size"] = (-1, 0)  # causal: no key after the query
    if hk != h:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        elif not _gqa["native"]:
            k = k.repeat_interleave(h // hk, dim=1)
            v = v.repeat_interleave(h // hk, dim=1)
    cu = cu_seq_lens_q.to(query.device, non_blocking=True)
    m = int(max_length_q or s)
    out = fn(q, k, v, cu, cu, m, m, **kw)
    return out.view(b, s, h, d), None


def register_varlen() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention)


def varlen_self_check(device: str, dtype) -> str | None:
    """Run varlen_attention on two short documents (4 query heads, 2 key/value heads) and compare output
    and gradients with SDPA on each document alone. None when they agree; else what went wrong (the caller
    falls back to SDPA). Where the kernel has no `enable_gqa` flag, unrepeated key/value heads are tried
    first and kept if they pass; else the heads are repeated and checked again."""
    try:
        _, params = _varlen_fn()
    except Exception as e:  # no varlen module in this torch
        return f"variable-length attention failed its self-check: {type(e).__name__}: {str(e)[:160]}"
    if "enable_gqa" not in params:
        _gqa["native"] = True
        if _check_once(device, dtype) is None:
            return None
    _gqa["native"] = False
    return _check_once(device, dtype)


def _check_once(device: str, dtype) -> str | None:
    import torch
    import torch.nn.functional as F

    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        lens = [5, 11]
        s = sum(lens)
        q = torch.randn(1, 4, s, 64, generator=g).to(device, dtype).requires_grad_()
        k = torch.randn(1, 2, s, 64, generator=g).to(device, dtype).requires_grad_()
        v = torch.randn(1, 2, s, 64, generator=g).to(device, dtype).requires_grad_()
        pos = torch.cat([torch.arange(n) for n in lens]).unsqueeze(0)
        out, _ = varlen_attention(None, q, k, v, None, scaling=64**-0.5, **varlen_kwargs(pos))
        w = torch.randn(out.shape, generator=g).to(device, dtype)
        (out * w).sum().backward()
        got = [out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]
        q.grad = k.grad = v.grad = None
        parts, o = [], 0
        for n in lens:
            sl = slice(o, o + n)
            kk = k[:, :, sl].repeat_interleave(2, dim=1)
            vv = v[:, :, sl].repeat_interleave(2, dim=1)
            parts.append(F.scaled_dot_product_attention(q[:, :, sl], kk, vv, is_causal=True).transpose(1, 2))
            o += n
        ref = torch.cat(parts, dim=1)
        (ref * w).sum().backward()
        want = [ref.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]
        for name, a, b in zip(("output", "dq", "dk", "dv"), got, want, strict=True):
            err = (a - b).abs().max().item()
            if not err <= 2e-2 * max(1.0, b.abs().max().item()):
                return f"variable-length attention's {name} differs from SDPA by {err:.3g}"
    except Exception as e:  # a missing kernel, an unsupported head size or dtype: fall back
        return f"variable-length attention failed its self-check: {type(e).__name__}: {str(e)[:160]}"
    return None
