"""The model `check --model` judges: its config.json, from a local directory or the Hugging Face cache.

Nothing is downloaded: a hub id is looked up in the cache (HF_HUB_CACHE, HF_HOME/hub, or
~/.cache/huggingface/hub: models--org--name/snapshots/<rev>/config.json, the revision refs/main names
first). The shape comes from train's estimator module, so `check` and `train --dry-run` agree.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import asdict


class ModelNotFound(ValueError):
    """A one-line message: where the config was looked for."""


def hub_cache(environ) -> str:
    if environ.get("HF_HUB_CACHE"):
        return environ["HF_HUB_CACHE"]
    if environ.get("HF_HOME"):
        return os.path.join(environ["HF_HOME"], "hub")
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "huggingface", "hub")


def find_config(model: str, environ=None) -> str:
    """Path of config.json for a local directory or a cached hub id; ModelNotFound otherwise."""
    environ = os.environ if environ is None else environ
    if os.path.isdir(model):
        path = os.path.join(model, "config.json")
        if os.path.isfile(path):
            return path
        raise ModelNotFound(f"{model} is a directory without config.json")
    if os.path.isfile(model) and model.endswith(".json"):
        return model
    cache = hub_cache(environ)
    repo = os.path.join(cache, "models--" + model.replace("/", "--"))
    ref = os.path.join(repo, "refs", "main")
    if os.path.isfile(ref):
        with open(ref, encoding="utf-8") as fh:
            path = os.path.join(repo, "snapshots", fh.read().strip(), "config.json")
        if os.path.isfile(path):
            return path
    found = sorted(glob.glob(os.path.join(repo, "snapshots", "*", "config.json")), key=os.path.getmtime)
    if found:
        return found[-1]
    raise ModelNotFound(f"no config.json for {model!r}: not a local directory, and not in the Hugging Face "
                        f"cache ({repo}); qdoctor does not download (huggingface-cli download {model} "
                        "config.json)")


def collect(model: str, environ=None) -> dict:
    """facts["model"]: where the config came from and the shape the estimator needs."""
    from qdoctor.train.memory import shape_from_config_json

    path = find_config(model, environ)
    try:
        with open(path, encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (OSError, ValueError) as e:
        raise ModelNotFound(f"cannot read {path}: {e}") from None
    if not isinstance(cfg, dict):
        raise ModelNotFound(f"{path} is not a JSON object")
    try:
        shape = shape_from_config_json(cfg)
    except ValueError as e:
        raise ModelNotFound(f"{path}: {e} (not a decoder language model qdoctor can size)") from None
    text = cfg
    for key in ("text_config", "llm_config", "language_config"):
        if "hidden_size" not in text and isinstance(text.get(key), dict):
            text = text[key]
    return {"id": model, "config_path": path, "model_type": cfg.get("model_type"),
            "architectures": cfg.get("architectures"), "shape": asdict(shape),
            "max_position_embeddings": text.get("max_position_embeddings") or text.get("n_positions"),
            "params": shape.total_params()}
