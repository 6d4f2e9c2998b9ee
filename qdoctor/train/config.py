"""The one typed config of a run. A TOML file (`--config`) and command-line flags fill the same fields.

`None` means "let the plan decide" (the plan records what it chose and why). Unknown keys and bad
values raise `ConfigError` naming the key; the CLI turns that into a one-line error, exit code 2.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, fields

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """Bad user input; the message is one line."""


@dataclass
class TrainConfig:
    model: str | None = None  # local HF dir or hub id; None = the embedded tiny Llama
    trust_remote_code: bool = False  # run Python code shipped with the model (never by default)
    data: str | None = None  # JSONL; None = the embedded instruction set
    output: str | None = None  # None = runs/<model>-<time>
    max_steps: int | None = None  # optimizer steps
    seed: int = 0
    lr: float | None = None
    lora_r: int = 16
    lora_alpha: int | None = None  # None = 2 * r
    lora_dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    batch_size: int | None = None  # effective batch (sequences per optimizer step)
    micro_batch: int | None = None
    grad_accum: int | None = None
    seq_len: int | None = None  # None = DEFAULT_SEQ_LEN, or the model's max_position_embeddings if fewer
    packing: bool = False
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    max_grad_norm: float = 0.3
    eval_fraction: float = 0.1
    eval_every: int | None = None
    save_every: int | None = None
    device: str | None = None  # "cpu", "cuda", "cuda:N"; None = cuda:0 when a GPU works, else cpu
    dtype: str = "auto"  # auto | bf16 | fp16 | fp32
    quantization: str = "auto"  # auto | nf4 | int8 | none
    optimizer: str = "auto"  # auto | paged_adamw_8bit | adamw_8bit | cpu_adamw | adamw
    gradient_checkpointing: str = "auto"  # auto | on | off | offload (layer inputs in pinned host memory)
    attention: str = "auto"  # auto | sdpa | eager | varlen
    fused_loss: str = "auto"  # auto | liger | none: fused linear + cross-entropy (never materialises logits)
    compile: str = "auto"  # auto | on | off: torch.compile each decoder layer
    log_every: int | None = None  # progress line every N steps off a terminal; None = about ten a run
    report_to: str = "none"  # none | tensorboard: metrics also as TensorBoard event files (report_to.py)
    nproc: int | None = None  # processes (one per GPU) launched through torchrun; None = 1, or the launcher's
    fsdp: bool | None = None  # shard the 4-bit model over the processes (FSDP-QLoRA); None = the plan decides

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


DEFAULT_BATCH = 16  # sequences per optimizer step (QLoRA's OASST1 run)
DEFAULT_SEQ_LEN = 1024

CHOICES = {
    "dtype": ("auto", "bf16", "fp16", "fp32"),
    "quantization": ("auto", "nf4", "int8", "none"),
    "optimizer": ("auto", "paged_adamw_8bit", "adamw_8bit", "cpu_adamw", "adamw"),
    "gradient_checkpointing": ("auto", "on", "off", "offload"),
    "attention": ("auto", "sdpa", "eager", "varlen"),
    "fused_loss": ("auto", "liger", "none"),
    "compile": ("auto", "on", "off"),
    "report_to": ("none", "tensorboard"),
}
POSITIVE = (
    "max_steps",
    "lora_r",
    "lora_alpha",
    "batch_size",
    "micro_batch",
    "grad_accum",
    "seq_len",
    "eval_every",
    "save_every",
    "log_every",
    "nproc",
)
NON_NEGATIVE = ("warmup_steps", "weight_decay", "max_grad_norm")


def _type_ok(name: str, value, hint: str) -> bool:
    if value is None:
        return "None" in hint
    if isinstance(value, bool):
        return "bool" in hint
    if isinstance(value, int):
        return "int" in hint or "float" in hint
    if isinstance(value, float):
        return "float" in hint
    if isinstance(value, str):
        return "str" in hint
    if isinstance(value, list):
        return "list" in hint and all(isinstance(v, str) for v in value)
    return False


def validate(cfg: TrainConfig) -> TrainConfig:
    hints = {f.name: str(f.type) for f in fields(TrainConfig)}
    for name, hint in hints.items():
        v = getattr(cfg, name)
        if not _type_ok(name, v, hint):
            raise ConfigError(f"config key {name!r}: {v!r} is not a valid {hint.replace(' | None', '')}")
        if isinstance(v, int) and not isinstance(v, bool) and "float" in hint and "int" not in hint:
            setattr(cfg, name, float(v))
    for name in POSITIVE:
        v = getattr(cfg, name)
        if v is not None and v < 1:
            raise ConfigError(f"config key {name!r}: must be >= 1, got {v!r}")
    for name in NON_NEGATIVE:
        v = getattr(cfg, name)
        if v is not None and v < 0:
            raise ConfigError(f"config key {name!r}: must be >= 0, got {v!r}")
    if cfg.lr is not None and not (0 < cfg.lr < 1):
        raise ConfigError(f"config key 'lr': must be between 0 and 1, got {cfg.lr!r}")
    if not 0 <= cfg.lora_dropout < 1:
        raise ConfigError(f"config key 'lora_dropout': must be in [0, 1), got {cfg.lora_dropout!r}")
    if not 0 <= cfg.eval_fraction < 0.5:
        raise ConfigError(f"config key 'eval_fraction': must be in [0, 0.5), got {cfg.eval_fraction!r}")
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise ConfigError(
                f"config key {name!r}: {getattr(cfg, name)!r} is not one of {', '.join(allowed)}"
            )
    if cfg.device is not None and not (
        cfg.device == "cpu"
        or cfg.device == "cuda"
        or (cfg.device.startswith("cuda:") and cfg.device[5:].isdigit())
    ):
        raise ConfigError(f"config key 'device': {cfg.device!r} is not cpu, cuda or cuda:N")
    if isinstance(cfg.target_modules, list) and not cfg.target_modules:
        raise ConfigError("config key 'target_modules': must not be empty")
    if cfg.fsdp and cfg.nproc == 1:
        raise ConfigError("fsdp shards the model over several processes: add --nproc 2 (or more), or launch "
                          "with torchrun / accelerate launch")
    batch_split(cfg, cfg.nproc or 1)
    from qdoctor.train.report_to import missing

    if why := missing(cfg.report_to):
        raise ConfigError(why)
    return cfg


def batch_split(cfg: TrainConfig, world: int = 1) -> tuple[int, int | None, int | None]:
    """(effective batch, micro-batch, accumulation) as far as the config fixes them; a split that would skip
    examples or leave a step empty is refused. Every optimizer step then sees exactly `batch` sequences.

    With `world` processes the micro-batch and the accumulation are per process: each process takes
    `batch / world` of every step's sequences, so batch = world x micro-batch x accumulation."""
    mb, acc = cfg.micro_batch, cfg.grad_accum
    procs = f" x {world} processes" if world > 1 else ""
    if cfg.batch_size:
        batch, src = cfg.batch_size, f"batch_size {cfg.batch_size}"
    elif mb and acc:
        batch, src = world * mb * acc, None
    else:
        batch, src = DEFAULT_BATCH, f"batch_size {DEFAULT_BATCH} (the default)"
    if batch % world:
        near = [b for b in (batch - batch % world, batch - batch % world + world) if b > 0]
        raise ConfigError(
            f"{src or f'batch_size {batch}'} does not split evenly over {world} processes (each takes the "
            f"same share of every step): use --batch-size {' or '.join(map(str, near))}"
        )
    per = batch // world
    if mb and acc and mb * acc != per:
        raise ConfigError(
            f"micro_batch {mb} x grad_accum {acc}{procs} = {world * mb * acc} sequences, but {src}: set two "
            "of the three"
        )
    if mb and mb > per:
        what = f"the {per} sequences each of {world} processes takes from {src}" if world > 1 else src
        raise ConfigError(
            f"micro_batch {mb} is larger than {what}: a step would hold no full micro-batch; set "
            f"--batch-size {mb * world} (or a multiple) or a micro-batch that divides {per}"
        )
    if mb and per % mb:
        what = f"the {per} sequences per process of {src}" if world > 1 else src
        raise ConfigError(
            f"micro_batch {mb} does not divide {what}: {per % mb} sequences of every step would be skipped; "
            f"use a micro-batch among {', '.join(str(d) for d in range(1, per + 1) if per % d == 0)}"
        )
    if acc and per % acc:
        raise ConfigError(f"grad_accum {acc} does not divide {src}{procs}: micro-batches would be uneven")
    if acc and not mb:
        mb = per // acc
    if mb and not acc:
        acc = per // mb
    return batch, mb, acc


