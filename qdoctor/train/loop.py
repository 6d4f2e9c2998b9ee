"""The training loop: it executes the plan and never looks at the hardware itself.

setup (cli) -> fit() loops -> evaluate() measures. One optimizer step = `batch` examples split into
`grad_accum` micro-batches of `micro_batch`; the loss is normalised by the step's label-token count, so
splitting a step differently (the out-of-memory back-off, a new --micro-batch on resume) gives the same
gradient. With several processes (qdoctor.train.distributed) each takes a disjoint slice of every step's
examples and the label tokens are counted over all of them, so N processes compute the gradient one process
computes for the same batch; only rank 0 writes (metrics, checkpoints), the others wait at a barrier.

Nothing non-finite reaches the weights or a checkpoint: a step whose gradient norm is NaN or inf is skipped
(counted, and marked in metrics.jsonl); a few in a row stop the run (QD804); a NaN loss stops it (QD802); and
a checkpoint is written only when every trainable tensor is finite. SIGINT and SIGTERM both end the run at
the next step boundary with a checkpoint.

The host reads a device value once per optimizer step (the micro-batch losses and the gradient norm, together)
and once per evaluation: every read waits for the GPU to finish what was queued, and on a small model those
waits, not the GPU, set the pace. metrics.jsonl is appended every METRICS_FLUSH_S seconds, and always before a
checkpoint is written and when the loop ends (a resume keeps the lines up to its checkpoint).
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from qdoctor import strict_json
from qdoctor.findings import Finding
from qdoctor.train import checkpoint, speed
from qdoctor.train import distributed as dist_
from qdoctor.train.data import IGNORE, collate, step_indices
from qdoctor.train.distributed import World
from qdoctor.train.plan import Plan
from qdoctor.train.timings import Timings


class StopRun(Exception):
    """The run stopped with a diagnosis (a Finding); the CLI prints it and exits 1."""

    def __init__(self, finding: Finding):
        super().__init__(finding.title)
        self.finding = finding


class RankStopped(StopRun):
    """One rank of several must stop on its own (the others wait in a collective it will not join): the CLI
    reports it from that rank and exits at once, so that torchrun stops the others."""


class Interrupted(Exception):
    def __init__(self, step: int, signame: str = "SIGINT"):
        super().__init__(f"interrupted ({signame}) at step {step}")
        self.step = step
        self.signame = signame


STOP_SIGNALS = ("SIGINT", "SIGTERM")  # Ctrl-C; what CI runners, schedulers and `docker stop` send
MAX_SKIPS_IN_ROW = 3  # non-finite gradient norms in a row before the run stops
MAX_SKIPS_IN_ROW_SCALED = 20  # fp16: the loss scaler halves its scale on each; 20 halvings leave 2**-4
METRICS_FLUSH_S = 2.0  # metrics.jsonl lags the run by at most this (plus one step) for someone tailing it


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


def oom_fix(checkpointing=False, device: str = "cuda") -> str:
    """What to change after out-of-memory at micro-batch 1, from what the run already does: checkpointing
    first, then (on a GPU) the layer inputs in host memory, then shorter sequences or a CPU-side optimizer."""
    rest = "lower --seq-len, or use --optimizer cpu_adamw"
    if not checkpointing:
        return f"turn on gradient checkpointing (--gradient-checkpointing on), {rest}"
    if checkpointing != "offload" and device.startswith("cuda"):
        return ("keep each layer's input in host memory (--gradient-checkpointing offload: 2 x hidden bytes "
                f"per token per layer leave the GPU), {rest}")
    return rest[0].upper() + rest[1:]


def with_oom_backoff(step_fn, batch: int, micro: int, notify, oom=is_oom, after_oom=None, fix=None):
    """Run step_fn(micro, accum); on out-of-memory halve the micro-batch, double the accumulation, retry.

    Returns (result, micro). At micro-batch 1 the error becomes a StopRun with a fix (`fix()`, or oom_fix()'s
    for a run without checkpointing).
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
                        fix() if fix else oom_fix(),
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


