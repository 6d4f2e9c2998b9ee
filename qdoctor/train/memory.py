"""Peak-memory estimate of one QLoRA micro-step, from the model's shape alone (no weights loaded).

    peak = base weights + LoRA (params, grads, optimizer states) + activations + logits

- Quantized linear weights: NF4 + double quant 4.127 bits/param, NF4 alone 4.5 (QLoRA §3), int8 8.5
  (int8 + per-row scales), none = compute dtype. Embeddings, lm_head and norms are not quantized; with fp16
  compute `prepare_model_for_kbit_training` upcasts them to fp32 ("upcast"), otherwise they stay in the
  compute dtype.
- LoRA params and grads are fp32 (peft keeps adapters in fp32); optimizer states per LoRA param: 8-bit
  Adam 2 bytes, 32-bit Adam 8 bytes, CPU-offloaded Adam 0 on the device.
- Activations per token: without checkpointing ACT_BYTES[path] x (hidden + intermediate) per layer; with
  it, the fp32 residual (4 x hidden) per layer plus one layer recomputed. Logits: vocab x 10 bytes per
  token (compute-dtype logits, their fp32 copy in the loss, and its gradient), none with a fused linear +
  cross-entropy loss.
- Offloaded checkpointing (qdoctor.train.offload): the per-layer inputs move to pinned host memory
  (`host_gib`, not part of the GPU total); the GPU keeps the recomputed layer. Arithmetic, not fitted: the
  layer-input term it removes is the arithmetic one above; held out, it predicted the one offloaded peak
  measured (6.7B, 1 x 65536 on the H200: 18.35 GiB estimated, 18.39 measured; HELD_OUT_OFFLOAD).

ACT_BYTES per path is fitted to measured H200 peaks (NF4 + DQ, bf16, LoRA r=16 on all linear layers,
PagedAdamW8bit): "upcast" to the plain loop with prepare_model_for_kbit_training, "eager" and "compiled"
(decoder layers compiled, which the plan does only without checkpointing) to qdoctor's own path in
bench/results/; the plain-loop rows and their method are in
docs/memory-calibration.md. `CALIBRATION` holds the rows with their source; tests check the
estimate against them, and the benchmark checks it against every configuration it runs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

GIB = 1024**3
BITS_PER_PARAM = {"nf4": 4.127, "nf4_nodq": 4.5, "int8": 8.5}
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
OPTIM_STATE_BYTES = {"paged_adamw_8bit": 2, "adamw_8bit": 2, "cpu_adamw": 0, "adamw": 8}
# bytes per token per layer per (hidden + intermediate), by path: fp32-upcast norms (the common recipe),
# the lean eager path, and compiled decoder layers, whose partitioner recomputes the pointwise ops (norms,
# SwiGLU, layout copies) in backward instead of keeping their outputs (speed.RECOMPUTE_POINTWISE)
# ("compiled": the value with the least largest error over CALIBRATION's four compiled rows, one call: 5.4%)
ACT_BYTES = {"upcast": 20.0, "eager": 10.8, "compiled": 6.17}
LOGIT_BYTES = 10
# with checkpointing, outside the fp32-upcast path: each layer keeps its bf16 input (2 x hidden bytes per
# token) and the layer being recomputed plus its backward take CKPT_LAYER_BYTES x (hidden + intermediate);
# fitted to qdoctor's path at micro-batch 1 on 6.7B (bench/results/h200-2026-11-29-longest.json)
CKPT_LAYER_BYTES = 15.6

SHAPE_1B = dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000)
SHAPE_7B = dict(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000)
PLAIN_LOOP_H200 = "docs/memory-calibration.md (plain loop with prepare_model_for_kbit_training, H200)"
BENCH_H200 = "bench/results/h200-2026-11-29-call1.json and -call2.json (qdoctor's path, H200)"
BENCH_H200_TRAIN = "bench/results/h200-2026-11-29-trainmode.json (qdoctor's path in training mode, H200)"
BENCH_H200_LONG = "bench/results/h200-2026-11-29-longest.json (qdoctor's path, checkpointing, H200)"
BENCH_S5 = "bench/results/h200-2026-11-29-s5-{}.json (the plan's path, compiled layers recomputing)"
# (shape, micro_batch, seq_len, checkpointing, path, measured peak GiB, source)
CALIBRATION = [
    (SHAPE_1B, 8, 1024, True, "upcast", 6.1, PLAIN_LOOP_H200),
    (SHAPE_1B, 8, 1024, False, "upcast", 26.5, PLAIN_LOOP_H200),
    (SHAPE_1B, 2, 4096, True, "upcast", 6.1, PLAIN_LOOP_H200),
    (SHAPE_1B, 2, 4096, False, "upcast", 26.5, PLAIN_LOOP_H200),
    (SHAPE_7B, 8, 1024, True, "upcast", 13.1, PLAIN_LOOP_H200),
    (SHAPE_7B, 8, 1024, False, "upcast", 87.4, PLAIN_LOOP_H200),
    (SHAPE_7B, 2, 4096, True, "upcast", 15.3, PLAIN_LOOP_H200),
    (SHAPE_7B, 2, 4096, False, "upcast", 93.7, PLAIN_LOOP_H200),
    (SHAPE_1B, 8, 1024, False, "eager", 17.16, BENCH_H200),
    (SHAPE_1B, 8, 1024, False, "compiled", 8.39, BENCH_S5.format("1b")),  # SDPA
    (SHAPE_1B, 2, 4096, False, "compiled", 8.33, BENCH_S5.format("1b")),  # packed, varlen (no mask)
    (SHAPE_7B, 8, 1024, False, "compiled", 28.26, BENCH_S5.format("7b")),  # SDPA
    (SHAPE_7B, 2, 4096, False, "compiled", 28.2, BENCH_S5.format("7b")),  # packed, varlen
    # checkpointing (layers not compiled; the layer term is CKPT_LAYER_BYTES), fused loss
    (SHAPE_7B, 1, 8192, True, "eager", 7.68, BENCH_H200_LONG),
    (SHAPE_7B, 1, 16384, True, "eager", 11.38, BENCH_H200_LONG),
]
# held out (not used to fit ACT_BYTES): the same path in other calls: -s5-1b-budget.json (an activation
# memory budget of 0.9 reached the same cut), -s5-1b-keep.json's and -s5-1b-packed.json's "plan" rows; and
# session 6's, the compiled layers replayed as CUDA graphs: -s6-1b.json and -s6-7b.json (the first 6.7B
# repeats). (shape, micro_batch, seq_len, packed, measured peak GiB); packed rows with variable-length
# attention have no dense mask: packed=False in the estimate's sense
HELD_OUT_COMPILED = [
    (SHAPE_1B, 8, 1024, False, 8.39),
    (SHAPE_1B, 2, 4096, False, 8.33),
    (SHAPE_1B, 8, 1024, False, 8.33),
    (SHAPE_1B, 2, 4096, False, 8.33),
    (SHAPE_1B, 2, 4096, False, 8.33),
    (SHAPE_1B, 8, 1024, False, 8.36),
    (SHAPE_1B, 2, 4096, False, 8.37),
    (SHAPE_7B, 8, 1024, False, 28.24),
    (SHAPE_7B, 2, 4096, False, 28.35),
]
# offloaded checkpointing, micro-batch 1, under a 24 GiB cap
# (bench/results/h200-2026-11-29-s4-longest-cap24.json)
# (shape, seq_len, measured peak GiB)
HELD_OUT_OFFLOAD = [(SHAPE_7B, 65536, 18.39)]
CALIBRATION_SOURCE = "docs/memory-calibration.md and bench/results/ (peaks measured on an H200)"


def path_of(quantization: str, dtype: str, compiled: bool) -> str:
    """Which activation model applies: fp32-upcast norms (fp16 on a quantized base), compiled decoder
    layers (speed.compile_layers: what they keep for backward), or eager."""
    if quantization in BITS_PER_PARAM and dtype == "fp16":
        return "upcast"
    return "compiled" if compiled else "eager"


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int | None = None

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def linear_params_per_layer(self) -> int:
        q = self.hidden * self.heads * self.hd
        kv = 2 * self.hidden * self.kv_heads * self.hd
        o = self.heads * self.hd * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        return q + kv + o + mlp

    def lora_params(self, r: int) -> int:
        """LoRA on every linear layer of every block (q, k, v, o, gate, up, down)."""
        h, i = self.hidden, self.intermediate
        qo = 2 * r * (h + self.heads * self.hd)
        kv = 2 * r * (h + self.kv_heads * self.hd)
        mlp = 3 * r * (h + i)
        return self.layers * (qo + kv + mlp)

    def total_params(self) -> int:
        return self.layers * (self.linear_params_per_layer() + 2 * self.hidden) + 2 * self.vocab * self.hidden


@dataclass(frozen=True)
class Estimate:
    weights_gib: float
    lora_gib: float
    optimizer_gib: float
    activations_gib: float
    logits_gib: float
    total_gib: float
    host_gib: float = 0.0  # pinned host memory for offloaded layer inputs; not part of total_gib (the GPU's)

    def to_dict(self) -> dict:
        return {k: round(v, 3) for k, v in asdict(self).items()}


def estimate(
    shape: Shape,
    *,
    micro_batch: int,
    seq_len: int,
    checkpointing: bool,
    quantization: str = "nf4",
    dtype: str = "bf16",
    optimizer: str = "paged_adamw_8bit",
    lora_r: int = 16,
    path: str | None = None,
    fused_loss: bool = False,
    packed: bool = False,
    shards: int = 1,
    offload: bool = False,
    compiled: bool = False,
) -> Estimate:
    """path: "upcast" | "eager" | "compiled" (None: path_of(quantization, dtype, compiled); compiled layers
    run only without checkpointing, so with it the path is eager). fused_loss: no logits term.
    shards: FSDP over that many GPUs: each keeps 1/shards of the weights, the LoRA tensors and their optimizer
    states, plus what is gathered whole while it runs: two decoder layers (the running one and the prefetched
    next) or the embeddings and head, whichever is larger. This sharded term is FSDP's layout, not a
    measurement (no multi-GPU peak has been calibrated).
    packed: rows hold several documents, so attention gets a dense document mask, which SDPA expands to
    micro_batch x heads x seq x seq in the compute dtype (2.0 GiB at 2x4096 with 32 heads; measured on
    the H200: +2.6 GiB on 1.1B, +2.0 GiB on 6.7B over the same tokens unpacked).
    offload (with checkpointing): each layer's input goes to pinned host memory; `host_gib` counts it as
    torch's pinned-memory cache allocates it, each tensor rounded up to a power of two bytes
    (CachingHostAllocator), so between 1x and 2x the tensors' own bytes. Arithmetic, not calibrated."""
    if offload and not checkpointing:
        raise ValueError("offload moves checkpointed layer inputs: it needs checkpointing")
    path = path or path_of(quantization, dtype, compiled and not checkpointing)
    lin = shape.layers * shape.linear_params_per_layer()
    if quantization in BITS_PER_PARAM:
        w_lin = lin * BITS_PER_PARAM[quantization] / 8
        other_bytes = 4 if path == "upcast" else DTYPE_BYTES[dtype]
    else:
        w_lin = lin * DTYPE_BYTES[dtype]
        other_bytes = DTYPE_BYTES[dtype]
    w_other = (2 * shape.vocab * shape.hidden + (2 * shape.layers + 1) * shape.hidden) * other_bytes
    weights = w_lin + w_other
    if shards > 1:
        gathered = max(2 * (w_lin / shape.layers + 2 * shape.hidden * other_bytes),
                       2 * shape.vocab * shape.hidden * other_bytes)
        weights = weights / shards + gathered
    n_lora = shape.lora_params(lora_r) / shards
    tokens = micro_batch * seq_len
    per_layer = ACT_BYTES[path] * (shape.hidden + shape.intermediate) * tokens
    # with checkpointing: one input per layer (the fp32 residual on the upcast path) + one layer recomputed
    layer_input = (4 if path == "upcast" else DTYPE_BYTES.get(dtype, 2)) * shape.hidden * tokens
    recomputed = per_layer if path == "upcast" else (
        CKPT_LAYER_BYTES * (shape.hidden + shape.intermediate) * tokens)
    host = 0
    if checkpointing and offload:
        act = recomputed
        host = shape.layers * _pinned_bytes(layer_input)
    elif checkpointing:
        act = shape.layers * layer_input + recomputed
    else:
        act = shape.layers * per_layer
    if packed:
        act += micro_batch * shape.heads * seq_len**2 * DTYPE_BYTES.get(dtype, 2)
    logits = 0 if fused_loss else LOGIT_BYTES * shape.vocab * tokens
    parts = dict(
        weights_gib=weights / GIB,
        lora_gib=8 * n_lora / GIB,
        optimizer_gib=OPTIM_STATE_BYTES[optimizer] * n_lora / GIB,
        activations_gib=act / GIB,
        logits_gib=logits / GIB,
    )
    return Estimate(**parts, total_gib=sum(parts.values()), host_gib=host / GIB)


