"""Compiled layers replay as CUDA graphs only where that was measured (one CUDA GPU, no checkpointing or
offloading), and every forward marks a new iteration of the graphs, so a step whose packed rows change
shape replays instead of re-recording. CPU tests on the recorded H200 machine; the GPU test runs the
real graphs and compares them with the uncaptured layers."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from train_support import toy_lm

from qdoctor.train import memory, speed
from qdoctor.train import plan as P
from qdoctor.train.config import TrainConfig

SNAP = Path(__file__).parent / "snapshots"
SHAPE_1B = memory.Shape(**memory.SHAPE_1B)


def _facts(name: str, **packages) -> dict:
    d = json.loads((SNAP / name).read_text())
    f = d.get("facts", d)
    f["packages"].update(packages)
    return f


def _plan(facts, cfg=None, shape=SHAPE_1B, max_len=1024):
    return P.make_plan(cfg or TrainConfig(), facts, [], shape=shape, model_name="m", embedded=False,
                       n_train=1000, max_len=max_len, model_type="llama")


def test_the_h200_plan_replays_its_compiled_layers_as_cuda_graphs_and_says_so():
    p = _plan(_facts("h200-cu130.json", **{"liger-kernel": "0.8.5"}))
    assert p.compile.value is True and speed.uses_cudagraphs(p)
    assert "CUDA graphs" in p.compile.reason and "77.6k" in p.compile.reason


def test_no_cuda_graphs_on_cpu_with_checkpointing_or_without_compiled_layers():
    assert not speed.uses_cudagraphs(_plan(_facts("cpu-ci-machine.json")))
    gpu = _facts("h200-cu130.json")
    assert not speed.uses_cudagraphs(_plan(gpu, TrainConfig(compile="off")))
    forced = _plan(gpu, TrainConfig(compile="on", gradient_checkpointing="on"))
    assert forced.compile.value is True and forced.gradient_checkpointing.value is True
    assert not speed.uses_cudagraphs(forced)  # checkpointing reruns the forward inside backward
    several = SimpleNamespace(compile=SimpleNamespace(value=True), device=SimpleNamespace(value="cuda:0"),
                              gradient_checkpointing=SimpleNamespace(value=False),
                              parallel=SimpleNamespace(value=SimpleNamespace(world=2)))
    assert not speed.uses_cudagraphs(several)
    several.parallel.value.world = 1
    assert speed.uses_cudagraphs(several)
    assert not speed.uses_cudagraphs(SimpleNamespace())  # a plan without those settings: nothing assumed


class _Layer:
    def __init__(self):
        self.kwargs = None

    def compile(self, **kw):
        self.kwargs = kw


def test_compile_layers_asks_inductor_for_cuda_graphs_only_when_told(monkeypatch):
    pytest.importorskip("torch")
    layers = [_Layer(), _Layer()]
    monkeypatch.setattr(speed, "decoder_layers", lambda model: layers)
    monkeypatch.setattr(speed, "RECOMPUTE_POINTWISE", {})
    assert speed.compile_layers(object(), cudagraphs=True) == 2
    want = {"dynamic": False, "backend": "inductor", "mode": "reduce-overhead"}
    assert all(x.kwargs == want for x in layers)
    speed.compile_layers(object())
    assert all("mode" not in x.kwargs for x in layers)


def test_every_forward_of_a_step_and_of_the_evaluation_marks_a_new_iteration(monkeypatch):
    torch = pytest.importorskip("torch")
    from qdoctor.train import loop

    torch.manual_seed(0)
    model = toy_lm()
    cfg = TrainConfig(device="cpu", dtype="fp32", quantization="none", optimizer="adamw", batch_size=4,
                      micro_batch=2)
    plan = _plan(_facts("cpu-ci-machine.json"), cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ex = [([1, 2, 3, 4], [1, 2, 3, 4]) for _ in range(4)]
    run = loop.Run(model, opt, sched, torch.amp.GradScaler("cpu", enabled=False), ex[:1], ex[:3], plan,
                   Path("."), 0, 2, "cpu", torch.float32, log=lambda m: None, micro=2)
    marks = []
    monkeypatch.setattr(speed, "mark_iteration", lambda: marks.append(1))
    loop.train_step(run, ex, 2, 2)
    assert marks == []  # the CPU plan: no graphs, nothing marked
    monkeypatch.setattr(speed, "uses_cudagraphs", lambda p: True)
    loop.train_step(run, ex, 2, 2)
    assert len(marks) == 2  # one per micro-batch forward (each is followed by its backward)
    loop.evaluate(run)
    assert len(marks) == 4  # three held-out sequences at micro-batch 2: two forwards


@pytest.mark.gpu
def test_cuda_graph_layers_train_like_uncaptured_ones_on_the_gpu(tmp_path):
    """A 4-bit LoRA Llama with compiled layers, with and without CUDA graphs: packed rows whose number of
    documents changes from step to step, and an evaluation between steps. The losses agree."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("bitsandbytes")
    losses = {}
    for graphs in (False, True):
        losses[graphs] = _train_on_gpu(torch, tmp_path / str(graphs), graphs)
    assert len(losses[True]) == len(losses[False])
    for a, b in zip(losses[True], losses[False], strict=True):
        assert a == pytest.approx(b, rel=2e-2)


def _train_on_gpu(torch, out: Path, graphs: bool) -> list[float]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from qdoctor.train import loop, optim
    from qdoctor.train import model as M
    from qdoctor.train.data import IGNORE

    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=512)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out / "m")
    facts = _facts("h200-cu130.json")
    tc = TrainConfig(model=str(out / "m"), batch_size=2, micro_batch=2, seq_len=512, packing=True,
                     compile="on", device="cuda:0", dtype="bf16", quantization="nf4",
                     optimizer="paged_adamw_8bit", lora_dropout=0.0, max_grad_norm=1e9)
    plan = P.make_plan(tc, facts, [], shape=memory.shape_from_config(cfg), model_name="m",
                       embedded=False, n_train=100, max_len=512, model_type="llama")
    assert plan.compile.value is True
    orig = speed.uses_cudagraphs
    speed.uses_cudagraphs = (lambda p: True) if graphs else (lambda p: False)
    try:
        model, _ = M.load_for_training(M.resolve(str(out / "m")), plan, 0)
        opt = optim.build("paged_adamw_8bit", model.parameters(), 1e-3, 0.0, flat=True)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, optim.schedule(0))
        g = torch.Generator().manual_seed(1)

        def row(docs):  # documents laid end to end in one 512-token row
            ids = torch.randint(0, 512, (512,), generator=g).tolist()
            labels, pos, start = list(ids), [], 0
            for n in docs:
                labels[start] = IGNORE
                pos += range(n)
                start += n
            return ids, labels, pos

        steps = [[row([512]), row([256, 256])], [row([128] * 4), row([64] * 8)]] * 3
        held = [row([200, 312]), row([512])]
        run = loop.Run(model, opt, sched, torch.amp.GradScaler("cuda", enabled=False), steps[0], held, plan,
                       out, 0, 2, "cuda:0", torch.bfloat16, log=lambda m: None, micro=2)
        model.train()
        seen = []
        for i, ex in enumerate(steps):
            seen.append(loop.train_step(run, ex, 2, 1)[0])
            if i % 2:
                seen.append(loop.evaluate(run))
        return seen
    finally:
        speed.uses_cudagraphs = orig
