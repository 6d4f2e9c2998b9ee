"""collect() end to end: this machine, broken installs, a failing collector, and the runtime merge/cache."""

from __future__ import annotations

import json
import sys
import time

import pytest

from qdoctor import cache
from qdoctor.facts import collect, runtime
from qdoctor.facts.schema import FACTS_SCHEMA, normalize
from qdoctor.redact import redact_obj

FORBIDDEN = ("torch", "bitsandbytes", "transformers", "peft", "accelerate", "triton")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QDOCTOR_CACHE_DIR", str(tmp_path / "cache"))


def stack_imported_by(code: str) -> list[str]:
    """The stack modules a fresh interpreter has imported after running `code`: in this pytest process
    earlier tests may have imported torch already, which would make a before/after check vacuous."""
    import os
    import subprocess

    probe = (f"{code}\nimport sys\n"
             f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({FORBIDDEN!r})))")
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ))
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1].replace("'", '"'))


def test_collect_imports_none_of_the_stack():
    assert stack_imported_by("from qdoctor.facts import collect; collect()") == []
    # the check can fail: importing the collector of a module that does import torch is seen
    assert stack_imported_by("from qdoctor.facts import collect; collect(); import torch") == ["torch"]


def test_collect_on_this_machine():
    facts = collect()
    assert normalize(json.loads(json.dumps(facts))) == normalize(facts)
    assert facts["schema"] == FACTS_SCHEMA
    for name in ("platform", "env", "packages", "torch", "bitsandbytes", "nvidia"):
        assert facts["collectors"][name]["ok"], (name, facts["collectors"][name])
    assert facts["nvidia"]["status"] in ("ok", "no-nvml", "no-driver", "no-gpu", "error")
    assert facts["runtime"]["ran"] is False
    if facts["packages"].get("torch"):
        assert facts["torch"]["installed"] and facts["torch"]["version"]
    if facts["packages"].get("bitsandbytes"):
        assert facts["bitsandbytes"]["binaries"] and facts["bitsandbytes"]["selected"]
    json.dumps(redact_obj(facts))


def test_broken_and_missing_stack(tmp_path):
    site = tmp_path / "site"
    (site / "torch").mkdir(parents=True)
    (site / "torch" / "__init__.py").write_text("raise SystemExit('must not be imported')\n")
    (site / "torch" / "version.py").write_text("garbage = = =")
    facts = collect(paths=[str(site)], environ={}, nvml=None)
    assert facts["torch"]["installed"] is True and "version.py" in facts["torch"]["error"]
    assert facts["bitsandbytes"]["installed"] is False
    assert facts["packages"] == {}
    assert all(c["ok"] for c in facts["collectors"].values())
    normalize(facts)


def test_a_failing_collector_is_isolated(monkeypatch):
    from qdoctor.facts import platform

    def slow_boom(environ=None):
        time.sleep(0.02)
        raise RuntimeError("collector bug")

    monkeypatch.setattr(platform, "collect", slow_boom)
    facts = collect()
    c = facts["collectors"]["platform"]
    assert set(c) == {"ok", "duration_ms", "error"}
    assert c["ok"] is False and c["error"] == "RuntimeError: collector bug"
    assert c["duration_ms"] >= 20  # the time spent before it failed is recorded (a lower bound only)
    assert facts["platform"] == {}
    assert facts["collectors"]["packages"]["ok"] and facts["packages"] is not None
    normalize(facts)


GPU_RESULT = {
    "runtime": {"ran": True, "cached": False, "duration_s": 12.3, "status": "ok", "error": None,
                "stderr_tail": ""},
    "payload": {
        "torch": {"imported": True, "version": "2.11.0+cu130", "cuda": "13.0", "cuda_available": True,
                  "device_count": 2, "arch_list": ["sm_75", "sm_80", "sm_90", "compute_120"],
                  "devices": [{"index": 0, "capability": "9.0", "bf16_supported": True},
                              {"index": 1, "capability": "7.5", "bf16_supported": False}]},
        "bitsandbytes": {"imported": True, "loads": False,
                         "library_class": "ErrorHandlerMockBNBNativeLibrary",
                         "error": "libcudart.so.13: cannot open shared object file"},
        "warnings": ["UserWarning: something"], "log": "bitsandbytes library load error"},
}


def test_merge_runtime_result():
    facts = normalize({"torch": {"version": "2.11.0+cu130", "arch_list": ["sm_75"], "source": "static"},
                       "bitsandbytes": {"loads": None}})
    runtime.merge(facts, GPU_RESULT)
    t, b = facts["torch"], facts["bitsandbytes"]
    assert (t["source"], t["cuda_available"], t["device_count"]) == ("runtime", True, 2)
    assert t["bf16_supported"] is False  # one device without native bf16
    assert t["arch_list"] == ["sm_75", "sm_80", "sm_90"] and "sm_120" in t["ptx"]
    assert b["loads"] is False and "cannot open shared object" in b["error"]
    assert facts["runtime"]["ran"] and facts["runtime"]["warnings"] == ["UserWarning: something"]


def test_a_failed_torch_import_is_recorded():
    facts = normalize({"torch": {"version": "2.11.0"}})
    runtime.merge(facts, {"runtime": {"ran": True, "status": "ok"},
                          "payload": {"torch": {"imported": False, "error": "ImportError: libcudnn.so.9"}}})
    assert facts["torch"]["error"] == "ImportError: libcudnn.so.9" and facts["torch"]["source"] == "runtime"


def test_plain_collect_merges_a_cached_deep_result_for_the_same_environment():
    facts = collect()
    cache.store(runtime.CACHE_KIND, cache.fingerprint(facts), GPU_RESULT)
    again = collect()
    assert again["runtime"]["cached"] is True and again["runtime"]["ran"] is True
    assert again["torch"]["source"] == "runtime" and again["torch"]["device_count"] == 2
    assert again["collectors"]["runtime_cache"]["ok"]


def test_cached_deep_result_is_ignored_when_the_environment_changed(monkeypatch):
    facts = collect()
    cache.store(runtime.CACHE_KIND, cache.fingerprint(facts), GPU_RESULT)
    monkeypatch.setenv("BNB_CUDA_VERSION", "128")
    again = collect()
    assert again["runtime"]["cached"] is False and again["torch"].get("device_count") is None


@pytest.mark.slow
def test_deep_collect_imports_in_a_child_only():
    notices = []
    facts = collect(deep=True, timeout=300, progress=notices.append)
    assert len(notices) == 1 and "child process" in notices[0]  # the slow step says it is slow
    # the import happens in the child: a fresh interpreter running the same deep collect stays clean
    assert stack_imported_by("from qdoctor.facts import collect; collect(deep=True, timeout=300)") == []
    assert facts["runtime"]["ran"] is True and facts["runtime"]["status"] == "ok", facts["runtime"]
    assert facts["torch"]["source"] == "runtime"
    assert isinstance(facts["torch"]["cuda_available"], bool)
    if facts["packages"].get("bitsandbytes"):
        assert isinstance(facts["bitsandbytes"]["loads"], bool)
    # the result is cached for the next plain check, which then has nothing slow to announce
    assert collect(deep=True, progress=notices.append)["runtime"]["cached"] is True and len(notices) == 1
