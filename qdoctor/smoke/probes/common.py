"""What every probe shares, inside the probe's own process: the context, dtypes, the tiny model.

Imported only in a probe process (it imports torch). Probes return plain measurements; the
verdict is made in the parent from those numbers (qdoctor.smoke.verdict), so a recorded result
can be judged again by a test.
"""

from __future__ import annotations

import os

import torch

from qdoctor.smoke.probes.ctx import Ctx  # noqa: F401  (re-exported for probes)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The tiny Llama shape: every linear layer is a multiple of the 4-bit block size (64) and
# head_dim = 64 / 4 = 16, the smallest head size the attention kernels are routinely run with.
TINY_LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)


def choose_compute_dtype(device: str) -> str:
    """bf16 where the GPU has it natively (compute capability >= 8.0), fp16 on older GPUs, fp32 on CPU."""
    if device.startswith("cuda"):
        major, _ = torch.cuda.get_device_capability(torch.device(device))
        return "bfloat16" if major >= 8 else "float16"
    return "float32"


def rel_err(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """Frobenius relative error, computed in float64 on the CPU."""
    a = actual.detach().to("cpu", torch.float64)
    r = reference.detach().to("cpu", torch.float64)
    return float((a - r).norm() / r.norm().clamp_min(1e-30))


def peak_cuda_mib(device: str) -> float | None:
    if not device.startswith("cuda") or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated(torch.device(device)) / 2**20


def save_tiny_llama(path: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> str:
    """A random-init Llama-shaped model (fixed seed) saved as a Hugging Face checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**TINY_LLAMA)
    model = LlamaForCausalLM(cfg).to(dtype)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    return path


def load_4bit(path: str, device: torch.device, compute_dtype: torch.dtype):
    """Load the checkpoint the way a QLoRA recipe does: NF4, double quantization, compute dtype."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qdoctor.hf_compat import dtype_kwarg

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=compute_dtype)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=q, device_map={"": device},
                                                **dtype_kwarg(compute_dtype))


def lora_config(r: int = 8):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear", bias="none",
                      task_type="CAUSAL_LM")


def batch(device: torch.device, seed: int, n: int = 2, seq: int = 32, vocab: int = TINY_LLAMA["vocab_size"]):
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq), generator=g)
    return ids.to(device)


def four_bit_modules(model) -> dict:
    import bitsandbytes as bnb

    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
