"""The run summary (summary.json, --json) and the loss-curve PNG."""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

from qdoctor import strict_json
from qdoctor.atomic import write_text

SUMMARY_SCHEMA = "qdoctor.train/1"
FINAL_LOSS_STEPS = 5  # final_loss is the mean of the last steps: one step's loss is noisy


def peak_memory_gib(device: str) -> dict:
    out = {"host_rss_gib": None, "device_gib": None}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out["host_rss_gib"] = round(rss / (1024**3 if sys.platform == "darwin" else 1024**2), 3)
    if device.startswith("cuda"):
        import torch

        out["device_gib"] = round(torch.cuda.max_memory_allocated(torch.device(device)) / 1024**3, 3)
    return out


def build(
    *, plan, fingerprint, history, run, wall_s, status, output, adapter_dir, first_eval, data=None,
    timings=None,
) -> dict:
    """`timings`: where this process's wall time went (qdoctor.train.timings), or None."""
    losses = [h["loss"] for h in history if h.get("loss") is not None]
    evals = [h["eval_loss"] for h in history if h.get("eval_loss") is not None]
    tail = losses[-FINAL_LOSS_STEPS:]
    return {
        "schema": SUMMARY_SCHEMA,
        "status": status,
        "output": str(output),
        "adapter": str(adapter_dir) if adapter_dir else None,
        "environment_fingerprint": fingerprint,
        "steps": run.step,
        "first_loss": losses[0] if losses else None,
        "final_loss": sum(tail) / len(tail) if tail else None,
        "final_loss_note": f"mean of the last {len(tail)} steps" if len(tail) > 1 else "the last step",
        "first_eval_loss": first_eval,
        "final_eval_loss": evals[-1] if evals else None,
        "train_time_s": round(run.elapsed, 3),
        "wall_time_s": round(wall_s, 3),
        "timings": timings,
        "tokens": run.tokens,
        "tokens_per_s": round(run.tokens / run.elapsed, 1) if run.elapsed else None,
        "peak_memory": peak_memory_gib(plan.device.value),
        "micro_batch_final": run.micro,
        "skipped_steps": run.skipped,
        "data": data,
        "plan": plan.to_dict(),
    }


def write(output: Path, summary: dict) -> None:
    write_text(Path(output) / "summary.json", strict_json.dumps(summary, indent=2) + "\n")


def plot(output: Path, history: list) -> Path | None:
    """loss.png: training loss per step and the held-out loss."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # plotting is a convenience; never fail a run for it
        return None
    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, [h["loss"] for h in history], label="train")
    ev = [(h["step"], h["eval_loss"]) for h in history if h.get("eval_loss") is not None]
    if ev:
        ax.plot(*zip(*ev, strict=True), "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(output) / "loss.png"
    tmp = path.with_name(".loss.png.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path
