"""The plan's speed means (fused linear + cross-entropy, compiled layers): chosen only where they can run,
with a reason, and on a GPU the same math as the plain path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qdoctor.train import memory, speed
from qdoctor.train import plan as P
from qdoctor.train.config import TrainConfig

SNAP = Path(__file__).parent / "snapshots"
SHAPE_1B = memory.Shape(**memory.SHAPE_1B)


def _facts(name: str) -> dict:
    d = json.loads((SNAP / name).read_text())
    return d.get("facts", d)


def _plan(facts, cfg=None, shape=SHAPE_1B, embedded=False, model_type="llama"):
    return P.make_plan(cfg or TrainConfig(), facts, [], shape=shape, model_name="m", embedded=embedded,
                       n_train=1000, max_len=1024, model_type=model_type)


def _with(facts, **packages):
    f = json.loads(json.dumps(facts))
    f["packages"].update(packages)
    return f


def test_h200_with_liger_and_triton_gets_fused_loss_and_compiled_layers():
    p = _plan(_with(_facts("h200-cu130.json"), **{"liger-kernel": "0.8.5"}))
    assert p.fused_loss.value == "liger" and p.compile.value is True
    assert "logits" in p.fused_loss.reason and "torch.compile" in p.compile.reason
    # the estimate follows the fused path: no logits term
    assert p.memory.estimate.logits_gib == 0


def test_without_liger_the_plan_says_how_to_get_it_and_keeps_compile():
    p = _plan(_facts("h200-cu130.json"))
    assert p.fused_loss.value == "none" and "pip install liger-kernel" in p.fused_loss.reason
    assert p.compile.value is True and p.memory.estimate.logits_gib > 0


def test_cpu_small_models_no_compiler_and_unmeasured_modes_fall_back_with_a_reason():
    cpu = _plan(_facts("cpu-ci-machine.json"))
    assert cpu.fused_loss.value == "none" and cpu.compile.value is False and "CPU" in cpu.compile.reason
    gpu = _with(_facts("h200-cu130.json"), **{"liger-kernel": "0.8.5"})
    tiny = _plan(gpu, embedded=True)
    assert tiny.compile.value is False and "small" in tiny.compile.reason
    nocc = json.loads(json.dumps(gpu))
    nocc["platform"]["c_compiler"] = None
    assert "C compiler" in _plan(nocc).compile.reason and _plan(nocc).compile.value is False
    fp16 = _plan(gpu, TrainConfig(dtype="fp16"))
    assert fp16.compile.value is False and "measured only" in fp16.compile.reason
    other = _plan(gpu, model_type="gpt2")
    assert other.fused_loss.value == "none" and "gpt2" in other.fused_loss.reason


def test_a_small_model_with_small_logits_keeps_the_standard_loss():
    gpu = _with(_facts("h200-cu130.json"), **{"liger-kernel": "0.8.5"})
    tiny = memory.Shape(hidden=256, intermediate=688, layers=4, heads=4, kv_heads=4, vocab=4096)
    small = _plan(gpu, TrainConfig(seq_len=256), shape=tiny, embedded=True)
    assert small.fused_loss.value == "none" and "small" in small.fused_loss.reason
    # the same small model with a vocabulary whose logits are large keeps the fused loss
    big_vocab = memory.Shape(hidden=256, intermediate=688, layers=4, heads=4, kv_heads=4, vocab=152_000)
    assert _plan(gpu, TrainConfig(seq_len=1024), shape=big_vocab).fused_loss.value == "liger"
    # a 1.1B model is not small
    assert _plan(gpu, TrainConfig(seq_len=256)).fused_loss.value == "liger"
    # asked for explicitly: what the user asked
    assert _plan(gpu, TrainConfig(seq_len=256, fused_loss="liger"), shape=tiny).fused_loss.value == "liger"


def test_explicit_choices_win_and_an_impossible_one_says_why():
    gpu = _facts("h200-cu130.json")  # no liger installed
    p = _plan(gpu, TrainConfig(fused_loss="liger", compile="off"))
    assert p.fused_loss.value == "none" and p.fused_loss.reason.startswith("liger asked for, but")
    assert p.compile.value is False and p.compile.reason == "set by you"


def test_liger_missing_reads_the_facts_not_this_interpreter():
    assert speed.liger_missing("cpu", "llama", {}) is not None
    assert speed.liger_missing("cuda:0", "llama", {"liger-kernel": "0.8.5", "triton": "3.6.0"}) is None
    assert "not installed" in speed.liger_missing("cuda:0", "llama", {"triton": "3.6.0"})


@pytest.mark.gpu
def test_fused_compiled_path_matches_the_plain_path_on_the_gpu(tmp_path):
    """Same tokens, same init: the first loss of the fast path equals the plain path's within 1%."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here")
    if speed.liger_missing("cuda:0", "llama") is not None:
        pytest.skip(speed.liger_missing("cuda:0", "llama"))
    from transformers import LlamaConfig, LlamaForCausalLM

    from qdoctor.facts import collect
    from qdoctor.train import model as M

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "m")
    facts = collect()
    ids = torch.randint(0, 4096, (4, 512), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    losses = {}
    for fused, comp in (("none", "off"), ("liger", "on")):
        tc = TrainConfig(model=str(tmp_path / "m"), device="cuda:0", dtype="bf16", quantization="nf4",
                         fused_loss=fused, compile=comp, lora_dropout=0.0)
        plan = _plan(facts, tc, shape=memory.shape_from_config(cfg))
        assert plan.fused_loss.value == fused and plan.compile.value is (comp == "on")
        model, _ = M.load_for_training(M.resolve(str(tmp_path / "m")), plan, 0)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
        losses[fused] = float(loss)
        del model
    assert abs(losses["liger"] / losses["none"] - 1) < 0.01, losses
