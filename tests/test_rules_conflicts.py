"""QD501: a module clash inside the QLoRA stack is an error; one between unrelated packages is info."""

from qdoctor import matrix
from qdoctor.facts.schema import normalize
from qdoctor.rules import judge


def _qd501(conflict):
    facts = normalize({"schema": "qdoctor.facts/1", "conflicts": [conflict]})
    return [f for f in judge(facts, matrix.load()) if f.code == "QD501"]


def test_stack_module_clash_is_an_error_with_reinstall_fix():
    (f,) = _qd501({"module": "bitsandbytes", "distributions": ["bitsandbytes", "bitsandbytes-cuda117"],
                   "versions": ["0.50.2", "0.26.0.post2"]})
    assert f.severity == "error"
    assert "bitsandbytes-cuda117 0.26.0.post2" in f.evidence[0]
    assert f.fix == "pip uninstall -y bitsandbytes bitsandbytes-cuda117 && pip install -U bitsandbytes"


def test_unrelated_clash_is_info_and_restores_the_owner():
    # Seen on the H200 image: botorch 0.18.1 also ships a top-level `build/`.
    (f,) = _qd501({"module": "build", "distributions": ["botorch", "build"], "versions": ["0.18.1", "1.6.1"]})
    assert f.severity == "info"
    assert "not part of the QLoRA stack" in f.title
    assert f.fix == "pip install --force-reinstall --no-deps build==1.6.1"
