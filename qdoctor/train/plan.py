"""Decide every training setting before the first step, each with its reason.

`make_plan` is a pure function of (config, facts, probe results, model shape, dataset size, processes):
tests feed it recorded machines. It calls one `choose_*` per decision, in dependency order (device -> dtype
and quantization -> the memory fit, which picks optimizer, micro-batch and checkpointing together, and with
several processes whether each GPU holds the whole 4-bit model (DDP) or a shard of it (FSDP) -> the
schedule). The loop then executes the plan and never looks at the hardware itself. With several processes
every rank computes the same plan from the same facts (the launcher's pre-flight), so they cannot disagree.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Generic, TypeVar

from qdoctor import devices, strict_json
from qdoctor.arch import cc_tuple, sm
from qdoctor.findings import Finding
from qdoctor.train import memory, speed
from qdoctor.train.config import DEFAULT_BATCH, TrainConfig, batch_split, resolve_seq_len

EMBEDDED_LR, EMBEDDED_STEPS = 3e-3, 60
GPU_HEADROOM = 0.85  # of free memory: the CUDA context, allocator fragmentation, the eval batch
CPU_SHARE = 0.5  # of host RAM: the OS and the data loader keep the rest

T = TypeVar("T")


@dataclass
class Choice(Generic[T]):
    value: T
    reason: str


@dataclass(frozen=True)
class Lora:
    r: int
    alpha: int
    dropout: float
    targets: list[str] | str


@dataclass(frozen=True)
class Parallel:
    """How the processes share the work: `world` processes, each taking `per_rank_batch` sequences of every
    step (batch = world x micro-batch x accumulation), with the whole model on each (ddp) or a shard of it
    (fsdp)."""

    world: int
    strategy: str  # single | ddp | fsdp
    backend: str | None  # gloo | nccl (gradients); None with one process
    per_rank_batch: int
    devices: str  # "cpu", "cuda:0", or "cuda:0..cuda:3" (rank r on cuda:r)


@dataclass(frozen=True)
class MemoryFit:
    """The estimate the micro-batch, checkpointing and optimizer were fitted to, and the budget."""

    device: str
    budget_gib: float
    budget: str  # how the budget was reckoned
    estimate: memory.Estimate
    tokens_per_sequence: int
    params_b: float
    calibration: str = memory.CALIBRATION_SOURCE

    def to_dict(self) -> dict:
        return {**asdict(self), "budget_gib": round(self.budget_gib, 2), "estimate": self.estimate.to_dict()}


@dataclass
class Plan:
    model: Choice[str]
    trust_remote_code: Choice[bool]
    device: Choice[str]
    dtype: Choice[str]  # bf16 | fp16 | fp32
    quantization: Choice[str]  # nf4 | int8 | none
    optimizer: Choice[str]
    gradient_checkpointing: Choice[bool | str]  # False | True | "offload" (layer inputs in host memory)
    attention: Choice[str]
    seq_len: Choice[int]
    batch_size: Choice[int]
    micro_batch: Choice[int]
    grad_accum: Choice[int]
    lr: Choice[float]
    max_steps: Choice[int]
    warmup_steps: Choice[int]
    lora: Choice[Lora]
    eval_every: Choice[int]
    save_every: Choice[int]
    loss_scaling: Choice[bool]
    max_grad_norm: Choice[float]
    weight_decay: Choice[float]
    fused_loss: Choice[str]  # liger | none
    compile: Choice[bool]
    parallel: Choice[Parallel] = None  # type: ignore[assignment]  (make_plan always sets it)
    memory: MemoryFit | None = None
    findings: list[Finding] = field(default_factory=list)

    def choices(self) -> dict[str, Choice]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("memory", "findings")}

    def to_dict(self) -> dict:
        d = {k: asdict(c) for k, c in self.choices().items()}
        d["memory"] = self.memory.to_dict() if self.memory else {}
        d["findings"] = [f.to_dict() for f in self.findings]
        return d

    def to_json(self) -> str:
        return strict_json.dumps(self.to_dict(), indent=2)

    def render(self) -> str:
        lines = ["Plan (every setting, and why):"]
        for k, c in self.choices().items():
            lines.append(f"  {k:<22} {_fmt(c.value):<20} {c.reason}")
        m = self.memory
        if m:
            est = m.estimate
            lines.append(
                f"Memory estimate on {m.device}: {est.total_gib:.2f} GiB peak of {m.budget_gib:.1f} "
                f"GiB usable (weights {est.weights_gib:.2f}, LoRA {est.lora_gib:.3f}, optimizer "
                f"{est.optimizer_gib:.3f}, activations {est.activations_gib:.2f}, logits "
                f"{est.logits_gib:.2f}); model {m.params_b:.3f}B params; calibrated on {m.calibration}"
                + (f"; plus {est.host_gib:.2f} GiB of host RAM for the offloaded layer inputs"
                   if est.host_gib else "")
            )
        for f in self.findings:
            lines.append(f"  [{f.severity}] {f.code} {f.title}" + (f" -> {f.fix}" if f.fix else ""))
        return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, Parallel):
        return v.strategy if v.world == 1 else f"{v.strategy} x{v.world} ({v.backend})"
    if isinstance(v, Lora):
        v = asdict(v)
    if isinstance(v, dict):
        return ",".join(f"{k}={_fmt(x)}" for k, x in v.items())
    return str(v)


# ---- probe results, read as data ----

BROKEN = ("fail", "crash", "timeout")  # probe outcomes the plan routes around
# the criteria of optim8bit's paged step (matrix/smoke_bands.toml)
PAGED_KEYS = frozenset({"paged_ok", "paged_state_is_managed", "paged_update_rel_err"})


@dataclass(frozen=True)
class ProbeView:
    """One probe's result as the plan reads it: status, measurements and the keys of failed criteria."""

    status: str | None = None
    measurements: dict = field(default_factory=dict)
    failed_keys: frozenset[str] | None = None  # None: not recorded (a result cached by an older qdoctor)

    @property
    def broken(self) -> bool:
        return self.status in BROKEN


