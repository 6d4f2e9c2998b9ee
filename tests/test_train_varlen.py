"""Packed rows with variable-length attention: document boundaries from the position ids, the attention
function's layout and causality, the plan's choice and its memory term, and, on CPU, the same logits as
SDPA with transformers' dense document mask (the flash kernel itself is replaced by a per-document SDPA;
the real kernel is checked on a GPU by the gpu-marked test and by speed.varlen_self_check)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from qdoctor.train import memory, speed  # noqa: E402
from qdoctor.train import plan as P  # noqa: E402
from qdoctor.train.config import TrainConfig  # noqa: E402

SNAP = Path(__file__).parent / "snapshots"
SHAPE_1B = memory.Shape(**memory.SHAPE_1B)


def _facts(name):
    d = json.loads((SNAP / name).read_text())
    return d.get("facts", d)


def _plan(facts, **cfg):
    return P.make_plan(TrainConfig(**cfg), facts, [], shape=SHAPE_1B, model_name="m", embedded=False,
                       n_train=1000, max_len=1024, model_type="llama")


def per_document_kernel(calls, gqa_flag, unequal_ok=False):
    """Stand-in for torch.nn.attention.varlen.varlen_attn: causal SDPA on each document alone. Records the
    keyword arguments so tests can check what the real kernel would be asked. `unequal_ok`: fewer key/value
    heads are taken without the flag (flash attention's own GQA); else they need the flag or repeating."""

    def fn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        calls.append(dict(window_size=window_size, enable_gqa=enable_gqa, max_q=max_q, heads=(q.shape[1],
                          k.shape[1]), cu=cu_q.tolist()))
        assert torch.equal(cu_q, cu_k) and window_size == (-1, 0), "must be causal self-attention"
        if not (k.shape[1] == q.shape[1] or enable_gqa or unequal_ok):
            raise RuntimeError("GQA needs enable_gqa or repeated heads")
        out = torch.zeros_like(q)
        cu = cu_q.tolist()
        for s, e in zip(cu[:-1], cu[1:], strict=True):
            assert e - s <= max_q
            if e == s:
                continue
            qq, kk, vv = (t[s:e].transpose(0, 1) for t in (q, k, v))
            rep = qq.shape[0] // kk.shape[0]
            kk, vv = kk.repeat_interleave(rep, 0), vv.repeat_interleave(rep, 0)
            out[s:e] = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale).transpose(0, 1)
        return out

    params = dict(inspect.signature(fn).parameters)
    if not gqa_flag:
        params.pop("enable_gqa")
    return lambda: (fn, params)


def test_cu_seqlens_mark_every_document_and_pad_to_a_power_of_two():
    pos = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]])
    cu = speed.cu_seqlens(pos)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 3, 5, 7, 10, 10, 10, 10]  # 4 documents, then empty ones up to 8 entries
    assert speed.cu_seqlens(torch.arange(4).unsqueeze(0)).tolist() == [0, 4]
    kw = speed.varlen_kwargs(pos)
    assert kw["max_length_q"] == 5 and kw["cu_seq_lens_q"].tolist() == cu.tolist()


@pytest.mark.parametrize("gqa_flag", [True, False])
def test_varlen_attention_equals_sdpa_with_a_document_mask(monkeypatch, gqa_flag):
    monkeypatch.setitem(speed._gqa, "native", False)
    calls = []
    monkeypatch.setattr(speed, "_varlen_fn", per_document_kernel(calls, gqa_flag))
    g = torch.Generator().manual_seed(0)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 0, 1, 2, 3]])
    b, h, hk, s, d = 2, 4, 2, 7, 8
    q, k, v = (torch.randn(b, n, s, d, generator=g) for n in (h, hk, hk))
    out, weights = speed.varlen_attention(None, q, k, v, None, scaling=0.3, **speed.varlen_kwargs(pos))
    assert weights is None and out.shape == (b, s, h, d)
    doc = torch.cumsum((pos == 0).int(), -1)
    mask = (doc[:, :, None] == doc[:, None, :]) & torch.ones(s, s, dtype=torch.bool).tril()
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                         attn_mask=mask[:, None], scale=0.3).transpose(1, 2)
    assert torch.allclose(out, ref, atol=1e-5)
    assert calls[0]["enable_gqa"] is gqa_flag and calls[0]["heads"] == (4, 4 if not gqa_flag else 2)


def test_without_boundaries_it_is_causal_sdpa(monkeypatch):
    monkeypatch.setattr(speed, "_varlen_fn", lambda: pytest.fail("no kernel for an unpacked batch"))
    q = torch.randn(1, 2, 5, 4)
    out, _ = speed.varlen_attention(None, q, q, q, None, scaling=0.5)
    ref = F.scaled_dot_product_attention(q, q, q, is_causal=True, scale=0.5).transpose(1, 2)
    assert torch.allclose(out, ref, atol=1e-6)


@pytest.mark.parametrize("unequal_ok", [True, False])
def test_the_self_check_keeps_key_value_heads_unrepeated_only_where_the_kernel_takes_them(monkeypatch,
                                                                                         unequal_ok):
    monkeypatch.setitem(speed._gqa, "native", not unequal_ok)  # the check must set it either way
    calls = []
    monkeypatch.setattr(speed, "_varlen_fn", per_document_kernel(calls, False, unequal_ok))
    assert speed.varlen_self_check("cpu", torch.float32) is None
    assert speed._gqa["native"] is unequal_ok
    calls.clear()
    q, k = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)
    speed.varlen_attention(None, q, k, k, None, **speed.varlen_kwargs(torch.tensor([[0, 1, 2, 0, 1, 2]])))
    assert calls[0]["heads"] == ((4, 2) if unequal_ok else (4, 4)) and calls[0]["enable_gqa"] is False


