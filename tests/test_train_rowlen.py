"""Compiled layers specialise on the row length, and CUDA graphs record one graph per length: where the plan
compiles, rows are padded to at most eight fixed lengths (speed.padded_len) instead of the longest example of
each micro-batch; the loss does not change, and the memory estimate counts the padded length."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from train_support import toy_lm

from qdoctor.train import memory, speed
from qdoctor.train import plan as P
from qdoctor.train.config import TrainConfig
from qdoctor.train.data import IGNORE, collate

SNAP = Path(__file__).parent / "snapshots"


def _facts(name: str) -> dict:
    d = json.loads((SNAP / name).read_text())
    return d.get("facts", d)


def _plan(facts, max_len=300, cfg=None):
    return P.make_plan(cfg or TrainConfig(), facts, [], shape=memory.Shape(**memory.SHAPE_1B), model_name="m",
                       embedded=False, n_train=1000, max_len=max_len, model_type="llama")


@pytest.mark.parametrize(("n", "seq", "want"), [
    (300, 1024, 384), (1024, 1024, 1024), (1000, 1024, 1024), (129, 1024, 256), (10, 256, 64), (65, 256, 128),
    (100, 4096, 512), (4000, 4096, 4096), (1030, 1024, 1030),
])
def test_padded_len_rounds_up_to_an_eighth_of_the_sequence_never_below_the_row(n, seq, want):
    assert speed.padded_len(n, seq) == want


@pytest.mark.parametrize("seq", [256, 1000, 1001, 1024, 1500, 4096, 4097])
def test_at_most_eight_lengths_for_any_longest_example(seq):
    lengths = {speed.padded_len(n, seq) for n in range(1, seq + 1)}
    assert len(lengths) <= 8 and max(lengths) == seq
    if seq >= 512:
        assert len(lengths) == 8


def test_only_a_compiling_plan_pads_and_its_estimate_counts_the_padded_rows():
    gpu = _plan(_facts("h200-cu130.json"))
    assert gpu.compile.value is True
    assert speed.row_length(gpu, 300) == 384
    assert gpu.memory.tokens_per_sequence == 384  # the estimate's rows are as long as the padded ones
    cpu = _plan(_facts("cpu-ci-machine.json"))
    assert cpu.compile.value is False and speed.row_length(cpu, 300) == 300
    assert cpu.memory.tokens_per_sequence == 300
    eager = _plan(_facts("h200-cu130.json"), cfg=TrainConfig(compile="off"))
    assert speed.row_length(eager, 300) == 300
    assert speed.row_length(SimpleNamespace(), 300) == 300


def test_collate_pads_with_ignored_labels_and_a_zero_mask():
    rows = [([5, 6, 7], [5, 6, 7]), ([8, 9], [IGNORE, 9])]
    b = collate(rows, pad_id=0, length=lambda n: 8)
    assert b["input_ids"].shape == (2, 8) and b["input_ids"][0].tolist() == [5, 6, 7, 0, 0, 0, 0, 0]
    assert b["labels"][1].tolist() == [IGNORE, 9] + [IGNORE] * 6
    assert b["attention_mask"].sum(-1).tolist() == [3, 2]
    packed = collate([([1, 2, 3], [1, 2, 3], [0, 1, 0])], pad_id=0, length=lambda n: 6)
    assert packed["position_ids"][0].tolist() == [0, 1, 0, 0, 1, 2]  # the padding is a document of its own


def test_padding_to_the_fixed_length_leaves_the_loss_as_it_was():
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                                     max_position_embeddings=256, attn_implementation="sdpa")).eval()
    g = torch.Generator().manual_seed(1)
    rows = []
    for n in (37, 50, 23):
        ids = torch.randint(3, 97, (n,), generator=g).tolist()
        rows.append((ids, [IGNORE] + ids[1:]))
    with torch.no_grad():
        plain = m(**collate(rows, pad_id=0)).loss
        padded_batch = collate(rows, pad_id=0, length=lambda n: speed.padded_len(n, 256))
        assert padded_batch["input_ids"].shape[1] == 64
        padded = m(**padded_batch).loss
    assert padded.item() == pytest.approx(plain.item(), rel=1e-5)


def test_the_loop_pads_each_micro_batch_as_the_plan_says(monkeypatch):
    torch = pytest.importorskip("torch")
    from qdoctor.train import loop

    seen = []
    model = toy_lm(record=seen)
    cfg = TrainConfig(device="cpu", dtype="fp32", quantization="none", optimizer="adamw", batch_size=2,
                      micro_batch=2)
    plan = _plan(_facts("cpu-ci-machine.json"), cfg=cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    run = loop.Run(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                   torch.amp.GradScaler("cpu", enabled=False), [], [([1, 2, 3], [1, 2, 3])], plan, Path("."),
                   0, 2, "cpu", torch.float32, log=lambda m: None, micro=2)
    ex = [([1, 2, 3, 4, 5], [1, 2, 3, 4, 5]), ([1, 2], [1, 2])]
    loop.train_step(run, ex, 2, 1)
    monkeypatch.setattr(plan.compile, "value", True)  # as a compiling plan would
    loop.train_step(run, ex, 2, 1)
    loop.evaluate(run)
    assert seen == [5, speed.padded_len(5, plan.seq_len.value), speed.padded_len(3, plan.seq_len.value)]


def test_the_compile_reason_names_the_row_multiple():
    gpu = _plan(_facts("h200-cu130.json"))
    assert "rows padded to a multiple of 128 tokens" in gpu.compile.reason
    assert "padded" not in _plan(_facts("cpu-ci-machine.json")).compile.reason
