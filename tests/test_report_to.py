"""`qdoctor train --report-to tensorboard`: event files beside metrics.jsonl when tensorboard is installed,
a one-line usage error (exit 2) before anything runs when it is not."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from qdoctor.train import cli as train_cli
from qdoctor.train import preflight, report_to

CPU_FACTS = {
    "platform": {"memory_total_mib": 24000},
    "nvidia": {"gpus": []},
    "torch": {"cuda": None, "cuda_available": False},
    "bitsandbytes": {"installed": True, "loads": True},
}


@pytest.fixture(autouse=True)
def env(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("QDOCTOR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("QDOCTOR_TEST_STOP_AFTER", raising=False)
    state = preflight.Preflight(CPU_FACTS, [], [{"probe": n, "status": "pass"} for n in preflight.CPU_PROBES],
                                fingerprint="test-fp")
    monkeypatch.setattr(preflight, "run", lambda device, **kw: state)


def invoke(*args):
    return CliRunner().invoke(train_cli.train, list(args), catch_exceptions=False)


def scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_without_tensorboard_it_is_a_one_line_usage_error(tmp_path, monkeypatch):
    monkeypatch.setattr(report_to, "find_spec", lambda name: None)
    out = tmp_path / "run"
    r = invoke("--output", str(out), "--max-steps", "1", "--report-to", "tensorboard")
    assert r.exit_code == 2
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "pip install tensorboard" in lines[0] and "Traceback" not in r.output
    assert not out.exists()  # refused before anything was written
    assert report_to.missing("none") is None


def test_an_unknown_tracker_is_refused(tmp_path):
    r = invoke("--output", str(tmp_path / "r"), "--report-to", "wandb")
    assert r.exit_code == 2 and "'wandb' is not one of none, tensorboard" in r.output


def test_writer_logs_trainer_tags_and_skips_non_finite(tmp_path):
    pytest.importorskip("tensorboard")
    w = report_to.writer_for("tensorboard", tmp_path)
    w.write({"step": 1, "loss": 6.25, "lr": 1e-4, "grad_norm": 1.5, "tokens_per_s": 100.0, "micro_batch": 4})
    w.write({"step": 2, "loss": 5.5, "lr": 2e-4, "grad_norm": None, "eval_loss": float("nan")})
    w.write({"step": 3, "loss": 5.0, "lr": 2e-4, "grad_norm": 1.0, "eval_loss": 5.25})
    w.close()
    s = scalars(tmp_path / "tensorboard")
    assert s["train/loss"] == [(1, 6.25), (2, 5.5), (3, 5.0)]
    assert [st for st, _ in s["train/grad_norm"]] == [1, 3]  # a skipped step has no norm
    assert s["eval/loss"] == [(3, 5.25)]  # NaN is not written
    assert math.isclose(s["train/learning_rate"][0][1], 1e-4, rel_tol=1e-6)
    assert report_to.writer_for("none", tmp_path) is None


def test_train_writes_event_files_matching_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    r = invoke("--output", str(out), "--max-steps", "2", "--batch-size", "4", "--eval-every", "2",
               "--report-to", "tensorboard")
    assert r.exit_code == 0, r.output
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    s = scalars(out / "tensorboard")
    assert [st for st, _ in s["train/loss"]] == [1, 2]
    for (step, v), m in zip(s["train/loss"], metrics, strict=True):
        assert step == m["step"] and math.isclose(v, m["loss"], rel_tol=1e-6)
    assert s["eval/loss"][-1][0] == 2
