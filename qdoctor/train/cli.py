"""`qdoctor train`: validate -> pre-flight -> plan -> run. With no --model/--data: the embedded tiny Llama.

Exit codes: 0 done (or --dry-run); 1 refused by an error finding, or stopped with a diagnosis (NaN loss or
gradients, out of memory at micro-batch 1); 2 bad input, a model that does not load, an output that cannot be
written (one line; nothing written before the model loads); 130 interrupted by SIGINT or SIGTERM (checkpoint
saved, and a command that continues the run).
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from qdoctor.console import EXIT_FINDINGS, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, out
from qdoctor.train.config import CHOICES, DEFAULT_BATCH, DEFAULT_SEQ_LEN

if TYPE_CHECKING:  # the modules load lazily: `qdoctor train --help` and bad input stay fast
    from qdoctor.train.config import TrainConfig
    from qdoctor.train.plan import Plan
    from qdoctor.train.preflight import Preflight
    from qdoctor.train.setup import Setup


class _Rank:
    """Where this process stands in a run of several: only rank 0 prints; under `train --nproc` the ranks
    leave the exit code for the launcher (qdoctor.train.launch) and exit 0 once they agree on it."""

    main = True
    status_file: str | None = None  # set from the launch file under `train --nproc`


def _say(text: str, err: bool = False) -> None:
    if _Rank.main:
        out(text, err=err)


def _fail(msg: str, code: int = EXIT_USAGE):
    """One line from rank 0; the process ends with `code` (the others of a run stop with it, or are stopped
    by torchrun)."""
    if _Rank.main:
        out(f"qdoctor: error: {msg}\n", err=True)
        _write_status(code)
    sys.exit(code)


def _write_status(code: int) -> None:
    if _Rank.main and _Rank.status_file:
        from qdoctor.train.launch import write_status

        write_status(_Rank.status_file, code)


def _end(world, code: int):
    """Every rank ends here with the code they agreed on."""
    from qdoctor.train import distributed as D

    _write_status(code)
    D.close(world)
    sys.exit(EXIT_OK if _Rank.status_file else code)


def _opt(*names, default_text: str | None = None, **kw):
    """A flag that defaults to "not set" (the TOML file, else the plan, decides); --help shows the default."""
    if default_text:
        kw["help"] = (kw.get("help", "") + f"  [default: {default_text}]").strip()
    return click.option(*names, default=None, **kw)


def _choice(name: str) -> str:
    return "[" + "|".join(CHOICES[name]) + "]"


EPILOG = """\b
Every flag is also a key of the --config TOML file, with underscores (in a
[train] table or at the top level; a flag on the command line wins), e.g.:
  [train]
  model = "./my-model"
  data = "train.jsonl"
  max_steps = 500
  lora_alpha = 32
  gradient_checkpointing = "on"

