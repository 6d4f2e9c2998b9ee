"""Decide every training setting before the first step, each with its reason.

`make_plan` is a pure function of (config, facts, probe results, model shape, dataset size): tests feed it
recorded machines. The fallback orders (dtype, quantization, optimizer) are data in matrix/plan.toml; this
module walks them. The loop then executes the plan and never looks at the hardware itself.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from qdoctor import devices
from qdoctor.arch import cc_tuple, sm
from qdoctor.findings import Finding
from qdoctor.train import memory
from qdoctor.train.config import TrainConfig

EMBEDDED_LR, EMBEDDED_STEPS = 3e-3, 60
DEFAULT_BATCH = 16
GPU_HEADROOM = 0.85  # of free memory: the CUDA context, allocator fragmentation, the eval batch
CPU_SHARE = 0.5  # of host RAM: the OS and the data loader keep the rest


@dataclass
class Choice:
    value: object
    reason: str


@dataclass
class Plan:
    model: Choice
    trust_remote_code: Choice
    device: Choice
    dtype: Choice
    quantization: Choice
    optimizer: Choice
    gradient_checkpointing: Choice
    attention: Choice
    batch_size: Choice
    micro_batch: Choice
    grad_accum: Choice
    lr: Choice
    max_steps: Choice
    warmup_steps: Choice
    lora: Choice
    eval_every: Choice
    save_every: Choice
    loss_scaling: Choice
    max_grad_norm: Choice
    weight_decay: Choice
    fused_loss: Choice
    compile: Choice
    memory: dict = field(default_factory=dict)
    findings: list = field(default_factory=list)

    def v(self, name: str):
        return getattr(self, name).value

    def to_dict(self) -> dict:
        d = {
            k: asdict(getattr(self, k)) for k in self.__dataclass_fields__ if k not in ("memory", "findings")
        }
        d["memory"] = self.memory
        d["findings"] = [f.to_dict() if isinstance(f, Finding) else f for f in self.findings]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def render(self) -> str:
        lines = ["Plan (every setting, and why):"]
        for k in self.__dataclass_fields__:
            if k in ("memory", "findings"):
                continue
            c = getattr(self, k)
            lines.append(f"  {k:<22} {_fmt(c.value):<20} {c.reason}")
        m = self.memory
        if m:
            est = m["estimate"]
            lines.append(
                f"Memory estimate on {m['device']}: {est['total_gib']:.2f} GiB peak of {m['budget_gib']:.1f} "
                f"GiB usable (weights {est['weights_gib']:.2f}, LoRA {est['lora_gib']:.3f}, optimizer "
                f"{est['optimizer_gib']:.3f}, activations {est['activations_gib']:.2f}, logits "
                f"{est['logits_gib']:.2f}); model {m['params_b']:.3f}B params; calibrated on "
                f"{memory.CALIBRATION_SOURCE}"
            )

        for f in self.findings:
            lines.append(f"  [{f.severity}] {f.code} {f.title}" + (f" -> {f.fix}" if f.fix else ""))
        return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, dict):
        return ",".join(f"{k}={_fmt(x)}" for k, x in v.items())
    return str(v)


BROKEN = ("fail", "crash", "timeout")  # probe outcomes the plan routes around


def probe_status(probes, name: str) -> str | None:
    for p in probes or []:
        d = p if isinstance(p, dict) else p.to_dict()
        if d.get("probe") == name:
            return d.get("status")
    return None


def _probe_note(probes, name: str) -> str:
    st = probe_status(probes, name)
    return f"{name} probe {st}" if st else f"{name} probe not run"


def _gpu(facts: dict, device: str) -> dict:
    """The NVML GPU behind `cuda:N`: the N-th GPU CUDA_VISIBLE_DEVICES lets through (qdoctor.devices)."""
    return devices.gpu_for(facts, device) or {}


def _cc(gpu: dict) -> tuple[int, int] | None:
    return cc_tuple(gpu.get("compute_capability"))


def choose_device(cfg: TrainConfig, facts: dict, probes) -> Choice:
    """The user's device, else qdoctor.devices' default (the one pre-flight probed); cuda:N is the N-th
    visible GPU, named with its NVML index in the reason."""
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


def choose_dtype(cfg, facts, probes, device: str) -> Choice:
    if cfg.dtype != "auto":
        return Choice(cfg.dtype, "set by you")
    if device == "cpu":
        return Choice("fp32", "CPU: bf16/fp16 matmuls are emulated or slow on most CPUs; fp32 is exact")
    gpu = _gpu(facts, device)
    cc = _cc(gpu)
    bf16 = (facts.get("torch") or {}).get("bf16_supported")
    if probe_status(probes, "precision") in BROKEN:
        return Choice("fp32", "the precision probe failed: fp32 compute (slow but safe)")
    if bf16 or (bf16 is None and cc is not None and cc >= (8, 0)):
        return Choice(
            "bf16",
            f"GPU is {sm(cc)}: native bf16 (QLoRA recipe; fp16 risks overflow)",
        )
    if cc is not None and cc >= (7, 0):
        return Choice("fp16", f"GPU is {sm(cc)}: no native bf16; fp16 with loss scaling")
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
    return not (
        bnb.get("installed") is False
        or bnb.get("loads") is False
        or probe_status(probes, "imports") in BROKEN
    )


def _optim_result(probes) -> dict:
    for p in probes or []:
        d = p if isinstance(p, dict) else p.to_dict()
        if d.get("probe") == "optim8bit":
            return d
    return {}


def _paged_failed(probes) -> bool:
    """The optim8bit probe's paged (managed-memory) step failed; see smoke/probes/optim.py."""
    m = _optim_result(probes).get("measurements") or {}
    return m.get("paged_ok") is False or m.get("paged") == "failed"


