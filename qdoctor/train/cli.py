"""`qdoctor train`: pre-flight -> plan -> run. With no --model/--data it trains the embedded tiny Llama.

Exit codes: 0 done (or --dry-run); 1 refused by an error finding, or stopped with a diagnosis (NaN loss,
out of memory at micro-batch 1); 2 bad input (one line, nothing written); 130 interrupted (checkpoint saved).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import click

from qdoctor.console import EXIT_FINDINGS, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, out

EMBEDDED_DATA = "qdoctor/instructions.jsonl"


class BadInput(Exception):
    pass


def _fail(msg: str, code: int = EXIT_USAGE):
    out(f"qdoctor: error: {msg}\n", err=True)
    sys.exit(code)


def _opt(*names, **kw):
    return click.option(*names, default=None, **kw)


@click.command("train")
@_opt(
    "--config",
    "config_file",
    type=str,
    help="TOML file with the same keys as the flags (a [train] table or top level).",
)
@_opt(
    "--model",
    help="Local Hugging Face model directory, or a hub id when online. Default: the embedded tiny Llama.",
)
@click.option(
    "--trust-remote-code",
    is_flag=True,
    default=None,
    help="Allow a model that needs its own Python code (auto_map) to run it. Off by default.",
)
@_opt("--data", help="JSONL with text, prompt/completion or messages. Default: the embedded instruction set.")
@_opt("--output", help="Run directory (default: runs/<model>-<time>).")
@_opt("--max-steps", type=int, help="Optimizer steps.")
@_opt("--seed", type=int)
@_opt("--lr", type=float)
@_opt("--lora-r", type=int)
@_opt("--micro-batch", type=int)
@_opt("--grad-accum", type=int)
@_opt("--batch-size", type=int, help="Effective batch (sequences per optimizer step).")
@_opt("--seq-len", type=int)
@_opt("--eval-every", type=int)
@_opt("--save-every", type=int)
@_opt("--device", help="cpu, cuda or cuda:N (default: the GPU when one works).")
@_opt("--dtype", help="auto, bf16, fp16 or fp32.")
@_opt("--optimizer", help="auto, paged_adamw_8bit, adamw_8bit, cpu_adamw or adamw.")
@_opt("--target-modules", help="Comma-separated LoRA targets (default all-linear).")
@click.option("--packing/--no-packing", default=None, help="Pack examples into full sequences.")
@click.option("--resume", is_flag=True, help="Continue the run in --output from its checkpoint.")
@click.option("--dry-run", is_flag=True, help="Print the plan and the memory estimate, then exit.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary (or plan) on stdout.")
@click.option("--force", is_flag=True, help="Start even when pre-flight finds an error.")
@click.option("--skip-probes", is_flag=True, help="Plan from facts alone (no probe child processes).")
def train(config_file, resume, dry_run, as_json, force, skip_probes, target_modules, **flags):
    """Fine-tune with QLoRA using settings this machine is known to handle, each with its reason."""
    from qdoctor import extra

    extra.require("train")  # one line and exit 2 without the `train` extra, not an ImportError
    from qdoctor.train import config as C
    from qdoctor.train.checkpoint import CheckpointError
    from qdoctor.train.data import DataError
    from qdoctor.train.model import ModelError

    t_start = time.perf_counter()
    if target_modules is not None:
        flags["target_modules"] = [t.strip() for t in target_modules.split(",") if t.strip()] or ""
    try:
        cfg = C.build(C.load_toml(config_file) if config_file else None, flags)
        setup = _setup(cfg, resume)
    except (C.ConfigError, DataError, ModelError, BadInput, CheckpointError) as e:
        _fail(str(e))
    from qdoctor.smoke.runner import ProbeUsageError
    from qdoctor.train import plan as P
    from qdoctor.train import preflight

    try:
        pf = preflight.run(cfg.device, skip_probes=skip_probes)
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
        shape=setup["shape"],
        model_name=setup["src"].name,
        embedded=setup["src"].embedded,
        n_train=len(setup["ds"].train),
        max_len=setup["ds"].max_len,
        model_type=setup["model_type"],
    )
    if dry_run:
        out(plan.to_json() + "\n" if as_json else plan.render())
        sys.exit(EXIT_OK)
    ident = _identity(cfg, plan, setup)
    try:
        _check_identity(setup["output"], ident, resume)
    except BadInput as e:
        _fail(str(e))
    out(plan.render(), err=True)
    code = _run(cfg, plan, setup, pf, ident, resume, as_json, t_start)
    sys.exit(code)


def _setup(cfg, resume: bool) -> dict:
    """Every input validated before anything is written."""
    from qdoctor.train import data as D
    from qdoctor.train import memory
    from qdoctor.train import model as M

    src = M.resolve(cfg.model, cfg.trust_remote_code)
    if resume and not cfg.output:
        raise BadInput("--resume needs --output DIR (the run to continue)")
    tok = M.load_tokenizer(src)
    mcfg = M.load_config(src)
    skel = M.meta_model(mcfg, src.trust_remote_code)
    M.check_targets(cfg.target_modules, skel, src.name)
    data_path = cfg.data or str(M.assets_dir() / "instructions.jsonl")
    rows = D.read_jsonl(data_path)
    ds = D.build(
        rows,
        tok,
        seq_len=cfg.seq_len,
        eval_fraction=cfg.eval_fraction,
        seed=cfg.seed,
        packing=cfg.packing,
        source=cfg.data or EMBEDDED_DATA,
    )
    output = (
        Path(cfg.output)
        if cfg.output
        else Path("runs") / (Path(src.name).name + time.strftime("-%Y%m%d-%H%M%S"))
    )
    _check_output(output, resume)
    if resume:
        from qdoctor.train import checkpoint

        if checkpoint.exists(output):  # a pickle, a damaged or a foreign checkpoint: refused before writing
            checkpoint.verify(output)
    data_hash = hashlib.sha256(Path(data_path).read_bytes()).hexdigest()[:16]
    return {
        "src": src,
        "tok": tok,
        "ds": ds,
        "shape": memory.shape_from_config(mcfg),
        "model_type": getattr(mcfg, "model_type", None),
        "output": output,
        "data_name": cfg.data or EMBEDDED_DATA,
        "data_hash": data_hash,
    }


def _check_output(output: Path, resume: bool) -> None:
    if output.exists() and not output.is_dir():
        raise BadInput(f"output {output} exists and is not a directory")
    if not output.exists() or not any(output.iterdir()):
        return
    if not (output / "run.json").is_file():
        raise BadInput(
            f"output directory {output} is not empty and holds no qdoctor run; choose a fresh --output"
        )
    if not resume:
        raise BadInput(
            f"output directory {output} already holds a run; add --resume to continue it or choose a "
            "fresh --output"
        )


def _identity(cfg, plan, setup) -> dict:
    return {
        "model": setup["src"].name,
        "data": setup["data_name"],
        "data_sha256": setup["data_hash"],
        "seed": cfg.seed,
        "lr": plan.v("lr"),
        "lora": plan.v("lora"),
        "batch_size": plan.v("batch_size"),
        "seq_len": cfg.seq_len,
        "packing": cfg.packing,
        "warmup_steps": plan.v("warmup_steps"),
        "weight_decay": cfg.weight_decay,
        "max_grad_norm": cfg.max_grad_norm,
        "eval_fraction": cfg.eval_fraction,
        "quantization": plan.v("quantization"),
        "optimizer": plan.v("optimizer"),
    }


def _check_identity(output: Path, ident: dict, resume: bool) -> None:
    f = output / "run.json"
    if not (resume and f.is_file()):
        return
    try:
        old = json.loads(f.read_text()).get("identity", {})
    except (OSError, ValueError):
        raise BadInput(f"{f} is unreadable; choose a fresh --output") from None
    diff = [k for k in sorted(set(old) | set(ident)) if json.dumps(old.get(k)) != json.dumps(ident.get(k))]
    if diff:
        raise BadInput(
            f"output directory {output} holds a different run (differs in {', '.join(diff)}); resume "
            "it with the same settings or choose a fresh --output"
        )


def _run(cfg, plan, setup, pf, ident, resume, as_json, t_start) -> int:
    import torch

    from qdoctor.atomic import write_text
    from qdoctor.train import checkpoint, loop, optim, summary
    from qdoctor.train import model as M

    output: Path = setup["output"]
    output.mkdir(parents=True, exist_ok=True)
    checkpoint.clean_temp(output)
    write_text(output / "run.json", json.dumps({"identity": ident, "created": time.time()}, indent=2) + "\n")
    write_text(output / "plan.json", plan.to_json() + "\n")
    model, base_path = M.load_for_training(setup["src"], plan, cfg.seed)
    opt = optim.build(plan.v("optimizer"), model.parameters(), plan.v("lr"), cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, optim.schedule(plan.v("warmup_steps")))
    dev = plan.v("device")
    scaler = torch.amp.GradScaler(dev.split(":")[0], enabled=plan.v("loss_scaling"))
    tok = setup["tok"]
    run = loop.Run(
        model,
        opt,
        sched,
        scaler,
        setup["ds"].train,
        setup["ds"].eval,
        plan,
        output,
        cfg.seed,
        tok.pad_token_id,
        dev,
        getattr(torch, M.TORCH_DTYPES[plan.v("dtype")]),
        log=lambda m: out(f"note: {m}\n", err=True),
        micro=plan.v("micro_batch"),
    )
    run.stop_after = _test_stop_after()
    first_eval = None
    if resume and checkpoint.exists(output):
        try:
            st = checkpoint.load(output, model, opt, sched, scaler)
        except checkpoint.CheckpointError as e:
            _fail(str(e))
        run.step, run.micro, run.tokens, run.elapsed = (
            st["step"],
            st["micro_batch"],
            st["tokens"],
            st["elapsed_s"],
        )
        run.history = loop.truncate_metrics(output, run.step)
        first_eval = _first_eval(output)
        out(f"note: resuming from step {run.step} (checkpoint in {output / 'checkpoint'})\n", err=True)
    else:
        if resume:
            out(f"note: {output} has no checkpoint yet: starting at step 0\n", err=True)
        loop.truncate_metrics(output, 0)
        first_eval = loop.evaluate(run)
        write_text(output / "eval0.json", json.dumps({"eval_loss": first_eval}) + "\n")
    status, code = "completed", EXIT_OK
    try:
        loop.fit(run, loop.progress_bar())
    except loop.Interrupted as e:
        status, code = "interrupted", EXIT_INTERRUPTED
        out(
            f"\nqdoctor: interrupted at step {e.step}: checkpoint saved in {output / 'checkpoint'}; continue "
            f"with: qdoctor train --output {output} --resume\n",
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
    )
    summary.write(output, summ)
    summary.plot(output, run.history)
    if as_json:
        out(json.dumps(summ, indent=2, default=str) + "\n")
    else:
        out(_human(summ))
    return code


def _first_eval(output: Path):
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

    return (
        f"{s['status']}: {s['steps']} steps, loss {f(s['first_loss'])} -> {f(s['final_loss'])}, held-out "
        f"{f(s['first_eval_loss'])} -> {f(s['final_eval_loss'])}, {s['tokens_per_s'] or 0:,.0f} tok/s, "
        f"{s['wall_time_s']:.1f} s wall\n"
        f"adapter: {s['adapter'] or 'not written yet (the run did not complete; see checkpoint/)'}\n"
        f"summary: {s['output']}/summary.json, "
        f"curve: {s['output']}/loss.png\n"
    )


def _test_stop_after():
    v = os.environ.get("QDOCTOR_TEST_STOP_AFTER")
    return int(v) if v and v.isdigit() else None