\b
Runs go to ./runs/<model>-<date>-<time>/ unless --output is given: run.json,
plan.json, metrics.jsonl (a line per step), checkpoint/, summary.json,
loss.png, and adapter/ once the run completes. --resume continues a run from
its checkpoint with the same settings: --max-steps may grow (the warmup stays
as planned) and --micro-batch may change (the loss is normalised by label
tokens: the same gradient, LoRA dropout drawing its masks in another order).
Exit codes: 0 done, 1 refused or stopped with a diagnosis, 2 bad input
(nothing written), 130 interrupted (checkpoint saved).
"""


@click.command("train", epilog=EPILOG)
@_opt(
    "--config",
    "config_file",
    type=str,
    metavar="FILE",
    help="TOML file with the same keys as the flags (a [train] table or top level).",
)
@_opt("--model", default_text="the embedded tiny Llama",
      help="Local Hugging Face model directory, or a hub id when online.")
@click.option("--trust-remote-code", is_flag=True, default=None,
              help="Allow a model that needs its own Python code (auto_map) to run it.  [default: off]")
@_opt("--data", default_text="the embedded instruction set",
      help='JSONL, one record a line: {"text"}, {"prompt", "completion"} or {"messages": [...]}.')
@_opt("--output", metavar="DIR", default_text="runs/<model>-<date>-<time>", help="Run directory.")
@_opt("--max-steps", type=int, default_text="one epoch; 60 for the embedded model", help="Optimizer steps.")
@_opt("--seed", type=int, default_text="0", help="Seeds LoRA init, data order and dropout.")
@_opt("--lr", type=float, default_text="2e-4 (1e-4 above 20B params; 3e-3 embedded)", help="Learning rate.")
@_opt("--warmup-steps", type=int, default_text="3% of max-steps", help="Linear warm-up, then constant.")
@_opt("--lora-r", type=int, default_text="16", help="LoRA rank.")
@_opt("--lora-alpha", type=int, default_text="2 x lora-r", help="LoRA scaling numerator.")
@_opt("--lora-dropout", type=float, default_text="0.05")
@_opt("--target-modules", default_text="all-linear", help="Comma-separated LoRA targets.")
@_opt("--batch-size", type=int, default_text=str(DEFAULT_BATCH), help="Effective batch: sequences per step.")
@_opt("--micro-batch", type=int, default_text="largest that fits memory",
      help="Sequences per forward pass; must divide --batch-size.")
@_opt("--grad-accum", type=int, default_text="batch-size / micro-batch", help="Micro-batches per step.")
@_opt("--seq-len", type=int, default_text=f"{DEFAULT_SEQ_LEN}, or the model's max positions if fewer",
      help="Tokens per sequence; longer records are cut (and counted).")
@click.option("--packing/--no-packing", default=None,
              help="Pack examples into full --seq-len sequences.  [default: off]")
@_opt("--weight-decay", type=float, default_text="0")
@_opt("--max-grad-norm", type=float, default_text="0.3", help="Gradient clipping.")
@_opt("--eval-fraction", type=float, default_text="0.1", help="Share of records held out for evaluation.")
@_opt("--eval-every", type=int, default_text="five evaluations a run", help="Steps between evaluations.")
@_opt("--save-every", type=int, default_text="four checkpoints a run", help="Steps between checkpoints.")
@_opt("--log-every", type=int, default_text="about ten lines a run",
      help="Steps between progress lines when stderr is not a terminal.")
@_opt("--report-to", metavar=_choice("report_to"), default_text="none",
      help="Also write the metrics as TensorBoard event files in OUTPUT/tensorboard (needs tensorboard).")
@_opt("--device", metavar="cpu|cuda|cuda:N", default_text="the GPU when one works, else cpu")
@_opt("--dtype", metavar=_choice("dtype"), default_text="auto: bf16, fp16 or fp32 by GPU")
@_opt("--quantization", metavar=_choice("quantization"), default_text="auto: nf4 when its probes pass")
@_opt("--optimizer", metavar=_choice("optimizer"), default_text="auto: by probes and memory")
@_opt("--gradient-checkpointing", metavar=_choice("gradient_checkpointing"),
      default_text="auto: on when activations do not fit, offload when even that does not",
      help="Recompute each decoder layer in backward; offload also keeps each layer's input in pinned host "
           "memory (GPU only), for the longest sequences.")
@_opt("--attention", metavar=_choice("attention"),
      default_text="auto: varlen for packed rows on a GPU, else sdpa")
@_opt("--fused-loss", metavar=_choice("fused_loss"), default_text="auto: liger-kernel where it is installed",
      help="Fused linear + cross-entropy: the logits are never materialised.")
@_opt("--compile", metavar=_choice("compile"), default_text="auto: on GPUs where it was measured faster",
      help="torch.compile each decoder layer.")
@_opt("--nproc", type=int, default_text="1; under torchrun or accelerate launch, their WORLD_SIZE",
      help="Processes, one per GPU (or all on the CPU), started through torchrun: data parallel QLoRA.")
@click.option("--fsdp/--no-fsdp", default=None,
              help="Shard the 4-bit model over the processes (FSDP-QLoRA) instead of a whole copy on each.  "
                   "[default: auto: only when one GPU cannot hold the model and a micro-batch]")
@click.option("--resume", is_flag=True, help="Continue the run in --output from its checkpoint.")
@click.option("--dry-run", is_flag=True, help="Print the plan and the memory estimate, then exit.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary (or plan) on stdout.")
@click.option("--force", is_flag=True, help="Start even when pre-flight finds an error.")
@click.option("--skip-probes", is_flag=True, help="Plan from facts alone (no probe child processes).")
@click.pass_context
def train(ctx, config_file, resume, dry_run, as_json, force, skip_probes, target_modules, **flags):
    """Fine-tune with QLoRA using settings this machine is known to handle, each with its reason."""
    t_start = time.perf_counter()  # the summary's wall time and start-up are counted from here
    from qdoctor import extra

    extra.require("train")  # one line and exit 2 without the `train` extra, not an ImportError
    from qdoctor.train import config as C
    from qdoctor.train import distributed as D
    from qdoctor.train.checkpoint import CheckpointError
    from qdoctor.train.data import DataError
    from qdoctor.train.model import ModelError
    from qdoctor.train.rundir import RunDirError
    from qdoctor.train.setup import identity, prepare

    if target_modules is not None:
        flags["target_modules"] = [t.strip() for t in target_modules.split(",") if t.strip()] or ""
    try:
        world = D.from_env()
        _Rank.main = world.main
        cfg = C.build(C.load_toml(config_file) if config_file else None, flags)
        nproc = check_world(cfg, world)
        early = _start_deep_facts(skip_probes) if world.launcher is None else None
        setup = prepare(cfg, resume, nproc, on_ml_start=early)
    except (C.ConfigError, DataError, ModelError, RunDirError, CheckpointError, D.LaunchError) as e:
        _fail(str(e))
    launching = cfg.nproc is not None and world.launcher is None  # `train --nproc N`: torchrun starts N
    quiet = world.launcher == "qdoctor"  # the launcher has shown the notes, the warnings and the plan
    for note in [] if quiet else setup.data_notes:
        _say(f"note: {note}\n", err=True)
    if not launching and world.several:
        D.init(world, cuda=_cuda_wanted(cfg))
    pf = _preflight(cfg, world, skip_probes, force, quiet, nproc)
    from qdoctor.train import plan as P
    from qdoctor.train import rundir

    try:
        plan = P.make_plan(
            cfg,
            pf.facts,
            pf.probes,
            shape=setup.shape,
            model_name=setup.src.name,
            embedded=setup.src.embedded,
            n_train=len(setup.ds.train),
            max_len=setup.ds.max_len,
            max_positions=setup.max_positions,
            resumed=setup.previous,
            model_type=setup.model_type,
            world=nproc,
            environ=dict(os.environ),
        )
        check_devices(plan, pf.facts, nproc)
    except C.ConfigError as e:
        _fail(str(e))
    if dry_run:
        _say(plan.to_json() + "\n" if as_json else plan.render())
        _end(world, EXIT_OK)
    ident = identity(cfg, plan, setup)
    try:
        if setup.previous:
            rundir.check_identity(setup.output, setup.previous, ident)
    except RunDirError as e:
        _fail(str(e))
    if not quiet:
        _say(plan.render(), err=True)
    hint = resume_command(ctx, setup.output, world)
    if launching:
        from qdoctor.train import launch

        args = command_words(ctx, setup.output, resume)
        sys.exit(launch.run(nproc, args, pf.to_dict(), cpu=plan.device.value == "cpu"))
    try:
        code = _run(cfg, plan, setup, pf, ident, resume, as_json, t_start, hint, world)
    except (ModelError, RunDirError) as e:
        _fail(str(e))
    except Exception as e:  # the disk filled up, or the output turned read-only: bad input, not a bug
        why = rundir.write_failure(e)
        if why is None:
            raise
        from qdoctor.train.checkpoint import saved_step

        step = saved_step(setup.output)
        kept = f"; the checkpoint of step {step} is intact; free space, then: {hint}" if step else ""
        _fail(f"cannot write to {setup.output}: {why}{kept}")
    _end(world, code)


def _start_deep_facts(skip_probes: bool):
    """For a process that runs the pre-flight itself: start its deep facts child as soon as the input has
    passed the checks that need no ML import (qdoctor.facts.runtime.start_early)."""

    def start() -> None:
        from qdoctor.facts import runtime
        from qdoctor.train.preflight import DEEP_TIMEOUT_S

        runtime.start_early(DEEP_TIMEOUT_S, in_process=skip_probes)

    return start


def check_world(cfg: TrainConfig, world) -> int:
    """The number of processes that will train, checked against the config; raises ConfigError."""
    from qdoctor.train import config as C

    if world.launcher and cfg.nproc and cfg.nproc != world.size:
        raise C.ConfigError(f"nproc {cfg.nproc}, but {world.launcher} started {world.size} process"
                            f"{'es' * (world.size != 1)} (WORLD_SIZE): drop --nproc under a launcher")
    nproc = world.size if world.launcher else (cfg.nproc or 1)
    if nproc > 1 and cfg.device not in (None, "cpu", "cuda"):
        raise C.ConfigError(f"device {cfg.device}: with several processes rank r uses cuda:r; choose the "
                            "GPUs with CUDA_VISIBLE_DEVICES (e.g. CUDA_VISIBLE_DEVICES=2,3) and --device "
                            "cuda")
    if cfg.fsdp and nproc == 1:
        raise C.ConfigError("fsdp shards the model over several processes: add --nproc 2 (or more), or "
                            "launch with torchrun / accelerate launch")
    C.batch_split(cfg, nproc)
    return nproc


def check_devices(plan: Plan, facts: dict, nproc: int) -> None:
    """One GPU per process: more processes than visible GPUs is refused (on the CPU any number runs)."""
    from qdoctor import devices
    from qdoctor.train.config import ConfigError

    n = devices.count(facts)
    if nproc > 1 and plan.device.value != "cpu" and n is not None and nproc > n:
        cvd = devices.cvd_value(facts)
        raise ConfigError(f"nproc {nproc} needs {nproc} GPUs, one per process; {n} visible"
                          + (f" (CUDA_VISIBLE_DEVICES={cvd})" if cvd is not None else "")
                          + f": use --nproc {n} or fewer, or --device cpu")


def _cuda_wanted(cfg: TrainConfig) -> bool:
    """Whether this rank's process group needs NCCL: a CUDA torch with a GPU, unless --device cpu."""
    if cfg.device == "cpu":
        return False
    import torch

    return torch.cuda.is_available()


