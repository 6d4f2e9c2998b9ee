"""Find the base model, check LoRA targets against it, and load it the way the plan says.

The shape (for the memory estimate) and the linear-module names (for target validation) come from the
config on the meta device, so `--dry-run` and bad-input errors never load weights. The embedded default is a
tiny Llama built from qdoctor/assets/tiny-llama.json with a fixed seed, materialised once in the cache.

No Python code that comes with a model runs unless the user passed --trust-remote-code: every transformers
loader gets trust_remote_code explicitly (with None, transformers asks on a terminal and a "y" runs it), and a
model that cannot load without its own code is refused with one line naming the flag.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

EMBEDDED_NAME = "qdoctor/tiny-llama"
EMBEDDED_SEED = 0


class ModelError(ValueError):
    """Bad --model or --target-modules; one line for the user."""


TRUST_FLAG = "--trust-remote-code"


def assets_dir() -> Path:
    return Path(str(resources.files("qdoctor") / "assets"))


def _offline() -> bool:
    return any(
        os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _looks_like_hub_id(s: str) -> bool:
    return (
        not s.startswith((".", "/", "~"))
        and s.count("/") <= 1
        and ":" not in s
        and "\\" not in s
        and all(part and all(c.isalnum() or c in "-_." for c in part) for part in s.split("/"))
    )


@dataclass
class ModelSource:
    name: str  # what the user gave, or EMBEDDED_NAME
    path: str | None  # a local directory (None: hub id)
    embedded: bool
    trust_remote_code: bool = False  # run the model's own Python code (only with --trust-remote-code)


def custom_code_reason(config: dict) -> str | None:
    """Why this config.json cannot load without running its own code (transformers' rule), else None.

    transformers runs a config's code when its auto_map names an AutoConfig class and its model_type is
    not one transformers implements; a known model_type with an auto_map loads transformers' own classes.
    """
    auto_map = config.get("auto_map")
    if not isinstance(auto_map, dict) or "AutoConfig" not in auto_map:
        return None
    import transformers

    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type in transformers.CONFIG_MAPPING:
        return None
    kind = f"model_type {model_type!r}" if model_type else "no model_type"
    return (
        f"config.json maps AutoConfig to {str(auto_map['AutoConfig'])[:80]!r} and transformers "
        f"{transformers.__version__} has {kind}"
    )


def refuse_custom_code(name: str, reason: str) -> ModelError:
    return ModelError(
        f"model {name} needs its own Python code to load ({reason}); qdoctor runs no code from a model "
        f"unless you pass {TRUST_FLAG} (read that code first)"
    )


def resolve(model: str | None, trust_remote_code: bool = False) -> ModelSource:
    if model is None:
        return ModelSource(EMBEDDED_NAME, None, True)
    p = Path(model).expanduser()
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise ModelError(f"model path {model} is not a Hugging Face model directory (no config.json)")
        try:
            config = json.loads((p / "config.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ModelError(f"model {model}: config.json is unreadable ({type(e).__name__})") from None
        reason = custom_code_reason(config) if isinstance(config, dict) else None
        if reason and not trust_remote_code:
            raise refuse_custom_code(model, reason)
        return ModelSource(model, str(p), False, bool(trust_remote_code))
    if _looks_like_hub_id(model):
        if _offline():
            raise ModelError(
                f"model {model} is not a local directory and HF_HUB_OFFLINE=1 forbids downloading "
                f"it; pass a local directory or unset HF_HUB_OFFLINE"
            )
        return ModelSource(model, None, False, bool(trust_remote_code))
    raise ModelError(f"model path {model} does not exist")


def _load_error(src: ModelSource, what: str, e: Exception) -> ModelError:
    """One line; transformers' advice to pass trust_remote_code becomes the flag a user can pass."""
    text = str(e).strip()
    if "trust_remote_code" in text and not src.trust_remote_code:
        return refuse_custom_code(src.name, f"transformers says its {what} contains custom code")
    msg = text.splitlines()[0] if text else type(e).__name__
    return ModelError(f"cannot load the {what} of model {src.name}: {msg[:200]}")


WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "*.pt", "*.pth")


