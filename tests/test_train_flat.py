"""optim.FlatParams: one optimizer tensor for every LoRA tensor of at least MIN_8BIT elements. The same
update, bit for bit, as per tensor; gradients accumulate into the buffer; a per-tensor checkpoint resumes."""

from __future__ import annotations

import json

import pytest
import torch

from qdoctor.train import optim
from tests.train_support import FAST, invoke

SHAPES = [(16, 2048), (2048, 16), (16, 300), (5632, 16), (8, 8), (16, 256)]


def _params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s) * 0.02) for s in SHAPES]


def test_the_layout_keeps_values_aligns_each_tensor_to_a_block_and_leaves_small_ones_alone():
    ps = _params()
    before = [p.detach().clone() for p in ps]
    lay = optim.FlatParams(ps)
    big = [p for p in ps if p.numel() >= optim.MIN_8BIT]
    assert lay.views == big and lay.small == [p for p in ps if p.numel() < optim.MIN_8BIT]
    base = lay.flat.data_ptr()
    for p, b in zip(ps, before, strict=True):
        assert torch.equal(p, b)
    for p in big:
        off = (p.data_ptr() - base) // p.element_size()
        assert p.untyped_storage().data_ptr() == lay.flat.untyped_storage().data_ptr()
        assert off % optim.BLOCK == 0
        assert p.grad.untyped_storage().data_ptr() == lay.flat.grad.untyped_storage().data_ptr()
    assert lay.flat.numel() == sum(-(-p.numel() // optim.BLOCK) * optim.BLOCK for p in big)
    with torch.no_grad():
        lay.flat.add_(1.0)  # the optimizer writes the buffer: the model's tensors see it
    assert torch.equal(big[0], before[0] + 1.0)


def test_autograd_accumulates_into_the_buffer_and_zero_grad_keeps_the_views():
    ps = _params()
    opt = optim.build("adamw", ps, 1e-3, 0.0, flat=True)
    lay = opt.qdoctor_flat
    for _ in range(2):  # two backward passes accumulate
        sum((p.float() ** 2).sum() for p in ps).backward()
    for p in lay.views:
        assert torch.allclose(p.grad, 4 * p.detach())
    assert float(lay.flat.grad.abs().sum()) > 0
    opt.zero_grad(set_to_none=True)
    assert float(lay.flat.grad.abs().sum()) == 0
    assert all(p.grad is not None for p in lay.views) and all(p.grad is None for p in lay.small)
    sum((p ** 2).sum() for p in ps).backward()
    assert torch.allclose(lay.views[0].grad, 2 * lay.views[0].detach())


def _five_steps(oa, ob, a, b, device):
    """The same random gradients through a per-tensor (oa on a) and a flat (ob on b) optimizer."""
    for step in range(5):
        torch.manual_seed(step + 10)
        grads = [torch.randn(s, device=device) for s in SHAPES]
        oa.zero_grad()
        ob.zero_grad()
        for p, g in zip(a, grads, strict=True):
            p.grad = g.clone()
        for p, g in zip(b, grads, strict=True):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.add_(g)  # as autograd accumulates into the existing view
        oa.step()
        ob.step()


@pytest.mark.parametrize("name", ["adamw_8bit", "adamw"])
def test_the_flat_update_equals_the_per_tensor_update_bit_for_bit(name):
    a, b = _params(), _params()
    oa, ob = optim.build(name, a, 1e-3, 0.0), optim.build(name, b, 1e-3, 0.0, flat=True)
    assert len(ob.param_groups[0]["params"]) < len(oa.param_groups[0]["params"])
    _five_steps(oa, ob, a, b, "cpu")
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_nothing_to_flatten_and_cpu_adamw_keep_the_per_tensor_optimizer():
    few = [torch.nn.Parameter(torch.zeros(8, 8)), torch.nn.Parameter(torch.zeros(16, 4096))]
    opt = optim.build("adamw", few, 1e-3, 0.0, flat=True)  # one big tensor: nothing gained
    assert not hasattr(opt, "qdoctor_flat") and len(opt.param_groups[0]["params"]) == 2
    opt = optim.build("cpu_adamw", _params(), 1e-3, 0.0, flat=True)
    assert not hasattr(opt, "qdoctor_flat")


def test_a_checkpoint_written_per_tensor_resumes_per_tensor_and_equals_the_uninterrupted_run(
        tmp_path, pf, monkeypatch):
    """An older qdoctor saved one optimizer state per tensor: resuming it must not load it into the flat
    layout (a different tensor count), but keep that layout and continue exactly."""
    from qdoctor.train.model import assets_dir

    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_bytes((assets_dir() / "instructions.jsonl").read_bytes())
    args = ["--data", "d.jsonl", *FAST]
    assert invoke("--output", "a", *args).exit_code == 0
    build = optim.build
    monkeypatch.setattr(optim, "build", lambda *a, **k: build(*a, **{**k, "flat": False}))
    monkeypatch.setenv("QDOCTOR_TEST_STOP_AFTER", "3")
    assert invoke("--output", "b", *args).exit_code == 130
    per_tensor = json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())
    monkeypatch.delenv("QDOCTOR_TEST_STOP_AFTER")
    monkeypatch.setattr(optim, "build", build)
    r = invoke("--output", "b", "--resume", *args)
    assert r.exit_code == 0, r.output
    flat = json.loads((tmp_path / "a" / "checkpoint" / "state.json").read_text())
    n = [sum(len(g["params"]) for g in s["optimizer"]["param_groups"]) for s in (per_tensor, flat)]
    assert n[0] > n[1]  # the uninterrupted run was flat, the interrupted one per tensor
    resumed = json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())
    assert sum(len(g["params"]) for g in resumed["optimizer"]["param_groups"]) == n[0]  # and it stayed so
    la = [json.loads(x)["loss"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert la == lb  # flat and per tensor: the same updates, so the same losses


@pytest.mark.gpu
def test_on_the_gpu_the_paged_8bit_flat_update_equals_the_per_tensor_one():
    """On CUDA the flat buffer's states are paged (bitsandbytes pages tensors of 1e5 elements or more) while
    most per-tensor states are not: where they live must not change a bit of the update."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    a = [torch.nn.Parameter(p.detach().cuda()) for p in _params()]
    b = [torch.nn.Parameter(p.detach().cuda()) for p in _params()]
    oa = optim.build("paged_adamw_8bit", a, 1e-3, 0.0)
    ob = optim.build("paged_adamw_8bit", b, 1e-3, 0.0, flat=True)
    _five_steps(oa, ob, a, b, "cuda")
    torch.cuda.synchronize()
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
