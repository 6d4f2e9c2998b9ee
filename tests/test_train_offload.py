"""Offloaded gradient checkpointing: the config value, the plan's choice and its reason, the estimate's
arithmetic, the hooks (what they move, and that gradients stay exact), and the benchmark's measured
longest-sequence bracket and memory cap. The pinned, non-blocking copies themselves run only on a GPU:
the gpu-marked test; on CPU the same hooks move tensors between CPU tensors."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest

from qdoctor.train import config as C
from qdoctor.train import memory
from qdoctor.train.plan import make_plan

ROOT = Path(__file__).resolve().parent.parent
SHAPE_7B = memory.Shape(**memory.SHAPE_7B)
GIB = 1024**3


def facts(gpu_mib: int | None = 143771, host_mib: int | None = 128000) -> dict:
    """An H200-like machine with liger-kernel (fused loss) and varlen-capable torch; gpu_mib None: no GPU."""
    gpus = [{"index": 0, "name": "NVIDIA H200", "compute_capability": "9.0", "memory_total_mib": gpu_mib}]
    return {
        "platform": {"memory_total_mib": host_mib} if host_mib else {},
        "nvidia": {"gpus": gpus if gpu_mib else []},
        "torch": {"cuda": "13.0" if gpu_mib else None, "cuda_available": bool(gpu_mib), "bf16_supported":
                  bool(gpu_mib), "version": "2.11.0"},
        "bitsandbytes": {"installed": True, "loads": True},
        "packages": {"liger-kernel": "0.8.5", "triton": "3.5.0", "torch": "2.11.0"},
    }


def plan(f, seq=32768, **cfg):
    cfg = {"batch_size": 1, "seq_len": seq, **cfg}
    return make_plan(C.build(None, cfg), f, [], shape=SHAPE_7B, model_name="m", embedded=False, n_train=100,
                     max_len=seq)


def est(seq, offload, **kw):
    return memory.estimate(SHAPE_7B, micro_batch=1, seq_len=seq, checkpointing=True, fused_loss=True,
                           offload=offload, **kw)


def gpu_mib_between(seq) -> int:
    """A GPU whose usable memory (85%) lies between the offloaded and the ordinary checkpointing estimates."""
    mid = (est(seq, True).total_gib + est(seq, False).total_gib) / 2
    return int(mid / 0.85 * 1024)


# ---- config ----


def test_offload_is_a_valid_checkpointing_value_and_typos_are_named():
    assert C.build({"gradient_checkpointing": "offload"}, {}).gradient_checkpointing == "offload"
    with pytest.raises(C.ConfigError, match="gradient_checkpointing.*offloaded.*offload"):
        C.build({"gradient_checkpointing": "offloaded"}, {})


# ---- estimate ----


def test_offload_estimate_moves_exactly_the_layer_inputs_to_the_host():
    """6.7B, bf16, 1 x 65536: each layer's input is 2 x 4096 x 65536 B = 512 MiB (a power of two), 32 layers
    = 16 GiB, which leaves the GPU total and appears as host_gib; the recomputed layer stays:
    15.6 x (4096 + 11008) x 65536 B = 14.381 GiB."""
    on, off = est(65536, False), est(65536, True)
    assert on.host_gib == 0 and off.host_gib == pytest.approx(16.0)
    assert on.activations_gib - off.activations_gib == pytest.approx(16.0)
    assert off.activations_gib == pytest.approx(15.6 * 15104 * 65536 / GIB)
    assert off.activations_gib == pytest.approx(14.381, abs=1e-3)
    parts = off.weights_gib + off.lora_gib + off.optimizer_gib + off.activations_gib + off.logits_gib
    assert off.total_gib == pytest.approx(parts)  # host memory is not GPU memory
    assert off.to_dict()["host_gib"] == 16.0


def test_offload_host_bytes_round_up_to_powers_of_two_as_pinned_memory_is_cached():
    """1 x 49152: 384 MiB a layer on the GPU (32 x 384 MiB = 12 GiB less), 512 MiB blocks in pinned memory."""
    on, off = est(49152, False), est(49152, True)
    assert on.activations_gib - off.activations_gib == pytest.approx(12.0)
    assert off.host_gib == pytest.approx(16.0)
    assert memory._pinned_bytes(384 * 2**20) == 512 * 2**20 and memory._pinned_bytes(2**20) == 2**20


def test_offload_on_the_fp32_upcast_path_moves_the_fp32_residual():
    """fp16 compute on NF4 keeps a 4 x hidden fp32 residual per layer: 1.1B at 2 x 4096 tokens moves
    22 x 4 x 2048 x 8192 B = 22 x 64 MiB = 1.375 GiB, and keeps one recomputed layer (20 x 7680 x 8192 B)."""
    shape = memory.Shape(**memory.SHAPE_1B)
    kw = dict(micro_batch=2, seq_len=4096, checkpointing=True, dtype="fp16")
    on, off = memory.estimate(shape, **kw), memory.estimate(shape, offload=True, **kw)
    assert off.host_gib == pytest.approx(1.375)
    assert on.activations_gib - off.activations_gib == pytest.approx(1.375)
    assert off.activations_gib == pytest.approx(20 * 7680 * 8192 / GIB)


def test_offload_without_checkpointing_is_refused():
    with pytest.raises(ValueError, match="checkpointing"):
        memory.estimate(SHAPE_7B, micro_batch=1, seq_len=1024, checkpointing=False, offload=True)


# ---- plan ----


def test_auto_offloads_only_when_checkpointing_at_micro_batch_1_does_not_fit():
    seq = 32768
    p = plan(facts(gpu_mib_between(seq)), seq)
    assert p.gradient_checkpointing.value == "offload"
    why = p.gradient_checkpointing.reason
    assert f"a 6.7B model at micro-batch 1 x {seq} tokens needs {est(seq, False).total_gib:.1f} GiB with " \
           "checkpointing" in why
    assert f"{est(seq, True).total_gib:.1f} GiB at micro-batch 1" in why
    assert "8.0 GiB of host RAM, within 62.5 GiB: half of 125 GiB host RAM" in why
    assert "pinned host memory" in why and "estimated and measured" in why
    assert p.memory.estimate.host_gib == pytest.approx(8.0) and not p.findings
    assert p.compile.value is False  # compiled layers stay off with checkpointing
    assert json.loads(p.to_json())["gradient_checkpointing"]["value"] == "offload"
    assert "8.00 GiB of host RAM for the offloaded layer inputs" in p.render()
    # the same run on a GPU where ordinary checkpointing fits: no offload
    roomy = plan(facts(int(est(seq, False).total_gib / 0.85 * 1024) + 512), seq)
    assert roomy.gradient_checkpointing.value is True and roomy.memory.estimate.host_gib == 0
    # and where no checkpointing is needed at all
    assert plan(facts(), 1024).gradient_checkpointing.value is False


def test_auto_never_offloads_on_cpu_or_without_enough_host_ram():
    seq = 32768
    cpu = plan(facts(gpu_mib=None, host_mib=24000), seq)
    assert cpu.device.value == "cpu" and cpu.gradient_checkpointing.value is True
    # host RAM: half of 15.6 GiB is 7.8 GiB, the layer inputs need 32 x 256 MiB = 8 GiB
    low = plan(facts(gpu_mib_between(seq), host_mib=16000), seq)
    assert low.gradient_checkpointing.value is True and low.memory.estimate.host_gib == 0
    assert any(f.code == "QD801" for f in low.findings)  # it does not fit, and says so
    unknown = plan(facts(gpu_mib_between(seq), host_mib=None), seq)
    assert unknown.gradient_checkpointing.value is True


def test_offload_asked_for_falls_back_with_a_reason_where_it_cannot_run():
    seq = 32768
    cpu = plan(facts(gpu_mib=None, host_mib=24000), seq, gradient_checkpointing="offload")
    assert cpu.gradient_checkpointing.value is True
    assert cpu.gradient_checkpointing.reason.startswith("offload asked for, but on the CPU the activations "
                                                        "are in host memory already: ordinary checkpointing")
    low = plan(facts(gpu_mib_between(seq), host_mib=16000), seq, gradient_checkpointing="offload")
    assert low.gradient_checkpointing.value is True
    assert "micro-batch 1 puts 8.0 GiB of layer inputs in host memory, more than 7.8 GiB" in \
        low.gradient_checkpointing.reason


def test_offload_asked_for_runs_even_where_it_is_not_needed_and_with_unknown_host_ram():
    p = plan(facts(), 4096, gradient_checkpointing="offload")
    assert p.gradient_checkpointing.value == "offload"
    assert p.gradient_checkpointing.reason.startswith("set by you: ")
    unknown = plan(facts(host_mib=None), 4096, gradient_checkpointing="offload")
    assert unknown.gradient_checkpointing.value == "offload"
    assert "unchecked: host RAM unknown" in unknown.gradient_checkpointing.reason


def test_offload_picks_the_largest_micro_batch_whose_inputs_fit_host_ram():
    """8 sequences of 8192 tokens on a GPU that fits all 8 offloaded, with host RAM for the layer inputs of
    only 4 (a layer's input at micro-batch 4 is 4 x 8192 x 8 KiB = 256 MiB, x 32 layers = 8 GiB of a 12 GiB
    share; micro-batch 8 would need 16 GiB)."""
    seq = 8192
    gpu = memory.estimate(SHAPE_7B, micro_batch=8, seq_len=seq, checkpointing=True, fused_loss=True,
                          offload=True).total_gib
    p = plan(facts(int(gpu / 0.85 * 1024) + 256, host_mib=24 * 1024), seq, batch_size=8,
             gradient_checkpointing="offload")
    assert p.gradient_checkpointing.value == "offload" and p.micro_batch.value == 4
    assert p.memory.estimate.host_gib == pytest.approx(8.0)
    roomy = plan(facts(int(gpu / 0.85 * 1024) + 256, host_mib=40 * 1024), seq, batch_size=8,
                 gradient_checkpointing="offload")
    assert roomy.micro_batch.value == 8 and roomy.memory.estimate.host_gib == pytest.approx(16.0)


# ---- the hooks ----


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def tiny_lora_llama(torch, offload_inputs: bool):
    """The embedded tiny Llama (2 layers), non-reentrant checkpointing, LoRA on a frozen base, as
    load_for_training builds it; its layer inputs offloaded (between CPU tensors) when asked."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from qdoctor.train import offload
    from qdoctor.train.model import embedded_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**embedded_config()))
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                             init_lora_weights=False))
    stats = offload.enable(model, device_type="cpu", min_bytes=0) if offload_inputs else None
    model.train()
    return model, stats


