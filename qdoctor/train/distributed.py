"""One run in several processes: what the launcher told this process, and the few collectives the run needs.

qdoctor writes no distributed runtime of its own: torchrun (`python -m torch.distributed.run`, which
`qdoctor train --nproc N` and `accelerate launch` both use) starts the processes and sets RANK, WORLD_SIZE,
LOCAL_RANK and the rendezvous address; torch.distributed does the communication. What every rank must keep
the same, or the run hangs in a collective or computes a different number:
- the same sequence of collectives: every decision that ends or skips a step (a signal, a non-finite loss or
  gradient norm) is taken on values all ranks share (all-reduced), never on a rank's own;
- its own device: the 4-bit model is loaded with device_map {"": LOCAL_RANK} (or the CPU), never "auto",
  which spreads one model over every GPU (accelerate #2713: "You can't train a model that has been loaded
  in 8-bit precision on a different device than the one you're training on");
- a disjoint slice of each step's sequences (`shard`), and a loss divided by the step's label tokens summed
  over all ranks, so N processes compute the gradient one process computes for the same effective batch.

Scalars (counts, losses, flags) travel over gloo on the CPU even when gradients use NCCL: the process
group is created for both ("cpu:gloo,cuda:nccl"), so no scalar needs a device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
LAUNCH_ENV = "QDOCTOR_LAUNCH"  # set by `qdoctor train --nproc`: the launcher's pre-flight, as a JSON file


class LaunchError(ValueError):
    """The launcher's environment is malformed or contradicts the config; one line for the user."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    launcher: str | None = None  # "qdoctor" (train --nproc), "accelerate", "torchrun", or None (one process)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.size > 1


SINGLE = World()


def from_env(environ=None) -> World:
    """The process's place in the run, from the variables torchrun (and accelerate launch through it) set.
    No RANK/WORLD_SIZE: one process. Raises LaunchError for values that are not a consistent rank layout."""
    env = os.environ if environ is None else environ
    if "RANK" not in env and "WORLD_SIZE" not in env:
        return SINGLE
    vals = {}
    for key in ENV_KEYS:
        raw = env.get(key)
        if raw is None:
            continue
        try:
            vals[key] = int(raw)
        except ValueError:
            raise LaunchError(f"{key}={raw!r} is not a number (set by the launcher: torchrun or accelerate "
                              "launch)") from None
    size = vals.get("WORLD_SIZE", 1)
    rank = vals.get("RANK", 0)
    local = vals.get("LOCAL_RANK", rank)
    local_size = vals.get("LOCAL_WORLD_SIZE", size)
    if size < 1 or not 0 <= rank < size or not 0 <= local < local_size:
        raise LaunchError(f"RANK={rank}, WORLD_SIZE={size}, LOCAL_RANK={local}, "
                          f"LOCAL_WORLD_SIZE={local_size} do not describe a rank of the run")
    if env.get(LAUNCH_ENV):
        launcher = "qdoctor"
    elif any(k.startswith("ACCELERATE_") for k in env):
        launcher = "accelerate"
    else:
        launcher = "torchrun"
    return World(rank, size, local, local_size, launcher)


def rank_device(device: str, world: World) -> str:
    """The device of this rank: the plan's CPU, or the GPU of its local rank (cuda:LOCAL_RANK)."""
    if device == "cpu" or not world.several:
        return device
    return f"cuda:{world.local_rank}"


def shard(items: list, world: World) -> list:
    """This rank's contiguous slice; the caller guarantees len(items) % world.size == 0 (batch_split)."""
    if not world.several:
        return items
    k, r = divmod(len(items), world.size)
    if r:
        raise AssertionError(f"{len(items)} items do not split over {world.size} ranks")
    return items[world.rank * k : (world.rank + 1) * k]


def eval_shard(items: list, world: World) -> list:
    """This rank's share of the held-out set (uneven shares are fine: the evaluation runs no collective
    inside the model, only the final sum)."""
    return items[world.rank :: world.size] if world.several else items


# ---- the process group ----------------------------------------------------------------------------------


def backend_for(cuda: bool) -> str:
    """gloo for everything on CPU; NCCL for CUDA tensors and gloo for the CPU scalars on GPUs."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def init(world: World, *, cuda: bool, timeout_s: float = 1800.0) -> None:
    """Join the run's process group (torchrun's rendezvous: MASTER_ADDR/MASTER_PORT in the environment)."""
    if not world.several:
        return
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if cuda:
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group(backend_for(cuda), timeout=timedelta(seconds=timeout_s))


def close(world: World) -> None:
    if not world.several:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.several:
        import torch.distributed as dist

        dist.barrier()


def sum_(world: World, value: float) -> float:
    """The sum of a number over the ranks (float64 on the CPU)."""
    if not world.several:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def max_(world: World, value: int) -> int:
    """The largest of an integer over the ranks: a flag one rank raised, an exit code one rank chose."""
    if not world.several:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([int(value)], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def broadcast_json(world: World, obj=None):
    """Rank 0's JSON-serialisable object on every rank (sent as JSON text, so nothing but data travels)."""
    if not world.several:
        return obj
    import json

    import torch.distributed as dist

    box = [json.dumps(obj) if world.main else None]
    dist.broadcast_object_list(box, src=0)
    return json.loads(box[0])


# ---- the model ------------------------------------------------------------------------------------------


