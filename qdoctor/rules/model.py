"""Will this model fit? (QD900-QD902, `check --model`): QLoRA memory per visible GPU, or in RAM without one.

The estimate is train's own (qdoctor.train.memory, a pure module: NF4 + double quant weights, LoRA r=16 on
every linear layer, paged AdamW 8-bit, activations calibrated on H200 runs within 15%), so `check` and
`train --dry-run` agree. For each kind of GPU it searches micro-batch x sequence length, without gradient
checkpointing (faster) and with it (less memory).
"""

from __future__ import annotations

from qdoctor.findings import Finding
from qdoctor.rules import rule
from qdoctor.rules.common import cc_tuple, visible_gpus

AREA = "model"
SEQS = (512, 1024, 2048, 4096, 8192, 16384, 32768)
BATCHES = (1, 2, 4, 8, 16, 32, 64)
HEADLINE_SEQ = 2048
GPU_RESERVE_GIB = 1.0  # CUDA context, allocator fragmentation
CPU_RESERVE_GIB = 2.0  # the OS and the Python process


def _shape(facts):
    from qdoctor.train.memory import Shape

    m = facts.get("model") or {}
    s = m.get("shape")
    return Shape(**s) if isinstance(s, dict) else None


def _targets(facts) -> list[tuple[str, float, str]]:
    """(label, GiB available, dtype) per kind of visible GPU; the RAM when there is none."""
    gpus = [g for g in visible_gpus(facts) if isinstance(g.get("memory_total_mib"), (int, float))]
    if not gpus:
        ram = (facts.get("platform") or {}).get("memory_total_mib")
        return [("CPU RAM", ram / 1024 - CPU_RESERVE_GIB, "fp32")] if isinstance(ram, (int, float)) else []
    kinds: dict[tuple, list[dict]] = {}
    for g in gpus:
        key = (g.get("name"), g.get("memory_total_mib"), g.get("compute_capability"))
        kinds.setdefault(key, []).append(g)
    out = []
    for (name, mib, cc), gs in kinds.items():
        idx = ", ".join(str(g.get("index")) for g in gs)
        dtype = "bf16" if (cc_tuple(cc) or (0, 0)) >= (8, 0) else "fp16"
        out.append((f"GPU {idx} ({name}, {round(mib / 1024)} GiB)", mib / 1024 - GPU_RESERVE_GIB, dtype))
    return out


def _fits(shape, budget, seq, ckpt, dtype):
    """The largest micro-batch that fits at `seq`, and its estimate; (0, None) when none does."""
    from qdoctor.train.memory import estimate

    best = (0, None)
    for mb in BATCHES:
        e = estimate(shape, micro_batch=mb, seq_len=seq, checkpointing=ckpt, dtype=dtype)
        if e.total_gib > budget:
            break
        best = (mb, e)
    return best


def _plan(shape, budget, max_pos, dtype) -> dict:
    seqs = [s for s in SEQS if not max_pos or s <= max_pos] or [max_pos or 512]
    head = max((s for s in seqs if s <= HEADLINE_SEQ), default=seqs[0])
    mb_fast, e_fast = _fits(shape, budget, head, False, dtype)
    mb_ckpt, e_ckpt = _fits(shape, budget, head, True, dtype)
    longest = max((s for s in seqs if _fits(shape, budget, s, True, dtype)[0]), default=None)
    return {"seq": head, "fast": (mb_fast, e_fast), "ckpt": (mb_ckpt, e_ckpt), "longest": longest}


def _name(facts) -> str:
    m = facts.get("model") or {}
    p = m.get("params")
    size = f" ({p / 1e9:.1f}B parameters)" if isinstance(p, (int, float)) else ""
    return f"{m.get('id') or m.get('model_type') or 'the model'}{size}"


def _breakdown(e) -> str:
    d = e.to_dict()
    return (f"weights {d['weights_gib']:.1f} + LoRA {d['lora_gib']:.2f} + optimizer {d['optimizer_gib']:.2f}"
            f" + activations {d['activations_gib']:.1f} + logits {d['logits_gib']:.1f}"
            f" = {d['total_gib']:.1f} GiB")