def test_the_self_check_passes_a_right_kernel_and_catches_a_wrong_one(monkeypatch):
    monkeypatch.setitem(speed._gqa, "native", False)
    monkeypatch.setattr(speed, "_varlen_fn", per_document_kernel([], True))
    assert speed.varlen_self_check("cpu", torch.float32) is None

    def leaky(q, k, v, cu_q, cu_k, max_q, max_k, **kw):  # attends across documents: the bug to catch
        kk, vv = (t.transpose(0, 1).repeat_interleave(q.shape[1] // k.shape[1], 0) for t in (k, v))
        return F.scaled_dot_product_attention(q.transpose(0, 1), kk, vv, is_causal=True).transpose(0, 1)

    monkeypatch.setattr(speed, "_varlen_fn", lambda: (leaky, {"window_size": None}))
    assert "output differs from SDPA" in speed.varlen_self_check("cpu", torch.float32)
    monkeypatch.setattr(speed, "_varlen_fn", lambda: (_ for _ in ()).throw(ImportError("no varlen")))
    assert "ImportError: no varlen" in speed.varlen_self_check("cpu", torch.float32)


def test_varlen_is_planned_for_packed_rows_where_it_can_run_and_its_mask_leaves_the_estimate():
    h200 = _facts("h200-cu130.json")
    packed = _plan(h200, packing=True, seq_len=4096, batch_size=2)
    assert packed.attention.value == "varlen" and "varlen" in packed.attention.reason
    dense = _plan(h200, packing=True, seq_len=4096, batch_size=2, attention="sdpa")
    mask = 2 * SHAPE_1B.heads * 4096**2 * 2 / memory.GIB  # the dense mask SDPA expands
    assert dense.memory.estimate.total_gib - packed.memory.estimate.total_gib == pytest.approx(mask)
    unpacked = _plan(h200)  # unpacked rows: SDPA's causal flash path measured faster
    assert unpacked.attention.value == "sdpa" and "faster than variable-length" in unpacked.attention.reason
    assert "variable-length" not in _plan(_facts("cpu-ci-machine.json")).attention.reason  # not an option
    rows = _plan(h200, attention="varlen")  # asked for: each row (and its padding) a sequence of its own
    assert rows.attention.value == "varlen" and "each row" in rows.attention.reason
    assert rows.memory.estimate.total_gib == _plan(h200).memory.estimate.total_gib
    assert _plan(_facts("cpu-ci-machine.json")).attention.value == "sdpa"
    cpu = _plan(_facts("cpu-ci-machine.json"), packing=True)
    assert cpu.attention.value == "sdpa" and "dense document mask (CPU" in cpu.attention.reason
    asked = _plan(_facts("cpu-ci-machine.json"), packing=True, attention="varlen")
    assert asked.attention.value == "sdpa" and "varlen asked for, but CPU" in asked.attention.reason


def test_right_padded_rows_are_a_document_each_and_their_padding_another(monkeypatch):
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    kw = speed.varlen_kwargs_from_mask(mask)
    assert kw["cu_seq_lens_q"].tolist() == [0, 3, 5, 10] and kw["max_length_q"] == 5
    monkeypatch.setattr(speed, "_varlen_fn", per_document_kernel([], True))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 5, 8, generator=g) for n in (4, 2, 2))
    out, _ = speed.varlen_attention(None, q, k, v, None, scaling=0.3, **kw)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), scale=0.3,
                                         is_causal=True).transpose(1, 2)
    assert torch.allclose(out[0, :3], ref[0, :3], atol=1e-5) and torch.allclose(out[1], ref[1], atol=1e-5)


@pytest.mark.parametrize(
    ("device", "dtype", "tv", "cc", "why"),
    [
        ("cuda:0", "bf16", "2.11.0+cu130", (9, 0), None),
        ("cpu", "fp32", "2.13.0", None, "CPU"),
        ("cuda:0", "bf16", "2.9.1+cu128", (9, 0), "2.10+"),
        ("cuda:0", "bf16", None, (9, 0), "unknown"),
        ("cuda:0", "fp16", "2.11.0", (7, 5), "8.0"),
        ("cuda:0", "fp32", "2.11.0", (8, 0), "bf16 or fp16"),
    ],
)
def test_varlen_missing_names_what_is_missing(device, dtype, tv, cc, why):
    got = speed.varlen_missing(device, dtype, tv, cc)
    assert got is None if why is None else why in got


def test_a_packed_model_gives_the_same_logits_as_the_dense_document_mask(monkeypatch):
    """The whole path: transformers passes the boundaries from the model call down to the registered
    attention function, and the result equals transformers' own document-masked SDPA."""
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setattr(speed, "_varlen_fn", per_document_kernel([], True))
    speed.register_varlen()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=50, max_position_embeddings=64,
                      use_cache=False)  # as in training: with a cache transformers skips packed masks
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 50, (2, 9))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4], [0, 1, 0, 1, 2, 3, 0, 1, 2]])
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        ref = model(input_ids=ids, position_ids=pos).logits
        model.set_attn_implementation(speed.VARLEN)
        got = model(input_ids=ids, position_ids=pos, **speed.varlen_kwargs(pos)).logits
        unmasked = model(input_ids=ids, position_ids=pos).logits  # no boundaries: attends across documents
    assert torch.allclose(got, ref, atol=1e-5)
    assert not torch.allclose(unmasked, ref, atol=1e-3)


@pytest.mark.gpu
def test_the_real_varlen_kernel_passes_its_self_check_on_the_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    assert speed.varlen_self_check("cuda", torch.bfloat16) is None