def loss_and_grads(model, ids):
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_hooks_move_one_tensor_per_layer_and_gradients_stay_exact(monkeypatch, torch):
    """What the hooks see is what checkpoint saves outside its own hooks: the layer's positional inputs,
    here the hidden state alone (transformers binds the mask and RoPE tables as keyword arguments, outside
    the checkpoint). One tensor per layer per forward moves, none of the activations inside a layer (the
    checkpoint's own hooks take those). Gradients are bit-identical to plain checkpointing."""
    from qdoctor.train import offload

    seen = []
    real = offload.offloadable
    monkeypatch.setattr(offload, "offloadable", lambda x, *a: seen.append(x) or real(x, *a))
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    ref_loss, ref = loss_and_grads(tiny_lora_llama(torch, False)[0], ids)
    model, stats = tiny_lora_llama(torch, True)
    loss, got = loss_and_grads(model, ids)
    layers = model.config.num_hidden_layers
    hidden = (2, 16, model.config.hidden_size)
    assert stats.layers == layers and stats.tensors == layers
    assert stats.bytes == layers * 2 * 16 * model.config.hidden_size * 4
    assert len(seen) == layers  # the layer inputs only: a layer makes dozens of tensors inside
    assert all(tuple(x.shape) == hidden and x.requires_grad for x in seen)
    assert loss == ref_loss and got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_hooks_around_a_whole_forward_would_see_far_more_than_the_layer_inputs(torch):
    """The control for the test above: the same hooks around a forward without checkpointing see every
    activation. Wrapping only the checkpoint call is what limits them to the layer inputs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qdoctor.train import offload
    from qdoctor.train.model import embedded_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**embedded_config()))
    stats = offload.Stats()
    ids = torch.randint(0, 512, (2, 16))
    with offload.hooks("cpu", 0, stats):
        model(input_ids=ids, labels=ids).loss.backward()
    assert stats.tensors > 10 * model.config.num_hidden_layers


def test_enable_fails_loudly_when_there_is_nothing_to_offload(torch):
    from transformers import LlamaConfig, LlamaForCausalLM

    from qdoctor.train import offload
    from qdoctor.train.model import ModelError, embedded_config

    model = LlamaForCausalLM(LlamaConfig(**embedded_config()))
    with pytest.raises(ModelError, match="no checkpointed decoder layers"):
        offload.enable(model, "cpu")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ModelError, match="non-reentrant"):
        offload.enable(model, "cpu")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    first = offload.enable(model, "cpu")
    assert first.layers == model.config.num_hidden_layers
    again = offload.enable(model, "cpu")  # enabling twice wraps the checkpoint function once
    assert offload.stats_of(model) is again
    fn = model.model.layers[0]._gradient_checkpointing_func
    assert not getattr(fn.__wrapped__, "qdoctor_offload", False)


@pytest.mark.gpu
def test_offload_on_cuda_trains_like_checkpointing_with_less_gpu_memory(torch):
    """Pinned, non-blocking copies on a real GPU: the same loss and gradients as plain checkpointing, and a
    lower peak (8 layers x 2 x 2048 x 1024 fp32 inputs = 128 MiB moved to the host)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from qdoctor.train import offload

    cfg = LlamaConfig(vocab_size=512, hidden_size=1024, intermediate_size=2048, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048)
    ids = torch.randint(0, 512, (2, 2048), generator=torch.Generator().manual_seed(0)).cuda()
    results = {}
    for off in (False, True):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).cuda()
        model.config.use_cache = False
        model.set_attn_implementation("eager")  # deterministic backward, so the two runs compare exactly
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                 lora_dropout=0.0, init_lora_weights=False))
        stats = offload.enable(model, "cuda") if off else None
        model.train()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss, grads = loss_and_grads(model, ids)
        torch.cuda.synchronize()
        results[off] = (loss, grads, torch.cuda.max_memory_allocated() - base, stats)
        del model
        torch.cuda.empty_cache()
    (l0, g0, p0, _), (l1, g1, p1, stats) = results[False], results[True]
    assert stats.tensors == 8 and stats.bytes == 8 * 2 * 2048 * 1024 * 4
    assert l1 == pytest.approx(l0, rel=1e-6)
    assert all(torch.allclose(g1[k], g0[k], rtol=1e-5, atol=1e-6) for k in g0)
    assert p1 < p0 - 64 * 2**20, (p0 / 2**20, p1 / 2**20)


