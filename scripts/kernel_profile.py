"""Where a training script's GPU time goes, by kernel: runs any training script under torch.profiler for a few
optimizer steps and writes the kernels' device time, so two trainers can be compared kernel by kernel.

    python scripts/kernel_profile.py --out k.json [--skip 4 --active 3] -- script.py ARGS...
    python scripts/kernel_profile.py --out k.json -m qdoctor -- train --skip-probes --output /tmp/run

Step boundaries come from torch's global optimizer-step hook, so the script needs no change (the peer loops
are measuring instruments and stay as they are). The first --skip steps (compilation, warm-up) are not
recorded; the next --active steps are, and the figures are per step.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
from collections import defaultdict

ANNOTATIONS = ("ProfilerStep", "Optimizer.step#", "Optimizer.zero_grad#")


def _kind(name: str) -> str:
    """A coarse family for a kernel name, so tables from different trainers line up."""
    n = name.lower()
    for key, words in (
        ("attention", ("flash", "fmha", "attention", "sdpa")),
        ("dequant 4-bit", ("dequantize", "kdequant", "nf4")),
        ("optimizer", ("optimizer", "adam", "paged")),
        ("matmul", ("gemm", "sm90_xmma", "cutlass", "cublas", "nvjet", "wgmma", "matmul")),
        ("triton (fused)", ("triton",)),
        ("copy/cast", ("copy", "cast", "convert")),
        ("elementwise/reduce", ("elementwise", "reduce", "vectorized")),
    ):
        if any(w in n for w in words):
            return key
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--skip", type=int, default=4, help="optimizer steps before recording")
    ap.add_argument("--active", type=int, default=3, help="optimizer steps recorded")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("-m", dest="module", help="run this module as `python -m` would, instead of a script")
    ap.add_argument("script", nargs="?")
    ap.add_argument("args", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    if a.module and a.script:
        a.args, a.script = [a.script, *a.args], None
    elif not a.module and not a.script:
        ap.error("give a script, or -m MODULE")

    import time

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile, schedule

    state = {"steps": 0, "done": False, "t": []}

    def report(p) -> None:
        if state["done"]:
            return
        state["done"] = True
        per = defaultdict(float)
        kinds = defaultdict(float)
        count = defaultdict(int)
        host = {"top_level_ops": 0, "kernels": 0, "optimizer_cpu_us": 0.0}
        for e in p.events() or []:
            on_gpu = getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
            nested = e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::")
            if not on_gpu and e.name.startswith("aten::") and not nested:
                host["top_level_ops"] += 1
            if not on_gpu and e.name.startswith("Optimizer.step#"):
                host["optimizer_cpu_us"] += e.cpu_time_total
            # the GPU-side copies of annotated ranges (ProfilerStep#, Optimizer.step#...) span kernels that
            # are counted on their own: adding them would count that time twice
            annotation = getattr(e, "is_user_annotation", False) or e.name.startswith(ANNOTATIONS)
            if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA and not annotation:
                us = e.device_time if hasattr(e, "device_time") else e.cuda_time
                per[e.name] += us
                count[e.name] += 1
                host["kernels"] += 1
                kinds[_kind(e.name)] += us
        total = sum(per.values())
        ts = state["t"]
        rows = sorted(per.items(), key=lambda kv: -kv[1])[: a.top]
        doc = {"script": a.script, "module": a.module, "args": a.args, "active_steps": a.active,
               "gpu_ms_per_step": round(total / 1000 / a.active, 2),
               "wall_ms_per_step": round(1000 * (ts[-1] - ts[-1 - a.active]) / a.active, 2)
               if len(ts) > a.active else None,
               # the host's share: dispatched ops and kernel launches per step, and the optimizer's
               # CPU time (for a small model the step is bound by these, not by the GPU)
               "top_level_ops_per_step": round(host["top_level_ops"] / a.active),
               "kernels_per_step": round(host["kernels"] / a.active),
               "optimizer_cpu_ms_per_step": round(host["optimizer_cpu_us"] / 1000 / a.active, 2),
               "by_kind_ms_per_step": {k: round(v / 1000 / a.active, 2)
                                       for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
               "kernels": [{"name": n[:160], "ms_per_step": round(v / 1000 / a.active, 3),
                            "calls_per_step": count[n] / a.active} for n, v in rows]}
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"[kernel_profile] {doc['gpu_ms_per_step']} ms of GPU time per step: "
              f"{doc['by_kind_ms_per_step']}", file=sys.stderr, flush=True)

    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], on_trace_ready=report,
                   schedule=schedule(wait=a.skip, warmup=1, active=a.active, repeat=1))

    def on_step(_opt, _args, _kwargs) -> None:
        state["steps"] += 1
        state["t"].append(time.perf_counter())
        if not state["done"]:
            prof.step()

    register_optimizer_step_post_hook(on_step)
    prof.start()
    sys.argv = [a.script or a.module, *a.args]
    try:
        if a.module:
            runpy.run_module(a.module, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(a.script, run_name="__main__")
    finally:
        prof.stop()


if __name__ == "__main__":
    main()
