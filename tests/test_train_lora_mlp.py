"""The fused LoRA MLP computes what peft + bitsandbytes compute (same loss, same gradients) while keeping
fewer tensors for backward; it is applied only where it is exactly that computation."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

from qdoctor.train import lora_mlp  # noqa: E402


def _model(dropout=0.0, targets="all-linear"):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qdoctor.train.model import embedded_base_dir, keep_cpu_4bit_layout

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    m = AutoModelForCausalLM.from_pretrained(embedded_base_dir(), quantization_config=q, dtype=torch.float32,
                                             device_map={"": "cpu"})
    keep_cpu_4bit_layout(m)
    m.config.use_cache = False
    torch.manual_seed(0)
    m = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=targets,
                                     task_type="CAUSAL_LM"))
    with torch.no_grad():  # LoRA B starts at zero; give it values so the LoRA paths carry gradient
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return m.train()


def _loss_and_grads(m, ids):
    m.zero_grad(set_to_none=True)
    loss = m(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def test_same_loss_and_gradients_as_peft_and_bitsandbytes():
    m = _model()
    ids = torch.randint(0, m.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    ref_loss, ref = _loss_and_grads(m, ids)
    n, why = lora_mlp.apply(m)
    assert n == m.config.num_hidden_layers and why is None
    loss, got = _loss_and_grads(m, ids)
    assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert got.keys() == ref.keys() and any("mlp" in k for k in got)
    for k in ref:
        scale = ref[k].abs().max().item() or 1.0
        assert (got[k] - ref[k]).abs().max().item() <= 1e-4 * scale, k


def test_it_keeps_fewer_tensors_for_backward():
    m = _model()
    ids = torch.randint(0, m.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))

    def saved_bytes():
        seen = {}

        def pack(t):
            seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(input_ids=ids, labels=ids)
        return sum(seen.values())

    before = saved_bytes()
    lora_mlp.apply(m)
    after = saved_bytes()
    inter = m.config.intermediate_size * ids.numel() * 4  # one fp32 intermediate-sized tensor
    # silu(e) and h are no longer kept: at least two intermediate-sized tensors per layer fewer
    assert before - after >= 2 * inter * m.config.num_hidden_layers * 0.9


def test_only_exact_cases_are_fused():
    drop = _model(dropout=0.1)
    n, why = lora_mlp.apply(drop)
    assert n == 0 and why == "LoRA dropout > 0"
    attn_only = _model(targets=["q_proj", "v_proj"])
    n, why = lora_mlp.apply(attn_only)
    assert n == 0 and why == "not a LoRA layer"


def test_the_plan_fuses_the_mlp_only_where_it_is_peft_exactly_and_counts_the_saving():
    import json
    from pathlib import Path

    from qdoctor.train import memory
    from qdoctor.train import plan as P
    from qdoctor.train.config import TrainConfig

    facts = json.loads((Path(__file__).parent / "snapshots" / "h200-cu130.json").read_text())
    facts = facts.get("facts", facts)
    shape = memory.Shape(**memory.SHAPE_1B)

    def plan(**kw):
        return P.make_plan(TrainConfig(**kw), facts, [], shape=shape, model_name="m", embedded=False,
                           n_train=1000, max_len=1024)

    on, off = plan(lora_dropout=0.0), plan(lora_dropout=0.0, fused_mlp="off")
    assert on.fused_mlp.value is True and off.fused_mlp.value is False
    assert on.micro_batch.value == off.micro_batch.value and not on.gradient_checkpointing.value
    tokens = on.micro_batch.value * 1024
    saved = 2 * 2 * shape.intermediate * tokens * shape.layers / memory.GIB  # two bf16 tensors per layer
    assert off.memory.estimate.total_gib - on.memory.estimate.total_gib == pytest.approx(saved)
    default = plan()  # lora_dropout 0.05: the fused MLP has no dropout
    assert default.fused_mlp.value is False and "--lora-dropout 0" in default.fused_mlp.reason
    assert plan(lora_dropout=0.0, quantization="none").fused_mlp.value is False
    assert "asked for, but" in plan(fused_mlp="on").fused_mlp.reason


def test_train_runs_with_the_fused_mlp_end_to_end(tmp_path):
    from click.testing import CliRunner

    from qdoctor.cli import cli

    r = CliRunner().invoke(cli, ["train", "--skip-probes", "--json", "--lora-dropout", "0",
                                 "--max-steps", "6", "--output", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout) if hasattr(r, "stdout") else None
    assert out["status"] == "completed" and out["plan"]["fused_mlp"]["value"] is True


@pytest.mark.gpu
def test_bf16_on_the_gpu_matches_peft_within_bf16_rounding():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qdoctor.train.model import embedded_base_dir

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    m = AutoModelForCausalLM.from_pretrained(embedded_base_dir(), quantization_config=q, dtype=torch.bfloat16,
                                             device_map={"": "cuda:0"})
    m.config.use_cache = False
    torch.manual_seed(0)
    m = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                     task_type="CAUSAL_LM")).train()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    ids = torch.randint(0, m.config.vocab_size, (4, 128), device="cuda")

    def run():
        m.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        return float(loss), {n: p.grad.float() for n, p in m.named_parameters() if p.grad is not None}

    ref_loss, ref = run()
    assert lora_mlp.apply(m)[0] == m.config.num_hidden_layers
    loss, got = run()
    assert abs(loss / ref_loss - 1) < 1e-3
    for k in ref:
        cos = torch.nn.functional.cosine_similarity(got[k].flatten(), ref[k].flatten(), dim=0)
        assert cos > 0.99, (k, float(cos))