def wrap_ddp(model, device: str):
    """DistributedDataParallel over the LoRA parameters. find_unused_parameters=False: every LoRA tensor gets
    a gradient each step, and with it DDP needs no extra graph walk (reentrant checkpointing with
    find_unused_parameters=True is a known "marked ready twice" failure; qdoctor checkpoints non-reentrantly).
    broadcast_buffers=False: the only buffers (rotary frequencies) are constants, and a broadcast per forward
    would make evaluation a collective."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [int(device.split(":")[1])] if device.startswith("cuda") else None
    # torch >= 2.13 renames it (and warns on the old name); the buffers are still synced once at init
    sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters \
        else "broadcast_buffers"
    return DDP(model, device_ids=ids, find_unused_parameters=False, **{sync: False})


def unwrap(model):
    """The peft model inside a DDP or FSDP wrapper."""
    return getattr(model, "module", model)


def no_sync(model, last: bool):
    """DDP's no_sync for every micro-batch but the last of a step: gradients are all-reduced once a step."""
    import contextlib

    if last or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def gather_objects(world: World, obj) -> list:
    """Every rank's object (the RNG states: tensors inside), in rank order, on rank 0; [obj] with one process.
    These travel between the processes of one run only; what reaches disk is written as safetensors + JSON."""
    if not world.several:
        return [obj]
    import torch.distributed as dist

    box = [None] * world.size if world.main else None
    dist.gather_object(obj, box, dst=0)
    return box if world.main else [obj]


# ---- FSDP-QLoRA -----------------------------------------------------------------------------------------
# bitsandbytes stores 4-bit weights in any dtype (bnb_4bit_quant_storage), so FSDP can flatten and shard them
# with the other parameters of a unit, provided every tensor of the unit has that dtype
# (https://huggingface.co/docs/bitsandbytes/main/fsdp_qlora; bitsandbytes PR #970). peft's
# fsdp_auto_wrap_policy gives each decoder layer and each LoRA module its own unit, so the fp32 LoRA tensors
# never share a flat parameter with the bf16-stored base; use_orig_params=False as in that recipe.


def wrap_fsdp(model, device: str, world: World):
    """FSDP (FULL_SHARD) with peft's wrap policy. On GPUs the weights come from rank 0 (sync_module_states:
    the others loaded nothing, see model.load_for_training); on the CPU every rank loaded them (FSDP
    refuses sync_module_states for CPU tensors)."""
    import torch
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy

    cuda = device.startswith("cuda")
    init_fn = None
    if cuda and not world.main:
        dev = torch.device(device)

        def init_fn(m):  # the meta tensors of ranks > 0 get storage; rank 0's values arrive by broadcast
            m.to_empty(device=dev, recurse=False)

    return FSDP(
        model,
        auto_wrap_policy=fsdp_auto_wrap_policy(model),
        sharding_strategy=ShardingStrategy.FULL_SHARD,
        use_orig_params=False,
        device_id=torch.device(device),
        sync_module_states=cuda,
        param_init_fn=init_fn,
        limit_all_gathers=True,
    )


def full_state(model, optimizer, gpu: bool) -> tuple[dict | None, dict | None]:
    """Under FSDP: the adapter's tensors (keys as peft writes them) and the whole optimizer state, on rank 0
    (None elsewhere). A collective: every rank calls it. On GPUs gathered into rank 0's CPU memory only
    (offload_to_cpu, rank0_only); on the CPU into every rank's, as FSDP's offload of CPU tensors fails there
    ("setStorage: ... out of bounds for storage of size 0", torch 2.13).

    peft's own selection (get_peft_model_state_dict) finds the LoRA modules by their names, which FSDP's
    wrappers change ("_fsdp_wrapped_module."), and returns nothing; the gathered state dict has the plain
    names, so the LoRA tensors are taken from it as peft takes them for a LoRA without bias: the ".lora_A."
    and ".lora_B." entries, the adapter name dropped."""
    import warnings

    import torch.distributed as dist
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    cfg = FullStateDictConfig(offload_to_cpu=gpu, rank0_only=gpu)
    ocfg = FullOptimStateDictConfig(offload_to_cpu=gpu, rank0_only=gpu)
    with warnings.catch_warnings():  # torch 2.13 points to torch.distributed.checkpoint (not safetensors)
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*state_dict_type.*")
        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, cfg, ocfg):
            sd = model.state_dict()
            osd = FSDP.optim_state_dict(model, optimizer)
    if dist.get_rank() != 0:
        return None, None
    return lora_tensors(sd), osd


def lora_tensors(state_dict: dict, adapter: str = "default") -> dict:
    """The LoRA entries of a whole-model state dict, named as in adapter_model.safetensors."""
    return {k.replace(f".{adapter}.", "."): v.detach().contiguous() for k, v in state_dict.items()
            if (".lora_A." in k or ".lora_B." in k) and f".{adapter}." in k}


def save_adapter(model, directory, tensors: dict) -> None:
    """What PeftModel.save_pretrained writes (adapter_config.json, adapter_model.safetensors), from tensors
    gathered by full_state."""
    from pathlib import Path

    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    unwrap(model).peft_config["default"].save_pretrained(str(d))
    save_file(dict(tensors), str(d / "adapter_model.safetensors"), metadata={"format": "pt"})


def load_full_optim_state(model, optimizer, osd: dict) -> None:
    """The inverse of full_state's optimizer half: every rank keeps its shard of a whole saved state."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    optimizer.load_state_dict(FSDP.optim_state_dict_to_load(model, optimizer, osd))
