"""Everything a run needs before pre-flight, validated: `prepare` turns a config into a typed `Setup`.

Order matters for the user: first what needs no ML import (the model directory's weights, the data file, the
output directory, the resume record; a bad one fails in well under a second), then what needs the tokenizer
and the model config (its class, its positions, the LoRA targets, the tokenized data). Nothing is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

from qdoctor.train import checkpoint, memory, rundir
from qdoctor.train import config as C
from qdoctor.train import data as D
from qdoctor.train import model as M

EMBEDDED_DATA = "qdoctor/instructions.jsonl"


@dataclass
class Setup:
    src: M.ModelSource
    tok: object  # the tokenizer (transformers)
    ds: D.Dataset
    shape: memory.Shape
    max_positions: int | None  # the model's max_position_embeddings
    model_type: str | None
    output: Path
    previous: dict | None  # run.json of the run being resumed
    data_name: str  # as given, or the embedded set's name
    data_path: str  # resolved
    data_hash: str  # content
    model_hash: str  # content (model.fingerprint)

    @property
    def data_notes(self) -> list[str]:
        return self.ds.notes()


def prepare(cfg: C.TrainConfig, resume: bool, world: int = 1, on_ml_start=None) -> Setup:
    """Raises ConfigError, DataError, ModelError or RunDirError (one line each, exit 2). `world`: the
    processes that will train (the batch is split over them; every one of them calls this, read-only).
    `on_ml_start()` is called once the checks that need no ML import have passed (train starts the
    pre-flight's deep child there, so it imports torch while this process imports transformers)."""
    if resume and not cfg.output:
        raise rundir.RunDirError("--resume needs --output DIR (the run to continue)")
    src = M.resolve(cfg.model, cfg.trust_remote_code)
    if src.path:
        M.check_weights(src.path)
    data_path = cfg.data or str(M.assets_dir() / "instructions.jsonl")
    rows = D.read_jsonl(data_path)
    output = (
        Path(cfg.output)
        if cfg.output
        else Path("runs") / (Path(src.name).name + time.strftime("-%Y%m%d-%H%M%S"))
    )
    previous = rundir.check(output, resume)
    done = checkpoint.saved_step(output) if previous else None
    if done and cfg.max_steps and cfg.max_steps < done:
        raise rundir.RunDirError(
            f"--max-steps {cfg.max_steps} is below the {done} steps the run in {output} has done"
        )
    if on_ml_start is not None:
        on_ml_start()
    tok = M.load_tokenizer(src)
    mcfg = M.load_config(src)
    M.check_causal_lm(mcfg, src.name)
    max_positions = M.max_positions(mcfg)
    seq_len, _ = C.resolve_seq_len(cfg, max_positions)
    M.check_targets(cfg.target_modules, M.meta_model(mcfg, src.trust_remote_code), src.name)
    ds = D.build(
        rows,
        tok,
        seq_len=seq_len,
        eval_fraction=cfg.eval_fraction,
        seed=cfg.seed,
        packing=cfg.packing,
        source=cfg.data or EMBEDDED_DATA,
    )
    data_hash = hashlib.sha256(Path(data_path).read_bytes()).hexdigest()[:16]
    model_hash = M.fingerprint(src)
    if previous:  # what can be compared before pre-flight is, so a mistyped resume fails fast
        early = early_identity(cfg, model_hash, data_hash, seq_len, world)
        rundir.check_identity(output, {"identity": {k: previous["identity"].get(k) for k in early}}, early)
    if previous and checkpoint.exists(output):  # a pickle, a damaged or a foreign checkpoint: refused here
        checkpoint.verify(output)
    return Setup(
        src=src,
        tok=tok,
        ds=ds,
        shape=memory.shape_from_config(mcfg),
        max_positions=max_positions,
        model_type=getattr(mcfg, "model_type", None),
        output=output,
        previous=previous,
        data_name=cfg.data or EMBEDDED_DATA,
        data_path=str(Path(data_path).resolve()),
        data_hash=data_hash,
        model_hash=model_hash,
    )


def early_identity(cfg: C.TrainConfig, model_hash: str, data_hash: str, seq_len: int, world: int = 1) -> dict:
    """The part of the identity known before the plan (which needs pre-flight). Not the number of processes:
    the effective batch and the loss normalised by the step's label tokens make the math the same."""
    return {
        "model": model_hash,
        "data_sha256": data_hash,
        "seed": cfg.seed,
        "batch_size": C.batch_split(cfg, world)[0],
        "seq_len": seq_len,
        "packing": cfg.packing,
        "weight_decay": cfg.weight_decay,
        "max_grad_norm": cfg.max_grad_norm,
        "eval_fraction": cfg.eval_fraction,
    }


def identity(cfg: C.TrainConfig, plan, setup: Setup) -> dict:
    """What changes the math of a run: content (not paths) and every resolved hyperparameter. Not here:
    max_steps (a run may be extended), micro-batch (the loss is normalised by label tokens), eval/save
    cadence, attention kernel, checkpointing, fused loss and compile (the same numbers)."""
    return {
        **early_identity(cfg, setup.model_hash, setup.data_hash, plan.seq_len.value,
                         plan.parallel.value.world),
        "lr": plan.lr.value,
        "lora": dataclasses.asdict(plan.lora.value),
        "warmup_steps": plan.warmup_steps.value,
        "dtype": plan.dtype.value,
        "quantization": plan.quantization.value,
        "optimizer": plan.optimizer.value,
    }
