"""Run a Python script with its GPU memory capped: `python scripts/mem_cap.py GIB SCRIPT [ARGS...]`.

Sets torch.cuda.set_per_process_memory_fraction(GIB / the GPU's total) on GPU 0, then runs SCRIPT as
__main__ with ARGS as its argv, in this process. The benchmark (scripts/bench_train.py --mem-cap) measures
every contender under the same cap this way, the peer loops included, without editing them. The cap limits
what torch's caching allocator may reserve: an allocation past it raises torch.OutOfMemoryError as a full GPU
would. Memory outside that allocator (the CUDA context, cudaMallocManaged pages of paged optimizers) is not
capped.
"""

from __future__ import annotations

import os
import runpy
import sys

GIB = 1024**3


def fraction(cap_gib: float, total_bytes: int) -> float:
    """The share of the GPU that is `cap_gib`, at most the whole of it."""
    if cap_gib <= 0:
        raise ValueError(f"memory cap must be positive, got {cap_gib}")
    return min(1.0, cap_gib * GIB / total_bytes)


def _gpu_total_bytes() -> int | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory


def _set_fraction(frac: float) -> None:
    import torch

    torch.cuda.set_per_process_memory_fraction(frac, 0)


def apply(cap_gib: float) -> float | None:
    """Cap this process's GPU 0 at `cap_gib`; the fraction set, or None without a GPU (nothing to cap)."""
    total = _gpu_total_bytes()
    if total is None:
        return None
    frac = fraction(cap_gib, total)
    _set_fraction(frac)
    return frac


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        raise SystemExit("usage: mem_cap.py GIB SCRIPT [ARGS...]")
    try:
        cap = float(argv[0])
    except ValueError:
        raise SystemExit(f"mem_cap.py: {argv[0]!r} is not a number of GiB") from None
    apply(cap)
    script, args = argv[1], argv[2:]
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python SCRIPT` would have it
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
