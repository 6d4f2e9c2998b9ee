"""The install footprint: `pip install qdoctor` brings what `check` needs and nothing it diagnoses; the
stack comes from the `train` extra, and smoke/train without it stop with one line (exit 2)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from qdoctor import extra, matrix

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PYPROJECT = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]


def names(reqs) -> set[str]:
    from packaging.requirements import Requirement

    return {Requirement(r).name for r in reqs}


def test_core_install_brings_none_of_the_stack():
    core = names(PYPROJECT["dependencies"])
    assert core == {"click", "packaging", "psutil", "nvidia-ml-py", "tomli"}
    assert not core & set(matrix.stack())


def test_train_extra_is_the_stack_and_test_pulls_it():
    assert set(matrix.stack()) <= names(PYPROJECT["optional-dependencies"]["train"])
    assert "qdoctor" in names(PYPROJECT["optional-dependencies"]["test"])  # qdoctor[train]


@pytest.mark.parametrize("cmd", [["smoke", "--device", "cpu"], ["train", "--dry-run"]])
def test_smoke_and_train_without_the_extra_say_so_in_one_line(monkeypatch, capsys, cmd):
    import importlib.util

    from qdoctor.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("peft", "accelerate") else real(name, *a))
    assert extra.missing() == ["peft", "accelerate"]
    with pytest.raises(SystemExit) as e:
        main(cmd)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"`qdoctor {cmd[0]}` needs the QLoRA stack; not installed: peft, accelerate" in err


def test_the_message_is_one_line_naming_the_command_and_the_fix(monkeypatch, capsys):
    import importlib.util

    from qdoctor.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(SystemExit) as e:
        main(["train"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "`qdoctor train` needs the QLoRA stack; not installed: torch" in err
    assert 'pip install "qdoctor[train]"' in err
