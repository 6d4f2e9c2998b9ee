"""The probes, in the order they run, and what each needs. Parent side: imports nothing heavy.

`needs` names the imports a probe cannot do without; `after_device` means a failed device probe
makes it pointless. A probe's finding codes are QD7{index}{kind} (see qdoctor.smoke.result).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Probe:
    name: str
    index: int  # the middle digit of its finding codes
    target: str  # "module:function", run in the probe's own process
    needs: tuple[str, ...]
    after_device: bool
    doc: str


_P = "qdoctor.smoke.probes."
ORDER = [
    Probe("imports", 1, _P + "basics:imports", (), False,
          "torch, bitsandbytes (native library really loaded), transformers and peft import; warnings kept"),
    Probe("device", 2, _P + "basics:device", ("torch",), False,
          "allocation and a matmul on every visible GPU, against a float64 CPU reference"),
    Probe("nf4", 3, _P + "quant:nf4", ("torch", "bitsandbytes"), True,
          "NF4/FP4 quantize-dequantize, with and without double quant, error inside its band"),
    Probe("matmul4bit", 4, _P + "quant:matmul4bit", ("torch", "bitsandbytes"), True,
          "Linear4bit forward against the dequantized reference in the compute dtype"),
    Probe("lora_step", 5, _P + "train:lora_step", ("torch", "bitsandbytes", "transformers", "peft"), True,
          "tiny 4-bit Llama + LoRA, non-reentrant checkpointing: only LoRA learns, base bit-for-bit frozen"),
    Probe("optim8bit", 6, _P + "optim:optim8bit", ("torch", "bitsandbytes"), True,
          "AdamW8bit steps close to torch AdamW; on CUDA a PagedAdamW8bit step (managed memory)"),
    Probe("save_load", 7, _P + "train:save_load", ("torch", "bitsandbytes", "transformers", "peft"), True,
          "adapter saved in PEFT format and reloaded onto a fresh 4-bit base gives the same logits"),
    Probe("precision", 8, _P + "train:precision", ("torch",), True,
          "bf16 autocast where native, fp16 with GradScaler otherwise, fp32 on CPU: losses finite"),
    Probe("ddp", 9, _P + "ddp:ddp", ("torch", "bitsandbytes", "transformers", "peft"), True,
          "two processes (NCCL on two GPUs, gloo on CPU): an all-reduce with a checked sum, then one QLoRA "
          "step under DDP with the same gradients on every rank; skipped with one GPU"),
]
PROBES: dict[str, Probe] = {p.name: p for p in ORDER}
