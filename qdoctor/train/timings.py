"""Where a run's wall time went: start-up, model load, training steps, evaluation, checkpoint writes, and how
much of a step is the host's own work.

A step's host time is its wall time less the time spent blocked in the step's one device sync (the loss and
gradient norm read back, qdoctor.train.loop.train_step): what Python, the launches and the data take. On the
CPU nothing runs asynchronously, so it is the whole step. When it is close to the step time on a GPU, the GPU
waits on Python (a small model), and a faster GPU will not make the run faster.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class Timings:
    """Seconds spent in this process (a resumed run counts only its own)."""

    startup_s: float = 0.0  # from the command's start to the model load: imports, setup, pre-flight, plan
    load_s: float = 0.0
    eval_s: float = 0.0
    checkpoint_s: float = 0.0  # checkpoints and the final adapter
    step_s: list = field(default_factory=list)  # each optimizer step: train_step, metrics and progress
    wait_s: list = field(default_factory=list)  # of which blocked waiting on the device

    @contextmanager
    def phase(self, name: str):
        """Add the time spent inside the block to `<name>_s`."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, f"{name}_s", getattr(self, f"{name}_s") + time.perf_counter() - t0)

    def add_step(self, step_s: float, wait_s: float) -> None:
        self.step_s.append(step_s)
        self.wait_s.append(min(wait_s, step_s))

    def to_dict(self, wall_s: float) -> dict:
        """The summary's `timings`; `other_s` is the rest of the wall time (run directory, optimizer set-up,
        summary), so the parts add up to `wall_s`."""
        train_s = sum(self.step_s)
        parts = {
            "startup_s": self.startup_s,
            "load_s": self.load_s,
            "train_s": train_s,
            "eval_s": self.eval_s,
            "checkpoint_s": self.checkpoint_s,
        }
        host = [s - w for s, w in zip(self.step_s, self.wait_s, strict=True)]
        return {
            **{k: round(v, 3) for k, v in parts.items()},
            "other_s": round(max(0.0, wall_s - sum(parts.values())), 3),
            "steps": len(self.step_s),
            "median_step_s": round(statistics.median(self.step_s), 4) if self.step_s else None,
            "host_s_per_step": round(statistics.median(host), 4) if host else None,
        }


def describe(t: dict) -> str:
    """One line for the text summary."""
    if not t:
        return ""
    line = (f"time: start-up {t['startup_s']:.1f} s, model load {t['load_s']:.1f} s, {t['steps']} steps "
            f"{t['train_s']:.1f} s, eval {t['eval_s']:.1f} s, checkpoints {t['checkpoint_s']:.1f} s")
    if t.get("median_step_s"):
        step, host = t["median_step_s"], t["host_s_per_step"]
        line += f"; a step {step * 1000:.0f} ms, {host * 1000:.0f} ms of it on the host ({host / step:.0%})"
    return line