def _only_paged_failed(probes) -> bool:
    """optim8bit failed on its paged criteria alone: the plain AdamW8bit update passed its bands."""
    d = _optim_result(probes)
    checks = d.get("failed_checks") or []
    return (d.get("status") == "fail" and _paged_failed(probes) and bool(checks)
            and all(c.startswith("paged") for c in checks))


def optimizer_chain(cfg, facts, probes, device: str) -> list[Choice]:
    """Candidates, best first; the memory fit picks the first that fits."""
    if cfg.optimizer != "auto":
        return [Choice(cfg.optimizer, "set by you")]
    out = []
    o8 = probe_status(probes, "optim8bit")
    eightbit_ok = _bnb_ok(facts, probes) and (
        o8 not in BROKEN or _only_paged_failed(probes)
    )
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
    return "H200, 1.1B, 8x1024: 28.5k tok/s lean, 40.4k compiled, 56.4k compiled + fused loss (bench/results)"


def choose_fused_loss(cfg, facts, device: str, model_type: str | None) -> Choice:
    from qdoctor.train import speed

    missing = speed.liger_missing(device, model_type, facts.get("packages"))
    if cfg.fused_loss == "none":
        return Choice("none", "set by you")
    if missing is None:
        return Choice("liger", "fused linear + cross-entropy (liger-kernel): the full-vocabulary logits are "
                      "never materialised" + ("" if cfg.fused_loss == "auto" else "; set by you"))
    if cfg.fused_loss == "liger":
        return Choice("none", f"liger asked for, but {missing}: the standard loss instead")
    return Choice("none", f"standard loss: {missing}")


def choose_compile(cfg, facts, device: str, dtype: str, checkpointing: bool, quant: str, shape,
                   embedded: bool) -> Choice:
    if cfg.compile != "auto":
        return Choice(cfg.compile == "on", "set by you")
    pk = facts.get("packages") or {}
    why = None
    if not device.startswith("cuda"):
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
                  f"SwiGLU and recomputes them in backward; {_speed_measured()}")


def _budget_gib(facts, device: str) -> tuple[float, str]:
    if device == "cpu":
        mib = (facts.get("platform") or {}).get("memory_total_mib")
        if not mib:
            return 8.0, "host RAM unknown: assuming 16 GiB, half usable"
        return mib / 1024 * CPU_SHARE, f"half of {mib / 1024:.0f} GiB host RAM"
    g = _gpu(facts, device)
    mib = g.get("memory_free_mib") or g.get("memory_total_mib")
    if not mib:
        return 8.0, "GPU memory unknown: assuming 8 GiB usable"
    kind = "free" if g.get("memory_free_mib") else "total"
    return mib / 1024 * GPU_HEADROOM, (f"{int(GPU_HEADROOM * 100)}% of {mib / 1024:.1f} GiB {kind} on "
                                       f"GPU {g.get('index', '?')} ({g.get('name') or 'unknown GPU'})")


