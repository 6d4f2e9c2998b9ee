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


def load_for_training(src: ModelSource, plan, seed: int):
    """Base in the plan's quantization and dtype on the plan's device, LoRA on top. Returns the peft model."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*checkpointing.*")
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    dtype = getattr(torch, TORCH_DTYPES[plan.v("dtype")])
    quant = plan.v("quantization")
    qcfg = None
    if quant == "nf4":
        qcfg = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    elif quant == "int8":
        qcfg = BitsAndBytesConfig(load_in_8bit=True)
    path = embedded_base_dir() if src.embedded else (src.path or src.name)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=qcfg,
        dtype=dtype,
        device_map={"": plan.v("device")},
        attn_implementation=plan.v("attention"),
        trust_remote_code=src.trust_remote_code,
    )
    model.config.use_cache = False
    if str(plan.v("device")) == "cpu":
        keep_cpu_4bit_layout(model)
    if qcfg is not None and plan.v("dtype") == "fp16":
        # fp16 only: norms and embeddings in fp32 keep loss scaling stable. With bf16 or fp32 compute the
        # upcast only costs memory and time (H200, 1.1B, 8x1024: 25.3 -> 17.2 GiB, bench/results).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if plan.v("gradient_checkpointing"):
        kw = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        model.enable_input_require_grads()
    lora = plan.v("lora")
    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=lora["targets"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, cfg)
    apply_speed(model, plan)
    return model, path


def apply_speed(model, plan) -> None:
    """The speed means the plan chose (qdoctor.train.speed); each was checked available when planned."""
    from qdoctor.train import speed

    fused = getattr(plan, "fused_loss", None)
    if fused is not None and fused.value == "liger":
        speed.apply_liger(model, model.config.model_type, parts=("fused_linear_cross_entropy",))
    comp = getattr(plan, "compile", None)
    if comp is not None and comp.value:
        speed.compile_layers(model)


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