def _preflight(cfg: TrainConfig, world, skip_probes: bool, force: bool, quiet: bool, nproc: int) -> Preflight:
    """Once per run: under `train --nproc` the launcher's (from its launch file); under torchrun or
    accelerate launch rank 0 runs it and sends it to the others; else this process runs it."""
    from qdoctor.smoke.runner import ProbeUsageError
    from qdoctor.train import distributed as D
    from qdoctor.train import launch, preflight

    if world.launcher == "qdoctor":
        data = launch.read_launch(os.environ[D.LAUNCH_ENV])
        _Rank.status_file = data.get("status")
        return preflight.Preflight.from_dict(data["preflight"])
    payload = None
    if world.main:
        try:
            pf = preflight.run(cfg.device, skip_probes=skip_probes, world=nproc,
                               progress=lambda m: _say(f"pre-flight: {m}\n", err=True))
            payload = {"preflight": pf.to_dict()}
        except ProbeUsageError as e:
            payload = {"error": str(e)}
    payload = D.broadcast_json(world, payload)
    if "error" in payload:
        _say(f"qdoctor: error: {payload['error']}\n", err=True)
        _end(world, EXIT_USAGE)
    pf = preflight.Preflight.from_dict(payload["preflight"])
    for note in [] if quiet else pf.notes:
        _say(f"note: {note}\n", err=True)
    if pf.cached and not quiet:
        _say("note: pre-flight probe results reused from the cache (environment unchanged)\n", err=True)
    if pf.errors and not force:
        for f in pf.errors:
            _say(f"qdoctor: error: {f.code} {f.title}" + (f" -> fix: {f.fix}" if f.fix else "") + "\n",
                 err=True)
        _say("qdoctor: refusing to train on this machine (pass --force to try anyway)\n", err=True)
        _end(world, EXIT_FINDINGS)
    for f in [] if quiet else pf.findings:
        if f.severity == "warning":
            _say(f"qdoctor: warning: {f.code} {f.title}" + (f" -> fix: {f.fix}" if f.fix else "") + "\n",
                 err=True)
    return pf


