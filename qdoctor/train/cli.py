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


def _fail(msg: str, code: int = EXIT_USAGE):
    out(f"qdoctor: error: {msg}\n", err=True)
    sys.exit(code)


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
      default_text="auto: on when activations do not fit")
@_opt("--attention", metavar=_choice("attention"), default_text="auto: sdpa")
@_opt("--fused-loss", metavar=_choice("fused_loss"), default_text="auto: liger-kernel where it is installed",
      help="Fused linear + cross-entropy: the logits are never materialised.")
@_opt("--compile", metavar=_choice("compile"), default_text="auto: on GPUs where it was measured faster",
      help="torch.compile each decoder layer.")
@click.option("--resume", is_flag=True, help="Continue the run in --output from its checkpoint.")
@click.option("--dry-run", is_flag=True, help="Print the plan and the memory estimate, then exit.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary (or plan) on stdout.")
@click.option("--force", is_flag=True, help="Start even when pre-flight finds an error.")
@click.option("--skip-probes", is_flag=True, help="Plan from facts alone (no probe child processes).")
@click.pass_context
def train(ctx, config_file, resume, dry_run, as_json, force, skip_probes, target_modules, **flags):
    """Fine-tune with QLoRA using settings this machine is known to handle, each with its reason."""
    from qdoctor import extra

    extra.require("train")  # one line and exit 2 without the `train` extra, not an ImportError
    from qdoctor.train import config as C
    from qdoctor.train.checkpoint import CheckpointError
    from qdoctor.train.data import DataError
    from qdoctor.train.model import ModelError
    from qdoctor.train.rundir import RunDirError
    from qdoctor.train.setup import identity, prepare

    t_start = time.perf_counter()
    if target_modules is not None:
        flags["target_modules"] = [t.strip() for t in target_modules.split(",") if t.strip()] or ""
    try:
        cfg = C.build(C.load_toml(config_file) if config_file else None, flags)
        setup = prepare(cfg, resume)
    except (C.ConfigError, DataError, ModelError, RunDirError, CheckpointError) as e:
        _fail(str(e))
    for note in setup.data_notes:
        out(f"note: {note}\n", err=True)
    from qdoctor.smoke.runner import ProbeUsageError
    from qdoctor.train import plan as P
    from qdoctor.train import preflight, rundir

    try:
        pf = preflight.run(cfg.device, skip_probes=skip_probes,
                           progress=lambda m: out(f"pre-flight: {m}\n", err=True))
    except ProbeUsageError as e:
        _fail(str(e))
    for note in pf.notes:
        out(f"note: {note}\n", err=True)
    if pf.cached:
        out("note: pre-flight probe results reused from the cache (environment unchanged)\n", err=True)
    if pf.errors and not force:
        for f in pf.errors:
            out(
                f"qdoctor: error: {f.code} {f.title}" + (f" -> fix: {f.fix}" if f.fix else "") + "\n",
                err=True,
            )
        out("qdoctor: refusing to train on this machine (pass --force to try anyway)\n", err=True)
        sys.exit(EXIT_FINDINGS)
    for f in pf.findings:
        if f.severity == "warning":
            out(f"qdoctor: warning: {f.code} {f.title}" + (f" -> fix: {f.fix}" if f.fix else "") + "\n",
                err=True)
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
    )
    if dry_run:
        out(plan.to_json() + "\n" if as_json else plan.render())
        sys.exit(EXIT_OK)
    ident = identity(cfg, plan, setup)
    try:
        if setup.previous:
            rundir.check_identity(setup.output, setup.previous, ident)
    except RunDirError as e:
        _fail(str(e))
    out(plan.render(), err=True)
    hint = resume_command(ctx, setup.output)
    try:
        code = _run(cfg, plan, setup, pf, ident, resume, as_json, t_start, hint)
    except (ModelError, RunDirError) as e:
        _fail(str(e))
    except Exception as e:  # the disk filled up, or the output turned read-only: bad input, not a bug
        why = rundir.write_failure(e)
        if why is None:
            raise
        step = rundir.checkpoint_step(setup.output)
        kept = f"; the checkpoint of step {step} is intact; free space, then: {hint}" if step else ""
        _fail(f"cannot write to {setup.output}: {why}{kept}")
    sys.exit(code)


def resume_command(ctx: click.Context, output: Path) -> str:
    """The command that continues this run, pasted as printed: every option given on the command line
    (paths made absolute, so it works from any directory), then --output and --resume."""
    from click.core import ParameterSource

    words = ["qdoctor", "train"]
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
    words += ["--output", str(Path(output).absolute()), "--resume"]
    return " ".join(shlex.quote(w) for w in words)


def _run(cfg: TrainConfig, plan: Plan, setup: Setup, pf: Preflight, ident: dict, resume: bool, as_json: bool,
         t_start: float, hint: str) -> int:
    """Load the model, then lock the run directory, write the run record and train."""
    from qdoctor.atomic import write_text
    from qdoctor.train import checkpoint, rundir
    from qdoctor.train import model as M

    output: Path = setup.output
    # the model loads before anything is written: a bad model leaves no run behind to refuse a retry
    model, base_path = M.load_for_training(setup.src, plan, cfg.seed)
    lock = rundir.Lock(output)
    try:
        previous = rundir.check(output, resume, locked=True)  # again, now that no one else can write here
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
        return _train(cfg, plan, setup, pf, resume, as_json, t_start, hint, model, base_path)
    finally:
        lock.release()