# ---- the benchmark: measured bracket, lengths per contender, the memory cap ----


def load_script(name: str):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(ROOT / "scripts"))


def rec(contender, seq, peak=None, mode=None, error=None, oom=False):
    r = {"model": "7b", "contender": contender, "variant": "maxseq", "seq": seq, "maxseq_mode": mode}
    if error:
        r.update(error=error, oom=oom, peak_gib=peak)
    else:
        r.update(tok_s=1000, peak_gib=peak)
    return r


def test_longest_sequences_reports_a_measured_bracket_and_a_line_to_the_cap():
    b = load_script("bench_train")
    records = [
        rec("plain", 24576, 20.4, "gc1"), rec("plain", 28672, 23.2, "gc1"),
        rec("plain", 32768, None, "gc1", "OutOfMemoryError()", oom=True),
        rec("qdoctor", 40960, 22.5, "ckpt"), rec("qdoctor", 49152, 23.9, "ckpt", "OutOfMemoryError()", True),
        rec("qdoctor", 65536, 18.0, "offload"), rec("qdoctor", 81920, 21.6, "offload"),
        rec("qdoctor", 98304, 23.9, "offload", "OutOfMemoryError()", True),
        rec("qdoctor", 114688, None, "offload", "CUDA error: device-side assert triggered"),
        {"model": "7b", "contender": "qdoctor", "variant": "plan", "seq": 1024, "tok_s": 5, "peak_gib": 9},
    ]
    res = b.longest_sequences(records, 139.8, 24.0)["7b"]
    assert set(res) == {"plain", "qdoctor", "qdoctor-offload"}
    plain, ck, off = res["plain"], res["qdoctor"], res["qdoctor-offload"]
    assert (plain["longest_trained"], plain["shortest_oom"]) == (24576 + 4096, 32768)
    assert (ck["longest_trained"], ck["shortest_oom"], ck["trained"]) == (40960, 49152, [40960])
    assert "gib_per_1k_tokens" not in ck  # one point makes no line
    assert (off["longest_trained"], off["shortest_oom"]) == (81920, 98304)
    assert off["failed_otherwise"] == [114688]  # a crash is not a memory limit: not in the bracket
    # the line: (65536, 18.0), (81920, 21.6): 0.225 GiB per 1k tokens, predicted to the 24 GiB cap
    assert off["gib_per_1k_tokens"] == pytest.approx(3.6 / 16, abs=1e-3)
    slope = 3.6 / 16384
    assert off["predicted_longest"] == int((24.0 - (18.0 - slope * 65536)) / slope)
    assert off["predicted_to_gib"] == 24.0 and off["mem_cap_gib"] == 24.0 and "note" not in off
    # without a cap the line runs to the whole GPU
    whole = b.longest_sequences(records, 139.8)["7b"]["plain"]
    assert whole["predicted_to_gib"] == 139.8 and "mem_cap_gib" not in whole