class Probes:
    """Probe results (smoke ProbeResult objects or their dicts) by name; a probe not run reads as empty."""

    def __init__(self, probes=None):
        if isinstance(probes, Probes):
            self._by_name: dict[str, ProbeView] = probes._by_name
            return
        self._by_name = {}
        for p in probes or []:
            d = p if isinstance(p, dict) else p.to_dict()
            keys = d.get("failed_keys")
            self._by_name[d.get("probe")] = ProbeView(
                d.get("status"), d.get("measurements") or {}, frozenset(keys) if keys is not None else None
            )

    def __getitem__(self, name: str) -> ProbeView:
        return self._by_name.get(name, ProbeView())

    def note(self, name: str) -> str:
        st = self[name].status
        return f"{name} probe {st}" if st else f"{name} probe not run"


def probe_status(probes, name: str) -> str | None:
    return Probes(probes)[name].status


def _probe_note(probes, name: str) -> str:
    return Probes(probes).note(name)


def _gpu(facts: dict, device: str) -> dict:
    """The NVML GPU behind `cuda:N`: the N-th GPU CUDA_VISIBLE_DEVICES lets through (qdoctor.devices)."""
    return devices.gpu_for(facts, device) or {}


def _cc(gpu: dict) -> tuple[int, int] | None:
    return cc_tuple(gpu.get("compute_capability"))


def _used(facts: dict, device: str, world: int) -> list[dict]:
    """The GPUs a run uses: the plan's device, or with several processes cuda:0 .. cuda:world-1 (rank r on
    cuda:r, counted as qdoctor.devices counts visible GPUs)."""
    if device == "cpu":
        return []
    if world == 1:
        return [_gpu(facts, device)]
    return [_gpu(facts, f"cuda:{i}") for i in range(world)]


def _weakest(gpus: list[dict]) -> dict:
    """The GPU with the lowest compute capability (an unknown one counts as lowest)."""
    return min(gpus, key=lambda g: _cc(g) or (0, 0)) if gpus else {}


def choose_trust_remote_code(cfg: TrainConfig) -> Choice[bool]:
    return Choice(
        cfg.trust_remote_code,
        "set by you (--trust-remote-code): Python code shipped with the model may run"
        if cfg.trust_remote_code
        else "no code shipped with a model runs (a model that needs it is refused)",
    )


def choose_device(cfg: TrainConfig, facts: dict, probes, world: int = 1) -> Choice:
    """The user's device, else qdoctor.devices' default (the one pre-flight probed); cuda:N is the N-th
    visible GPU, named with its NVML index in the reason. With several processes: rank 0's device (rank r
    uses cuda:r; `parallel` names them all)."""
    if world > 1 and cfg.device not in (None, "cpu"):
        dev = "cuda:0"
        return Choice(dev, f"set by you (cuda): one GPU per process, rank 0 on "
                      f"{devices.describe(facts, dev)}")
    if cfg.device:
        dev = "cpu" if cfg.device == "cpu" else f"cuda:{devices.ordinal(cfg.device)}"
        return Choice(dev, "set by you" + ("" if dev == "cpu" else f" ({devices.describe(facts, dev)})"))
    if probe_status(probes, "device") in BROKEN:
        return Choice("cpu", "the device probe failed on the GPU: training on CPU (see `qdoctor smoke`)")
    dev = devices.default_device(facts)
    if dev != "cpu":
        note = devices.visible(facts).note
        why = f"{devices.describe(facts, dev)} is usable by torch" + (f" ({note})" if note else "")
        return Choice(dev, why)
    gpus = devices.all_gpus(facts)
    if not gpus:
        why = "no GPU visible"
    elif not devices.visible(facts).gpus:
        why = f"CUDA_VISIBLE_DEVICES={devices.cvd_value(facts)!r} hides every GPU"
    else:
        why = "torch cannot use the GPU (CPU-only build or CUDA unavailable)"
    return Choice("cpu", why)


def choose_dtype(cfg, facts, probes, device: str, world: int = 1) -> Choice:
    """With several GPUs, the one with the lowest compute capability decides: every rank computes alike."""
    if cfg.dtype != "auto":
        return Choice(cfg.dtype, "set by you")
    if device == "cpu":
        return Choice("fp32", "CPU: bf16/fp16 matmuls are emulated or slow on most CPUs; fp32 is exact")
    used = _used(facts, device, world)
    gpu = _weakest(used)
    cc = _cc(gpu)
    which = "GPU" if len(used) == 1 else (
        f"the weakest of the {len(used)} GPUs used, GPU {gpu.get('index', '?')},"
        if len({_cc(g) for g in used}) > 1 else f"each of the {len(used)} GPUs used")
    bf16 = (facts.get("torch") or {}).get("bf16_supported")
    if probe_status(probes, "precision") in BROKEN:
        return Choice("fp32", "the precision probe failed: fp32 compute (slow but safe)")
    if bf16 or (bf16 is None and cc is not None and cc >= (8, 0)):
        return Choice(
            "bf16",
            f"{which} is {sm(cc)}: native bf16 (QLoRA recipe; fp16 risks overflow)",
        )
    if cc is not None and cc >= (7, 0):
        return Choice("fp16", f"{which} is {sm(cc)}: no native bf16; fp16 with loss scaling")
    return Choice("fp32", "GPU has no fast bf16/fp16 (compute capability < 7.0) or it is unknown")