def check_weights(path: str) -> None:
    """A local model directory holds weights, and every safetensors file is whole: read from the headers
    alone (milliseconds), so a missing or truncated file is a one-line error before pre-flight, not a crash
    minutes later."""
    d = Path(path)
    files = sorted({f for pat in WEIGHT_FILES for f in d.glob(pat) if f.is_file()})
    if not files:
        raise ModelError(
            f"model directory {path} has a config.json but no weights (model.safetensors or "
            "pytorch_model.bin)"
        )
    for index in d.glob("*.index.json"):
        try:
            shards = set((json.loads(index.read_text()).get("weight_map") or {}).values())
        except (OSError, ValueError, AttributeError):
            raise ModelError(f"model weight index {index} is not valid JSON") from None
        missing = sorted(s for s in shards if not (d / s).is_file())
        if missing:
            raise ModelError(f"model directory {path} lacks weight shards named in {index.name}: "
                             f"{', '.join(missing[:3])}")
    for f in files:
        if f.suffix == ".safetensors":
            _check_safetensors(f)


def _check_safetensors(f: Path) -> None:
    """The header (8-byte length, then JSON) parses and the file is as long as its tensors need."""
    size = f.stat().st_size
    try:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 or not 2 <= n <= min(size - 8, 100 * 2**20):
                raise ValueError
            header = json.loads(fh.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise ModelError(f"model weights {f} are corrupt (not a safetensors file)") from None
    if size < 8 + n + end:
        raise ModelError(
            f"model weights {f} are truncated ({size:,} bytes; its header needs {8 + n + end:,})"
        )


def fingerprint(src: ModelSource) -> str:
    """What identifies the base model's math, for resume: the embedded config; a hub id; or a local
    directory's content (small files whole; large ones by size and their first and last MiB, which differ
    between any two checkpoints; fast on 100 GB)."""
    h = hashlib.sha256()
    if src.embedded:
        h.update(json.dumps([embedded_config(), EMBEDDED_SEED], sort_keys=True).encode())
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            h.update((assets_dir() / name).read_bytes())
        return "embedded:" + h.hexdigest()[:16]
    if src.path is None:
        return "hub:" + src.name
    mib = 2**20
    for f in sorted(Path(src.path).iterdir()):
        if not f.is_file() or f.name.startswith(".") or f.suffix == ".md":
            continue
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= 16 * mib:
                h.update(fh.read())
            else:
                h.update(fh.read(mib))
                fh.seek(size - mib)
                h.update(fh.read(mib))
    return "sha256:" + h.hexdigest()[:16]


def check_causal_lm(config, name: str) -> None:
    """qdoctor trains decoder-only causal LMs. Encoder models (BERT and kin) also have a causal-LM head class
    in transformers, but it is meant for `is_decoder=True` configs: from an encoder checkpoint it would train
    a bidirectional model on next-token loss."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    auto_map = getattr(config, "auto_map", None)
    if isinstance(auto_map, dict) and "AutoModelForCausalLM" in auto_map:
        return  # the model's own code names its causal-LM class (loaded only with --trust-remote-code)
    mtype = getattr(config, "model_type", None) or "?"
    causal = set()
    for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        causal.update(v if isinstance(v, (list, tuple)) else [v])
    archs = list(getattr(config, "architectures", None) or [])
    why = None
    if getattr(config, "is_encoder_decoder", False):
        why = f"it is an encoder-decoder model ({mtype})"
    elif mtype not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        why = f"transformers has no causal-LM class for model type {mtype!r}"
    elif archs and not any(a in causal for a in archs):
        why = f"its architecture is {', '.join(archs)} ({mtype})"
    elif mtype in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        why = f"{mtype} is an encoder (masked LM) and its config does not set is_decoder"
    if why:
        raise ModelError(f"model {name} is not a causal language model: {why}; qdoctor trains decoder-only "
                         "LMs")


def max_positions(config) -> int | None:
    v = getattr(config, "max_position_embeddings", None)
    return v if isinstance(v, int) and v > 0 else None


def embedded_config() -> dict:
    return json.loads((assets_dir() / "tiny-llama.json").read_text())


def load_config(src: ModelSource):
    from transformers import AutoConfig, LlamaConfig

    if src.embedded:
        return LlamaConfig(**embedded_config())
    try:
        return AutoConfig.from_pretrained(src.path or src.name, trust_remote_code=src.trust_remote_code)
    except Exception as e:  # network, auth, missing repo, malformed config, custom code
        raise _load_error(src, "config", e) from None


def meta_model(config, trust_remote_code: bool = False):
    """The model skeleton on the meta device: names and shapes, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        except ValueError as e:
            if "trust_remote_code" in str(e) and not trust_remote_code:
                name = getattr(config, "_name_or_path", "") or "this model"
                raise refuse_custom_code(name, "its causal-LM class is custom code") from None
            raise ModelError(f"not a causal language model: {str(e).splitlines()[0][:200]}") from None


def linear_names(model) -> list[str]:
    """Leaf names of the linear layers LoRA can target (not the output head: as peft's all-linear)."""
    import torch

    out = set()
    out_emb = model.get_output_embeddings()
    for name, mod in model.named_modules():
        if mod is out_emb:
            continue
        if isinstance(mod, torch.nn.Linear) or type(mod).__name__ in ("Linear4bit", "Linear8bitLt"):
            out.add(name.rsplit(".", 1)[-1])
    return sorted(out)


def check_targets(targets, model, model_name: str) -> None:
    if targets == "all-linear":
        return
    have = linear_names(model)
    wanted = [targets] if isinstance(targets, str) else list(targets)
    missing = [t for t in wanted if t not in have]
    if missing:
        raise ModelError(
            f"target module {', '.join(missing)} is not in model {model_name}; its linear modules: "
            f"{', '.join(have)}"
        )


def embedded_base_dir() -> str:
    """Materialise the random-init tiny Llama once (safetensors, fp32) so it loads like any local model."""
    from qdoctor import cache

    cfg = embedded_config()
    digest = hashlib.sha256(json.dumps([cfg, EMBEDDED_SEED], sort_keys=True).encode()).hexdigest()[:16]
    final = Path(cache.cache_dir()) / "models" / f"tiny-llama-{digest}"
    if (final / "config.json").is_file():
        return str(final)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-llama.", dir=final.parent))
    try:
        torch.manual_seed(EMBEDDED_SEED)
        LlamaForCausalLM(LlamaConfig(**cfg)).save_pretrained(tmp)
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(assets_dir() / f, tmp / f)
        try:
            os.replace(tmp, final)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


def load_tokenizer(src: ModelSource):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if src.embedded:
        tok = PreTrainedTokenizerFast.from_pretrained(str(assets_dir()))
    else:
        try:
            tok = AutoTokenizer.from_pretrained(src.path or src.name, trust_remote_code=src.trust_remote_code)
        except Exception as e:
            raise _load_error(src, "tokenizer", e) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def load_for_training(src: ModelSource, plan, seed: int, device: str | None = None, main: bool = True):
    """Base in the plan's quantization and dtype on `device` (this process's: the plan's device, or with
    several processes its own GPU, never device_map "auto"), LoRA on top. Returns the peft model.

    FSDP-QLoRA: the 4-bit weights are stored in the compute dtype (bnb_4bit_quant_storage), which is what
    FSDP flattens and shards. On GPUs only rank 0 reads the weights (into CPU memory); the other ranks build
    the model without them and receive rank 0's when FSDP wraps it (sync_module_states): transformers'
    CPU-RAM-efficient loading, switched on by the variables accelerate sets for it."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.utils import logging as hf_logging

    from qdoctor.hf_compat import dtype_kwarg

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*checkpointing.*")
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    dtype = getattr(torch, TORCH_DTYPES[plan.dtype.value])
    quant = plan.quantization.value
    device = device or plan.device.value
    fsdp = plan.parallel is not None and plan.parallel.value.strategy == "fsdp"
    qcfg = None
    if quant == "nf4":
        qcfg = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            **({"bnb_4bit_quant_storage": dtype} if fsdp else {}),
        )
    elif quant == "int8":
        qcfg = BitsAndBytesConfig(load_in_8bit=True)
    path = embedded_base_dir() if src.embedded else (src.path or src.name)
    device_map = {"": device}
    if fsdp and device.startswith("cuda"):  # untested here (no machine with two GPUs): marked GPU tests
        os.environ.setdefault("ACCELERATE_USE_FSDP", "true")
        os.environ.setdefault("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
        device_map = None
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path,
            quantization_config=qcfg,
            **dtype_kwarg(dtype),
            device_map=device_map,
            attn_implementation=_attn_implementation(plan),
            output_loading_info=True,
            trust_remote_code=src.trust_remote_code,
        )
    except Exception as e:  # missing/corrupt weights, download or auth failures: bad input, one line
        if "out of memory" in str(e).lower():
            raise
        if "trust_remote_code" in str(e) and not src.trust_remote_code:
            raise _load_error(src, "model", e) from None
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ModelError(
            f"cannot load the weights of model {src.name}: {type(e).__name__}: {first}"
        ) from None
    missing = list((info or {}).get("missing_keys") or [])
    if device_map is None and not main:
        missing = []  # CPU-RAM-efficient loading: this rank read no weights; FSDP sends it rank 0's
    if missing:  # transformers would initialise them at random and train on that
        raise ModelError(
            f"the weights of model {src.name} lack {len(missing)} tensors its config needs (e.g. "
            f"{sorted(missing)[0]}): they would start from random values"
        )
    model.config.use_cache = False
    if device == "cpu":
        keep_cpu_4bit_layout(model)
    if qcfg is not None and plan.dtype.value == "fp16":
        # fp16 only: norms and embeddings in fp32 keep loss scaling stable. With bf16 or fp32 compute the
        # upcast only costs memory and time (H200, 1.1B, 8x1024: 25.3 -> 17.2 GiB, bench/results).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if plan.gradient_checkpointing.value:
        kw = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        model.enable_input_require_grads()
        if plan.gradient_checkpointing.value == "offload":
            from qdoctor.train import offload

            offload.enable(model, device_type=torch.device(device).type)
    lora = plan.lora.value
    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.targets,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, cfg)
    apply_speed(model, plan)
    return model, path


def _attn_implementation(plan) -> str:
    from qdoctor.train import speed

    if plan.attention.value == "varlen":
        speed.register_varlen()
        return speed.VARLEN
    return plan.attention.value


def apply_speed(model, plan) -> None:
    """The speed means the plan chose (qdoctor.train.speed); each was checked available when planned.
    Variable-length attention is also self-checked on the device here: if it disagrees with SDPA the model
    goes back to SDPA (packed rows then get transformers' dense document mask), with a warning saying why."""
    from qdoctor.train import speed

    if plan.attention.value == "varlen":
        import torch

        dev = next(p.device for p in model.parameters())
        dtype = getattr(torch, TORCH_DTYPES[plan.dtype.value])
        why = speed.varlen_self_check(str(dev), dtype)
        if why:
            model.set_attn_implementation("sdpa")
            warnings.warn(f"{why}: SDPA with a dense document mask instead", stacklevel=2)
    if plan.fused_loss.value == "liger":
        speed.apply_liger(model, model.config.model_type, parts=("fused_linear_cross_entropy",))
    if plan.compile.value:
        speed.compile_layers(model, cudagraphs=speed.uses_cudagraphs(plan))


def keep_cpu_4bit_layout(model) -> None:
    """Turn off bitsandbytes' CPU inference repacking of 4-bit weights.

    On CPUs with AVX512-BF16, bitsandbytes 0.50's Linear4bit repacks its weights for an inference kernel
    on the first eval-mode forward without gradients, and unpacks them in state_dict(). The repack
    crashes when in_features is not a multiple of the blocksize ("shape '[128, 5]' is invalid for input
    of size 704", seen on the embedded model's evaluation) and each pack/unpack cycle moves the logits by
    ~1e-3, which breaks exact resume. Source: bitsandbytes nn/modules.py, Linear4bit.forward.
    """
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