def diagnose_nonfinite_grad(
    step: int, in_row: int, dtype: str, lr: float, what: str = "gradient norm"
) -> Finding:
    """QD804: steps were skipped (nothing applied), the last checkpoint holds finite weights."""
    fixes = [f"lower the learning rate (--lr {lr / 10:g})", "lower --max-grad-norm"]
    if dtype == "fp16":
        fixes.insert(0, "use bf16 where the GPU supports it, else fp32 (fp16 overflows; trl #618)")
    return Finding(
        "QD804",
        "error",
        f"{what} not finite at step {step} ({in_row} step{'s' if in_row != 1 else ''} in a row skipped)",
        [f"compute dtype {dtype}, lr {lr:g}", "skipped steps applied nothing; the last checkpoint is finite"],
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
    plan: Plan
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
    stop_requested: str | None = None  # the name of the signal that asked the run to stop
    stop_after: int | None = None  # tests: behave as if Ctrl-C came right after this step
    skipped: int = 0  # steps skipped for a non-finite gradient norm
    skipped_in_row: int = 0
    log_every: int | None = None  # progress line every N steps off a terminal
    report: object = None  # a train.report_to writer (--report-to), or None
    world: World = dist_.SINGLE  # this process's place among the run's processes
    timings: Timings = field(default_factory=Timings)
    wait_s: float = 0.0  # this step's time blocked on the device (in the one read-back)
    pending: list = field(default_factory=list)  # metric lines not yet appended to metrics.jsonl
    flushed_at: float = field(default_factory=time.perf_counter)

    @property
    def core(self):
        """The peft model (inside the DDP or FSDP wrapper when there is one): what is saved and evaluated."""
        return dist_.unwrap(self.model)

    @property
    def sharded(self) -> bool:
        return self.plan.parallel.value.strategy == "fsdp"


def forward_loss(run: Run, batch: dict, weight: float):
    """The micro-batch's mean token loss times `weight` (its share of the step's label tokens, counted on the
    host from the examples: counting the device tensor would wait for the GPU). A tensor on the device."""
    import torch

    # the config of the model inside any DDP/FSDP wrapper (which has none of its own); a toy model has none
    if getattr(getattr(run.core, "config", None), "_attn_implementation", None) == speed.VARLEN:
        pos = batch.get("position_ids")  # document boundaries, from the host
        extra = speed.varlen_kwargs(pos) if pos is not None else speed.varlen_kwargs_from_mask(
            batch["attention_mask"])
        batch = {**batch, **extra}
    batch = to_device(batch, run.device)
    if speed.uses_cudagraphs(run.plan):  # each forward (and its backward) is one iteration of the graphs
        speed.mark_iteration()
    with torch.autocast(
        run.device.split(":")[0], dtype=run.autocast_dtype, enabled=run.plan.dtype.value != "fp32"
    ):
        out = run.model(**batch)
    return out.loss.float() * weight


def to_device(batch: dict, device: str) -> dict:
    """The micro-batch's tensors on the device. On a GPU they go through pinned memory without blocking:
    torch's copy from pageable memory waits for everything queued on the stream first (a hidden sync per
    tensor), so the host could not prepare a micro-batch while the GPU computes the one before."""
    if not device.startswith("cuda"):
        return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
    out = {}
    for k, v in batch.items():
        if not hasattr(v, "pin_memory"):
            out[k] = v
            continue
        try:
            out[k] = v.pin_memory().to(device, non_blocking=True)
        except RuntimeError:  # no page-locked memory to be had: the blocking copy
            out[k] = v.to(device)
    return out


def _collate(run: Run, examples: list) -> dict:
    return collate(examples, run.pad_id, lambda n: speed.row_length(run.plan, n))


def _label_tokens(examples) -> int:
    return sum(sum(1 for x in b[1:] if x != IGNORE) for _, b, *_ in examples)


def train_step(run: Run, examples: list, micro: int, accum: int) -> tuple[float, float]:
    """(loss, gradient norm) of one step; `examples` are this process's share of it. A non-finite norm means
    the update was skipped: nothing was applied. With several processes the gradients are all-reduced once,
    after the last micro-batch; DDP averages them over the ranks, hence the loss x world size, which makes the
    average the sum: the gradient of (the step's summed token losses / its label tokens on all ranks).
    The host waits for the device once, in read_back (with fp16 loss scaling the scaler's step reads its
    found-inf flag too: a second wait, torch's)."""
    import torch

    if micro * accum != len(examples):  # config validation guarantees it: never train a partial step
        raise AssertionError(f"micro-batch {micro} x {accum} != {len(examples)} examples in the step")
    world = run.world
    run.optimizer.zero_grad(set_to_none=True)
    chunks = [examples[i * micro : (i + 1) * micro] for i in range(accum)]
    counts = [_label_tokens(c) for c in chunks]
    n_label = dist_.sum_(world, sum(counts))
    scale = world.size  # DDP's all-reduce and FSDP's reduce-scatter both divide by the world size
    losses = []
    for i, chunk in enumerate(chunks):
        with dist_.no_sync(run.model, last=i == accum - 1):
            loss = forward_loss(run, _collate(run, chunk), counts[i] / n_label)
            losses.append(loss.detach())
            run.scaler.scale(loss * scale if scale > 1 else loss).backward()
    run.scaler.unscale_(run.optimizer)
    params = [p for p in run.model.parameters() if p.requires_grad]  # (a flat layout's views: the same norm)
    if hasattr(run.model, "clip_grad_norm_"):  # FSDP: each rank holds a shard; the norm is a collective
        gn = run.model.clip_grad_norm_(run.plan.max_grad_norm.value)
    else:
        gn = torch.nn.utils.clip_grad_norm_(params, run.plan.max_grad_norm.value)
    *parts, gn = read_back(run, [*losses, gn])
    total = 0.0
    for x in parts:  # summed in order, as each micro-batch's loss came: the same float, and the same
        total += x  # first non-finite value, that reading them one by one gave
        if not math.isfinite(total) and not world.several:
            run.optimizer.zero_grad(set_to_none=True)  # a non-finite loss applies nothing; the run stops
            return total, 0  # (with several processes every rank must reach the all-reduce below)
    total = dist_.sum_(world, total)
    if math.isfinite(gn):
        run.scaler.step(run.optimizer)
    else:
        run.optimizer.zero_grad(set_to_none=True)  # skipped: the NaN/inf gradient never reaches the weights
    run.scaler.update()  # with fp16 loss scaling, a skipped step lowers the scale
    with warnings.catch_warnings():  # torch warns when a skipped first step leaves the optimizer unstepped
        warnings.simplefilter("ignore", UserWarning)
        run.scheduler.step()  # the schedule stays a function of the step, skipped or not
    return total, gn


def read_back(run: Run, values: list) -> list[float]:
    """Device scalars to Python floats in one transfer: the step's only wait for the device (its time is
    `run.wait_s`). Stacked in the widest of their dtypes, so each float is what reading it alone gives."""
    import torch

    dtype = torch.float32
    for v in values:
        dtype = torch.promote_types(dtype, v.dtype)
    dev = values[0].device
    t0 = time.perf_counter()
    out = torch.stack([v.detach().to(dev, dtype) for v in values]).tolist()
    run.wait_s += time.perf_counter() - t0
    return out


def evaluate(run: Run) -> float | None:
    """The held-out loss (per label token). With DDP each process evaluates a share and the sums are added;
    under FSDP every process runs every batch (each forward gathers the shards, a collective)."""
    import torch

    if not run.eval:
        return None
    world = run.world
    n_label = _label_tokens(run.eval)
    mine = run.eval if run.sharded else dist_.eval_shard(run.eval, world)
    # under DDP the peft model itself: its forward runs no collective, and the ranks' shares may differ
    on = run if run.sharded or run.core is run.model else dataclasses.replace(run, model=run.core)
    with run.timings.phase("eval"):
        run.model.eval()
        parts = []
        with torch.no_grad():
            for i in range(0, len(mine), run.micro):
                chunk = mine[i : i + run.micro]
                parts.append(forward_loss(on, _collate(run, chunk), _label_tokens(chunk) / n_label))
        total = sum(read_back(run, parts)) if parts else 0.0  # one wait for the device, not one a batch
        run.model.train()
        return total if run.sharded else dist_.sum_(world, total)


def nonfinite_params(run: Run) -> list[str]:
    """Names of trainable tensors holding NaN or inf (LoRA tensors: small, checked before every save, with
    one read of the device for all of them)."""
    import torch

    named = [(n, p) for n, p in run.core.named_parameters() if p.requires_grad]
    if not named:
        return []
    if len({p.device for _, p in named}) == 1:
        ok = torch.stack([torch.isfinite(p).all() for _, p in named]).tolist()
    else:
        ok = [bool(torch.isfinite(p).all()) for _, p in named]
    return [n for (n, _), fine in zip(named, ok, strict=True) if not fine]


def save_checkpoint(run: Run) -> None:
    """Every rank takes part (the RNG states, and under FSDP the gathered adapter and optimizer state);
    rank 0 writes; the others wait until the checkpoint is complete."""
    with run.timings.phase("checkpoint"):
        _save_checkpoint(run)


def _save_checkpoint(run: Run) -> None:
    bad = nonfinite_params(run)
    if dist_.max_(run.world, int(bool(bad))):  # under FSDP each rank sees only its shard
        raise StopRun(
            diagnose_nonfinite_grad(
                run.step, run.skipped_in_row, run.plan.dtype.value, run.scheduler.get_last_lr()[0],
                what=f"weights ({bad[0]}{' and more' if len(bad) > 1 else ''})" if bad else "weights",
            )
        )
    extra = {}
    if run.world.several:
        extra["rng_ranks"] = dist_.gather_objects(run.world, checkpoint.rng_state())[1:]
    if run.sharded:
        extra["adapter_state"], extra["optimizer_state"] = dist_.full_state(run.model, run.optimizer,
                                                                          run.device != "cpu")
    if run.world.main:
        flush_metrics(run)  # the lines up to this step are on disk before the checkpoint that keeps them
        checkpoint.save(
            run.output,
            run.core,
            run.optimizer,
            run.scheduler,
            run.scaler,
            {
                "step": run.step,
                "micro_batch": run.micro,
                "tokens": run.tokens,
                "elapsed_s": run.elapsed,
                "examples_seen": run.step * run.plan.batch_size.value,
                "skipped_steps": run.skipped,
                "world_size": run.world.size,
            },
            **extra,
        )
    dist_.barrier(run.world)


def _metric(run: Run, rec: dict) -> None:
    run.history.append(rec)
    if not run.world.main:
        return
    run.pending.append(strict_json.dumps(rec) + "\n")
    if time.perf_counter() - run.flushed_at >= METRICS_FLUSH_S:
        flush_metrics(run)
    if run.report is not None:
        run.report.write(rec)


def flush_metrics(run: Run) -> None:
    """Append the pending metric lines to metrics.jsonl (and flush the --report-to writer)."""
    run.flushed_at = time.perf_counter()
    if run.report is not None:
        run.report.flush()
    if not run.pending:
        return
    with open(run.output / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write("".join(run.pending))
    run.pending.clear()


def fit(run: Run, progress) -> None:
    batch, steps = run.plan.batch_size.value, run.plan.max_steps.value
    eval_every, save_every = run.plan.eval_every.value, run.plan.save_every.value
    max_skips = MAX_SKIPS_IN_ROW_SCALED if run.plan.loss_scaling.value else MAX_SKIPS_IN_ROW
    last_finite = None
    prev = _catch_stop_signals(run)
    per_rank = batch // run.world.size
    try:
        run.model.train()
        while run.step < steps:
            _agree_on_stop(run)
            if run.stop_requested:
                save_checkpoint(run)
                raise Interrupted(run.step, run.stop_requested)
            t0 = time.perf_counter()
            off0 = run.timings.eval_s + run.timings.checkpoint_s
            run.wait_s = 0.0
            examples = [run.train[i] for i in step_indices(len(run.train), batch, run.step, run.seed)]
            mine = dist_.shard(examples, run.world)
            if run.world.several:
                (loss, gnorm) = _step_or_stop(run, mine, per_rank)
            else:
                (loss, gnorm), run.micro = with_oom_backoff(
                    lambda m, a, ex=mine: train_step(run, ex, m, a),
                    per_rank,
                    run.micro,
                    run.log,
                    after_oom=_free,
                    fix=lambda: oom_fix(run.plan.gradient_checkpointing.value, run.device),
                )
            if not math.isfinite(loss):
                raise StopRun(
                    diagnose_nonfinite(
                        run.step + 1, loss, run.plan.dtype.value, run.scheduler.get_last_lr()[0], last_finite
                    )
                )
            waited = run.wait_s  # the step's own wait (an evaluation below reads the device too)
            last_finite = loss
            run.step += 1
            skipped = not math.isfinite(gnorm)
            run.skipped += skipped
            run.skipped_in_row = run.skipped_in_row + 1 if skipped else 0
            ntok = sum(len(x[0]) for x in examples)
            dt = time.perf_counter() - t0
            run.tokens += ntok
            run.elapsed += dt
            rec = {
                "step": run.step,
                "loss": round(loss, 6),
                "lr": run.scheduler.get_last_lr()[0],
                "grad_norm": round(gnorm, 6) if not skipped else None,
                "tokens": ntok,
                "tokens_per_s": round(ntok / dt, 1),
                "micro_batch": run.micro,
                "elapsed_s": round(run.elapsed, 3),
            }
            if skipped:
                rec["skipped"] = "gradient norm not finite"
                run.log(f"step {run.step}: gradient norm {gnorm} is not finite: skipped (nothing applied)")
                if run.skipped_in_row >= max_skips:
                    _metric(run, rec)
                    raise StopRun(
                        diagnose_nonfinite_grad(
                            run.step, run.skipped_in_row, run.plan.dtype.value, run.scheduler.get_last_lr()[0]
                        )
                    )
            if run.step % eval_every == 0 or run.step == steps:
                rec["eval_loss"] = evaluate(run)
            _metric(run, rec)
            progress(run, rec)
            if run.step % save_every == 0 and run.step < steps:
                save_checkpoint(run)
            if run.stop_after is not None and run.step >= run.stop_after and not run.stop_requested:
                run.stop_requested = "SIGINT"
            off = run.timings.eval_s + run.timings.checkpoint_s - off0
            run.timings.add_step(time.perf_counter() - t0 - off, waited)
        save_checkpoint(run)
    finally:
        if run.world.main:
            flush_metrics(run)
        for signum, handler in prev.items():
            signal.signal(signum, handler)


def _agree_on_stop(run: Run) -> None:
    """All ranks stop at the same step boundary: a signal one rank caught (torchrun forwards it to each, not
    necessarily at the same moment) becomes every rank's, as the largest signal number any rank saw."""
    if not run.world.several:
        return
    mine = signal.Signals[run.stop_requested].value if run.stop_requested else 0
    agreed = dist_.max_(run.world, mine)
    if agreed and not run.stop_requested:
        run.stop_requested = signal.Signals(agreed).name


def _step_or_stop(run: Run, examples: list, per_rank: int) -> tuple[float, float]:
    """A step with several processes: the micro-batch cannot shrink for one rank alone (the others would
    wait in the all-reduce), so out of memory stops the run with what to lower."""
    try:
        return train_step(run, examples, run.micro, per_rank // run.micro)
    except Exception as e:
        if not is_oom(e):
            raise
        fix = oom_fix(run.plan.gradient_checkpointing.value, run.device)
        raise RankStopped(
            Finding(
                "QD803",
                "error",
                f"out of memory in one of {run.world.size} processes at micro-batch {run.micro}",
                [str(e).splitlines()[0][:200], f"rank {run.world.rank}"],
                f"lower --micro-batch (now {run.micro}), or: {fix}, or shard the model with --fsdp",
                "plan",
            )
        ) from None


def _catch_stop_signals(run: Run) -> dict:
    """SIGINT and SIGTERM set a flag; the loop saves a checkpoint at the next step boundary and stops."""
    if not _main_thread():
        return {}
    def ask_stop(signum, _frame):
        run.stop_requested = signal.Signals(signum).name

    return {getattr(signal, n): signal.signal(getattr(signal, n), ask_stop) for n in STOP_SIGNALS}


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _free() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def read_metrics(output: Path, step: int) -> list:
    """The metric lines up to `step` (those of the checkpoint being resumed)."""
    import json

    path = Path(output) / "metrics.jsonl"
    keep = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("step", 0) <= step:
                keep.append(strict_json.finite(rec))  # lines written before strict JSON may hold a bare NaN
    return keep


def truncate_metrics(output: Path, step: int) -> list:
    """On resume: drop metric lines written after the checkpoint (they will be produced again)."""
    from qdoctor.atomic import write_text

    keep = read_metrics(output, step)
    write_text(Path(output) / "metrics.jsonl", "".join(strict_json.dumps(r) + "\n" for r in keep))
    return keep


def progress_bar(stream=None):
    """Loss, tokens/s and ETA on stderr; a carriage-return bar on a terminal, otherwise a line every
    `run.log_every` steps (default: about ten a run), at the first and last step and at each evaluation."""
    stream = stream or sys.stderr
    tty = hasattr(stream, "isatty") and stream.isatty()

    def show(run: Run, rec: dict) -> None:
        steps = run.plan.max_steps.value
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
        elif run.step in (1, steps) or run.step % (run.log_every or max(1, steps // 10)) == 0 or ev:
            stream.write(line + "\n")
        else:
            return
        stream.flush()

    return show
