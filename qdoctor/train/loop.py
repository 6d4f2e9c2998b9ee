"""The training loop: it executes the plan and never looks at the hardware itself.

setup (cli) -> fit() loops -> evaluate() measures. One optimizer step = `batch` examples split into
`grad_accum` micro-batches of `micro_batch`; the loss is normalised by the step's label-token count, so
splitting a step differently (the out-of-memory back-off) gives the same gradient.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from qdoctor.findings import Finding
from qdoctor.train import checkpoint
from qdoctor.train.data import IGNORE, collate, step_indices


class StopRun(Exception):
    """The run stopped with a diagnosis (a Finding); the CLI prints it and exits 1."""

    def __init__(self, finding: Finding):
        super().__init__(finding.title)
        self.finding = finding


class Interrupted(Exception):
    def __init__(self, step: int):
        super().__init__(f"interrupted at step {step}")
        self.step = step


def is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e)
    )


def smaller_micro(batch: int, micro: int) -> int:
    """Half the micro-batch (or the next divisor of the batch), so the effective batch is unchanged."""
    for d in range(micro // 2, 0, -1):
        if batch % d == 0:
            return d
    return 1


def with_oom_backoff(step_fn, batch: int, micro: int, notify, oom=is_oom, after_oom=None):
    """Run step_fn(micro, accum); on out-of-memory halve the micro-batch, double the accumulation, retry.

    Returns (result, micro). At micro-batch 1 the error becomes a StopRun with a fix.
    """
    while True:
        try:
            return step_fn(micro, batch // micro), micro
        except Exception as e:
            if not oom(e):
                raise
            if after_oom:
                after_oom()
            if micro == 1:
                raise StopRun(
                    Finding(
                        "QD803",
                        "error",
                        "out of memory even at micro-batch 1",
                        [str(e).splitlines()[0][:200]],
                        'turn on gradient checkpointing (--config with gradient_checkpointing = "on"), lower '
                        "--seq-len, or use --optimizer cpu_adamw",
                        "plan",
                    )
                ) from None
            new = smaller_micro(batch, micro)
            notify(
                f"out of memory at micro-batch {micro}: retrying with micro-batch {new} x accumulation "
                f"{batch // new} (same effective batch {batch})"
            )
            micro = new


def diagnose_nonfinite(step: int, loss: float, dtype: str, lr: float, last_finite: float | None) -> Finding:
    fixes = [f"lower the learning rate (--lr {lr / 10:g})"]
    if dtype == "fp16":
        fixes.insert(
            0, "use bf16 instead of fp16 where the GPU supports it, else fp32 (fp16 overflows; trl #618)"
        )
    fixes.append("check the data for degenerate examples")
    ev = [f"loss {loss} at step {step}", f"compute dtype {dtype}, lr {lr:g}"]
    if last_finite is not None:
        ev.append(f"last finite loss {last_finite:.4f}")
    return Finding(
        "QD802",
        "error",
        f"loss became {'NaN' if math.isnan(loss) else 'inf'} at step {step}",
        ev,
        "; or ".join(fixes),
        "plan",
    )


@dataclass
class Run:
    model: object
    optimizer: object
    scheduler: object
    scaler: object
    train: list
    eval: list
    plan: object
    output: Path
    seed: int
    pad_id: int
    device: str
    autocast_dtype: object
    log: object = print  # stderr notices
    step: int = 0
    micro: int = 1
    tokens: int = 0
    elapsed: float = 0.0
    history: list = field(default_factory=list)
    stop_requested: bool = False
    stop_after: int | None = None  # tests: behave as if Ctrl-C came right after this step


def forward_loss(run: Run, batch: dict, n_label_tokens: int):
    import torch

    batch = {k: v.to(run.device) for k, v in batch.items()}
    with torch.autocast(
        run.device.split(":")[0], dtype=run.autocast_dtype, enabled=run.plan.v("dtype") != "fp32"
    ):
        out = run.model(**batch)
    n = int((batch["labels"][:, 1:] != IGNORE).sum())
    return out.loss.float() * (n / n_label_tokens)


def train_step(run: Run, examples: list, micro: int, accum: int) -> tuple[float, int]:
    import torch

    run.optimizer.zero_grad(set_to_none=True)
    n_label = sum(sum(1 for x in b[1:] if x != IGNORE) for _, b, *_ in examples)
    total = 0.0
    for i in range(accum):
        loss = forward_loss(run, collate(examples[i * micro : (i + 1) * micro], run.pad_id), n_label)
        total += loss.item()
        if not math.isfinite(total):
            return total, 0
        run.scaler.scale(loss).backward()
    run.scaler.unscale_(run.optimizer)
    params = [p for p in run.model.parameters() if p.requires_grad]
    gn = torch.nn.utils.clip_grad_norm_(params, run.plan.v("max_grad_norm"))
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    return total, float(gn)


def evaluate(run: Run) -> float | None:
    import torch

    if not run.eval:
        return None
    run.model.eval()
    n_label = sum(sum(1 for x in b[1:] if x != IGNORE) for _, b, *_ in run.eval)
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(run.eval), run.micro):
            total += forward_loss(run, collate(run.eval[i : i + run.micro], run.pad_id), n_label).item()
    run.model.train()
    return total


def save_checkpoint(run: Run) -> None:
    checkpoint.save(
        run.output,
        run.model,
        run.optimizer,
        run.scheduler,
        run.scaler,
        {
            "step": run.step,
            "micro_batch": run.micro,
            "tokens": run.tokens,
            "elapsed_s": run.elapsed,
            "examples_seen": run.step * run.plan.v("batch_size"),
        },
    )


def _metric(run: Run, rec: dict) -> None:
    run.history.append(rec)
    with open(run.output / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(rec) + "\n")


def fit(run: Run, progress) -> None:
    batch, steps = run.plan.v("batch_size"), run.plan.v("max_steps")
    eval_every, save_every = run.plan.v("eval_every"), run.plan.v("save_every")
    last_finite = None
    prev = (
        signal.signal(signal.SIGINT, lambda *_: setattr(run, "stop_requested", True))
        if _main_thread()
        else None
    )
    try:
        run.model.train()
        while run.step < steps:
            if run.stop_requested:
                save_checkpoint(run)
                raise Interrupted(run.step)
            t0 = time.perf_counter()
            examples = [run.train[i] for i in step_indices(len(run.train), batch, run.step, run.seed)]
            (loss, gnorm), run.micro = with_oom_backoff(
                lambda m, a, ex=examples: train_step(run, ex, m, a),
                batch,
                run.micro,
                run.log,
                after_oom=_free,
            )
            if not math.isfinite(loss):
                raise StopRun(
                    diagnose_nonfinite(
                        run.step + 1, loss, run.plan.v("dtype"), run.scheduler.get_last_lr()[0], last_finite
                    )
                )
            last_finite = loss
            run.step += 1
            ntok = sum(len(x[0]) for x in examples)
            dt = time.perf_counter() - t0
            run.tokens += ntok
            run.elapsed += dt
            rec = {
                "step": run.step,
                "loss": round(loss, 6),
                "lr": run.scheduler.get_last_lr()[0],
                "grad_norm": round(gnorm, 6),
                "tokens": ntok,
                "tokens_per_s": round(ntok / dt, 1),
                "micro_batch": run.micro,
                "elapsed_s": round(run.elapsed, 3),
            }
            if run.step % eval_every == 0 or run.step == steps:
                rec["eval_loss"] = evaluate(run)
            _metric(run, rec)
            progress(run, rec)
            if run.step % save_every == 0 and run.step < steps:
                save_checkpoint(run)
            if run.stop_after is not None and run.step >= run.stop_after:
                run.stop_requested = True
        save_checkpoint(run)
    finally:
        if prev is not None:
            signal.signal(signal.SIGINT, prev)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _free() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def truncate_metrics(output: Path, step: int) -> list:
    """On resume: drop metric lines written after the checkpoint (they will be produced again)."""
    path = Path(output) / "metrics.jsonl"
    keep = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("step", 0) <= step:
                keep.append(rec)
    from qdoctor.atomic import write_text

    write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
    return keep


def progress_bar(stream=None):
    """Loss, tokens/s and ETA on stderr; a carriage-return bar on a terminal, a line every ~10% otherwise."""
    stream = stream or sys.stderr
    tty = hasattr(stream, "isatty") and stream.isatty()

    def show(run: Run, rec: dict) -> None:
        steps = run.plan.v("max_steps")
        rate = run.tokens / run.elapsed if run.elapsed else 0.0
        eta = run.elapsed / max(1, len([h for h in run.history if "loss" in h])) * (steps - run.step)
        eta = min(eta, run.elapsed / max(run.step, 1) * (steps - run.step))
        width = 24
        done = int(width * run.step / steps)
        ev = f" eval {rec['eval_loss']:.3f}" if rec.get("eval_loss") is not None else ""
        line = (
            f"[{'#' * done}{'.' * (width - done)}] step {run.step}/{steps} loss {rec['loss']:.4f}{ev} "
            f"{rate:,.0f} tok/s ETA {int(eta) // 60}:{int(eta) % 60:02d}"
        )
        if tty:
            stream.write("\r" + line + ("\n" if run.step == steps else ""))
        elif run.step == steps or run.step % max(1, steps // 10) == 0 or run.step == 1 or ev:
            stream.write(line + "\n")
        stream.flush()

    return show
