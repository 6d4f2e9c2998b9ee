"""Probe `ddp`: two processes (NCCL on two GPUs, gloo on the CPU) do what a data-parallel QLoRA run does.

1. an all-reduce of a known tensor, its sum checked exactly: what hangs or comes back wrong when GPUs cannot
   reach each other (peer-to-peer broken by PCIe ACS or an IOMMU; a container's small /dev/shm);
2. one QLoRA step under DistributedDataParallel, wrapped as `qdoctor train` wraps it (train.distributed):
   each rank loads the 4-bit tiny Llama on its own device and computes on its own batch; after backward every
   rank must hold the same LoRA gradients, equal to the mean of the ranks' own gradients.

The ranks are forked on the CPU (this process already imported the stack) and started as fresh interpreters
on GPUs (CUDA does not survive a fork). They meet through a file store in the probe's private directory, so
no port is needed, and each leaves its result in a JSON file. A rank that does not finish within
RANKS_TIMEOUT_S is killed and reported as a hang.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

WORLD = 2
COLLECTIVE_TIMEOUT_S = 60.0  # torch.distributed's own timeout: a hung collective raises in the rank
RANKS_TIMEOUT_S = 90.0  # the probe's deadline for both ranks (the runner's per-probe timeout is 120 s)
ALLREDUCE_N = 1024


def ddp(ctx) -> dict:
    import torch

    from qdoctor.smoke.probes.common import save_tiny_llama

    if ctx.is_cuda:
        n = torch.cuda.device_count()
        if n < WORLD:
            return {"skip": f"{n} GPU visible: the ddp probe needs {WORLD} (one per process); a single GPU "
                            "trains without it"}
        devs, backend = [f"cuda:{i}" for i in range(WORLD)], "nccl"
    else:
        devs, backend = ["cpu"] * WORLD, "gloo"
    path = save_tiny_llama(os.path.join(ctx.workdir, "base"), seed=ctx.seed)
    job = {"world": WORLD, "backend": backend, "devices": devs, "model": path, "seed": ctx.seed,
           "dtype": ctx.compute_dtype, "inject": ctx.inject, "store": os.path.join(ctx.workdir, "store"),
           "out": ctx.workdir}
    t0 = time.perf_counter()
    finished = _run_ranks(job, fork=not ctx.is_cuda)
    ranks = [_read(ctx.workdir, r) for r in range(WORLD)]
    m: dict = {"backend": backend, "world_size": WORLD, "devices": devs, "device": ctx.device,
               "ranks_finished": finished, "seconds": round(time.perf_counter() - t0, 3)}
    errors = [f"rank {r}: {x['error']}" for r, x in enumerate(ranks) if x.get("error")]
    if errors:
        m["rank_error"] = "\n".join(errors)[-4000:]
    if not finished:
        hang = (f"a rank did not finish within {RANKS_TIMEOUT_S:g} s (a collective that hangs: NCCL "
                "peer-to-peer or shared memory)")
        m["rank_error"] = (m.get("rank_error", "") + "\n" + hang).strip()
    done = [x for x in ranks if "allreduce_ok" in x]
    m["allreduce_ok"] = len(done) == WORLD and all(x["allreduce_ok"] for x in done)
    grads = [x for x in ranks if "grad_diff_across_ranks" in x]
    if len(grads) == WORLD:
        m["grad_diff_across_ranks"] = max(x["grad_diff_across_ranks"] for x in grads)
        m["grad_rel_err_vs_mean"] = max(x["grad_rel_err_vs_mean"] for x in grads)
        m["grads_nonzero"] = all(x["grads_nonzero"] for x in grads)
        m["losses"] = [x["loss"] for x in grads]
        m["losses_finite"] = all(v == v and abs(v) != float("inf") for v in m["losses"])
        m["compute_dtype"] = grads[0]["dtype"]
    else:
        m["ddp_step_ok"] = False
    return {"measurements": m}


def _read(workdir: str, rank: int) -> dict:
    try:
        with open(os.path.join(workdir, f"rank{rank}.json"), encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def _run_ranks(job: dict, fork: bool) -> bool:
    """Start the ranks, wait for them up to RANKS_TIMEOUT_S; True when both ended."""
    if fork:
        import multiprocessing

        mp = multiprocessing.get_context("fork")
        procs = [mp.Process(target=rank_main, args=(r, job)) for r in range(WORLD)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + RANKS_TIMEOUT_S
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            p.kill()
            p.join(5)
        return not alive
    spec = json.dumps(job)
    code = "import sys, json; from qdoctor.smoke.probes.ddp import rank_main; rank_main(int(sys.argv[1]), " \
           "json.loads(sys.argv[2]))"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r), spec]) for r in range(WORLD)]
    deadline = time.monotonic() + RANKS_TIMEOUT_S
    ok = True
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            ok = False
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(5)
    return ok


def rank_main(rank: int, job: dict) -> None:
    """One rank: join the group, all-reduce, one DDP QLoRA step; its measurements into rank{rank}.json."""
    import traceback

    out: dict = {"rank": rank}
    try:
        _rank(rank, job, out)
    except BaseException as e:  # noqa: BLE001 - the rank's failure is the result
        out["error"] = "".join(traceback.format_exception(type(e), e, e.__traceback__))[-3000:]
    finally:
        with open(os.path.join(job["out"], f"rank{rank}.json"), "w", encoding="utf-8") as fh:
            json.dump(out, fh)
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except BaseException:  # noqa: BLE001
            pass


def _rank(rank: int, job: dict, out: dict) -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from qdoctor.smoke.probes.common import DTYPES, batch, choose_compute_dtype, load_4bit, lora_config
    from qdoctor.train.distributed import wrap_ddp

    torch.set_num_threads(1)
    device = job["devices"][rank]
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    world = job["world"]
    store = dist.FileStore(job["store"], world)
    dist.init_process_group(job["backend"], store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))

    # 1. all-reduce: rank r sends (r + 1) * [1..N]; the sum is exactly (1 + ... + world) * [1..N]
    base = torch.arange(1, ALLREDUCE_N + 1, dtype=torch.float32, device=dev)
    t = base * (rank + 1)
    dist.all_reduce(t)
    want = base * (world * (world + 1) // 2)
    out["allreduce_ok"] = bool(torch.equal(t, want))

    # 2. one QLoRA step under DDP, on a batch of this rank's own
    from peft import get_peft_model

    dtype = DTYPES[job["dtype"] or choose_compute_dtype(device)]
    model = load_4bit(job["model"], dev, dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    torch.manual_seed(job["seed"])  # the same LoRA start on every rank
    model = get_peft_model(model, lora_config())
    with torch.no_grad():  # lora_B starts at zero, which makes lora_A's gradient zero: give it a value
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator(device=p.device).manual_seed(job["seed"]))
    wrapped = wrap_ddp(model, device)
    ids = batch(dev, job["seed"] + 1 + rank)
    params = [p for p in model.parameters() if p.requires_grad]
    with wrapped.no_sync():  # this rank's own gradient, for the reference mean
        wrapped(input_ids=ids, labels=ids).loss.backward()
    own = torch.cat([p.grad.detach().float().flatten() for p in params])
    for p in params:
        p.grad = None
    loss = wrapped(input_ids=ids, labels=ids).loss
    loss.backward()  # DDP all-reduces (averages) the gradients here
    synced = torch.cat([p.grad.detach().float().flatten() for p in params])
    if job.get("inject") == "wrong" and rank == 1:
        synced = synced + 1e-3  # fault injection: the verdict must see ranks disagree
    every = [torch.empty_like(synced) for _ in range(world)]
    dist.all_gather(every, synced)
    mean = own.clone()
    dist.all_reduce(mean)
    mean /= world
    out["grad_diff_across_ranks"] = max(float((x - every[0]).abs().max()) for x in every)
    out["grad_rel_err_vs_mean"] = float((synced - mean).norm() / mean.norm().clamp_min(1e-30))
    out["grads_nonzero"] = bool(synced.abs().sum() > 0)
    out["loss"] = float(loss.detach().float())
    out["dtype"] = str(dtype).replace("torch.", "")
