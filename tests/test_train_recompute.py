"""Compiled decoder layers recompute their pointwise work in backward instead of keeping it
(speed.RECOMPUTE_POINTWISE): on CPU, through the same partitioner inductor uses (backend
"aot_eager_decomp_partition", no C compiler), a 4-bit LoRA Llama keeps much less for backward and its
gradients do not change."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

from qdoctor.train import speed  # noqa: E402

BACKEND = "aot_eager_decomp_partition"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
    d = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d)
    return d


def _lora_model(path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.bfloat16,
                                                 device_map={"": "cpu"}, attn_implementation="sdpa")
    torch.manual_seed(1)
    m = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    m.train()
    return m


def _saved_bytes_and_grads(path, keep: bool, monkeypatch):
    """_run_compiled with the partitioner's default cut (keep) or with speed.RECOMPUTE_POINTWISE."""
    import torch._functorch.config as fc

    defaults = {name: True for name in speed.RECOMPUTE_POINTWISE if hasattr(fc, name)}
    with fc.patch(**defaults), monkeypatch.context() as mp:  # both restored afterwards
        if keep:
            mp.setattr(speed, "RECOMPUTE_POINTWISE", {})
        return _run_compiled(path)


def _run_compiled(path):
    """Bytes of distinct non-parameter tensors autograd keeps over one forward (second call: compiled),
    and the LoRA gradients of the following backward."""
    torch._dynamo.reset()
    m = _lora_model(path)
    assert speed.compile_layers(m, backend=BACKEND) == 2
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(2))
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    for _ in range(2):  # the first call compiles; count the second
        seen.clear()
        m.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    torch._dynamo.reset()
    return sum(seen.values()), loss.item(), grads


def test_compiled_layers_recompute_pointwise_work_and_keep_the_same_gradients(model_dir, monkeypatch):
    kept, loss_k, grads_k = _saved_bytes_and_grads(model_dir, True, monkeypatch)
    lean, loss_r, grads_r = _saved_bytes_and_grads(model_dir, False, monkeypatch)
    # measured here: 0.73 of the default cut's bytes (the embeddings' and the loss's share is unchanged)
    assert lean < 0.8 * kept, (lean, kept)
    assert loss_r == pytest.approx(loss_k, rel=1e-6)
    assert grads_k.keys() == grads_r.keys() and len(grads_k) == 28
    for n, g in grads_k.items():
        assert torch.allclose(grads_r[n], g, rtol=1e-2, atol=1e-5), n


def test_the_plan_estimates_what_compiled_layers_keep_only_where_it_compiles_them():
    """The memory fit uses the compiled path's activation bytes when the plan compiles the layers (a GPU
    with Triton, no checkpointing), and the eager path's when it does not (compile off)."""
    import json
    from pathlib import Path

    from qdoctor.train import memory
    from qdoctor.train import plan as P
    from qdoctor.train.config import TrainConfig

    snap = json.loads((Path(__file__).parent / "snapshots" / "h200-cu130.json").read_text())
    facts = snap.get("facts", snap)
    shape = memory.Shape(**memory.SHAPE_1B)

    def make(**cfg):
        return P.make_plan(TrainConfig(**cfg), facts, [], shape=shape, model_name="m", embedded=False,
                           n_train=1000, max_len=1024, model_type="llama")

    shape_cfg = dict(batch_size=8, micro_batch=8, seq_len=1024)
    kw = dict(micro_batch=8, seq_len=1024, checkpointing=False)  # no liger-kernel in that snapshot: logits
    compiled, eager = make(**shape_cfg), make(compile="off", **shape_cfg)
    assert compiled.compile.value and not compiled.gradient_checkpointing.value
    assert "recomputes that pointwise work" in compiled.compile.reason
    assert compiled.memory.estimate.total_gib == pytest.approx(
        memory.estimate(shape, compiled=True, **kw).total_gib)
    assert not eager.compile.value
    assert eager.memory.estimate.total_gib == pytest.approx(memory.estimate(shape, **kw).total_gib)
    assert eager.memory.estimate.activations_gib > 1.5 * compiled.memory.estimate.activations_gib
