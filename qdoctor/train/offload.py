"""Gradient checkpointing with each decoder layer's input kept in pinned host memory instead of the GPU.

With checkpointing, what stays on the GPU per token is each layer's input (2 x hidden bytes in bf16: 256 KB
per token on a 6.7B Llama) plus the one layer being recomputed. Moving the inputs to host memory leaves only
the recomputed layer; each is copied back when backward reaches its layer. Unsloth's "unsloth" checkpointing
does the same (https://unsloth.ai/blog/long-context).

How: a `saved_tensors_hooks` pair entered around each layer's checkpoint call. Non-reentrant checkpointing
(torch.utils.checkpoint, use_reentrant=False) saves the layer's inputs *before* it pushes its own hooks
(`_NoopSaveInputs.apply` up to torch 2.11, `_make_saved_tensor` in 2.13), and the innermost hooks win, so
the hooks here see exactly the saved inputs while the checkpoint still handles everything inside the layer.
Both copies are `non_blocking` on the current stream: the device-to-host copy is ordered after the kernel
that made the tensor and before any reuse of its GPU memory; the host-to-device copy before the recompute
that reads it; torch keeps the pinned block until its copy has finished.

Kept as they are: tensors on another device, small ones, parameters, and tensors that need no gradient.
The last are inputs every layer shares (RoPE tables, attention masks, position ids): one copy on the GPU
serves all layers, while offloading would put one copy per layer in host memory. transformers passes them
as keyword arguments, bound outside the checkpoint, so today the hooks see only the hidden state (the one
input that differs per layer, and carries gradient); the rule keeps it so for a layer that passes them
positionally.

Nothing here imports torch at import time.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

MIN_BYTES = 1 << 20  # smaller tensors are not worth a copy each way


@dataclass
class Stats:
    """What the hooks moved: tensors and bytes packed to host memory since the last reset."""

    layers: int = 0
    tensors: int = 0
    bytes: int = 0

    def reset(self) -> None:
        self.tensors = self.bytes = 0


def offloadable(x, device_type: str, min_bytes: int) -> bool:
    import torch

    return (x.device.type == device_type and x.requires_grad and not isinstance(x, torch.nn.Parameter)
            and x.numel() * x.element_size() >= min_bytes and x.layout == torch.strided)


def hooks(device_type: str = "cuda", min_bytes: int = MIN_BYTES, stats: Stats | None = None):
    """The saved_tensors_hooks context: pack copies an offloadable tensor into host memory (pinned when the
    device is a GPU), unpack copies it back to the device it came from."""
    import torch

    pin = device_type != "cpu"

    def pack(x):
        if not offloadable(x, device_type, min_bytes):
            return x
        host = torch.empty(x.size(), dtype=x.dtype, pin_memory=pin)  # contiguous, as torch's save_on_cpu
        host.copy_(x, non_blocking=pin)
        if stats is not None:
            stats.tensors += 1
            stats.bytes += host.numel() * host.element_size()
        return _Packed(x.device, host)

    def unpack(p):
        if isinstance(p, _Packed):
            return p.host.to(p.device, non_blocking=pin)
        return p

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


class _Packed:
    __slots__ = ("device", "host")

    def __init__(self, device, host):
        self.device = device
        self.host = host


def offloading(checkpoint_fn, device_type: str = "cuda", min_bytes: int = MIN_BYTES,
               stats: Stats | None = None):
    """`checkpoint_fn` (a checkpoint function, called as fn(function, *args)) with the inputs it saves held
    in host memory."""

    @functools.wraps(checkpoint_fn)
    def wrapped(function, *args, **kwargs):
        with hooks(device_type, min_bytes, stats):
            return checkpoint_fn(function, *args, **kwargs)

    wrapped.qdoctor_offload = True
    wrapped.qdoctor_stats = stats
    return wrapped


def stats_of(model) -> Stats | None:
    """The Stats `enable` returned for this model (None when its layers are not offloading)."""
    for m in model.modules():
        stats = getattr(getattr(m, "_gradient_checkpointing_func", None), "qdoctor_stats", None)
        if stats is not None:
            return stats
    return None


def _non_reentrant(fn) -> bool:
    """transformers sets functools.partial(checkpoint, use_reentrant=...) (or a wrapper around it)."""
    from torch.utils.checkpoint import checkpoint

    while isinstance(fn, functools.partial):
        if fn.keywords.get("use_reentrant") is True:
            return False
        if fn.func is checkpoint:
            return fn.keywords.get("use_reentrant") is False
        fn = fn.func
    return False


def enable(model, device_type: str = "cuda", min_bytes: int = MIN_BYTES) -> Stats:
    """Wrap the checkpoint function of every checkpointed decoder layer (transformers'
    GradientCheckpointingLayer, after gradient_checkpointing_enable with use_reentrant=False). Raises
    ModelError when there is nothing to wrap or the function is not non-reentrant checkpointing: the
    layer inputs would silently stay on the GPU."""
    from qdoctor.train.model import ModelError

    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers < 4.52
        raise ModelError("offloaded checkpointing needs transformers' GradientCheckpointingLayer "
                         "(transformers >= 4.52); use --gradient-checkpointing on") from None
    stats = Stats()
    layers = [m for m in model.modules()
              if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    for layer in layers:
        fn = getattr(layer, "_gradient_checkpointing_func", None)
        if getattr(fn, "qdoctor_offload", False):  # enabled twice: wrap the checkpoint function once
            fn = fn.__wrapped__
        if fn is None or not _non_reentrant(fn):
            raise ModelError(f"offloaded checkpointing: layer {type(layer).__name__} does not use "
                             "non-reentrant torch.utils.checkpoint; use --gradient-checkpointing on")
        layer._gradient_checkpointing_func = offloading(fn, device_type, min_bytes, stats)
        stats.layers += 1
    if not layers:
        name = type(model.get_base_model() if hasattr(model, "get_base_model") else model).__name__
        raise ModelError(f"offloaded checkpointing: {name} has no checkpointed decoder layers "
                         "(GradientCheckpointingLayer); use --gradient-checkpointing on")
    return stats