def _train(cfg: TrainConfig, plan: Plan, setup: Setup, pf: Preflight, resume: bool, as_json: bool,
           t_start: float, hint: str, model, base_path: str) -> int:
    import torch

    from qdoctor import strict_json
    from qdoctor.atomic import write_text
    from qdoctor.train import checkpoint, loop, optim, report_to, summary
    from qdoctor.train import model as M

    output: Path = setup.output
    opt = optim.build(plan.optimizer.value, model.parameters(), plan.lr.value, cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, optim.schedule(plan.warmup_steps.value))
    dev = plan.device.value
    scaler = torch.amp.GradScaler(dev.split(":")[0], enabled=plan.loss_scaling.value)
    tok = setup.tok
    run = loop.Run(
        model,
        opt,
        sched,
        scaler,
        setup.ds.train,
        setup.ds.eval,
        plan,
        output,
        cfg.seed,
        tok.pad_token_id,
        dev,
        getattr(torch, M.TORCH_DTYPES[plan.dtype.value]),
        log=lambda m: out(f"note: {m}\n", err=True),
        micro=plan.micro_batch.value,
        log_every=cfg.log_every,
        report=report_to.writer_for(cfg.report_to, output),
    )
    run.stop_after = _test_stop_after()
    first_eval = None
    if resume and checkpoint.exists(output):
        try:
            st = checkpoint.load(output, model, opt, sched, scaler)
        except checkpoint.CheckpointError as e:
            _fail(str(e))
        run.step, run.tokens, run.elapsed = st["step"], st["tokens"], st["elapsed_s"]
        if cfg.micro_batch is None:
            run.micro = st["micro_batch"]  # as saved: it may have backed off after an out-of-memory
        elif cfg.micro_batch != st["micro_batch"]:
            out(f"note: micro-batch {cfg.micro_batch} (the checkpoint ran {st['micro_batch']}): the loss is "
                "normalised by label tokens, so the gradient is the same (dropout masks are drawn in "
                "another order)\n", err=True)
        run.history = loop.truncate_metrics(output, run.step)
        run.skipped = sum(1 for h in run.history if h.get("skipped"))
        first_eval = _first_eval(output)
        out(f"note: resuming from step {run.step} of {plan.max_steps.value} (checkpoint in "
            f"{output / 'checkpoint'})\n", err=True)
    else:
        if resume:
            out(f"note: {output} has no checkpoint yet: starting at step 0\n", err=True)
        loop.truncate_metrics(output, 0)
        first_eval = loop.evaluate(run)
        write_text(output / "eval0.json", strict_json.dumps({"eval_loss": first_eval}) + "\n")
    status, code = "completed", EXIT_OK
    try:
        loop.fit(run, loop.progress_bar())
    except loop.Interrupted as e:
        status, code = "interrupted", EXIT_INTERRUPTED
        out(
            f"\nqdoctor: interrupted ({e.signame}) at step {e.step}: checkpoint saved in "
            f"{output / 'checkpoint'}; continue with:\n  {hint}\n",
            err=True,
        )
    except loop.StopRun as e:
        status, code = "stopped", EXIT_FINDINGS
        f = e.finding
        out(f"\nqdoctor: error: {f.code} {f.title} ({'; '.join(f.evidence)}) -> fix: {f.fix}\n", err=True)
    adapter = None
    if status == "completed":
        adapter = _save_adapter(model, output, base_path)
    summ = summary.build(
        plan=plan,
        fingerprint=pf.fingerprint,
        history=run.history,
        run=run,
        wall_s=time.perf_counter() - t_start,
        status=status,
        output=output,
        adapter_dir=adapter,
        first_eval=first_eval,
        data=setup.ds.to_dict(),
    )
    summary.write(output, summ)
    summary.plot(output, run.history)
    if as_json:
        out(strict_json.dumps(summ, indent=2) + "\n")
    else:
        out(_human(summ))
    return code


def _first_eval(output: Path):
    import json

    try:
        return json.loads((output / "eval0.json").read_text())["eval_loss"]
    except (OSError, ValueError, KeyError):
        return None


def _save_adapter(model, output: Path, base_path: str) -> Path:
    """The final adapter, loadable with PeftModel.from_pretrained (base_model_name_or_path = the base)."""
    import tempfile

    from qdoctor.atomic import replace_dir

    tmp = Path(tempfile.mkdtemp(prefix=".adapter.tmp-", dir=output))
    model.peft_config["default"].base_model_name_or_path = base_path
    model.save_pretrained(tmp)
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
    return "\n".join(lines) + "\n"


def _test_stop_after():
    v = os.environ.get("QDOCTOR_TEST_STOP_AFTER")
    return int(v) if v and v.isdigit() else None