def choose_quantization(cfg, facts, probes) -> Choice:
    if cfg.quantization != "auto":
        return Choice(cfg.quantization, "set by you")
    bnb = facts.get("bitsandbytes") or {}
    if (
        bnb.get("installed") is False
        or bnb.get("loads") is False
        or probe_status(probes, "imports") in BROKEN
    ):
        return Choice("none", "bitsandbytes does not load here: LoRA on an unquantized base")
    nf4 = probe_status(probes, "nf4")
    if nf4 in BROKEN or probe_status(probes, "matmul4bit") in BROKEN:
        return Choice(
            "int8",
            f"4-bit kernels failed ({_probe_note(probes, 'nf4')}, "
            f"{_probe_note(probes, 'matmul4bit')}): 8-bit weights instead",
        )
    return Choice(
        "nf4", f"NF4 + double quantization, 4.127 bits/param (QLoRA §3); {_probe_note(probes, 'nf4')}"
    )


def _bnb_ok(facts, probes) -> bool:
    bnb = facts.get("bitsandbytes") or {}
    loads = bnb.get("installed") is not False and bnb.get("loads") is not False
    return loads and not Probes(probes)["imports"].broken


def _paged_failed(probes) -> bool:
    """The optim8bit probe's paged (managed-memory) step failed; see smoke/probes/optim.py."""
    m = Probes(probes)["optim8bit"].measurements
    return m.get("paged_ok") is False or m.get("paged") == "failed"


def _only_paged_failed(probes) -> bool:
    """optim8bit failed on its paged criteria alone: the plain AdamW8bit update passed its bands."""
    o8 = Probes(probes)["optim8bit"]
    keys = o8.failed_keys
    return bool(o8.status == "fail" and _paged_failed(probes) and keys and keys <= PAGED_KEYS)


def optimizer_chain(cfg, facts, probes, device: str, fsdp: bool = False) -> list[Choice[str]]:
    """Candidates, best first; the memory fit picks the first that fits."""
    if fsdp:
        if cfg.optimizer not in ("auto", "adamw"):
            from qdoctor.train.config import ConfigError

            raise ConfigError(f"optimizer {cfg.optimizer} with fsdp: its state cannot be gathered through "
                              "FSDP's optim_state_dict for a checkpoint; use --optimizer adamw")
        return [Choice("adamw", "torch AdamW: FSDP can gather its state into a checkpoint (bitsandbytes' "
                       "8-bit and paged states cannot); sharded, LoRA's 32-bit states stay small")]
    if cfg.optimizer != "auto":
        return [Choice(cfg.optimizer, "set by you")]
    out = []
    o8_ok = not Probes(probes)["optim8bit"].broken or _only_paged_failed(probes)
    eightbit_ok = _bnb_ok(facts, probes) and o8_ok
    note = _probe_note(probes, "optim8bit")
    if device == "cpu":
        if eightbit_ok:
            out.append(
                Choice(
                    "adamw_8bit",
                    f"8-bit AdamW (states 2 bytes/param); {note}; paged optimizers need CUDA managed memory",
                )
            )
        out.append(
            Choice(
                "adamw",
                "torch AdamW" + ("" if eightbit_ok else f": the 8-bit optimizer is unusable ({note})"),
            )
        )
        return out
    if eightbit_ok and not _paged_failed(probes):
        out.append(
            Choice(
                "paged_adamw_8bit",
                f"paged AdamW 8-bit: states page to CPU under memory pressure (QLoRA recipe); {note}",
            )
        )
    if eightbit_ok:
        out.append(
            Choice(
                "adamw_8bit",
                "AdamW 8-bit" + (": the paged (managed-memory) step failed" if _paged_failed(probes) else ""),
            )
        )
    why = f"the 8-bit optimizer is unusable ({note})" if not eightbit_ok else "GPU memory is short"
    out.append(Choice("cpu_adamw", f"32-bit AdamW with states and step on the CPU: {why}"))
    out.append(Choice("adamw", "torch AdamW on the device (last resort)"))
    return out


COMPILE_MIN_PARAMS = 0.3e9  # below this, compiling (20-40 s once) costs more than a typical run saves


def _speed_measured() -> str:
    return "H200, 1.1B, 8x1024: 28.5k tok/s lean, 40.4k compiled (bench/NOTES.md)"


def _cudagraphs_measured() -> str:
    return "H200, 1.1B, 8x1024: 55.1k tok/s without, 77.6k with, the same peak; bench/NOTES.md"


def _recompute_measured() -> str:
    return "H200, 1.1B, 8x1024: 8.4 GiB instead of 11.5; 6.7B: 28.3 instead of 37.3; bench/NOTES.md"


# Below COMPILE_MIN_PARAMS, liger's first-use cost (Triton compiles its kernels) is more than a short run
# saves when the logits it avoids are this small
SMALL_LOGITS_GIB = 0.25


def _small_run(shape, gib: float) -> bool:
    return shape is not None and shape.total_params() < COMPILE_MIN_PARAMS and gib < SMALL_LOGITS_GIB


def _small_measured() -> str:
    return "H200, the embedded default: 21.6 s with the standard loss, 24.0 s with liger's, process wall; " \
        "bench/NOTES.md"