def command_words(ctx: click.Context, output: Path, resume: bool) -> list[str]:
    """The options given on the command line (paths made absolute, so they work from any directory), then
    --output and --resume when asked: what a rank of `train --nproc` runs, and what continues a run."""
    from click.core import ParameterSource

    words = []
    for p in ctx.command.params:
        if p.name in ("resume", "dry_run", "output") or not isinstance(p, click.Option):
            continue
        if ctx.get_parameter_source(p.name) != ParameterSource.COMMANDLINE:
            continue
        v = ctx.params[p.name]
        if p.is_flag and p.secondary_opts:
            words.append(p.opts[0] if v else p.secondary_opts[0])
        elif p.is_flag:
            if v:
                words.append(p.opts[0])
        elif v is not None:
            if p.name in ("config_file", "model", "data") and Path(str(v)).expanduser().exists():
                v = str(Path(str(v)).expanduser().absolute())
            words += [p.opts[0], str(v)]
    return words + ["--output", str(Path(output).absolute())] + (["--resume"] if resume else [])


def resume_command(ctx: click.Context, output: Path, world=None) -> str:
    """The command that continues this run, pasted as printed; under torchrun or accelerate launch, through
    the same launcher with the same number of processes."""
    prefix = ["qdoctor", "train"]
    if world is not None and world.launcher == "torchrun":
        prefix = ["torchrun", f"--nproc-per-node={world.size}", "-m", "qdoctor", "train"]
    elif world is not None and world.launcher == "accelerate":
        prefix = ["accelerate", "launch", f"--num_processes={world.size}", "-m", "qdoctor", "train"]
    return " ".join(shlex.quote(w) for w in prefix + command_words(ctx, output, True))


