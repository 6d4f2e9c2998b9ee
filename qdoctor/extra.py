"""The `train` extra: `smoke` and `train` drive the QLoRA stack, which qdoctor's own install leaves out
(installing the doctor must not change the environment it diagnoses; see pyproject.toml)."""

from __future__ import annotations

INSTALL = 'pip install "qdoctor[train]"'
FIX = f'{INSTALL}  # from a clone: pip install -e ".[train]"'


def missing() -> list[str]:
    """Packages of the stack that cannot be imported here, found without importing any of them."""
    import importlib.util

    from qdoctor import matrix

    out = []
    for name in matrix.stack():
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(name)
    return out


def require(command: str) -> None:
    """Stop `command` with one line (exit 2) when the stack is not installed."""
    from qdoctor.console import UsageError

    gone = missing()
    if gone:
        raise UsageError(f"`qdoctor {command}` needs the QLoRA stack; not installed: {', '.join(gone)}. "
                         f"Install it with: {FIX}")
