"""Checkpoints you can open, and that run no code when loaded.

<output>/checkpoint/ holds three things, replaced together atomically (written to a temp dir, then
os.replace; a crash while saving leaves the previous checkpoint intact):

- adapter/            the LoRA weights (adapter_model.safetensors) and peft's adapter_config.json;
- state.safetensors   every other tensor: the optimizer's moments (torch AdamW's, bitsandbytes' 8-bit
                      uint8 states with their float absmax and qmap, the CPU AdamW's fp32 masters) and the
                      torch CPU and CUDA RNG states (uint8);
- state.json          everything else as plain JSON: the format, the loop position (step, micro-batch,
                      tokens, ...; the batch order is a pure function of seed and step), the run's identity,
                      the optimizer's param groups and per-parameter scalars, the scheduler and loss-scaler
                      states, Python's and numpy's RNG states, and the sha256 of each tensor file.

A run of several processes writes one checkpoint (rank 0): the adapter and the optimizer state are the same
on every rank (DDP) or gathered whole (FSDP), and each rank's RNG states are kept under rng.ranks, so each
rank resumes its own dropout stream.

Neither safetensors nor JSON can carry code, so a run directory copied from anyone can be resumed without
trusting it. Checkpoints of qdoctor before this format were pickles (state.pt); they are refused, never
loaded. Inside state.json the non-JSON values of a state dict are tagged: {"$tensor": key into
state.safetensors}, {"$tuple": [...]}, {"$dict": [[key, value], ...]} for non-string keys, {"$float": "nan"}.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
from pathlib import Path

from qdoctor.atomic import replace_dir
from qdoctor.train.rundir import RECORD

FORMAT = "qdoctor.checkpoint/1"
STATE_JSON, STATE_TENSORS, ADAPTER = "state.json", "state.safetensors", "adapter"
ADAPTER_WEIGHTS = "adapter/adapter_model.safetensors"
LEGACY = "state.pt"  # the pickle older qdoctor wrote
RESERVED = ("format", "run", "optimizer", "scheduler", "scaler", "rng", "files")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed safely; the message is one line for the user."""


# --- state dicts <-> (JSON, tensors) -------------------------------------------------------------------


