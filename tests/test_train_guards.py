"""What `qdoctor train` refuses, skips or reports instead of finishing with a wrong run (issue 7): pure parts,
and the loop on a toy model (no peft, no bitsandbytes)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_train_units import CPU_FACTS, PASS, SHAPE_1B

from qdoctor import strict_json
from qdoctor.train import checkpoint, loop, rundir
from qdoctor.train import config as C
from qdoctor.train import data as D
from qdoctor.train import model as M
from qdoctor.train.plan import Choice, Parallel, make_plan


def strict_loads(text: str):
    """json.loads that refuses the bare NaN/Infinity Python would accept."""
    return json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"not JSON: {c}")))


# ---- 1, 2: the batch split ----


@pytest.mark.parametrize(
    "cfg,needle",
    [
        ({"micro_batch": 32}, "larger than batch_size 16 (the default)"),  # issue: every loss 0.0000
        ({"micro_batch": 32, "batch_size": 16}, "larger than batch_size 16"),
        ({"micro_batch": 3, "batch_size": 8}, "2 sequences of every step would be skipped"),
        ({"grad_accum": 3}, "grad_accum 3 does not divide"),
        ({"micro_batch": 4, "grad_accum": 3, "batch_size": 8}, "set two of the three"),
    ],
)
def test_a_batch_split_that_skips_or_empties_steps_is_refused(cfg, needle):
    with pytest.raises(C.ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        C.build(None, cfg)


@pytest.mark.parametrize(
    "cfg,split",
    [
        ({}, (16, None, None)),
        ({"micro_batch": 4, "batch_size": 8}, (8, 4, 2)),
        ({"grad_accum": 4}, (16, 4, 4)),
        ({"micro_batch": 4, "grad_accum": 3}, (12, 4, 3)),
    ],
)
def test_valid_batch_splits_cover_every_example(cfg, split):
    assert C.batch_split(C.build(None, cfg)) == split
    p = make_plan(C.build(None, cfg), CPU_FACTS, PASS, shape=SHAPE_1B, model_name="m", embedded=False,
                  n_train=100, max_len=64)
    assert p.micro_batch.value * p.grad_accum.value == p.batch_size.value == split[0]


def test_train_step_never_trains_a_partial_step():
    with pytest.raises(AssertionError, match="examples in the step"):
        loop.train_step(SimpleNamespace(), [([1, 2], [1, 2])] * 8, 3, 2)


# ---- 3, 10: the loop on a toy model: non-finite gradients, signals ----


class ToyLM:
    """A two-layer next-token model with the interface the loop uses (forward -> .loss)."""

    def __new__(cls):
        import torch

        class _M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.emb = torch.nn.Embedding(16, 8)
                self.head = torch.nn.Linear(8, 16)

            def forward(self, input_ids, attention_mask, labels):
                logits = self.head(self.emb(input_ids))
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, 16), labels[:, 1:].reshape(-1), ignore_index=D.IGNORE
                )
                return SimpleNamespace(loss=loss)

        return _M()


class Plan:
    """The plan fields the loop reads."""

    def __init__(self):
        self.set(dtype="fp32", max_grad_norm=1.0, batch_size=4, max_steps=4, eval_every=100, save_every=100,
                 loss_scaling=False, parallel=Parallel(1, "single", None, 4, "cpu"))

    def set(self, **kw):
        for k, v in kw.items():
            setattr(self, k, Choice(v, "test"))


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """A Run on ToyLM; `poison` holds the (1-based) steps whose gradient is made NaN; checkpoint saves are
    recorded as (step, all weights finite)."""
    import torch

    model = ToyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    data = [([1, 2, 3, 4, 5], [D.IGNORE, 2, 3, 4, 5]), ([6, 7, 8], [6, 7, 8]), ([9, 10, 11], [9, 10, 11])]
    notes, saves = [], []
    run = loop.Run(model, opt, sched, torch.amp.GradScaler("cpu", enabled=False), data * 3, [], Plan(),
                   tmp_path, 0, 0, "cpu", torch.float32, log=notes.append, micro=2)
    run.poison = set()
    model.head.weight.register_hook(lambda g: g * math.nan if run.step + 1 in run.poison else g)

    def fake_save(output, model, *a):
        saves.append((a[-1]["step"], all(bool(torch.isfinite(p).all()) for p in model.parameters())))

    monkeypatch.setattr(checkpoint, "save", fake_save)
    run.notes, run.saves = notes, saves
    return run


def weights(run):
    return [p.detach().clone() for p in run.model.parameters()]


def test_a_nan_gradient_step_is_skipped_counted_and_written_as_null(toy):
    import torch

    toy.poison = {2}
    seen = {}
    loop.fit(toy, lambda run, rec: seen.__setitem__(run.step, weights(run)))
    assert toy.step == 4 and toy.skipped == 1
    assert all(torch.equal(a, b) for a, b in zip(seen[1], seen[2], strict=True))  # step 2 applied nothing
    assert not all(torch.equal(a, b) for a, b in zip(seen[2], seen[3], strict=True))  # step 3 did
    recs = [strict_loads(x) for x in (toy.output / "metrics.jsonl").read_text().splitlines()]
    assert recs[1]["grad_norm"] is None and "skipped" in recs[1] and recs[2]["grad_norm"] > 0
    assert any("step 2" in n and "skipped" in n for n in toy.notes)
    assert toy.saves == [(4, True)]


def test_nan_gradients_in_a_row_stop_the_run_and_never_reach_a_checkpoint(toy):
    toy.plan.set(max_steps=10, save_every=1)
    toy.poison = {2, 3, 4, 5}
    with pytest.raises(loop.StopRun) as e:
        loop.fit(toy, lambda run, rec: None)
    assert e.value.finding.code == "QD804" and "3 steps in a row" in e.value.finding.title
    assert toy.step == 1 + loop.MAX_SKIPS_IN_ROW and toy.skipped == loop.MAX_SKIPS_IN_ROW
    assert toy.saves and all(finite for _, finite in toy.saves)


def test_a_checkpoint_is_never_written_from_non_finite_weights(toy):
    import torch

    with torch.no_grad():
        toy.model.head.bias[0] = math.inf
    with pytest.raises(loop.StopRun) as e:
        loop.save_checkpoint(toy)
    assert e.value.finding.code == "QD804" and "head.bias" in e.value.finding.title
    assert toy.saves == []


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_sigint_and_sigterm_save_a_checkpoint_and_stop(toy, sig):
    toy.plan.set(max_steps=50)
    before = signal.getsignal(signal.SIGTERM)

    def progress(run, rec):
        if run.step == 2:
            os.kill(os.getpid(), getattr(signal, sig))

    with pytest.raises(loop.Interrupted) as e:
        loop.fit(toy, progress)
    assert e.value.signame == sig and e.value.step == 2 and toy.saves == [(2, True)]
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored


def test_metrics_and_every_json_file_are_strict():
    assert strict_json.dumps({"a": math.nan, "b": [math.inf, 1.5], "c": {"d": -math.inf}}) == (
        '{"a": null, "b": [null, 1.5], "c": {"d": null}}'
    )
    from qdoctor.findings import Finding
    from qdoctor.report import render_json

    doc = render_json([Finding("QD1", "ok", "t", [], None, "x")], {"m": math.nan}, "smoke",
                      {"probes": [{"rel_err": math.inf}]})
    assert strict_loads(doc)["probes"][0]["rel_err"] is None


def test_old_metrics_with_bare_nan_are_rewritten_strict_on_resume(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "grad_norm": NaN}\n{"step": 2, "loss": 1.0}\n')
    assert loop.truncate_metrics(tmp_path, 1) == [{"step": 1, "grad_norm": None}]
    strict_loads((tmp_path / "metrics.jsonl").read_text())


# ---- 4, 12: data ----


def tok():
    return M.load_tokenizer(M.ModelSource("e", None, True))


def test_chat_without_an_assistant_turn_is_refused_with_its_line(tmp_path):
    f = tmp_path / "c.jsonl"
    msgs = [{"role": "user", "content": "hi"}, {"role": "gpt", "content": "yo"}]
    f.write_text('{"text": "ok"}\n' + json.dumps({"messages": msgs}) + "\n")
    with pytest.raises(D.DataError, match=r'line 2: messages have no "assistant" turn.*roles: user, gpt'):
        D.read_jsonl(str(f))


def test_chat_with_the_assistant_first_trains_only_the_assistant_turn():
    t = tok()
    ids, labels = D.encode({"messages": [{"role": "assistant", "content": "Hello there"},
                                         {"role": "user", "content": "secret user text"}]}, t)
    trained = t.decode([i for i, lab in zip(ids, labels, strict=True) if lab != D.IGNORE])
    assert "Hello there" in trained and "secret" not in trained and "user" not in trained
    assert "secret" not in t.decode(ids)  # turns after the last assistant one are left out


def test_dropped_and_truncated_records_are_shown_with_their_lines():
    t = tok()
    rows = [{"text": "", "_line": 1}, {"text": "short one", "_line": 2}, {"text": "word " * 200, "_line": 3}]
    rows += [{"text": f"row {i}", "_line": 4 + i} for i in range(3)]
    ds = D.build(rows, t, seq_len=32, eval_fraction=0.1, seed=0, packing=False)
    notes = " | ".join(ds.notes())
    assert "1 of 6 records dropped" in notes and "lines 1)" in notes
    assert "1 of 6 records cut to seq_len 32" in notes and "lines 3)" in notes
    assert ds.to_dict()["dropped_lines"] == [1] and ds.to_dict()["truncated"] == 1


def test_seq_len_is_checked_against_the_model_positions():
    with pytest.raises(C.ConfigError, match="max_position_embeddings 2048"):
        C.resolve_seq_len(C.build(None, {"seq_len": 4096, "packing": True}), 2048)
    assert C.resolve_seq_len(C.build(None, {}), 256)[0] == 256  # the embedded model: capped, and said
    assert "max_position_embeddings" in C.resolve_seq_len(C.build(None, {}), 256)[1]
    assert C.resolve_seq_len(C.build(None, {}), 4096) == (1024, C.resolve_seq_len(C.build(None, {}), None)[1])
    assert C.resolve_seq_len(C.build(None, {"seq_len": 300}), None)[0] == 300


# ---- 6, 7: the model ----


def test_missing_truncated_or_corrupt_weights_are_named_before_loading(tmp_path):
    import torch
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(M.ModelError, match="no weights"):
        M.check_weights(str(tmp_path))
    save_file({"w": torch.zeros(64, 64)}, str(tmp_path / "model.safetensors"))
    M.check_weights(str(tmp_path))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(M.ModelError, match="truncated"):
        M.check_weights(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(M.ModelError, match="corrupt"):
        M.check_weights(str(tmp_path))
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"a": "model-1.safetensors"}}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(M.ModelError, match="model-1.safetensors"):
        M.check_weights(str(tmp_path))


def test_only_decoder_causal_lms_are_trained():
    from transformers import BertConfig, GPT2Config, LlamaConfig, T5Config

    for cfg, needle in [
        (BertConfig(architectures=["BertForMaskedLM"]), "BertForMaskedLM"),
        (BertConfig(), "encoder"),
        (T5Config(), "encoder-decoder"),
    ]:
        with pytest.raises(M.ModelError, match=needle):
            M.check_causal_lm(cfg, "m")
    M.check_causal_lm(LlamaConfig(architectures=["LlamaForCausalLM"]), "m")
    M.check_causal_lm(GPT2Config(), "m")
    M.check_causal_lm(BertConfig(is_decoder=True, architectures=["BertLMHeadModel"]), "m")
    from qdoctor.train import memory

    shape = memory.shape_from_config(GPT2Config())  # n_inner None: 4 x hidden, not "0.000B params"
    assert shape.intermediate == 4 * 768 and 0.1e9 < shape.total_params() < 0.2e9


def test_model_fingerprint_follows_content_not_path(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "config.json").write_text('{"x": 1}')
        (d / "model.safetensors").write_bytes(b"w" * 100)
    fa = M.fingerprint(M.ModelSource("a", str(a), False))
    assert fa == M.fingerprint(M.ModelSource(str(b.absolute()), str(b), False))
    (b / "model.safetensors").write_bytes(b"v" * 100)
    assert fa != M.fingerprint(M.ModelSource("b", str(b), False))


# ---- 5, 6, 11: the run directory ----


def test_a_run_directory_is_locked_while_a_run_uses_it(tmp_path):
    out = tmp_path / "run"
    lock = rundir.Lock(out)
    assert rundir.holder(out) == os.getpid()
    with pytest.raises(rundir.RunDirError, match=f"in use by another qdoctor train \\(pid {os.getpid()}\\)"):
        rundir.Lock(out)
    with pytest.raises(rundir.RunDirError, match="in use"):
        rundir.check(out, resume=False)
    assert rundir.check(out, resume=False, locked=True) is None  # only the lock file: still a fresh dir
    lock.release()
    assert rundir.holder(out) is None
    rundir.Lock(out).release()


def test_resume_needs_an_existing_run(tmp_path):
    with pytest.raises(rundir.RunDirError, match="does not exist"):
        rundir.check(tmp_path / "typo", resume=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(rundir.RunDirError, match="holds no qdoctor run"):
        rundir.check(tmp_path / "empty", resume=True)
    (tmp_path / "f").write_text("x")
    with pytest.raises(rundir.RunDirError, match="not a directory"):
        rundir.check(tmp_path / "f" / "run", resume=False)


def test_storage_failures_are_told_from_bugs():
    import errno

    assert rundir.write_failure(OSError(errno.ENOSPC, "No space left on device", "o/x")) == (
        "No space left on device (o/x)"
    )
    # torch.save on a full tmpfs (seen here): RuntimeError, not OSError
    torch_msg = "[enforce fail at inline_container.cc:672] . unexpected pos 9 vs 2"
    assert rundir.write_failure(RuntimeError(torch_msg))
    assert rundir.write_failure(Exception("I/O error: No space left on device (os error 28)")) == (
        "No space left on device"
    )
    assert rundir.write_failure(ValueError("shape mismatch")) is None
    assert rundir.write_failure(OSError(errno.ENOENT, "No such file")) is None


def resumed_plan(**cfg):
    return make_plan(C.build(None, cfg), CPU_FACTS, PASS, shape=SHAPE_1B, model_name="m", embedded=False,
                     n_train=1000, max_len=64, resumed={"max_steps": 100, "identity": {"warmup_steps": 3}})


def test_extending_a_run_keeps_its_warmup_and_max_steps():
    fresh = make_plan(C.build(None, {"max_steps": 400}), CPU_FACTS, PASS, shape=SHAPE_1B, model_name="m",
                      embedded=False, n_train=1000, max_len=64)
    assert fresh.warmup_steps.value == 12  # 3% of 400: what a resume must not switch to
    p = resumed_plan(max_steps=400)
    assert p.max_steps.value == 400 and p.warmup_steps.value == 3 and "resumed" in p.warmup_steps.reason
    p = resumed_plan()
    assert p.max_steps.value == 100 and "resumed" in p.max_steps.reason
    assert resumed_plan(warmup_steps=5).warmup_steps.value == 5


def test_identity_differences_are_named(tmp_path):
    old = {"identity": {"seed": 0, "lr": 2e-4, "warmup_steps": 3}}
    assert rundir.identity_diff(old["identity"], {"seed": 0, "lr": 0.0002, "warmup_steps": 3}) == []
    with pytest.raises(rundir.RunDirError, match=r"differs in lr, seed: lr: 0.0002 -> 0.001; seed: 0 -> 1"):
        rundir.check_identity(tmp_path, old, {"seed": 1, "lr": 1e-3, "warmup_steps": 3})


# ---- newcomer points ----


def test_the_resume_hint_repeats_what_was_given_with_absolute_paths(tmp_path, monkeypatch):
    from qdoctor.train.cli import resume_command, train

    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text("{}")
    ctx = train.make_context("train", ["--data", "d.jsonl", "--max-steps", "9", "--no-packing", "--force",
                                       "--output", "o", "--dry-run", "--target-modules", "q_proj,v_proj"])
    words = resume_command(ctx, Path("o")).split()
    assert words[:2] == ["qdoctor", "train"] and words[-3:] == ["--output", str(tmp_path / "o"), "--resume"]
    assert words[words.index("--data") + 1] == str(tmp_path / "d.jsonl")
    assert {"--no-packing", "--force"} <= set(words) and "--dry-run" not in words
    assert words[words.index("--max-steps") + 1] == "9" and "q_proj,v_proj" in words
    assert "--seed" not in words  # only what was given


def test_a_bad_input_fails_before_any_ml_import_or_preflight():
    code = (
        "import sys\n"
        "from qdoctor.cli import main\n"
        "try:\n    main(['train', '--data', '/nonexistent/d.jsonl'])\n"
        "except SystemExit as e:\n    code = e.code\n"
        "heavy = ('torch', 'transformers', 'qdoctor.facts', 'qdoctor.smoke')\n"
        "heavy = [m for m in heavy if m in sys.modules]\n"
        "print(code, heavy)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "2 []", r.stdout + r.stderr
    assert "dataset /nonexistent/d.jsonl does not exist" in r.stderr


def test_preflight_says_what_it_runs(monkeypatch, tmp_path):
    import qdoctor.facts
    import qdoctor.smoke
    from qdoctor.smoke import ProbeResult
    from qdoctor.train import preflight

    monkeypatch.setenv("QDOCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(qdoctor.facts, "collect", lambda **kw: dict(CPU_FACTS))

    def fake_probes(names, dev, timeout, facts, progress=None):
        out = [ProbeResult(n, "pass", 1.5) for n in names]
        for r in out:
            progress("done", r.probe, r)
        return out

    monkeypatch.setattr(qdoctor.smoke, "run_probes", fake_probes)
    lines = []
    preflight.run(None, progress=lines.append)
    text = "\n".join(lines)
    assert "checking the machine" in lines[0] and "running probes imports, nf4, optim8bit" in text
    assert "nf4: pass 1.5 s" in text and lines[-1].startswith("done in")


def test_every_config_key_has_a_flag_with_its_default_and_a_readme_entry():
    from dataclasses import fields

    from qdoctor.train.cli import train

    flags = {p.name: p for p in train.params}
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for f in fields(C.TrainConfig):
        name = "config_file" if f.name == "config" else f.name
        assert name in flags, f"no flag for config key {f.name}"
        assert "[default:" in (flags[name].help or ""), f"--help shows no default for {f.name}"
        assert f"`{f.name}`" in readme, f"README does not document {f.name}"
    assert "./runs/" in readme


def test_the_summary_says_what_final_loss_is():
    from qdoctor.train import summary
    from qdoctor.train.cli import _human

    run = SimpleNamespace(step=3, elapsed=1.0, tokens=10, micro=1, skipped=1)
    plan = SimpleNamespace(device=Choice("cpu", "test"), to_dict=lambda: {})
    s = summary.build(plan=plan, fingerprint=None, history=[{"loss": x} for x in (3.0, 2.0, 1.0)], run=run,
                      wall_s=1.0, status="completed", output="o", adapter_dir=None, first_eval=None)
    assert s["final_loss"] == 2.0 and s["final_loss_note"] == "mean of the last 3 steps"
    text = _human(s)
    assert "3.0000 at step 1 -> 2.0000 (mean of the last 3 steps)" in text and "skipped: 1 steps" in text


def test_rules_listing_keeps_whole_sentences():
    from qdoctor.rules import load_rules
    from qdoctor.rulesdoc import first_sentence, other_codes, render_rules

    assert first_sentence("A rule that wraps\nmid-sentence (e.g. here). Second one.") == (
        "A rule that wraps mid-sentence (e.g. here)."
    )
    docs = {", ".join(r.codes): r.doc for r in load_rules()} | {c: doc for c, _, _, doc in other_codes()}
    for line in render_rules(load_rules()).splitlines():
        codes, rest = line.split("  ", 1)  # the code column ends at two spaces (a rule may have several)
        desc = rest.split(None, 2)[2]
        full = " ".join(docs[codes.strip()].split())
        assert full.startswith(desc) and (desc == full or desc.endswith((".", "!", "?"))), line


def test_the_memory_calibration_is_cited_from_the_repository():
    from qdoctor.train import memory

    root = Path(__file__).resolve().parent.parent
    for source in {memory.CALIBRATION_SOURCE, *(row[-1] for row in memory.CALIBRATION)}:
        path = source.split()[0]
        assert "/" in path and (root / path).exists(), source  # a file in the repository, not elsewhere
    doc = root / memory.PLAIN_LOOP_H200.split()[0]
    cells = [row.split("|")[-2].strip() for row in doc.read_text().splitlines() if row.startswith("| ")]
    peaks = [float(c) for c in cells if c.replace(".", "").isdigit()]
    assert peaks == [row[-2] for row in memory.CALIBRATION if row[-1] == memory.PLAIN_LOOP_H200]


def test_a_new_micro_batch_gives_the_same_gradient(toy):
    """Why a resume may change --micro-batch: the loss is normalised by the step's label tokens."""
    import torch

    examples = toy.train[:4]
    grads = []
    for micro in (4, 2, 1):
        toy.model.zero_grad()
        toy.optimizer = torch.optim.SGD(toy.model.parameters(), lr=0.0)  # measure, do not move
        loss, _ = loop.train_step(toy, examples, micro, 4 // micro)
        grads.append((loss, [p.grad.clone() for p in toy.model.parameters()]))
    for loss, g in grads[1:]:
        assert loss == pytest.approx(grads[0][0], rel=1e-6)
        assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(g, grads[0][1], strict=True))