def test_longest_sequences_flags_an_out_of_memory_below_a_length_that_trained():
    b = load_script("bench_train")
    res = b.longest_sequences([rec("plain", 8192, None, "gc1", "CUDA out of memory", True),
                               rec("plain", 16384, 14.9, "gc1")], None, 24.0)["7b"]["plain"]
    assert res["longest_trained"] == 16384 and res["shortest_oom"] == 8192 and "not monotone" in res["note"]


def test_maxseq_lengths_per_contender_and_the_commands_under_a_cap():
    b = load_script("bench_train")
    assert b.maxseq_lengths("8192,16384") == {"": [8192, 16384]}
    lens = b.maxseq_lengths("plain=28672,32768; ckpt=40960;offload=65536,98304;4096")
    assert lens == {"plain": [28672, 32768], "ckpt": [40960], "offload": [65536, 98304], "": [4096]}
    assert b.lengths_for(lens, "unsloth") == [4096]
    with pytest.raises(SystemExit, match="--maxseq"):
        b.maxseq_lengths("plain=lots")
    a = types.SimpleNamespace(contenders="plain,qdoctor", shapes="none", variants="plan", peers="/p",
                              maxseq="plain=28672,32768;ckpt=40960;offload=65536,98304",
                              maxseq_variants="ckpt,offload", mem_cap=24.0, snapshot=False, steps=1, warm=0)
    runs = b.build_runs(a, Path("/m"), unsloth=False)
    plain = [r for r in runs if r[0] == "plain"]
    assert [r[3] for r in plain] == [{"maxseq_mode": "gc1", "bs": 1, "seq": 28672},
                                     {"maxseq_mode": "gc1", "bs": 1, "seq": 32768}]
    cmd = plain[0][2]
    assert cmd[1:4] == [b.MEM_CAP, "24.0", "/p/plain_loop.py"]
    assert cmd[4:] == ["/m", "--bs", "1", "--seq", "28672", "--gc", "1", "--prep", "0", "--steps", "1",
                       "--warm", "0"]
    q = [r for r in runs if r[0] == "qdoctor"]
    assert [r[3]["maxseq_mode"] for r in q] == ["ckpt", "offload"]
    assert q[1][3][b.EXPECT] == [65536, 98304]
    assert q[1][2][q[1][2].index("--shapes") + 1] == "1x65536,1x98304"
    assert q[1][2][-2:] == ["--mem-cap", "24.0"] and q[1][2][q[1][2].index("--variant") + 1] == "offload"


