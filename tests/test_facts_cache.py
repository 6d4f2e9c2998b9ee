"""The JSON cache: round trip, harmless failures, and what the environment fingerprint depends on."""

from __future__ import annotations

import copy
import os

from qdoctor import cache


def test_round_trip_and_key_check(tmp_path, monkeypatch):
    monkeypatch.setenv("QDOCTOR_CACHE_DIR", str(tmp_path))
    assert cache.load("probe", "k1") is None
    assert cache.store("probe", "k1", {"a": [1, 2]}) is True
    assert cache.load("probe", "k1") == {"a": [1, 2]}
    assert cache.load("probe", "k2") is None
    assert cache.load("other", "k1") is None


def test_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.delenv("QDOCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.cache_dir() == os.path.join(str(tmp_path), "qdoctor")


def test_unwritable_or_corrupt_cache_is_a_miss(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache dir should be")
    monkeypatch.setenv("QDOCTOR_CACHE_DIR", str(blocker))
    assert cache.store("probe", "k", {"x": 1}) is False
    assert cache.load("probe", "k") is None
    monkeypatch.setenv("QDOCTOR_CACHE_DIR", str(tmp_path / "c"))
    cache.store("probe", "k", {"x": 1})
    path = cache._path("probe", "k")
    with open(path, "w") as fh:
        fh.write("{not json")
    assert cache.load("probe", "k") is None


def test_max_age(tmp_path, monkeypatch):
    monkeypatch.setenv("QDOCTOR_CACHE_DIR", str(tmp_path))
    cache.store("probe", "k", 1)
    os.utime(cache._path("probe", "k"), (1, 1))
    assert cache.load("probe", "k", max_age_s=60) is None
    assert cache.load("probe", "k") == 1


def test_disabled(tmp_path, monkeypatch):
    monkeypatch.setenv("QDOCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("QDOCTOR_NO_CACHE", "1")
    assert cache.store("probe", "k", 1) is False and cache.load("probe", "k") is None


FACTS = {"platform": {"python_executable": "/venv/bin/python", "python": "3.11.7", "release": "6.8"},
         "packages": {"torch": "2.11.0+cu130", "bitsandbytes": "0.50.2", "transformers": "5.17.0",
                      "peft": "0.21.0", "numpy": "2.5.2"},
         "nvidia": {"driver": "580.159.04", "gpus": [{"name": "NVIDIA H200", "memory_free_mib": 1}]},
         "env": {"CUDA_VISIBLE_DEVICES": None, "BNB_CUDA_VERSION": None, "LD_LIBRARY_PATH": None,
                 "HF_HOME": "x"}}


def test_fingerprint_tracks_what_a_runtime_result_depends_on():
    base = cache.fingerprint(FACTS)
    assert base == cache.fingerprint(copy.deepcopy(FACTS))
    for path, value in ((("packages", "torch"), "2.11.0+cu128"), (("packages", "peft"), "0.20.0"),
                        (("packages", "nvidia-cublas-cu12"), "12.8.4.1"),
                        (("nvidia", "driver"), "590.44.01"), (("env", "CUDA_VISIBLE_DEVICES"), "1"),
                        (("env", "BNB_CUDA_VERSION"), "128"), (("env", "LD_LIBRARY_PATH"), "/x"),
                        (("platform", "python_executable"), "/other/python")):
        f = copy.deepcopy(FACTS)
        f[path[0]][path[1]] = value
        assert cache.fingerprint(f) != base, path
    g = copy.deepcopy(FACTS)
    g["nvidia"]["gpus"][0]["name"] = "NVIDIA H100"
    assert cache.fingerprint(g) != base
    # things a deep result does not depend on leave it unchanged
    h = copy.deepcopy(FACTS)
    h["env"]["HF_HOME"] = "y"
    h["nvidia"]["gpus"][0]["memory_free_mib"] = 99
    assert cache.fingerprint(h) == base


def test_fingerprint_is_the_same_for_python_and_python3_of_one_venv():
    from qdoctor.cache import fingerprint

    a = {"platform": {"python_executable": "~/venv/bin/python", "python": "3.11.7"}}
    b = {"platform": {"python_executable": "~/venv/bin/python3", "python": "3.11.7"}}
    c = {"platform": {"python_executable": "~/other-venv/bin/python3", "python": "3.11.7"}}
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)


def test_probe_cache_key_follows_qdoctor_version_and_the_matrix(tmp_path, monkeypatch):
    """A new qdoctor or a changed smoke band must not reuse an old probe verdict."""
    import shutil

    import qdoctor
    from qdoctor import matrix

    key = cache.probe_key(cache.fingerprint(FACTS), "cpu", ("imports", "nf4"))
    assert key == cache.probe_key(cache.fingerprint(FACTS), "cpu", ("imports", "nf4"))
    assert key != cache.probe_key(cache.fingerprint(FACTS), "cuda:0", ("imports", "nf4"))
    monkeypatch.setattr(qdoctor, "__version__", "9.9.9")
    assert cache.probe_key(cache.fingerprint(FACTS), "cpu", ("imports", "nf4")) != key
    monkeypatch.undo()
    d = tmp_path / "matrix"
    shutil.copytree(matrix.matrix_dir(), d)
    monkeypatch.setattr(matrix, "matrix_dir", lambda: d)
    assert cache.probe_key(cache.fingerprint(FACTS), "cpu", ("imports", "nf4")) == key
    bands = d / "smoke_bands.toml"
    bands.write_text(bands.read_text().replace("max = 0.100", "max = 0.101", 1))
    assert cache.probe_key(cache.fingerprint(FACTS), "cpu", ("imports", "nf4")) != key


def test_preflight_reuses_probes_only_while_fresh(tmp_path, monkeypatch):
    import qdoctor.facts
    import qdoctor.smoke
    from qdoctor.train import preflight

    facts = {"platform": {"memory_total_mib": 8000}, "nvidia": {"gpus": []}, "env": {},
             "torch": {"cuda": None, "version": "2.13.0+cpu"}, "bitsandbytes": {"installed": True}}
    monkeypatch.setenv("QDOCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(qdoctor.facts, "collect", lambda **kw: facts)
    runs = []
    monkeypatch.setattr(qdoctor.smoke, "run_probes", lambda n, d, t, f, **_: runs.append(d) or [])
    assert not preflight.run(None).cached and preflight.run(None).cached and runs == ["cpu"]
    for f in (tmp_path / f"v{cache.VERSION}" / preflight.CACHE_KIND).iterdir():
        os.utime(f, (1, 1))  # older than cache.MAX_AGE_S
    assert not preflight.run(None).cached and runs == ["cpu", "cpu"]


def _static(cached: bool, cuda: str | None = "13.0", gpus=({"visible": True},)):
    return {"runtime": {"cached": cached}, "torch": {"cuda": cuda},
            "nvidia": {"status": "ok", "gpus": list(gpus)}}


def test_the_early_deep_child_is_the_one_the_deep_collect_uses(monkeypatch):
    """train starts the deep child before its own imports; deep() must take that child's result and not
    spawn a second one."""
    import qdoctor.facts
    from qdoctor.facts import runtime

    spawned = []
    monkeypatch.setattr(runtime, "_early", {})
    monkeypatch.setattr(qdoctor.facts, "collect", lambda **kw: _static(False))
    monkeypatch.setattr(runtime, "run_child", lambda timeout: spawned.append(timeout) or {
        "runtime": {"ran": True, "status": "ok"}, "payload": {"torch": {}, "bitsandbytes": {}}})
    monkeypatch.setattr(runtime.cache, "store", lambda *a, **k: True)
    runtime.start_early(42.0)
    facts = {"runtime": {}, "torch": {}, "bitsandbytes": {}}
    runtime.deep(facts, 42.0)
    assert spawned == [42.0] and facts["runtime"]["status"] == "ok"
    runtime.deep(facts, 42.0)  # with no early child pending, deep() spawns its own
    assert spawned == [42.0, 42.0]


def test_no_early_child_where_the_deep_collect_would_not_spawn_one(monkeypatch):
    import qdoctor.facts
    from qdoctor.facts import runtime

    spawned = []
    monkeypatch.setattr(runtime, "run_child", lambda timeout: spawned.append(timeout) or {})
    for static, in_process in ((_static(True), False),  # a fresh cached result
                               (_static(False, cuda=None), True),  # --skip-probes, a CPU-only torch
                               (_static(False, gpus=()), True)):  # --skip-probes, no GPU visible
        monkeypatch.setattr(runtime, "_early", {})
        monkeypatch.setattr(qdoctor.facts, "collect", lambda s=static, **kw: s)
        runtime.start_early(5.0, in_process=in_process)
        assert runtime._take_early(5.0) is None
    assert spawned == []
    monkeypatch.setattr(runtime, "_early", {})
    monkeypatch.setattr(qdoctor.facts, "collect", lambda **kw: _static(False))
    runtime.start_early(5.0, in_process=True)  # --skip-probes with a GPU: the child still runs
    runtime._take_early(5.0)
    assert spawned == [5.0]