@rule("QD900", "model-fits", AREA, also=("QD901", "QD902"))
def model_fit(facts, matrix):
    """With `--model`: does 4-bit QLoRA of this model fit each kind of visible GPU (the RAM without one)?
    QD900 (ok): at which micro-batch for a 2048-token sequence, without and with gradient checkpointing, and
    the longest sequence that fits. QD902 (warning): only sequences shorter than 2048 tokens fit.
    QD901 (error): not even one 512-token sequence with checkpointing fits; the fix names the memory needed
    and sharding the 4-bit weights over several GPUs with FSDP."""
    from qdoctor.train.memory import estimate, path_of

    shape = _shape(facts)
    if shape is None:
        return []
    max_pos = (facts.get("model") or {}).get("max_position_embeddings")
    targets = _targets(facts)
    out = []
    for label, budget, dtype in targets:
        p = _plan(shape, budget, max_pos, dtype)
        mb_fast, e_fast = p["fast"]
        mb_ckpt, e_ckpt = p["ckpt"]
        kept = GPU_RESERVE_GIB if "GPU" in label else CPU_RESERVE_GIB
        ev = [f"{label}: {budget:.1f} GiB usable ({kept:g} GiB kept for the runtime)",
              "estimate: qdoctor.train.memory (train's plan): NF4 + double quant, LoRA r=16 on all linear "
              f"layers, paged AdamW 8-bit, {dtype} compute, {path_of('nf4', dtype, False)} path, "
              "no fused loss"]
        if p["longest"] is None:
            need = estimate(shape, micro_batch=1, seq_len=min(512, max_pos or 512), checkpointing=True,
                            dtype=dtype)
            ev.append(f"micro-batch 1 x {min(512, max_pos or 512)} with checkpointing: {_breakdown(need)}")
            n = int(need.total_gib // max(budget, 0.1)) + 1
            fix = (f"needs about {need.total_gib:.0f} GiB: use a GPU with more memory, or shard the 4-bit "
                   f"weights over {n}+ GPUs with FSDP (accelerate launch --use_fsdp, "
                   "bnb_4bit_quant_storage=bf16)")
            out.append(Finding("QD901", "error", f"{_name(facts)} does not fit {label}: even one 512-token "
                               "sequence with gradient checkpointing needs more memory", ev, fix, AREA))
            continue
        parts = []
        if mb_fast:
            parts.append(f"micro-batch {mb_fast} without gradient checkpointing ({e_fast.total_gib:.1f} GiB)")
            ev.append(f"micro-batch {mb_fast} x {p['seq']}, no checkpointing: {_breakdown(e_fast)}")
        if mb_ckpt:
            what = (f"or {mb_ckpt} with it" if mb_fast
                    else f"micro-batch {mb_ckpt} with gradient checkpointing")
            parts.append(f"{what} ({e_ckpt.total_gib:.1f} GiB)")
            ev.append(f"micro-batch {mb_ckpt} x {p['seq']}, checkpointing: {_breakdown(e_ckpt)}")
        title = (f"{_name(facts)} fits {label}: at {p['seq']} tokens, {', '.join(parts) or 'nothing'}; "
                 f"longest sequence at micro-batch 1: {p['longest']} tokens")
        if mb_ckpt:
            out.append(Finding("QD900", "ok", title, ev, None, AREA))
        else:
            why = f"only below {p['seq']} tokens"
            mb, seq = 1, p["longest"]
            mid = (facts.get("model") or {}).get("id") or "MODEL"
            out.append(Finding("QD902", "warning", f"{title} ({why})", ev,
                               f"qdoctor train --model {mid} --micro-batch {mb} --seq-len {seq}  # with "
                               f"gradient checkpointing (HF Trainer: gradient_checkpointing=True, "
                               f"per_device_train_batch_size={mb}); more gradient accumulation for a larger "
                               "effective batch", AREA))
    return out
