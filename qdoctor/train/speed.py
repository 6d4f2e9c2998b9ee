"""Optional speed means for the training path. Each one is detected, then applied; none is required.

- fused kernels from liger-kernel (RMSNorm, SwiGLU, RoPE, and a fused linear + cross-entropy that never
  materialises the full-vocabulary logits): https://github.com/linkedin/Liger-Kernel
- torch.compile of each decoder layer (one graph reused by every layer)

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


def compile_layers(model) -> int:
    """torch.compile each decoder layer in place; returns how many. Parameters are graph inputs (not
    guards), so all layers share one compiled graph instead of recompiling per layer."""
    import torch

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=False)
    return len(layers)