# ---- issue 11: host overhead: one device read per step, metrics off the hot path ----


@pytest.fixture
def reads(monkeypatch):
    """Counts every read of a tensor's value by the host (on a GPU each one waits for the queued work)."""
    import torch

    seen = {"n": 0}
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, **kw):
            seen["n"] += 1
            return _real(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return seen


def test_one_device_read_per_optimizer_step_and_per_evaluation(toy, reads, monkeypatch):
    toy.eval = toy.train[:5]  # three evaluation micro-batches of 2
    toy.plan.set(eval_every=2)
    per = {"train_step": [], "evaluate": [], "nonfinite_params": []}
    for name in per:
        real = getattr(loop, name)

        def wrapped(*a, _real=real, _name=name, **kw):
            before = reads["n"]
            try:
                return _real(*a, **kw)
            finally:
                per[_name].append(reads["n"] - before)

        monkeypatch.setattr(loop, name, wrapped)
    monkeypatch.setattr(checkpoint, "save", lambda *a: None)  # the fixture's records the weights: reads
    loop.fit(toy, lambda run, rec: None)  # 4 steps of 2 micro-batches, evaluations at steps 2 and 4
    assert per == {"train_step": [1] * 4, "evaluate": [1, 1], "nonfinite_params": [1]}
    assert reads["n"] == 4 + 2 + 1  # nothing else in the loop reads the device
    assert [r.get("eval_loss") is not None for r in toy.history] == [False, True, False, True]


def test_the_first_non_finite_micro_batch_loss_is_the_one_reported(toy, monkeypatch):
    """The losses are read once a step, after every micro-batch ran: the run still stops on the value the
    first non-finite micro-batch gave (inf, not the NaN of a later one), and nothing is applied."""
    import torch

    real = loop.forward_loss
    calls = []

    def poisoned(run, batch, w):
        calls.append(1)
        loss = real(run, batch, w)
        return loss * {1: math.inf, 2: math.nan}.get(len(calls), 1.0)

    monkeypatch.setattr(loop, "forward_loss", poisoned)
    before = weights(toy)
    with pytest.raises(loop.StopRun) as e:
        loop.fit(toy, lambda run, rec: None)
    assert e.value.finding.code == "QD802" and "loss became inf at step 1" in e.value.finding.title
    assert all(torch.equal(a, b) for a, b in zip(before, weights(toy), strict=True))
    assert toy.step == 0 and toy.saves == []


def test_metrics_reach_disk_before_each_checkpoint_and_when_the_loop_ends(toy, monkeypatch):
    monkeypatch.setattr(loop, "METRICS_FLUSH_S", 1e9)  # never on time: only the checkpoint and the end flush
    toy.plan.set(max_steps=5, save_every=2)
    on_disk = []

    def lines():
        path = toy.output / "metrics.jsonl"
        return [json.loads(x)["step"] for x in path.read_text().splitlines()] if path.exists() else []

    monkeypatch.setattr(checkpoint, "save", lambda out, model, *a: on_disk.append((a[-1]["step"], lines())))
    seen, flushed = [], []
    toy.report = SimpleNamespace(write=lambda rec: None, flush=lambda: flushed.append(toy.step))  # a tracker
    loop.fit(toy, lambda run, rec: seen.append(lines()))
    assert seen[0] == [] and seen[2] == [1, 2]  # buffered between checkpoints
    assert on_disk == [(2, [1, 2]), (4, [1, 2, 3, 4]), (5, [1, 2, 3, 4, 5])]
    assert flushed == [2, 4, 5, 5]  # the tracker too: with each checkpoint and at the end, not every step
    toy.plan.set(max_steps=7)
    toy.poison = {6, 7}
    monkeypatch.setattr(loop, "MAX_SKIPS_IN_ROW", 2)
    with pytest.raises(loop.StopRun):  # a run that stops still leaves its lines
        loop.fit(toy, lambda run, rec: None)
    assert lines() == [1, 2, 3, 4, 5, 6, 7]


def test_timings_split_the_wall_time_without_exceeding_it(toy):
    toy.eval = toy.train[:2]
    toy.plan.set(eval_every=2, save_every=3)
    loop.fit(toy, lambda run, rec: None)
    t = toy.timings.to_dict(wall_s=10_000.0)
    parts = ("startup_s", "load_s", "train_s", "eval_s", "checkpoint_s")
    assert t["steps"] == 4 and all(t[k] >= 0 for k in (*parts, "other_s", "median_step_s", "host_s_per_step"))
    raw = toy.timings  # the summary rounds to 1 ms: a toy's evaluation may round to 0
    assert raw.eval_s > 0 and raw.checkpoint_s > 0 and len(raw.step_s) == len(raw.wait_s) == 4
    assert sum(t[k] for k in parts) + t["other_s"] == pytest.approx(10_000.0, abs=0.01)
    assert t["host_s_per_step"] <= t["median_step_s"]  # on the CPU the step's read waits for nothing
    from qdoctor.train.timings import Timings, describe

    assert Timings().to_dict(1.0)["median_step_s"] is None and describe({}) == ""
    short = Timings(startup_s=3.0, load_s=2.0).to_dict(wall_s=4.0)
    assert short["other_s"] == 0  # never negative, even when rounding pushes the parts past the wall


def test_a_step_counts_only_its_own_wait_for_the_device(toy, monkeypatch):
    """Host time = step time - the step's read-back wait; an evaluation's read-back is not the step's."""
    real = loop.read_back

    def slow(run, values):
        out = real(run, values)
        run.wait_s += 1000.0  # as if each read waited 1000 s
        return out

    monkeypatch.setattr(loop, "read_back", slow)
    toy.eval = toy.train[:2]
    toy.plan.set(eval_every=2)
    seen = []
    monkeypatch.setattr(toy.timings, "add_step", lambda step_s, wait_s: seen.append(wait_s))
    loop.fit(toy, lambda run, rec: None)
    assert [round(w) for w in seen] == [1000] * 4  # steps 2 and 4 evaluated: still one wait each


class _HostTensor:
    """Records how to_device moves it (a CPU-only torch cannot pin memory)."""

    def __init__(self, fail_pin=False):
        self.calls, self.fail_pin = [], fail_pin

    def pin_memory(self):
        if self.fail_pin:
            raise RuntimeError("cannot pin")
        self.calls.append("pin")
        return self

    def to(self, device, non_blocking=False):
        self.calls.append((device, non_blocking))
        return self


def test_a_micro_batch_reaches_a_gpu_through_pinned_memory_without_blocking():
    a, b = _HostTensor(), _HostTensor(fail_pin=True)
    out = loop.to_device({"input_ids": a, "labels": b, "max_length_q": 7}, "cuda:0")
    assert a.calls == ["pin", ("cuda:0", True)]  # no hidden wait for the queued work
    assert b.calls == [("cuda:0", False)]  # no pinned memory: the plain copy, still correct
    assert out["max_length_q"] == 7
    c = _HostTensor()
    loop.to_device({"input_ids": c}, "cpu")
    assert c.calls == [("cpu", False)]


@pytest.mark.gpu
def test_one_device_sync_per_step_on_a_gpu(tmp_path):
    """On CUDA: torch's sync debug mode warns at every synchronizing call; a step makes exactly one."""
    import warnings

    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    model = ToyLM().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    data = [([1, 2, 3, 4, 5], [D.IGNORE, 2, 3, 4, 5]), ([6, 7, 8], [6, 7, 8])] * 2
    run = loop.Run(model, opt, sched, torch.amp.GradScaler("cuda", enabled=False), data, [], Plan(),
                   tmp_path, 0, 0, "cuda:0", torch.float32, micro=2)
    loop.train_step(run, data, 2, 2)  # warm-up: first-call allocations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loop.train_step(run, data, 2, 2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
