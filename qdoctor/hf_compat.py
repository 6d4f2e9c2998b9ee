"""Arguments whose names changed between transformers releases: one place decides, every caller uses it."""

from __future__ import annotations


def dtype_kwarg(dtype) -> dict:
    """from_pretrained's dtype argument: `dtype` from transformers 4.56 (`torch_dtype` is deprecated there),
    `torch_dtype` before. Older releases pass an unknown `dtype` on to the model's __init__, which raises
    (measured: 4.53.0 and 4.55.4, matrix/verified/linux-x86_64-cpu.json)."""
    import transformers

    release = tuple(int(x) for x in transformers.__version__.split(".")[:2] if x.isdigit())
    return {"dtype": dtype} if release >= (4, 56) else {"torch_dtype": dtype}
