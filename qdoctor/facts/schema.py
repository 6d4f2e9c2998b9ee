"""The facts snapshot contract (`qdoctor.facts/1`): its sections, and loading a saved one.

A snapshot is plain JSON. A missing value is null and unknown is never treated as bad, so a
snapshot from an older qdoctor (fewer keys) is still judged; a value of the wrong *type* is a
usage error, named by its key.
"""

from __future__ import annotations

import json

FACTS_SCHEMA = "qdoctor.facts/1"
SNAPSHOT_FENCE = "```json qdoctor-snapshot"  # the block `qdoctor report` embeds its --json output in

# section -> (type, default). Collectors fill these; rules read them with .get().
SECTIONS = {
    "platform": (dict, {}),
    "packages": (dict, {}),
    "conflicts": (list, []),
    "requirements": (list, []),
    "nvidia": (dict, {}),
    "torch": (dict, {}),
    "bitsandbytes": (dict, {}),
    "env": (dict, {}),
    "driver": (dict, {}),
    "native": (dict, {}),
    "extensions": (dict, {}),
    "bytecode": (dict, {}),
    "model": (dict, {}),
    "runtime": (dict, {}),
    "collectors": (dict, {}),
}


class FactsError(ValueError):
    """A snapshot that cannot be judged; the message is one line for the user."""


def empty() -> dict:
    return {"schema": FACTS_SCHEMA, **{k: (d.copy()) for k, (_, d) in SECTIONS.items()}}


def normalize(obj) -> dict:
    """Accept a bare facts object or a whole `--json` report; return a complete facts dict."""
    if not isinstance(obj, dict):
        raise FactsError("expected a JSON object (a `qdoctor check --json` output or a facts object)")
    if "facts" in obj and isinstance(obj.get("facts"), dict):
        obj = obj["facts"]
    schema = obj.get("schema")
    if schema is not None and not (isinstance(schema, str) and schema.startswith("qdoctor.facts/")):
        raise FactsError(f"not a qdoctor facts snapshot (schema is {schema!r}, expected {FACTS_SCHEMA!r})")
    if schema is None and not any(k in obj for k in SECTIONS):
        raise FactsError("not a qdoctor facts snapshot (no schema and none of the known sections)")
    out = dict(obj)
    out["schema"] = schema or FACTS_SCHEMA
    for key, (typ, default) in SECTIONS.items():
        val = out.get(key)
        if val is None:
            out[key] = default.copy()
        elif not isinstance(val, typ):
            raise FactsError(f"facts key {key!r} must be a JSON {'object' if typ is dict else 'array'}, "
                             f"got {type(val).__name__}")
    gpus = out["nvidia"].get("gpus")
    if gpus is not None and not (isinstance(gpus, list) and all(isinstance(g, dict) for g in gpus)):
        raise FactsError("facts key 'nvidia.gpus' must be an array of objects")
    return out


def extract_snapshot(text: str) -> str | None:
    """The JSON of a markdown report: `qdoctor report`'s `qdoctor-snapshot` block, or the facts block of
    `check --format markdown`. None when the text holds neither."""
    for start in (SNAPSHOT_FENCE, "<details><summary>facts</summary>\n\n```json"):
        i = text.find(start)
        if i < 0:
            continue
        i = text.find("\n", i + len(start) - 1) + 1
        j = text.find("\n```", i)
        if j >= i > 0:
            return text[i:j]
    return None


def load_file(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as e:
        raise FactsError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise FactsError(f"{path} is not a UTF-8 text file") from None
    embedded = extract_snapshot(text) if not text.lstrip().startswith(("{", "[")) else None
    try:
        obj = json.loads(embedded if embedded is not None else text)
    except json.JSONDecodeError as e:
        what = "its embedded snapshot is not" if embedded is not None else "is not"
        raise FactsError(f"{path} {what} valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    try:
        return normalize(obj)
    except FactsError as e:
        raise FactsError(f"{path}: {e}") from None