def _divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def fit_batch(shape, cfg, *, batch: int, tokens: int, quant: str, dtype: str, optimizer: str, budget: float,
              fused: bool = False):
    """(micro_batch, checkpointing, estimate) or None when even micro-batch 1 with checkpointing fails."""
    ck_opts = {"auto": (False, True), "on": (True,), "off": (False,)}[cfg.gradient_checkpointing]
    micros = [cfg.micro_batch] if cfg.micro_batch else _divisors_desc(batch)
    if cfg.grad_accum and not cfg.micro_batch:
        micros = [max(1, batch // cfg.grad_accum)]
    for ck in ck_opts:
        for mb in micros:
            if not ck and cfg.gradient_checkpointing == "auto" and mb < min(batch, 4):
                break  # a tiny micro-batch wastes the device: checkpointing with a bigger one is faster
            est = memory.estimate(
                shape,
                micro_batch=mb,
                seq_len=tokens,
                checkpointing=ck,
                quantization=quant,
                dtype=dtype,
                optimizer=optimizer,
                lora_r=cfg.lora_r,
                fused_loss=fused,
            )
            if est.total_gib <= budget:
                return mb, ck, est
    return None


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
    model_type: str | None = "llama",
) -> Plan:
    findings = []
    device = choose_device(cfg, facts, probes)
    dtype = choose_dtype(cfg, facts, probes, device.value)
    quant = choose_quantization(cfg, facts, probes)
    if cfg.micro_batch and cfg.grad_accum:
        batch = cfg.micro_batch * cfg.grad_accum
    else:
        batch = cfg.batch_size or DEFAULT_BATCH
    batch_c = Choice(
        batch,
        "set by you"
        if cfg.batch_size or (cfg.micro_batch and cfg.grad_accum)
        else f"{DEFAULT_BATCH} sequences per step (QLoRA's OASST1 run)",
    )
    tokens = cfg.seq_len if cfg.packing else min(cfg.seq_len, max_len or cfg.seq_len)
    budget, budget_why = _budget_gib(facts, device.value)
    fused = choose_fused_loss(cfg, facts, device.value, model_type)
    chosen = None
    for opt in optimizer_chain(cfg, facts, probes, device.value):
        fit = fit_batch(
            shape,
            cfg,
            batch=batch,
            tokens=tokens,
            quant=quant.value,
            dtype=dtype.value,
            optimizer=opt.value,
            budget=budget,
            fused=fused.value == "liger",
        )
        if opt.value == "cpu_adamw" and chosen is None and fit is None:
            continue
        if fit is not None:
            chosen = (opt, fit)
            break
    if chosen is None:
        opt = optimizer_chain(cfg, facts, probes, device.value)[0]
        mb = cfg.micro_batch or 1
        est = memory.estimate(
            shape,
            micro_batch=mb,
            seq_len=tokens,
            checkpointing=cfg.gradient_checkpointing != "off",
            quantization=quant.value,
            dtype=dtype.value,
            optimizer=opt.value,
            lora_r=cfg.lora_r,
            fused_loss=fused.value == "liger",
        )
        chosen = (opt, (mb, cfg.gradient_checkpointing != "off", est))
        findings.append(
            Finding(
                "QD801",
                "warning",
                f"estimated peak {est.total_gib:.1f} GiB exceeds the "
                f"{budget:.1f} GiB usable on {device.value}",
                [budget_why],
                "lower --seq-len or --micro-batch, or use a smaller model; on "
                "out-of-memory the run halves the micro-batch",
                "plan",
            )
        )
    opt, (mb, ck, est) = chosen
    accum = batch // mb
    mb_why = (
        "set by you"
        if cfg.micro_batch
        else f"largest that fits the estimate ({est.total_gib:.2f} GiB <= {budget:.1f} GiB: {budget_why})"
    )
    if cfg.gradient_checkpointing != "auto":
        ck_why = "set by you"
    elif ck:
        ck_why = "activations of a useful micro-batch do not fit without it (non-reentrant)"
    else:
        ck_why = "activations fit without it: about 30% faster (H200 measurements)"
    attention = (
        Choice(cfg.attention, "set by you")
        if cfg.attention != "auto"
        else Choice(
            "sdpa", "torch scaled_dot_product_attention (fused kernels, exact); eager only as a fallback"
        )
    )
    if cfg.lr:
        lr = Choice(cfg.lr, "set by you")
    elif embedded:
        lr = Choice(EMBEDDED_LR, "embedded tiny random-init model: a large LR shows learning within a minute")
    elif shape.total_params() > 20e9:
        lr = Choice(1e-4, "QLoRA paper: 1e-4 for 33B/65B")
    else:
        lr = Choice(2e-4, "QLoRA paper: 2e-4 up to 13B")
    if cfg.max_steps:
        steps = Choice(cfg.max_steps, "set by you")
    elif embedded:
        steps = Choice(
            EMBEDDED_STEPS, "embedded default: enough for the loss to fall clearly, under a minute on CPU"
        )
    else:
        steps = Choice(max(1, math.ceil(n_train / batch)), f"one epoch of {n_train} training examples")
    n = steps.value
    warm = (
        Choice(cfg.warmup_steps, "set by you")
        if cfg.warmup_steps is not None
        else Choice(
            round(0.03 * n), "3% of the steps, then constant (QLoRA: warmup_ratio 0.03, constant schedule)"
        )
    )
    alpha = cfg.lora_alpha or 2 * cfg.lora_r
    lora = Choice(
        {"r": cfg.lora_r, "alpha": alpha, "dropout": cfg.lora_dropout, "targets": cfg.target_modules},
        "LoRA on all linear layers of the blocks (QLoRA §4: needed to match full fine-tuning)"
        if cfg.target_modules == "all-linear"
        else "target modules set by you",
    )
    ev = (
        Choice(cfg.eval_every, "set by you")
        if cfg.eval_every
        else Choice(max(1, n // 5), "five evaluations per run")
    )
    sv = (
        Choice(cfg.save_every, "set by you")
        if cfg.save_every
        else Choice(max(1, n // 4), "a checkpoint every quarter of the run")
    )
    scaling = Choice(
        dtype.value == "fp16",
        "fp16 needs dynamic loss scaling" if dtype.value == "fp16" else f"not needed with {dtype.value}",
    )
    comp = choose_compile(cfg, facts, device.value, dtype.value, ck, quant.value, shape, embedded)
    mem = {
        "device": device.value,
        "budget_gib": round(budget, 2),
        "budget": budget_why,
        "estimate": est.to_dict(),
        "tokens_per_sequence": tokens,
        "params_b": shape.total_params() / 1e9,
        "calibration": memory.CALIBRATION_SOURCE,
    }
    return Plan(
        model=Choice(
            model_name, "embedded tiny Llama (random init, fixed seed)" if embedded else "set by you"
        ),
        trust_remote_code=Choice(
            cfg.trust_remote_code,
            "set by you (--trust-remote-code): Python code shipped with the model may run"
            if cfg.trust_remote_code
            else "no code shipped with a model runs (a model that needs it is refused)",
        ),
        device=device,
        dtype=dtype,
        quantization=quant,
        optimizer=opt,
        gradient_checkpointing=Choice(ck, ck_why),
        attention=attention,
        batch_size=batch_c,
        micro_batch=Choice(mb, mb_why),
        grad_accum=Choice(accum, f"{batch} / {mb}: same effective batch"),
        lr=lr,
        max_steps=steps,
        warmup_steps=warm,
        lora=lora,
        eval_every=ev,
        save_every=sv,
        loss_scaling=scaling,
        max_grad_norm=Choice(cfg.max_grad_norm, "QLoRA: 0.3" if cfg.max_grad_norm == 0.3 else "set by you"),
        weight_decay=Choice(cfg.weight_decay, "QLoRA: 0" if cfg.weight_decay == 0 else "set by you"),
        fused_loss=fused,
        compile=comp,
        memory=mem,
        findings=findings,
    )
