"""Fixtures shared by the `qdoctor train` end-to-end tests (constants in train_support.py)."""

from __future__ import annotations

import pytest
from train_support import CPU_FACTS, PROBES

from qdoctor.facts import runtime
from qdoctor.train import preflight


@pytest.fixture(autouse=True)
def _no_early_deep_child_left():
    """A `train` invoked in this process may have started the pre-flight's deep child early
    (runtime.start_early); the next test must not find it."""
    yield
    t = runtime._early.pop("thread", None)
    if t is not None:
        t.join(120)
    runtime._early.clear()


@pytest.fixture
def train_env(tmp_path_factory, monkeypatch):
    """An isolated cache, no hub access, no test stop left over (modules opt in with usefixtures)."""
    monkeypatch.setenv("QDOCTOR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("QDOCTOR_TEST_STOP_AFTER", raising=False)


@pytest.fixture
def pf(monkeypatch):
    """Inject the pre-flight result; `state.findings` can be set by a test."""
    state = preflight.Preflight(CPU_FACTS, [], list(PROBES), fingerprint="test-fp")
    monkeypatch.setattr(preflight, "run", lambda device, **kw: state)
    monkeypatch.setattr(runtime, "start_early", lambda *a, **kw: None)  # no pre-flight, so no deep child
    return state