def choose_fused_loss(cfg, facts, device: str, model_type: str | None, shape=None,
                      tokens: int = 0) -> Choice[str]:
    """`shape` and `tokens` (one process's tokens per optimizer step, an upper bound on a micro-step's): a
    small model whose logits are small keeps the standard loss (see SMALL_LOGITS_GIB)."""
    missing = speed.liger_missing(device, model_type, facts.get("packages"))
    if cfg.fused_loss == "none":
        return Choice("none", "set by you")
    logits_gib = memory.LOGIT_BYTES * (shape.vocab if shape else 0) * tokens / memory.GIB
    if missing is None and cfg.fused_loss == "auto" and _small_run(shape, logits_gib):
        return Choice("none", f"standard loss: the logits of a model this small take {logits_gib * 1024:.0f} "
                      "MiB, and liger's kernels are compiled on first use, which costs more than they save "
                      f"here ({_small_measured()})")
    if missing is None:
        return Choice("liger", "fused linear + cross-entropy (liger-kernel): the full-vocabulary logits are "
                      "never materialised (H200, 6.7B, 8x1024: 37.2 GiB instead of 39.3, 2% slower; "
                      "bench/NOTES.md)" + ("" if cfg.fused_loss == "auto" else "; set by you"))
    if cfg.fused_loss == "liger":
        return Choice("none", f"liger asked for, but {missing}: the standard loss instead")
    return Choice("none", f"standard loss: {missing}")


def choose_compile(cfg, facts, device: str, dtype: str, checkpointing: bool, quant: str, shape,
                   embedded: bool, world: int = 1) -> Choice[bool]:
    if cfg.compile != "auto":
        return Choice(cfg.compile == "on", "set by you")
    pk = facts.get("packages") or {}
    why = None
    if world > 1:
        why = "several processes: compiled layers were measured with one (DDP/FSDP hooks split graphs)"
    elif not device.startswith("cuda"):
        why = "CPU: torch.compile is not measured there"
    elif "triton" not in pk:
        why = "Triton is not installed (torch.compile's GPU back-end)"
    elif "c_compiler" in (facts.get("platform") or {}) and not facts["platform"]["c_compiler"]:
        why = "no C compiler (cc/gcc/clang) on PATH: Triton needs one to build its launcher"
    elif dtype != "bf16" or quant not in ("nf4", "none") or checkpointing:
        why = "compiled layers are measured only with bf16, NF4 and no gradient checkpointing"
    elif embedded or shape.total_params() < COMPILE_MIN_PARAMS:
        why = "a model this small: compiling (20-40 s once) costs more than it saves"
    if why:
        return Choice(False, why)
    return Choice(True, "torch.compile of each decoder layer (one graph for all): fuses norms, RoPE and "
                  f"SwiGLU; {_speed_measured()}; recomputes that pointwise work in backward instead "
                  f"of keeping it ({_recompute_measured()}); and replays each layer as CUDA graphs, one "
                  f"launch instead of one per kernel, ~110 per layer and pass ({_cudagraphs_measured()})")


def _with_row_lengths(choice: Choice[bool], seq_len: int) -> Choice[bool]:
    """A compiled plan pads rows to a few fixed lengths (speed.padded_len); its reason says so."""
    if not choice.value:
        return choice
    step = speed.padded_len(1, seq_len)
    return Choice(True, f"{choice.reason}; rows padded to a multiple of {step} tokens, so it compiles for at "
                  "most 8 lengths, not one per longest example")


def _budget_gib(facts, device: str, world: int = 1) -> tuple[float, str]:
    """Memory one process may use: half the host RAM on CPU (shared by every process there), or the free
    memory of its GPU (with several GPUs, the smallest of them)."""
    if device == "cpu":
        mib = (facts.get("platform") or {}).get("memory_total_mib")
        if not mib:
            return 8.0 / world, "host RAM unknown: assuming 16 GiB, half usable" + (
                f", shared by {world} processes" if world > 1 else "")
        share = f", shared by {world} processes" if world > 1 else ""
        return mib / 1024 * CPU_SHARE / world, f"half of {mib / 1024:.0f} GiB host RAM{share}"
    used = _used(facts, device, world)
    g = min(used, key=lambda x: x.get("memory_free_mib") or x.get("memory_total_mib") or 0)
    mib = g.get("memory_free_mib") or g.get("memory_total_mib")
    if not mib:
        return 8.0, "GPU memory unknown: assuming 8 GiB usable"
    kind = "free" if g.get("memory_free_mib") else "total"
    least = f" (the least of the {world} GPUs used)" if world > 1 else ""
    return mib / 1024 * GPU_HEADROOM, (f"{int(GPU_HEADROOM * 100)}% of {mib / 1024:.1f} GiB {kind} on "
                                       f"GPU {g.get('index', '?')} ({g.get('name') or 'unknown GPU'}){least}")


def _divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def fit_batch(shape, cfg, *, batch: int, tokens: int, quant: str, dtype: str, optimizer: str, budget: float,
              fused: bool = False, world: int = 1, shards: int = 1, dense_mask: bool = False,
              host_budget: float | None = None, compiled: bool = False):
    """(micro_batch, checkpointing, estimate) or None when even micro-batch 1 in the leanest mode allowed
    fails. `batch` is what one process takes of each step (the effective batch / world). checkpointing is
    False, True, or "offload" (layer inputs in host memory), tried in that order under auto; offload only
    where `host_budget` (GiB of host RAM for the layer inputs; None: offload not possible here) holds them."""
    mode = cfg.gradient_checkpointing
    ck_opts = {"auto": (False, True, "offload"), "on": (True,), "off": (False,),
               "offload": ("offload", True)}[mode]
    if host_budget is None:
        ck_opts = tuple(c for c in ck_opts if c != "offload")
    elif mode == "offload":
        ck_opts = ("offload",)
    fixed = batch_split(cfg, world)[1]
    micros = [fixed] if fixed else _divisors_desc(batch)
    for ck in ck_opts:
        for mb in micros:
            if not ck and mode == "auto" and mb < min(batch, 4):
                break  # a tiny micro-batch wastes the device: checkpointing with a bigger one is faster
            est = memory.estimate(
                shape,
                micro_batch=mb,
                seq_len=tokens,
                checkpointing=bool(ck),
                quantization=quant,
                dtype=dtype,
                optimizer=optimizer,
                lora_r=cfg.lora_r,
                fused_loss=fused,
                packed=dense_mask,
                shards=shards,
                offload=ck == "offload",
                compiled=compiled,
            )
            if est.total_gib <= budget and (host_budget is None or est.host_gib <= host_budget):
                return mb, ck, est
    return None