def _run(cfg: TrainConfig, plan: Plan, setup: Setup, pf: Preflight, ident: dict, resume: bool, as_json: bool,
         t_start: float, hint: str, world) -> int:
    """Load the model, then lock the run directory, write the run record and train. With several processes
    every rank loads its own model; rank 0 alone locks and writes, the others wait for it."""
    from qdoctor.atomic import write_text
    from qdoctor.train import checkpoint, rundir
    from qdoctor.train import distributed as D
    from qdoctor.train import model as M
    from qdoctor.train.rundir import RunDirError
    from qdoctor.train.timings import Timings

    output: Path = setup.output
    device = D.rank_device(plan.device.value, world)
    timings = Timings(startup_s=time.perf_counter() - t_start)
    # the model loads before anything is written: a bad model leaves no run behind to refuse a retry
    with timings.phase("load"):
        model, base_path = M.load_for_training(setup.src, plan, cfg.seed, device, main=world.main)
    if world.rank:  # LoRA starts the same on every rank (seeded above); dropout draws its own masks
        import torch

        torch.manual_seed(cfg.seed + 1_000_003 * world.rank)
    lock, failed = None, None
    if world.main:
        try:
            lock = rundir.Lock(output)
            previous = rundir.check(output, resume, locked=True)  # again, now that no one else can write
            if previous:
                rundir.check_identity(output, previous, ident)
            checkpoint.clean_temp(output)
            rundir.write_record(
                output,
                ident,
                max_steps=plan.max_steps.value,
                created=(previous or {}).get("created") or time.time(),
                model=setup.src.name if not setup.src.path else str(Path(setup.src.path).resolve()),
                data=setup.data_path,
            )
            write_text(output / "plan.json", plan.to_json() + "\n")
        except RunDirError as e:
            failed = e
    if D.max_(world, int(failed is not None)):
        if lock:
            lock.release()
        if failed is not None:
            raise failed
        _end(world, EXIT_USAGE)
    try:
        return _train(cfg, plan, setup, pf, resume, as_json, t_start, hint, model, base_path, world, device,
                      timings)
    finally:
        if lock:
            lock.release()


