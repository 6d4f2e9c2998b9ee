"""Read a JSONL dataset, tokenize it, split off a held-out set, and serve deterministic batches.

Formats, one per line: {"text"} (loss on every token), {"prompt", "completion"} (loss on the completion
only; with the tokenizer's chat template when it has one, else plain concatenation), {"messages": [...]}
(chat template; loss on the last assistant turn). Batch order is a pure function of (seed, step), so a
resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

IGNORE = -100


class DataError(ValueError):
    """Bad dataset; one line for the user."""


def read_jsonl(path: str) -> list[dict]:
    p = Path(path)
    if not p.exists():
        raise DataError(f"dataset {path} does not exist")
    if p.is_dir():
        raise DataError(f"dataset {path} is a directory, expected a JSONL file")
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read dataset {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise DataError(f"dataset {path} is not UTF-8 text") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"dataset {path} line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"dataset {path} line {n}: expected a JSON object")
        ok = (
            isinstance(obj.get("text"), str)
            or (isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str))
            or _valid_messages(obj.get("messages"))
        )
        if not ok:
            raise DataError(
                f'dataset {path} line {n}: needs "text", "prompt"+"completion" or "messages" '
                f"(got keys: {', '.join(sorted(obj)) or 'none'})"
            )
        obj["_line"] = n
        rows.append(obj)
    if not rows:
        raise DataError(f"dataset {path} is empty")
    return rows


def _valid_messages(m) -> bool:
    return (
        isinstance(m, list)
        and len(m) >= 1
        and all(
            isinstance(x, dict) and isinstance(x.get("role"), str) and isinstance(x.get("content"), str)
            for x in m
        )
    )


def encode(row: dict, tok) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with prompt positions set to IGNORE."""
    eos = tok.eos_token or ""
    has_template = bool(getattr(tok, "chat_template", None))
    if "text" in row and isinstance(row["text"], str):
        ids = tok(row["text"] + eos, add_special_tokens=False)["input_ids"]
        return ids, list(ids)
    if "messages" in row and _valid_messages(row["messages"]):
        msgs = row["messages"]
        if has_template:
            full = tok.apply_chat_template(msgs, tokenize=False)
            last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
            prompt = (
                tok.apply_chat_template(msgs[:last], tokenize=False, add_generation_prompt=True)
                if last
                else ""
            )
        else:
            full = "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + eos
            last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
            prompt = (
                "".join(f"{m['role']}: {m['content']}\n" for m in msgs[:last]) + "assistant: " if last else ""
            )
        return _split(tok, prompt, full)
    prompt, completion = row["prompt"], row["completion"]
    if has_template:
        p = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        full = tok.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
            tokenize=False,
        )
        return _split(tok, p, full)
    return _split(tok, prompt, prompt + completion + eos)


def _split(tok, prompt: str, full: str) -> tuple[list[int], list[int]]:
    ids = tok(full, add_special_tokens=False)["input_ids"]
    n = len(tok(prompt, add_special_tokens=False)["input_ids"]) if prompt and full.startswith(prompt) else 0
    return ids, [IGNORE] * n + ids[n:]


@dataclass
class Dataset:
    train: list[tuple[list[int], list[int]]]
    eval: list[tuple[list[int], list[int]]]
    max_len: int
    n_dropped: int = 0


def build(
    rows: list[dict],
    tok,
    *,
    seq_len: int,
    eval_fraction: float,
    seed: int,
    packing: bool,
    source: str = "dataset",
) -> Dataset:
    examples, dropped = [], 0
    for r in rows:
        ids, labels = encode(r, tok)
        ids, labels = ids[:seq_len], labels[:seq_len]
        if not any(x != IGNORE for x in labels[1:]):
            dropped += 1  # nothing to learn once truncated
            continue
        examples.append((ids, labels))
    if not examples:
        raise DataError(f"{source}: no example has a completion token within seq_len={seq_len}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = int(len(examples) * eval_fraction) if len(examples) >= 10 else 0
    ev = [examples[i] for i in order[:n_eval]]
    tr = [examples[i] for i in order[n_eval:]]
    if packing:
        tr = pack(tr, seq_len)
    return Dataset(tr, ev, max(len(x[0]) for x in tr), dropped)


def pack(examples, seq_len: int):
    """Concatenate examples into full seq_len rows of (ids, labels, position_ids).

    Position ids restart at each example, so attention stays inside it: transformers turns restarting
    position ids (with no attention_mask) into a document mask (masking_utils.find_packed_sequence_indices).
    An example cut at a row's end continues in the next row with its positions continuing.
    """
    ids, labels, pos, out = [], [], [], []
    for a, b, *_ in examples:
        ids += a
        labels += [IGNORE] + b[1:]  # never predict an example's first token from the previous one
        pos += range(len(a))
        while len(ids) >= seq_len:
            out.append((ids[:seq_len], labels[:seq_len], pos[:seq_len]))
            ids, labels, pos = ids[seq_len:], labels[seq_len:], pos[seq_len:]
    if ids and any(x != IGNORE for x in labels):
        out.append((ids, labels, pos))
    return out


def step_indices(n: int, batch: int, step: int, seed: int) -> list[int]:
    """The example indices of optimizer step `step` (0-based): epochs are seeded permutations."""
    out = []
    pos = step * batch
    while len(out) < batch:
        epoch, off = divmod(pos, n)
        perm = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(perm)
        take = min(batch - len(out), n - off)
        out += perm[off : off + take]
        pos += take
    return out


def collate(examples, pad_id: int):
    """Right-pad to the longest in the micro-batch; returns torch tensors.

    Packed rows (ids, labels, position_ids) get position_ids and no attention_mask, which makes
    transformers mask attention per document; padding there forms a document of its own.
    """
    import torch

    n = max(len(x[0]) for x in examples)
    packed = all(len(x) > 2 for x in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    pos = torch.zeros((len(examples), n), dtype=torch.long)
    for i, (a, b, *p) in enumerate(examples):
        ids[i, : len(a)] = torch.tensor(a)
        labels[i, : len(b)] = torch.tensor(b)
        mask[i, : len(a)] = 1
        if packed:
            pos[i, : len(a)] = torch.tensor(p[0])
            pos[i, len(a) :] = torch.arange(n - len(a))
    if packed:
        return {"input_ids": ids, "position_ids": pos, "labels": labels}
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