HOST_SHARE = 0.5  # of host RAM for offloaded layer inputs: the OS, data loader and model load need the rest


def host_budget_gib(facts: dict, world: int = 1) -> tuple[float | None, str]:
    """Host RAM the offloaded layer inputs of one process may take: half of it (and no more than is available,
    where the facts record that), shared by the processes of the run. None when the RAM is unknown."""
    plat = facts.get("platform") or {}
    total, avail = plat.get("memory_total_mib"), plat.get("memory_available_mib")
    if not total:
        return None, "host RAM unknown"
    gib, why = total / 1024 * HOST_SHARE, f"half of {total / 1024:.0f} GiB host RAM"
    if avail and avail / 1024 < gib:
        gib, why = avail / 1024, f"the {avail / 1024:.0f} GiB of host RAM available"
    if world > 1:
        gib, why = gib / world, why + f", shared by {world} processes"
    return gib, why


def offload_missing(device: str, host_gib: float | None, host_need_gib: float, micro: int = 1) -> str | None:
    """Why offloaded checkpointing can't be used here, or None when it can. `host_need_gib`: the layer
    inputs of the smallest micro-batch (`micro`) in host memory."""
    if not device.startswith("cuda"):
        return "on the CPU the activations are in host memory already"
    if host_gib is None:
        return "host RAM is unknown (no memory_total_mib in the facts)"
    if host_need_gib > host_gib:
        return (f"micro-batch {micro} puts {host_need_gib:.1f} GiB of layer inputs in host memory, more than "
                f"{host_gib:.1f} GiB")
    return None


# ---- one decision each ----


def choose_batch(cfg: TrainConfig, world: int = 1) -> Choice[int]:
    given = cfg.batch_size or (cfg.micro_batch and cfg.grad_accum)
    batch = batch_split(cfg, world)[0]
    why = "set by you" if given else f"{DEFAULT_BATCH} sequences per step (QLoRA's OASST1 run)"
    if world > 1:
        why += f"; split over {world} processes, {batch // world} each"
    return Choice(batch, why)


def choose_seq_len(cfg: TrainConfig, max_positions: int | None) -> Choice[int]:
    return Choice(*resolve_seq_len(cfg, max_positions))


@dataclass(frozen=True)
class Fit:
    """The memory fit: one joint decision of optimizer, micro-batch and checkpointing (False, True, or
    "offload": the layer inputs in host memory)."""

    optimizer: Choice[str]
    micro_batch: int
    checkpointing: bool | str
    estimate: memory.Estimate
    budget_gib: float
    budget: str
    fits: bool
    ckpt_estimate: memory.Estimate | None = None  # the smallest micro-batch with ordinary checkpointing,
    ckpt_micro: int = 1  # when offloaded (to say why)
    host_budget_gib: float | None = None  # host RAM for offloaded layer inputs
    host_budget: str = ""
    offload_missing: str | None = None  # why offloading could not be used (when it was considered)


def fit_memory(cfg, facts, probes, shape, *, device: str, dtype: str, quant: str, batch: int, tokens: int,
               fused: bool, world: int = 1, shards: int = 1, dense_mask: bool = False,
               compiled: bool = False) -> Fit:
    """The first optimizer (best first) with a micro-batch that fits the budget; the largest such micro-batch,
    without checkpointing where that fits, else with it, else (on a GPU, when host RAM holds them) with the
    layer inputs in host memory. When nothing fits: the best optimizer at micro-batch 1 (or the one set) in
    the leanest mode allowed, with `fits` False. `batch` is one process's share of a step; `shards` > 1 is
    FSDP."""
    budget, why = _budget_gib(facts, device, world)
    chain = optimizer_chain(cfg, facts, probes, device, fsdp=shards > 1)
    mb1 = batch_split(cfg, world)[1] or 1

    def est(ck, opt, mb=mb1):
        return memory.estimate(shape, micro_batch=mb, seq_len=tokens, checkpointing=bool(ck),
                               quantization=quant, dtype=dtype, optimizer=opt, lora_r=cfg.lora_r,
                               fused_loss=fused, packed=dense_mask, shards=shards, offload=ck == "offload",
                               compiled=compiled)

    host, host_why = host_budget_gib(facts, world)
    missing = None
    if cfg.gradient_checkpointing in ("auto", "offload"):
        missing = offload_missing(device, host, est("offload", chain[0].value).host_gib, mb1)
    if missing and cfg.gradient_checkpointing == "offload" and host is None and device.startswith("cuda"):
        missing, host = None, math.inf  # asked for: host RAM unknown is no reason to refuse it
    host_ok = None if missing else host
    extra = dict(host_budget_gib=host, host_budget=host_why, offload_missing=missing, ckpt_micro=mb1)
    for opt in chain:
        fit = fit_batch(shape, cfg, batch=batch, tokens=tokens, quant=quant, dtype=dtype, optimizer=opt.value,
                        budget=budget, fused=fused, world=world, shards=shards, dense_mask=dense_mask,
                        host_budget=host_ok, compiled=compiled)
        if fit is not None:
            ckpt = est(True, opt.value) if fit[1] == "offload" else None
            return Fit(opt, *fit, budget, why, True, ckpt_estimate=ckpt, **extra)
    leanest = "offload" if host_ok is not None else True
    ck = {"off": False, "on": True}.get(cfg.gradient_checkpointing, leanest)
    ckpt = est(True, chain[0].value) if ck == "offload" else None
    return Fit(chain[0], mb1, ck, est(ck, chain[0].value), budget, why, False, ckpt_estimate=ckpt, **extra)