def _train(cfg: TrainConfig, plan: Plan, setup: Setup, pf: Preflight, resume: bool, as_json: bool,
           t_start: float, hint: str, model, base_path: str, world, device: str, timings) -> int:
    import torch

    from qdoctor import strict_json
    from qdoctor.atomic import write_text
    from qdoctor.train import checkpoint, loop, optim, report_to, summary
    from qdoctor.train import distributed as D
    from qdoctor.train import model as M

    output: Path = setup.output
    resuming = resume and checkpoint.exists(output)
    sharded = plan.parallel.value.strategy == "fsdp"
    try:
        if resuming:  # the adapter goes into the whole model, before FSDP shards it
            checkpoint.load_adapter(output, model)
    except checkpoint.CheckpointError as e:
        _fail(str(e))
    if sharded:
        wrapped = D.wrap_fsdp(model, device, world)
    elif world.several:
        wrapped = D.wrap_ddp(model, device)
    else:
        wrapped = model
    # one process steps every LoRA tensor at once (optim.FlatParams); a checkpoint written per tensor (an
    # older qdoctor) resumes per tensor
    flat = not sharded and not world.several
    if flat and resuming:
        n = checkpoint.saved_optimizer_tensors(output)
        flat = n is None or n < sum(1 for p in wrapped.parameters() if p.requires_grad)
    opt = optim.build(plan.optimizer.value, wrapped.parameters(), plan.lr.value, cfg.weight_decay, flat=flat)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, optim.schedule(plan.warmup_steps.value))
    if sharded and plan.loss_scaling.value:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        scaler = ShardedGradScaler(device.split(":")[0])
    else:
        scaler = torch.amp.GradScaler(device.split(":")[0], enabled=plan.loss_scaling.value)
    tok = setup.tok
    run = loop.Run(
        wrapped,
        opt,
        sched,
        scaler,
        setup.ds.train,
        setup.ds.eval,
        plan,
        output,
        cfg.seed,
        tok.pad_token_id,
        device,
        getattr(torch, M.TORCH_DTYPES[plan.dtype.value]),
        log=lambda m: _say(f"note: {m}\n", err=True),
        micro=plan.micro_batch.value,
        log_every=cfg.log_every,
        report=report_to.writer_for(cfg.report_to, output) if world.main else None,
        world=world,
        timings=timings,
    )
    run.stop_after = _test_stop_after()
    first_eval = None
    if resuming:
        try:
            st = checkpoint.load_state(output, opt, sched, scaler, rank=world.rank,
                                       load_optimizer=(lambda o, s: D.load_full_optim_state(wrapped, o, s))
                                       if sharded else None)
        except checkpoint.CheckpointError as e:
            _fail(str(e))
        run.step, run.tokens, run.elapsed = st["step"], st["tokens"], st["elapsed_s"]
        per_rank = plan.parallel.value.per_rank_batch
        saved_world = st.get("world_size") or 1
        if cfg.micro_batch is None and per_rank % st["micro_batch"] == 0:
            run.micro = st["micro_batch"]  # as saved: it may have backed off after an out-of-memory
        elif cfg.micro_batch is not None and cfg.micro_batch != st["micro_batch"]:
            _say(f"note: micro-batch {cfg.micro_batch} (the checkpoint ran {st['micro_batch']}): the loss is "
                 "normalised by label tokens, so the gradient is the same (dropout masks are drawn in "
                 "another order)\n", err=True)
        if saved_world != world.size:
            _say(f"note: {world.size} process{'es' * (world.size != 1)} (the checkpoint ran {saved_world}): "
                 "the same effective batch and loss normalisation, so the same gradient; dropout masks are "
                 "drawn in another order\n", err=True)
        run.history = loop.truncate_metrics(output, run.step) if world.main else loop.read_metrics(output,
                                                                                                   run.step)
        run.skipped = sum(1 for h in run.history if h.get("skipped"))
        first_eval = _first_eval(output)
        _say(f"note: resuming from step {run.step} of {plan.max_steps.value} (checkpoint in "
             f"{output / 'checkpoint'})\n", err=True)
    else:
        if resume:
            _say(f"note: {output} has no checkpoint yet: starting at step 0\n", err=True)
        if world.main:
            loop.truncate_metrics(output, 0)
        first_eval = loop.evaluate(run)
        if world.main:
            write_text(output / "eval0.json", strict_json.dumps({"eval_loss": first_eval}) + "\n")
    status, code = "completed", EXIT_OK
    try:
        loop.fit(run, loop.progress_bar() if world.main else (lambda *a: None))
    except loop.Interrupted as e:
        status, code = "interrupted", EXIT_INTERRUPTED
        _say(
            f"\nqdoctor: interrupted ({e.signame}) at step {e.step}: checkpoint saved in "
            f"{output / 'checkpoint'}; continue with:\n  {hint}\n",
            err=True,
        )
    except loop.RankStopped as e:  # this rank alone: say so from here, and end now (torchrun stops the rest)
        f = e.finding
        out(f"\nqdoctor: error: {f.code} {f.title} ({'; '.join(f.evidence)}) -> fix: {f.fix}\n", err=True)
        if _Rank.status_file:
            from qdoctor.train.launch import write_status

            write_status(_Rank.status_file, EXIT_FINDINGS)
        sys.exit(EXIT_FINDINGS)
    except loop.StopRun as e:
        status, code = "stopped", EXIT_FINDINGS
        f = e.finding
        _say(f"\nqdoctor: error: {f.code} {f.title} ({'; '.join(f.evidence)}) -> fix: {f.fix}\n", err=True)
    adapter = None
    if status == "completed":
        state = D.full_state(wrapped, opt, device != "cpu")[0] if sharded else None  # a collective
        if world.main:
            with timings.phase("checkpoint"):
                adapter = _save_adapter(model, output, base_path, state)
    if world.main:
        wall = time.perf_counter() - t_start
        summ = summary.build(
            plan=plan,
            fingerprint=pf.fingerprint,
            history=run.history,
            run=run,
            wall_s=wall,
            status=status,
            output=output,
            adapter_dir=adapter,
            first_eval=first_eval,
            data=setup.ds.to_dict(),
            timings=timings.to_dict(wall),
        )
        summary.write(output, summ)
        summary.plot(output, run.history)
        if as_json:
            _say(strict_json.dumps(summ, indent=2) + "\n")
        else:
            _say(_human(summ))
    D.barrier(world)  # the others end once rank 0 has written everything
    return code