def test_lengths_a_dead_worker_never_reported_are_recorded_as_failed_not_as_out_of_memory():
    b = load_script("bench_train")
    got = [{"seq": 65536, "tok_s": 900, "peak_gib": 18.0}]
    extra = b.missing_records(got, [65536, 98304, 131072], "Killed")
    assert [r["seq"] for r in extra] == [98304, 131072]
    assert all(r["error"].startswith("no record") and r["oom"] is False for r in extra)
    assert b.missing_records(got, None, "") == []


def test_mem_cap_sets_the_fraction_then_runs_the_script_with_its_argv(tmp_path, monkeypatch):
    mc = load_script("mem_cap")
    calls = []
    monkeypatch.setattr(mc, "_gpu_total_bytes", lambda: 96 * GIB)
    monkeypatch.setattr(mc, "_set_fraction", calls.append)
    script = tmp_path / "peer.py"
    out = tmp_path / "argv.json"
    script.write_text("import json, sys\n"
                      f"json.dump({{'argv': sys.argv, 'name': __name__}}, open({str(out)!r}, 'w'))\n")
    monkeypatch.setattr(sys, "argv", ["mem_cap.py"])
    monkeypatch.setattr(sys, "path", list(sys.path))
    mc.main(["24", str(script), "/models/m", "--bs", "1", "--seq", "32768"])
    assert calls == [0.25]
    assert json.loads(out.read_text()) == {"argv": [str(script), "/models/m", "--bs", "1", "--seq", "32768"],
                                           "name": "__main__"}
    assert mc.fraction(200, 100 * GIB) == 1.0
    with pytest.raises(ValueError):
        mc.fraction(0, GIB)


def test_mem_cap_without_a_gpu_caps_nothing(monkeypatch):
    mc = load_script("mem_cap")
    monkeypatch.setattr(mc, "_gpu_total_bytes", lambda: None)
    monkeypatch.setattr(mc, "_set_fraction", lambda f: pytest.fail("no GPU: nothing to cap"))
    assert mc.apply(24) is None


def test_capped_facts_show_the_plan_the_cap():
    b = load_script("bench_train")
    f = facts()
    capped = b.capped_facts(f, 24.0)
    assert capped["nvidia"]["gpus"][0]["memory_total_mib"] == 24 * 1024
    assert capped["nvidia"]["gpus"][0]["memory_free_mib"] == 24 * 1024
    assert f["nvidia"]["gpus"][0]["memory_total_mib"] == 143771  # a copy