FSDP_QUANT = ("nf4", "none")  # bitsandbytes' int8 weights have no storage dtype FSDP can flatten


def _accelerate_fsdp(environ) -> bool:
    """`accelerate launch` with an FSDP config exports ACCELERATE_USE_FSDP=true to every process."""
    return str((environ or {}).get("ACCELERATE_USE_FSDP", "")).lower() in ("1", "true", "yes")


def choose_parallel(cfg, facts, probes, shape, *, device: str, dtype: str, quant: str, batch: int,
                    tokens: int, fused: bool, world: int, environ=None, dense_mask: bool = False,
                    compiled: bool = False) -> tuple[Choice[Parallel], Fit]:
    """One process; or several, each holding the whole 4-bit model (DDP: the fastest, when it fits), or a
    shard of it (FSDP-QLoRA: when one GPU cannot hold the model and a micro-batch, or when asked). Returns
    the choice and the memory fit it was decided on."""
    per = batch // world
    gpus = device.startswith("cuda")
    devs = device if world == 1 or not gpus else f"cuda:0..cuda:{world - 1}"
    backend = None if world == 1 else ("nccl" if gpus else "gloo")

    def fit(shards):
        return fit_memory(cfg, facts, probes, shape, device=device, dtype=dtype, quant=quant, batch=per,
                          tokens=tokens, fused=fused, world=world, shards=shards, dense_mask=dense_mask,
                          compiled=compiled)

    ddp = fit(1)
    if world == 1:
        return Choice(Parallel(1, "single", None, batch, devs), "one process (--nproc, torchrun or "
                      "accelerate launch run several)"), ddp
    split = f"each of {world} processes takes {per} of the {batch} sequences of a step"
    ddp_choice = Choice(Parallel(world, "ddp", backend, per, devs), f"data parallel: {split}; every "
                        "process holds the whole 4-bit model")
    if cfg.fsdp is False:
        return Choice(ddp_choice.value, ddp_choice.reason + " (--no-fsdp)"), ddp
    asked = "set by you" if cfg.fsdp else ("accelerate launch's FSDP config (ACCELERATE_USE_FSDP)"
                                            if _accelerate_fsdp(environ) else None)
    if quant not in FSDP_QUANT:
        if asked:
            from qdoctor.train.config import ConfigError

            raise ConfigError(f"fsdp ({asked}) needs 4-bit (nf4) or unquantized weights; quantization is "
                              f"{quant}: bitsandbytes' 8-bit weights cannot be sharded")
        return ddp_choice, ddp
    if not asked and ddp.fits:
        return Choice(ddp_choice.value, ddp_choice.reason + f" (estimate {ddp.estimate.total_gib:.2f} GiB "
                      f"fits {ddp.budget_gib:.1f} GiB)"), ddp
    sharded = fit(world)
    if not asked and not sharded.fits and sharded.estimate.total_gib >= ddp.estimate.total_gib:
        return ddp_choice, ddp
    why = asked or (f"one GPU cannot hold the 4-bit model and a micro-batch ({ddp.estimate.total_gib:.1f} "
                    f"GiB > {ddp.budget_gib:.1f} GiB usable); sharded over {world} GPUs: "
                    f"{sharded.estimate.total_gib:.1f} GiB each")
    store = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
    return Choice(Parallel(world, "fsdp", backend, per, devs),
                  f"FSDP-QLoRA: {why}; {split}; 4-bit weights stored as {store} "
                  f"(bnb_4bit_quant_storage = the FSDP dtype)"), sharded


def memory_finding(fit: Fit, device: str) -> Finding | None:
    if fit.fits:
        return None
    return Finding(
        "QD801",
        "warning",
        f"estimated peak {fit.estimate.total_gib:.1f} GiB exceeds the {fit.budget_gib:.1f} GiB usable on "
        f"{device}",
        [fit.budget],
        "lower --seq-len or --micro-batch, or use a smaller model; on out-of-memory the run halves the "
        "micro-batch",
        "plan",
    )


def choose_micro_batch(cfg: TrainConfig, fit: Fit, batch: int, world: int = 1) -> Choice[int]:
    """`batch`: one process's share of a step; the micro-batch is per process."""
    if cfg.micro_batch:
        why = "set by you"
    elif cfg.grad_accum:
        why = f"{batch} / grad_accum {cfg.grad_accum} (set by you)"
    else:
        est = fit.estimate.total_gib
        why = f"largest that fits the estimate ({est:.2f} GiB <= {fit.budget_gib:.1f} GiB: {fit.budget})"
    return Choice(fit.micro_batch, why + (" (per process)" if world > 1 else ""))


def choose_grad_accum(cfg: TrainConfig, batch: int, micro: int, world: int = 1) -> Choice[int]:
    accum = batch // micro
    why = "set by you" if cfg.grad_accum else (
        f"{batch} / {micro}: {accum} micro-batch{'es' if accum > 1 else ''} of {micro} per step")
    if world > 1:
        why += (f" in each process; effective batch {world} processes x {micro} x {accum} = "
                f"{world * micro * accum}")
    return Choice(accum, why)