def pack(obj, tensors: dict, path: str = ""):
    """A state dict as JSON, its tensors moved into `tensors` (CPU copies, keyed by where they were)."""
    import torch

    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"$float": repr(obj)}
    if isinstance(obj, torch.Tensor):
        key = path.strip("/") or "tensor"
        if key in tensors:
            raise TypeError(f"checkpoint: two tensors at {key!r}")
        # a private contiguous CPU copy: safetensors refuses shared storage (bitsandbytes shares its qmaps)
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {"$tensor": key}
    if isinstance(obj, list):
        return [pack(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return {"$tuple": [pack(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: pack(v, tensors, f"{path}/{k}") for k, v in obj.items()}
        return {"$dict": [[pack(k, tensors), pack(v, tensors, f"{path}/{k}")] for k, v in obj.items()]}
    raise TypeError(f"checkpoint: cannot store a {type(obj).__name__} at {path or '/'}")


def unpack(obj, tensors: dict):
    """The inverse of pack; a reference to a tensor that is not in the file is a CheckpointError."""
    if isinstance(obj, list):
        return [unpack(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        (tag, v), = obj.items()
        if tag == "$tensor":
            if v not in tensors:
                raise CheckpointError(f"{STATE_TENSORS} has no tensor {v!r}")
            return tensors[v]
        if tag == "$tuple":
            return tuple(unpack(x, tensors) for x in v)
        if tag == "$dict":
            return {unpack(k, tensors): unpack(x, tensors) for k, x in v}
        if tag == "$float":
            return float(v)
    return {k: unpack(v, tensors) for k, v in obj.items()}


# --- RNG states: Python's and numpy's as JSON (exact), torch's as uint8 tensors -----------------------


def rng_state() -> dict:
    import numpy as np
    import torch

    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": name,
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(s: dict) -> None:
    import numpy as np
    import torch

    py, npy = s["python"], s["numpy"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    np.random.set_state(
        (
            npy["bit_generator"],
            np.array(npy["keys"], dtype=np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    )
    torch.set_rng_state(s["torch"])
    if s.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# --- save ------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_identity(output: Path):
    """The identity run.json gives this run (None when absent): a checkpoint belongs to one run."""
    try:
        return json.loads((Path(output) / RECORD).read_text()).get("identity")
    except (OSError, ValueError, AttributeError):
        return None


def _dump(doc: dict) -> str:
    """One line per top-level key: the loop position reads at a glance, the big states stay compact."""
    items = [f"  {json.dumps(k)}: {json.dumps(v, allow_nan=False)}" for k, v in doc.items()]
    return "{\n" + ",\n".join(items) + "\n}\n"


def write_state(directory: Path, optimizer, scheduler, scaler, state: dict, identity=None, *,
                rng_ranks: list | None = None, optimizer_state: dict | None = None) -> None:
    """state.json + state.safetensors into `directory` (the adapter must already be there: it is hashed).
    rng_ranks: the RNG states of ranks 1.. of a run of several processes; optimizer_state: the optimizer's
    state dict when it is not optimizer.state_dict() (FSDP's gathered one)."""
    from safetensors.torch import save_file

    clash = [k for k in state if k in RESERVED]
    if clash:
        raise TypeError(f"checkpoint: loop state uses reserved keys {clash}")
    directory = Path(directory)
    tensors: dict = {}
    rng = rng_state()
    if rng_ranks:
        rng["ranks"] = list(rng_ranks)
    doc = {
        "format": FORMAT,
        **pack(state, tensors, "loop"),
        "run": pack(identity, tensors, "run"),
        "optimizer": pack(optimizer.state_dict() if optimizer_state is None else optimizer_state, tensors,
                          "optimizer"),
        "scheduler": pack(scheduler.state_dict(), tensors, "scheduler"),
        "scaler": pack(scaler.state_dict(), tensors, "scaler"),
        "rng": pack(rng, tensors, "rng"),
    }
    save_file(tensors, str(directory / STATE_TENSORS), metadata={"format": FORMAT})
    doc["files"] = {
        name: _sha256(directory / name)
        for name in (STATE_TENSORS, ADAPTER_WEIGHTS)
        if (directory / name).is_file()
    }
    (directory / STATE_JSON).write_text(_dump(doc))


def save(output: Path, model, optimizer, scheduler, scaler, state: dict, *, rng_ranks: list | None = None,
         adapter_state: dict | None = None, optimizer_state: dict | None = None) -> Path:
    """adapter_state / optimizer_state: what FSDP gathered on rank 0 (the live model holds only a shard)."""
    output = Path(output)
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint.tmp-", dir=output))
    try:
        if adapter_state is None:
            model.save_pretrained(tmp / ADAPTER)
        else:
            from qdoctor.train.distributed import save_adapter

            save_adapter(model, tmp / ADAPTER, adapter_state)
        write_state(tmp, optimizer, scheduler, scaler, state, run_identity(output), rng_ranks=rng_ranks,
                    optimizer_state=optimizer_state)
        replace_dir(tmp, output / "checkpoint")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output / "checkpoint"


# --- verify and load -------------------------------------------------------------------------------------


def exists(output: Path) -> bool:
    """A checkpoint directory is there (whole, damaged or old: `verify` tells which)."""
    return (Path(output) / "checkpoint").is_dir()


def saved_step(output: Path) -> int | None:
    """The optimizer step of the saved checkpoint (from its JSON side file), None when there is none."""
    try:
        step = json.loads((Path(output) / "checkpoint" / STATE_JSON).read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def saved_optimizer_tensors(output: Path) -> int | None:
    """How many tensors the saved optimizer state holds (a flat layout saves fewer: optim.FlatParams), None
    when there is no readable checkpoint."""
    try:
        doc = json.loads((Path(output) / "checkpoint" / STATE_JSON).read_text())
        groups = doc["optimizer"]["param_groups"]
        return sum(len(g["params"]) for g in groups)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def verify(output: Path) -> dict:
    """Read state.json and check every file against it, before anything is loaded or written.

    Returns the parsed state.json; raises CheckpointError with one line. Reads no pickle, ever.
    """
    output = Path(output)
    ck = output / "checkpoint"
    fresh = "it cannot be resumed safely; start a fresh --output"
    if (ck / LEGACY).exists():
        raise CheckpointError(
            f"checkpoint in {ck} was written by an older qdoctor ({LEGACY}, a pickle, which can run code "
            f"when loaded); {fresh}"
        )
    try:
        doc = json.loads((ck / STATE_JSON).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint in {ck} has no {STATE_JSON} (incomplete or damaged); {fresh}"
        ) from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint file {ck / STATE_JSON} is unreadable ({type(e).__name__}); {fresh}"
        ) from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"checkpoint file {ck / STATE_JSON} is not a JSON object; {fresh}")
    if "format" not in doc:
        raise CheckpointError(
            f"checkpoint in {ck} was written by an older qdoctor (no format field); {fresh}"
        )
    if doc["format"] != FORMAT:
        raise CheckpointError(
            f"checkpoint in {ck} has format {str(doc['format'])[:40]!r}; this qdoctor reads {FORMAT} only; "
            f"resume it with the qdoctor that wrote it, or start a fresh --output"
        )
    files = doc.get("files")
    missing = [k for k in RESERVED if k not in doc]
    if missing or not isinstance(files, dict) or set(files) != {STATE_TENSORS, ADAPTER_WEIGHTS}:
        raise CheckpointError(
            f"checkpoint file {ck / STATE_JSON} is incomplete (missing "
            f"{', '.join(missing) or 'file digests'}); {fresh}"
        )
    for name, digest in files.items():
        if not (ck / name).is_file():
            raise CheckpointError(f"checkpoint file {ck / name} is missing; {fresh}")
        if _sha256(ck / name) != digest:
            raise CheckpointError(
                f"checkpoint file {ck / name} does not match its sha256 in {STATE_JSON} (corrupt or "
                f"edited); {fresh}"
            )
    loop = {k: v for k, v in doc.items() if k not in RESERVED}
    if not isinstance(loop.get("step"), int) or not all(
        v is None or isinstance(v, (int, float)) for v in loop.values()
    ):
        raise CheckpointError(f"checkpoint file {ck / STATE_JSON} has a malformed loop position; {fresh}")
    if unpack(doc["run"], {}) != run_identity(output):
        raise CheckpointError(
            f"checkpoint in {ck} belongs to a different run than {output / 'run.json'}; {fresh}"
        )
    return doc


def _read(output: Path) -> tuple[Path, dict, dict, dict]:
    """(checkpoint dir, verified state.json, adapter weights, state tensors)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    ck = Path(output) / "checkpoint"
    doc = verify(output)
    try:
        weights = load_file(str(ck / ADAPTER_WEIGHTS))
        tensors = load_file(str(ck / STATE_TENSORS))
    except SafetensorError as e:
        raise CheckpointError(
            f"checkpoint in {ck}: a tensor file is unreadable ({str(e)[:120]}); start a fresh --output"
        ) from None
    return ck, doc, weights, tensors


def _unfit(ck: Path, e: Exception) -> CheckpointError:
    msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    return CheckpointError(f"checkpoint in {ck} does not fit this run ({msg}); start a fresh --output")


LOAD_ERRORS = (ValueError, KeyError, TypeError, IndexError, RuntimeError, OverflowError, AttributeError)


def load_adapter(output: Path, model) -> None:
    """The LoRA weights into the (unwrapped) peft model: under FSDP before it is sharded. The whole checkpoint
    is read and checked first, so a damaged one is refused before the model is touched."""
    from peft import set_peft_model_state_dict

    ck, doc, weights, tensors = _read(output)
    try:
        unpack(doc, tensors)
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint in {ck}: {e}; start a fresh --output") from None
    try:
        result = set_peft_model_state_dict(model, weights)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"adapter tensors {result.unexpected_keys[:3]} are not in this model")
    except LOAD_ERRORS as e:
        raise _unfit(ck, e) from None


def load_state(output: Path, optimizer, scheduler, scaler, *, rank: int = 0, load_optimizer=None) -> dict:
    """Optimizer, scheduler, loss scaler and this rank's RNG states; returns the saved loop state. A rank the
    checkpoint has no RNG state for (the run now has more processes) keeps its own.
    load_optimizer(optimizer, state): how a saved whole state reaches a sharded optimizer (FSDP)."""
    ck, doc, _, tensors = _read(output)
    try:
        st = unpack(doc, tensors)
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint in {ck}: {e}; start a fresh --output") from None
    try:
        if load_optimizer is None:
            optimizer.load_state_dict(st["optimizer"])
        else:
            load_optimizer(optimizer, st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        scaler.load_state_dict(st["scaler"])
        ranks = st["rng"].get("ranks") or []
        if rank == 0:
            set_rng_state(st["rng"])
        elif rank <= len(ranks):
            set_rng_state(ranks[rank - 1])
    except LOAD_ERRORS as e:
        raise _unfit(ck, e) from None
    return {k: v for k, v in st.items() if k not in RESERVED}


def load(output: Path, model, optimizer, scheduler, scaler, *, rank: int = 0) -> dict:
    """Restore everything into the live objects; returns the saved loop state (step, micro-batch, ...)."""
    load_adapter(output, model)
    return load_state(output, optimizer, scheduler, scaler, rank=rank)


def clean_temp(output: Path) -> None:
    for p in Path(output).glob(".checkpoint.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    old = Path(output) / "checkpoint.old"
    if old.exists() and not (Path(output) / "checkpoint").exists():
        os.replace(old, Path(output) / "checkpoint")
