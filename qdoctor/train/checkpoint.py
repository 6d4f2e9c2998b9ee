"""Checkpoints you can open: <output>/checkpoint/{adapter/, state.pt, state.json}, replaced atomically.

state.pt holds the optimizer, scheduler and loss-scaler states, every RNG (python, numpy, torch CPU and
all CUDA devices) and the data position (optimizer step; the batch order is a pure function of seed and
step). A crash while saving leaves the previous checkpoint intact (write to a temp dir, then os.replace).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

from qdoctor.atomic import replace_dir


def rng_state() -> dict:
    import numpy as np
    import torch

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(s: dict) -> None:
    import numpy as np
    import torch

    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save(output: Path, model, optimizer, scheduler, scaler, state: dict) -> Path:
    import torch

    output = Path(output)
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint.tmp-", dir=output))
    try:
        model.save_pretrained(tmp / "adapter")
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rng_state(),
                "state": state,
            },
            tmp / "state.pt",
        )
        (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
        replace_dir(tmp, output / "checkpoint")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output / "checkpoint"


def exists(output: Path) -> bool:
    return (Path(output) / "checkpoint" / "state.pt").is_file()


def load(output: Path, model, optimizer, scheduler, scaler) -> dict:
    """Restore everything into the live objects; returns the saved loop state (step, micro-batch, ...)."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    ck = Path(output) / "checkpoint"
    weights = load_file(str(ck / "adapter" / "adapter_model.safetensors"))
    set_peft_model_state_dict(model, weights)
    blob = torch.load(ck / "state.pt", weights_only=False, map_location="cpu")
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    scaler.load_state_dict(blob["scaler"])
    set_rng_state(blob["rng"])
    return blob["state"]


def clean_temp(output: Path) -> None:
    for p in Path(output).glob(".checkpoint.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    old = Path(output) / "checkpoint.old"
    if old.exists() and not (Path(output) / "checkpoint").exists():
        os.replace(old, Path(output) / "checkpoint")