def choose_checkpointing(cfg: TrainConfig, fit: Fit, shape: memory.Shape | None = None,
                         tokens: int | None = None) -> Choice[bool | str]:
    """False, True (non-reentrant), or "offload": checkpointing with each layer's input in pinned host
    memory (qdoctor.train.offload), chosen by itself only when micro-batch 1 with checkpointing won't fit."""
    asked = cfg.gradient_checkpointing
    if asked == "offload" and fit.checkpointing != "offload":
        return Choice(fit.checkpointing, f"offload asked for, but {fit.offload_missing}: ordinary "
                      "checkpointing (non-reentrant)")
    if fit.checkpointing == "offload":
        return Choice("offload", ("set by you: " if asked == "offload" else "") + _offload_reason(fit, shape,
                                                                                                 tokens))
    if asked != "auto":
        return Choice(fit.checkpointing, "set by you")
    if fit.checkpointing:
        return Choice(True, "activations of a useful micro-batch do not fit without it (non-reentrant)")
    return Choice(False, "activations fit without it: 36-41% faster on the H200 (docs/memory-calibration.md)")


def _offload_reason(fit: Fit, shape: memory.Shape | None, tokens: int | None) -> str:
    est, ck = fit.estimate, fit.ckpt_estimate
    what = f"micro-batch {fit.ckpt_micro}"
    if shape is not None and tokens:
        what = f"a {shape.total_params() / 1e9:.1f}B model at micro-batch {fit.ckpt_micro} x {tokens} tokens"
    need = f"{what} needs {ck.total_gib:.1f} GiB with checkpointing" if ck else "checkpointing"
    host = (f"{est.host_gib:.1f} GiB of host RAM, within {fit.host_budget_gib:.1f} GiB: {fit.host_budget}"
            if fit.host_budget_gib is not None and math.isfinite(fit.host_budget_gib)
            else f"{est.host_gib:.1f} GiB of host RAM, unchecked: {fit.host_budget}")
    return (f"{need} ({fit.budget_gib:.1f} GiB usable); {est.total_gib:.1f} GiB at micro-batch "
            f"{fit.micro_batch} with each layer's input in pinned host memory ({host}; H200, 6.7B at 65,536 "
            "tokens: 18.4 GiB estimated and measured, bench/NOTES.md)")


def choose_attention(cfg: TrainConfig, facts: dict, device: str, dtype: str) -> Choice[str]:
    """Packed rows need attention kept inside each document: variable-length flash attention ("varlen")
    where torch, the GPU and the dtype allow it, else SDPA with a dense document mask (slower, and its memory
    counted in the estimate)."""
    if cfg.attention in ("sdpa", "eager"):
        return Choice(cfg.attention, "set by you")
    tv = (facts.get("torch") or {}).get("version") or (facts.get("packages") or {}).get("torch")
    cc = _cc(_gpu(facts, device)) if device.startswith("cuda") else None
    missing = speed.varlen_missing(device, dtype, tv, cc)
    if not cfg.packing and cfg.attention == "auto":  # measured: SDPA's causal flash path is faster there
        vs = f"; on unpacked rows faster than variable-length attention ({_sdpa_measured()})"
        return Choice("sdpa", "torch scaled_dot_product_attention (fused kernels, exact)"
                      + (vs if missing is None else ""))
    mine = "" if cfg.attention == "auto" else "; set by you"
    if missing is None:
        what = "each packed document attends only to itself, with no dense mask" if cfg.packing else (
            "each row (and its padding) is a sequence of its own")
        return Choice("varlen", f"variable-length flash attention (torch.nn.attention.varlen): {what}; "
                      f"self-checked against SDPA when the model loads ({_varlen_measured()}){mine}")
    if cfg.attention == "varlen":
        return Choice("sdpa", f"varlen asked for, but {missing}: SDPA instead"
                      + (" with a dense document mask" if cfg.packing else ""))
    if not cfg.packing:
        return Choice("sdpa", f"torch scaled_dot_product_attention (fused kernels, exact; {missing})")
    return Choice("sdpa", f"packed rows: SDPA with a dense document mask ({missing})")


def _sdpa_measured() -> str:
    return "H200, 1.1B, 8x1024 in training mode: 35.9k tok/s with varlen, 43.4k with SDPA (two calls); " \
        "bench/NOTES.md"


def _varlen_measured() -> str:
    return "H200, packed 2x4096 against unpacked 8x1024 rows: 1.1B 57.6k vs 78.7k tok/s, 6.7B 16.7k vs " \
        "17.7k; a dense document mask instead: 32.3k vs 42.8k on 1.1B; bench/NOTES.md"


def choose_lr(cfg: TrainConfig, embedded: bool, shape: memory.Shape) -> Choice[float]:
    if cfg.lr:
        return Choice(cfg.lr, "set by you")
    if embedded:
        return Choice(EMBEDDED_LR, "embedded tiny random-init model: a large LR shows learning within a "
                      "minute")
    if shape.total_params() > 20e9:
        return Choice(1e-4, "QLoRA paper: 1e-4 for 33B/65B")
    return Choice(2e-4, "QLoRA paper: 2e-4 up to 13B")


def choose_max_steps(cfg: TrainConfig, resumed: dict, embedded: bool, n_train: int, batch: int
                     ) -> Choice[int]:
    if cfg.max_steps:
        return Choice(cfg.max_steps, "set by you")
    if resumed.get("max_steps"):
        return Choice(resumed["max_steps"], "the run being resumed")
    if embedded:
        return Choice(EMBEDDED_STEPS, "embedded default: enough for the loss to fall clearly, under a "
                      "minute on CPU")
    return Choice(max(1, math.ceil(n_train / batch)), f"one epoch of {n_train} training examples")


