"""`check --model`: config.json from a directory or the Hugging Face cache (never downloaded), sized with
train's own estimator, judged per kind of GPU (or the RAM), in both directions."""

from __future__ import annotations

import json
import re

import pytest
from cli_support import entry
from click.testing import CliRunner
from test_rules_snapshots import SNAP, load, run

from qdoctor.facts.model import ModelNotFound, collect, find_config
from qdoctor.train import memory

LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
            "max_position_embeddings": 131072, "model_type": "llama", "num_attention_heads": 32,
            "num_hidden_layers": 32, "num_key_value_heads": 8, "vocab_size": 128256}
LLAMA_70B = {**LLAMA_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
             "num_hidden_layers": 80}


def model_dir(tmp_path, cfg, name="m"):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def judged(snapshot, cfg, tmp_path):
    facts = load(snapshot)
    facts["model"] = collect(model_dir(tmp_path, cfg))
    return [f for f in run(facts) if f.area == "model"]


def test_shape_from_config_json():
    s = memory.shape_from_config_json(LLAMA_8B)
    got = (s.hidden, s.intermediate, s.layers, s.heads, s.kv_heads, s.vocab)
    assert got == (4096, 14336, 32, 32, 8, 128256)
    assert 7.9e9 < s.total_params() < 8.1e9  # Llama 3.1 8B has 8.03B parameters
    vlm = memory.shape_from_config_json({"model_type": "llava", "text_config": LLAMA_8B})
    assert vlm == s
    gpt2 = memory.shape_from_config_json({"n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257})
    assert gpt2.intermediate == 3072 and gpt2.kv_heads == 12
    moe = memory.shape_from_config_json({**LLAMA_8B, "num_local_experts": 8})
    assert moe.intermediate == 8 * 14336
    with pytest.raises(ValueError, match="hidden_size"):
        memory.shape_from_config_json({"model_type": "bert-ish"})
    # the existing function keeps its behaviour
    assert memory.shape_from_config(LLAMA_8B) == s


def test_config_from_a_directory_and_from_the_hub_cache(tmp_path):
    assert find_config(model_dir(tmp_path, LLAMA_8B)).endswith("config.json")
    hub = tmp_path / "hub"
    repo = hub / "models--meta-llama--Llama-3.1-8B"
    for rev in ("aaa", "bbb"):
        (repo / "snapshots" / rev).mkdir(parents=True)
        (repo / "snapshots" / rev / "config.json").write_text(json.dumps(LLAMA_8B))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("aaa")
    env = {"HF_HUB_CACHE": str(hub)}
    assert find_config("meta-llama/Llama-3.1-8B", env) == str(repo / "snapshots" / "aaa" / "config.json")
    assert find_config("meta-llama/Llama-3.1-8B", {"HF_HOME": str(tmp_path)}).endswith("config.json")
    with pytest.raises(ModelNotFound, match="does not download"):
        find_config("someone/not-cached", env)


def test_fits_an_h200_with_and_without_checkpointing(tmp_path):
    (f,) = judged("h200-cu130", LLAMA_8B, tmp_path)
    assert f.code == "QD900" and f.severity == "ok"
    m = re.search(r"micro-batch (\d+) without gradient checkpointing \(([\d.]+) GiB\), or (\d+) with it",
                  f.title)
    assert m, f.title
    fast, gib, ckpt = int(m.group(1)), m.group(2), int(m.group(3))
    assert ckpt > fast >= 1
    # the same estimator as train's plan, and the largest micro-batch that fits 140 GiB less the reserve
    shape = memory.shape_from_config_json(LLAMA_8B)
    e = memory.estimate(shape, micro_batch=fast, seq_len=2048, checkpointing=False)
    assert f"{e.total_gib:.1f}" == gib
    bigger = memory.estimate(shape, micro_batch=2 * fast, seq_len=2048, checkpointing=False)
    assert bigger.total_gib > 143771 / 1024 - 1.0 >= e.total_gib


def test_tight_on_a_t4_short_sequences_only_and_too_big(tmp_path):
    (f,) = judged("t4", LLAMA_8B, tmp_path)
    assert f.code == "QD900" and "Tesla T4" in f.title
    assert "micro-batch 1 with gradient checkpointing" in f.title and "without" not in f.title
    (tmp_path / "a").mkdir()
    (f,) = judged("t4", {**LLAMA_8B, "num_hidden_layers": 48}, tmp_path / "a")  # 14.2 GiB at 2048 tokens
    assert f.code == "QD902" and f.severity == "warning" and "only below 2048 tokens" in f.title
    assert "--micro-batch 1 --seq-len 1024" in f.fix and "gradient_checkpointing=True" in f.fix
    (tmp_path / "b").mkdir()
    (f,) = judged("t4", LLAMA_70B, tmp_path / "b")
    assert f.code == "QD901" and f.severity == "error" and "FSDP" in f.fix


def test_ram_when_there_is_no_gpu_and_one_line_per_gpu_kind(tmp_path):
    (f,) = judged("cpu-only-machine", LLAMA_8B, tmp_path)
    assert "CPU RAM" in f.title
    (tmp_path / "y").mkdir()
    fs = judged("mixed-gpus", LLAMA_8B, tmp_path / "y")
    assert len(fs) == 2 and {"GPU 0" in f.title or "GPU 1" in f.title for f in fs} == {True}


def test_no_model_no_finding():
    assert not [f for f in run(load("h200-cu130")) if f.area == "model"]


def test_cli_model_flag(tmp_path):
    d = model_dir(tmp_path, LLAMA_70B)
    r = CliRunner().invoke(entry, ["check", "--facts", str(SNAP / "t4.json"), "--model", d])
    assert r.exit_code == 1 and "QD901" in r.output and "Model fit" in r.output
    missing = str(tmp_path / "none")
    r = CliRunner().invoke(entry, ["check", "--facts", str(SNAP / "t4.json"), "--model", missing])
    assert r.exit_code == 2 and "Traceback" not in r.output
    r = CliRunner().invoke(entry, ["check", "--facts", str(SNAP / "h200-cu130.json"), "--model", d, "--json"])
    doc = json.loads(r.output)
    assert doc["facts"]["model"]["shape"]["layers"] == 80
    (f,) = [x for x in doc["findings"] if x["area"] == "model"]
    assert f["code"] == "QD900" and "with it" in f["title"] and "70.6B parameters" in f["title"]
