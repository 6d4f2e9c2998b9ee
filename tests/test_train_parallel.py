"""Several processes, the pure parts: the launcher's variables, the batch split, the plan's DDP/FSDP choice
on recorded machines, the memory estimate when sharded, and the launcher's command and files. No process
starts."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from qdoctor.facts.schema import normalize
from qdoctor.train import config as C
from qdoctor.train import distributed as D
from qdoctor.train import launch, memory, preflight
from qdoctor.train.plan import make_plan

SNAP = Path(__file__).parent / "snapshots"
SHAPE_1B = memory.Shape(**memory.SHAPE_1B)
SHAPE_70B = memory.Shape(hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, vocab=32000)
PASS = [{"probe": n, "status": "pass"} for n in preflight.GPU_PROBES]


def snapshot(name: str) -> dict:
    return normalize(json.loads((SNAP / f"{name}.json").read_text()))


def gpus(n: int, name="NVIDIA GeForce RTX 4090", cc="8.9", mib=24564) -> dict:
    return {
        "platform": {"memory_total_mib": 256000},
        "nvidia": {"status": "ok", "gpus": [{"index": i, "name": name, "compute_capability": cc,
                                             "memory_total_mib": mib, "memory_free_mib": mib - 500}
                                            for i in range(n)]},
        "torch": {"version": "2.11.0+cu130", "cuda": "13.0", "cuda_available": True, "bf16_supported": True},
        "bitsandbytes": {"installed": True, "loads": True},
        "packages": {"bitsandbytes": "0.50.2"},
    }


def plan(facts, world, shape=SHAPE_1B, environ=None, seq=1024, **cfg):
    return make_plan(C.build(None, cfg), facts, PASS, shape=shape, model_name="m", embedded=False,
                     n_train=1000, max_len=seq, world=world, environ=environ)


# ---- what the launcher told this process ----

def test_no_rank_variables_is_one_process():
    assert D.from_env({}) == D.SINGLE and not D.SINGLE.several and D.SINGLE.main


def test_torchrun_accelerate_and_qdoctor_launches_are_told_apart():
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                "TORCHELASTIC_RUN_ID": "x"}
    w = D.from_env(torchrun)
    assert (w.rank, w.size, w.local_rank, w.local_size, w.launcher) == (3, 4, 1, 2, "torchrun")
    assert not w.main and w.several
    assert D.from_env({**torchrun, "ACCELERATE_MIXED_PRECISION": "bf16"}).launcher == "accelerate"
    assert D.from_env({**torchrun, D.LAUNCH_ENV: "/x/launch.json"}).launcher == "qdoctor"
    assert D.from_env({"RANK": "0", "WORLD_SIZE": "1"}).several is False  # torchrun --nproc-per-node 1


@pytest.mark.parametrize("env", [
    {"RANK": "two", "WORLD_SIZE": "2"},
    {"RANK": "2", "WORLD_SIZE": "2"},
    {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"},
])
def test_a_rank_layout_that_is_not_one_is_a_one_line_error(env):
    with pytest.raises(D.LaunchError, match="RANK|WORLD_SIZE"):
        D.from_env(env)


def test_each_rank_takes_its_slice_and_its_own_gpu():
    w = D.World(1, 2, 1, 2, "torchrun")
    assert D.shard(list(range(8)), w) == [4, 5, 6, 7]
    assert D.shard(list(range(8)), D.World(0, 2)) == [0, 1, 2, 3]
    assert D.eval_shard(list(range(5)), w) == [1, 3]  # uneven shares are fine for evaluation
    assert D.rank_device("cuda:0", w) == "cuda:1" and D.rank_device("cpu", w) == "cpu"
    assert D.backend_for(True) == "cpu:gloo,cuda:nccl" and D.backend_for(False) == "gloo"
    with pytest.raises(AssertionError):
        D.shard(list(range(7)), w)


# ---- the batch split over processes ----

@pytest.mark.parametrize("cfg, world, split", [
    ({"batch_size": 16}, 2, (16, None, None)),
    ({"batch_size": 16, "micro_batch": 2}, 4, (16, 2, 2)),
    ({"micro_batch": 2, "grad_accum": 3}, 2, (12, 2, 3)),  # batch = world x micro x accum
    ({"batch_size": 8, "grad_accum": 2}, 2, (8, 2, 2)),
])
def test_the_batch_splits_over_processes(cfg, world, split):
    assert C.batch_split(C.build(None, cfg), world) == split


@pytest.mark.parametrize("cfg, world, needle", [
    ({"batch_size": 10}, 4, "does not split evenly over 4 processes .* use --batch-size 8 or 12"),
    ({"batch_size": 8, "micro_batch": 8}, 2, "larger than the 4 sequences each of 2 processes"),
    ({"batch_size": 8, "micro_batch": 3}, 2, "use a micro-batch among 1, 2, 4"),
])
def test_a_split_that_leaves_a_process_uneven_is_refused(cfg, world, needle):
    with pytest.raises(C.ConfigError, match=needle):
        C.batch_split(C.build(None, cfg), world)


def test_the_launch_and_the_config_must_agree():
    from qdoctor.train.cli import check_world

    w = D.World(0, 2, 0, 2, "torchrun")
    assert check_world(C.build(None, {}), w) == 2
    with pytest.raises(C.ConfigError, match="nproc 4, but torchrun started 2 processes"):
        check_world(C.build(None, {"nproc": 4}), w)
    with pytest.raises(C.ConfigError, match="CUDA_VISIBLE_DEVICES"):
        check_world(C.build(None, {"device": "cuda:1"}), w)
    with pytest.raises(C.ConfigError, match="fsdp shards the model over several processes"):
        check_world(C.build(None, {"fsdp": True}), D.SINGLE)
    with pytest.raises(C.ConfigError, match="--nproc 2"):
        C.build(None, {"fsdp": True, "nproc": 1})


def test_more_processes_than_visible_gpus_is_refused():
    from qdoctor.train.cli import check_devices

    f = snapshot("h200-synthetic")
    p = plan(f, 2)
    with pytest.raises(C.ConfigError, match="nproc 2 needs 2 GPUs, one per process; 1 visible"):
        check_devices(p, f, 2)
    check_devices(plan(snapshot("cpu-only-machine"), 4, device="cpu"), snapshot("cpu-only-machine"), 4)


# ---- the plan ----

def test_the_plan_states_world_size_per_process_micro_batch_and_effective_batch():
    p = plan(gpus(2), 2, batch_size=16)
    par = p.parallel.value
    assert (par.world, par.strategy, par.backend, par.per_rank_batch, par.devices) == (
        2, "ddp", "nccl", 8, "cuda:0..cuda:1")
    assert p.batch_size.value == 16 and 8 % p.micro_batch.value == 0
    assert f"effective batch 2 processes x {p.micro_batch.value} x {p.grad_accum.value} = 16" in (
        p.grad_accum.reason)
    assert "(per process)" in p.micro_batch.reason
    assert p.compile.value is False and "several processes" in p.compile.reason
    assert "ddp x2 (nccl)" in p.render()
    one = plan(gpus(2), 1)
    assert one.parallel.value.strategy == "single" and one.parallel.value.per_rank_batch == 16


def test_on_mixed_gpus_the_weakest_decides_dtype_and_the_smallest_the_budget():
    f = snapshot("mixed-gpus")  # GPU 0: A100 40 GB (sm_80), GPU 1: V100 16 GB (sm_70)
    one, two = plan(f, 1), plan(f, 2)
    assert one.dtype.value == "bf16"
    assert two.dtype.value == "fp16" and "the weakest of the 2 GPUs used, GPU 1, is sm_70" in two.dtype.reason
    assert "GPU 1 (Tesla V100-PCIE-16GB) (the least of the 2 GPUs used)" in two.memory.budget
    assert two.memory.budget_gib < one.memory.budget_gib


def test_fsdp_is_chosen_when_one_gpu_cannot_hold_the_4bit_model():
    f = gpus(4)  # 4 x 24 GB: Llama-2-70B in 4 bits is ~34 GiB of weights alone
    p = plan(f, 4, shape=SHAPE_70B, seq=512, batch_size=8)
    par = p.parallel
    assert par.value.strategy == "fsdp", par.reason
    assert "one GPU cannot hold the 4-bit model and a micro-batch" in par.reason
    assert "sharded over 4 GPUs" in par.reason and "bnb_4bit_quant_storage" in par.reason
    assert "bfloat16" in par.reason and p.optimizer.value == "adamw"
    assert p.memory.estimate.total_gib <= p.memory.budget_gib and not p.findings  # the sharded fit fits
    ddp = plan(f, 4, shape=SHAPE_70B, seq=512, batch_size=8, fsdp=False)
    assert ddp.parallel.value.strategy == "ddp" and "--no-fsdp" in ddp.parallel.reason
    assert ddp.findings and ddp.findings[0].code == "QD801"  # and it says the whole model does not fit
    small = plan(f, 4, shape=SHAPE_1B, batch_size=8)
    assert small.parallel.value.strategy == "ddp" and "fits" in small.parallel.reason


def test_fsdp_asked_for_by_flag_or_by_accelerate_launch():
    f = gpus(2)
    assert plan(f, 2, fsdp=True).parallel.reason.startswith("FSDP-QLoRA: set by you")
    p = plan(f, 2, environ={"ACCELERATE_USE_FSDP": "true"})
    assert p.parallel.value.strategy == "fsdp" and "ACCELERATE_USE_FSDP" in p.parallel.reason
    with pytest.raises(C.ConfigError, match="8-bit weights cannot be sharded"):
        plan(f, 2, fsdp=True, quantization="int8")
    with pytest.raises(C.ConfigError, match="use --optimizer adamw"):
        plan(f, 2, fsdp=True, optimizer="paged_adamw_8bit")


def test_sharding_divides_weights_and_lora_state_but_gathers_a_unit_whole():
    kw = dict(micro_batch=1, seq_len=512, checkpointing=True)
    whole = memory.estimate(SHAPE_70B, **kw)
    four = memory.estimate(SHAPE_70B, shards=4, **kw)
    assert four.weights_gib < whole.weights_gib / 2 and four.weights_gib > whole.weights_gib / 4
    assert four.lora_gib == pytest.approx(whole.lora_gib / 4)
    assert four.activations_gib == whole.activations_gib  # each process runs its own micro-batch


# ---- the launcher's files and command ----

def test_the_launcher_hands_its_preflight_and_arguments_to_the_ranks(tmp_path):
    from qdoctor.findings import Finding

    pf = preflight.Preflight({"platform": {}}, [Finding("QD204", "info", "mixed GPUs")], [{"probe": "nf4"}],
                             "fp", True, ["a note"])
    launch_file, status = launch.write_launch(tmp_path, pf.to_dict(), ["--max-steps", "3"])
    data = launch.read_launch(str(launch_file))
    assert data["args"] == ["--max-steps", "3"] and data["status"] == str(status)
    again = preflight.Preflight.from_dict(data["preflight"])
    assert again == pf
    launch.write_status(data["status"], 130)
    assert status.read_text() == "130\n"
    cmd = launch.torchrun_command(2)
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                       "qdoctor.train.launch"]  # no `train` option on torchrun's command line (--nproc)
    env = launch.worker_env(2, str(launch_file), cpu=True, environ={"PATH": "/bin"})
    assert env[D.LAUNCH_ENV] == str(launch_file) and env["PATH"] == "/bin"
    assert int(env["OMP_NUM_THREADS"]) >= 1
    assert launch.worker_env(2, "f", cpu=True, environ={"OMP_NUM_THREADS": "7"})["OMP_NUM_THREADS"] == "7"


def test_the_resume_command_goes_through_the_same_launcher(tmp_path):
    import click

    from qdoctor.train.cli import resume_command, train

    ctx = click.Context(train)
    ctx.params = {p.name: None for p in train.params}
    assert resume_command(ctx, tmp_path, D.World(0, 4, 0, 4, "torchrun")).startswith(
        "torchrun --nproc-per-node=4 -m qdoctor train --output")
    assert resume_command(ctx, tmp_path, D.World(0, 2, 0, 2, "accelerate")).startswith(
        "accelerate launch --num_processes=2 -m qdoctor train")
    assert resume_command(ctx, tmp_path, D.SINGLE).startswith("qdoctor train --output")


def test_plan_json_carries_the_parallel_choice():
    d = plan(gpus(2), 2).to_dict()
    assert d["parallel"]["value"]["world"] == 2 and d["parallel"]["reason"]
    assert copy.deepcopy(d) == json.loads(json.dumps(d))


# ---- the launcher's signals, with a stand-in for torchrun ----

FAKE_TORCHRUN = r"""
import os, signal, subprocess, sys, time
rank = r'''
import os, signal, sys, time
def stop(signum, frame):
    open(sys.argv[1] + f".rank{sys.argv[2]}", "w").write(signal.Signals(signum).name)
    if sys.argv[2] == "0":
        open(os.environ["STATUS"], "w").write("130\n")
    sys.exit(0)
signal.signal(signal.SIGINT, stop)
open(sys.argv[1] + f".ready{sys.argv[2]}", "w").close()
time.sleep(60)
'''
kids = [subprocess.Popen([sys.executable, "-c", rank, os.environ["MARK"], str(r)]) for r in range(2)]
sys.exit(max(k.wait() for k in kids))
"""


def test_the_launcher_signals_the_ranks_and_returns_rank_0s_code(tmp_path, monkeypatch):
    """Ctrl-C reaches the launcher only (torchrun and the ranks run in sessions of their own); it forwards the
    signal to torchrun's children, the ranks, and returns the code rank 0 left (130), with no report of a
    failure from torchrun."""
    import os
    import signal
    import sys
    import threading
    import time

    mark = str(tmp_path / "mark")
    monkeypatch.setattr(launch, "torchrun_command", lambda n: [sys.executable, "-c", FAKE_TORCHRUN])
    real_write = launch.write_launch

    def write_launch(directory, preflight, args):
        launch_file, status = real_write(directory, preflight, args)
        monkeypatch.setenv("STATUS", str(status))
        return launch_file, status

    monkeypatch.setattr(launch, "write_launch", write_launch)
    monkeypatch.setenv("MARK", mark)

    def interrupt():
        deadline = time.monotonic() + 30
        while not all(Path(f"{mark}.ready{r}").exists() for r in (0, 1)) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    code = launch.run(2, ["--max-steps", "3"], {"facts": {}}, cpu=True)
    assert code == 130
    assert [Path(f"{mark}.rank{r}").read_text() for r in (0, 1)] == ["SIGINT", "SIGINT"]


def test_an_out_of_memory_error_on_one_rank_stops_that_rank_at_once(monkeypatch):
    """The other ranks wait in the all-reduce: halving the micro-batch on one rank alone cannot work."""
    from types import SimpleNamespace

    from qdoctor.train import loop

    def oom(*a):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(loop, "train_step", oom)
    plan = SimpleNamespace(gradient_checkpointing=SimpleNamespace(value=False))
    run = SimpleNamespace(micro=4, world=D.World(1, 2, 1, 2, "torchrun"), plan=plan, device="cuda:1")
    with pytest.raises(loop.RankStopped) as e:
        loop._step_or_stop(run, [None] * 8, 8)
    f = e.value.finding
    assert f.code == "QD803" and "one of 2 processes at micro-batch 4" in f.title and "rank 1" in f.evidence
    assert "--fsdp" in f.fix and "--gradient-checkpointing on" in f.fix


def test_ranks_agree_on_the_signal_one_of_them_caught(monkeypatch):
    """torchrun or the launcher signals each rank, not at the same instant: at each step boundary the ranks
    take the largest signal number any of them saw, so all stop at the same step."""
    from types import SimpleNamespace

    from qdoctor.train import loop

    seen = []
    monkeypatch.setattr(loop.dist_, "max_", lambda world, v: seen.append(v) or 15)
    run = SimpleNamespace(world=D.World(1, 2, 1, 2, "torchrun"), stop_requested=None)
    loop._agree_on_stop(run)
    assert run.stop_requested == "SIGTERM" and seen == [0]
    one = SimpleNamespace(world=D.SINGLE, stop_requested=None)
    loop._agree_on_stop(one)  # one process: no collective, nothing changes
    assert one.stop_requested is None and seen == [0]


def test_preflight_of_several_processes_runs_the_ddp_probe_and_its_failure_refuses(tmp_path, monkeypatch):
    """The all-reduce that would hang an hour into a run is tried in pre-flight, in seconds; its failure is an
    error (no plan routes around a collective that does not work)."""
    import qdoctor.facts
    import qdoctor.smoke
    from qdoctor.smoke.result import ProbeResult

    facts = {"platform": {"memory_total_mib": 8000}, "nvidia": {"gpus": []}, "env": {},
             "torch": {"cuda": None, "version": "2.13.0+cpu"}, "bitsandbytes": {"installed": True}}
    monkeypatch.setenv("QDOCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(qdoctor.facts, "collect", lambda **kw: facts)
    asked = []

    def run_probes(names, device, timeout, f, **kw):
        asked.append(tuple(names))
        return [ProbeResult(n, "pass") if n != "ddp" else
                ProbeResult("ddp", "timeout", reason="no result within 120 s") for n in names]

    monkeypatch.setattr(qdoctor.smoke, "run_probes", run_probes)
    assert "ddp" not in preflight.run(None).probes[-1]["probe"] and asked[-1] == preflight.CPU_PROBES
    pf = preflight.run(None, world=2)
    assert asked[-1] == (*preflight.CPU_PROBES, "ddp")
    assert [f.code for f in pf.errors] == ["QD793"] and "ddp" in pf.errors[0].title