def choose_warmup(cfg: TrainConfig, resumed: dict, steps: int) -> Choice[int]:
    """Kept from the run being resumed: the automatic 3% would change when --max-steps grows."""
    prev = (resumed.get("identity") or {}).get("warmup_steps")
    if cfg.warmup_steps is not None:
        return Choice(cfg.warmup_steps, "set by you")
    if isinstance(prev, int):
        return Choice(prev, "the run being resumed (kept when --max-steps grows)")
    return Choice(round(0.03 * steps), "3% of the steps, then constant (QLoRA: warmup_ratio 0.03, constant "
                  "schedule)")


def choose_lora(cfg: TrainConfig) -> Choice[Lora]:
    lora = Lora(cfg.lora_r, cfg.lora_alpha or 2 * cfg.lora_r, cfg.lora_dropout, cfg.target_modules)
    if cfg.target_modules == "all-linear":
        return Choice(lora, "LoRA on all linear layers of the blocks (QLoRA §4: needed to match full "
                      "fine-tuning)")
    return Choice(lora, "target modules set by you")


def choose_eval_every(cfg: TrainConfig, steps: int) -> Choice[int]:
    return Choice(cfg.eval_every, "set by you") if cfg.eval_every else Choice(max(1, steps // 5), "five "
                                                                                 "evaluations per run")


def choose_save_every(cfg: TrainConfig, steps: int) -> Choice[int]:
    if cfg.save_every:
        return Choice(cfg.save_every, "set by you")
    return Choice(max(1, steps // 4), "a checkpoint every quarter of the run")


def choose_loss_scaling(dtype: str) -> Choice[bool]:
    if dtype == "fp16":
        return Choice(True, "fp16 needs dynamic loss scaling")
    return Choice(False, f"not needed with {dtype}")


def make_plan(
    cfg: TrainConfig,
    facts: dict,
    probes,
    *,
    shape: memory.Shape,
    model_name: str,
    embedded: bool,
    n_train: int,
    max_len: int | None = None,
    max_positions: int | None = None,
    resumed: dict | None = None,
    model_type: str | None = "llama",
    world: int = 1,
    environ: dict | None = None,
) -> Plan:
    """`resumed`: the run.json record of the run being continued; its max_steps and warmup are kept unless
    set again, so extending a run with a larger --max-steps leaves its schedule as it was. `world`: the
    processes that will train; `environ`: the launcher's variables (accelerate launch's FSDP config)."""
    probes = Probes(probes)
    resumed = resumed or {}
    device = choose_device(cfg, facts, probes, world)
    dtype = choose_dtype(cfg, facts, probes, device.value, world)
    quant = choose_quantization(cfg, facts, probes)
    batch = choose_batch(cfg, world)
    seq_len = choose_seq_len(cfg, max_positions)
    # whether the layers would be compiled without checkpointing: they then keep less for backward, and
    # rows are padded to a few fixed lengths (speed.padded_len), which the estimate must count
    compilable = choose_compile(cfg, facts, device.value, dtype.value, False, quant.value, shape, embedded,
                                world).value
    longest = min(seq_len.value, max_len or seq_len.value)
    if compilable:
        longest = speed.padded_len(longest, seq_len.value)
    tokens = seq_len.value if cfg.packing else longest
    per_rank = batch.value // world
    fused = choose_fused_loss(cfg, facts, device.value, model_type, shape, per_rank * tokens)
    attention = choose_attention(cfg, facts, device.value, dtype.value)
    parallel, fit = choose_parallel(cfg, facts, probes, shape, device=device.value, dtype=dtype.value,
                                    quant=quant.value, batch=batch.value, tokens=tokens,
                                    fused=fused.value == "liger", world=world, environ=environ,
                                    dense_mask=cfg.packing and attention.value != "varlen",
                                    compiled=compilable)
    per_rank = parallel.value.per_rank_batch
    micro = choose_micro_batch(cfg, fit, per_rank, world)
    ckpt = choose_checkpointing(cfg, fit, shape, tokens)
    steps = choose_max_steps(cfg, resumed, embedded, n_train, batch.value)
    return Plan(
        model=Choice(model_name, "embedded tiny Llama (random init, fixed seed)"
                     if embedded else "set by you"),
        trust_remote_code=choose_trust_remote_code(cfg),
        device=device,
        dtype=dtype,
        quantization=quant,
        optimizer=fit.optimizer,
        gradient_checkpointing=ckpt,
        attention=attention,
        seq_len=seq_len,
        batch_size=batch,
        micro_batch=micro,
        grad_accum=choose_grad_accum(cfg, per_rank, micro.value, world),
        lr=choose_lr(cfg, embedded, shape),
        max_steps=steps,
        warmup_steps=choose_warmup(cfg, resumed, steps.value),
        lora=choose_lora(cfg),
        eval_every=choose_eval_every(cfg, steps.value),
        save_every=choose_save_every(cfg, steps.value),
        loss_scaling=choose_loss_scaling(dtype.value),
        max_grad_norm=Choice(cfg.max_grad_norm, "QLoRA: 0.3" if cfg.max_grad_norm == 0.3 else "set by you"),
        weight_decay=Choice(cfg.weight_decay, "QLoRA: 0" if cfg.weight_decay == 0 else "set by you"),
        fused_loss=fused,
        compile=_with_row_lengths(choose_compile(
            cfg, facts, device.value, dtype.value, ckpt.value, quant.value, shape, embedded, world
        ), seq_len.value),
        parallel=parallel,
        memory=MemoryFit(device.value, fit.budget_gib, fit.budget, fit.estimate, tokens,
                         shape.total_params() / 1e9),
        findings=[f for f in (memory_finding(fit, device.value),) if f],
    )