def resolve_seq_len(cfg: TrainConfig, max_positions: int | None) -> tuple[int, str]:
    """(tokens per sequence, why). Longer than the model's positions is refused when set, capped when not."""
    if cfg.seq_len is not None:
        if max_positions and cfg.seq_len > max_positions:
            raise ConfigError(
                f"seq_len {cfg.seq_len} is longer than the model's max_position_embeddings "
                f"{max_positions}: positions past it were never trained; use --seq-len {max_positions} "
                "or less"
            )
        return cfg.seq_len, "set by you"
    if max_positions and max_positions < DEFAULT_SEQ_LEN:
        return max_positions, f"the model's max_position_embeddings (below the default {DEFAULT_SEQ_LEN})"
    return DEFAULT_SEQ_LEN, f"default {DEFAULT_SEQ_LEN} tokens (longer examples are truncated)"


def load_toml(path: str) -> dict:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config {path} is not valid TOML: {e}") from None
    return data.get("train", data) if isinstance(data.get("train"), dict) else data


def build(file_values: dict | None = None, flag_values: dict | None = None) -> TrainConfig:
    """Defaults < TOML file < flags (flags given as None are 'not set')."""
    known = {f.name for f in fields(TrainConfig)}
    values = {}
    for source, d in (("config file", file_values or {}), ("flags", flag_values or {})):
        for k, v in d.items():
            key = k.replace("-", "_")
            if key not in known:
                raise ConfigError(f"unknown config key {k!r} in {source} (known: {', '.join(sorted(known))})")
            if source == "flags" and v is None:
                continue
            values[key] = v
    return validate(TrainConfig(**values))