def _pinned_bytes(n: float) -> int:
    """What torch's pinned-memory cache allocates for an n-byte tensor: the next power of two."""
    return 1 << max(0, math.ceil(n) - 1).bit_length()


def shape_from_config(cfg) -> Shape:
    """From a transformers config (or a dict of one)."""
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    heads = get("num_attention_heads")
    hidden = get("hidden_size")
    return Shape(
        hidden=hidden,
        intermediate=get("intermediate_size") or get("n_inner") or 4 * hidden,  # GPT-2: n_inner None = 4x
        layers=get("num_hidden_layers"),
        heads=heads,
        kv_heads=get("num_key_value_heads") or heads,
        vocab=get("vocab_size"),
        head_dim=get("head_dim", None),
    )


def shape_from_config_json(cfg: dict) -> Shape:
    """A Shape from a Hugging Face config.json dict, for `check --model` (no transformers import).

    Reads the text tower of multimodal configs (text_config / llm_config), GPT-2 style names (n_embd,
    n_layer, n_head), and counts every expert's MLP for mixture-of-experts models (all experts' weights are
    resident; activations are then over-estimated, which errs on the safe side). Raises ValueError naming
    the first size it cannot find.
    """
    for key in ("text_config", "llm_config", "language_config"):
        if "hidden_size" not in cfg and isinstance(cfg.get(key), dict):
            cfg = cfg[key]

    def first(*keys):
        for k in keys:
            if isinstance(cfg.get(k), int) and cfg[k] > 0:
                return cfg[k]
        return None

    hidden = first("hidden_size", "n_embd", "d_model")
    layers = first("num_hidden_layers", "n_layer", "num_layers")
    heads = first("num_attention_heads", "n_head")
    vocab = first("vocab_size")
    for name, val in (("hidden_size", hidden), ("num_hidden_layers", layers), ("num_attention_heads", heads),
                      ("vocab_size", vocab)):
        if val is None:
            raise ValueError(f"config.json has no {name}")
    experts = first("num_local_experts", "num_experts", "n_routed_experts") or 1
    inter = first("moe_intermediate_size") if experts > 1 else None
    inter = inter or first("intermediate_size", "n_inner", "ffn_dim") or 4 * hidden
    shared = (first("n_shared_experts", "num_shared_experts") or 0) if experts > 1 else 0
    return Shape(hidden=hidden, intermediate=inter * (experts + shared), layers=layers, heads=heads,
                 kv_heads=first("num_key_value_heads", "num_kv_heads") or heads, vocab=vocab,
                 head_dim=first("head_dim"))