def _first_eval(output: Path):
    import json

    try:
        return json.loads((output / "eval0.json").read_text())["eval_loss"]
    except (OSError, ValueError, KeyError):
        return None


def _save_adapter(model, output: Path, base_path: str, state: dict | None = None) -> Path:
    """The final adapter, loadable with PeftModel.from_pretrained (base_model_name_or_path = the base).
    `state`: the adapter tensors FSDP gathered (the live model holds only a shard)."""
    import tempfile

    from qdoctor.atomic import replace_dir

    tmp = Path(tempfile.mkdtemp(prefix=".adapter.tmp-", dir=output))
    model.peft_config["default"].base_model_name_or_path = base_path
    if state is None:
        model.save_pretrained(tmp)
    else:
        from qdoctor.train.distributed import save_adapter

        save_adapter(model, tmp, state)
    replace_dir(tmp, output / "adapter")
    return output / "adapter"


def _human(s: dict) -> str:
    def f(x):
        return "n/a" if x is None else f"{x:.4f}"

    lines = [
        f"{s['status']}: {s['steps']} steps, train loss {f(s['first_loss'])} at step 1 -> "
        f"{f(s['final_loss'])} ({s['final_loss_note']}), held-out {f(s['first_eval_loss'])} -> "
        f"{f(s['final_eval_loss'])}, {s['tokens_per_s'] or 0:,.0f} tok/s, {s['wall_time_s']:.1f} s wall"
    ]
    if s.get("skipped_steps"):
        lines.append(f"skipped: {s['skipped_steps']} steps with a non-finite gradient norm (nothing applied)")
    lines.append(f"adapter: {s['adapter'] or 'not written yet (the run did not complete; see checkpoint/)'}")
    lines.append(f"summary: {s['output']}/summary.json, curve: {s['output']}/loss.png")
    if s.get("timings"):
        from qdoctor.train.timings import describe

        lines.append(describe(s["timings"]))
    return "\n".join(lines) + "\n"


def _test_stop_after():
    v = os.environ.get("QDOCTOR_TEST_STOP_AFTER")
    return int(v) if v and v.isdigit() else None
