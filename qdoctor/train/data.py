"""Read a JSONL dataset, tokenize it, split off a held-out set, and serve deterministic batches.

Formats, one per line: {"text"} (loss on every token), {"prompt", "completion"} (loss on the completion
only; with the tokenizer's chat template when it has one, else plain concatenation), {"messages": [...]}
(chat template; loss on the last assistant turn; turns after it are left out; a record with no assistant
turn is refused: it has nothing to learn, and usually means other role names). Batch order is a pure
function of (seed, step), so a resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
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
        if "text" not in obj and "prompt" not in obj and last_assistant(obj["messages"]) is None:
            roles = ", ".join(dict.fromkeys(m["role"] for m in obj["messages"]))
            raise DataError(
                f'dataset {path} line {n}: messages have no "assistant" turn to learn (roles: {roles})'
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


def last_assistant(msgs: list[dict]) -> int | None:
    """Index of the last assistant turn (0 is a valid index), None when there is none."""
    return max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)


def encode(row: dict, tok) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with prompt positions set to IGNORE."""
    eos = tok.eos_token or ""
    has_template = bool(getattr(tok, "chat_template", None))
    if "text" in row and isinstance(row["text"], str):
        ids = tok(row["text"] + eos, add_special_tokens=False)["input_ids"]
        return ids, list(ids)
    if "messages" in row and _valid_messages(row["messages"]):
        last = last_assistant(row["messages"])
        if last is None:
            raise DataError(f"line {row.get('_line', '?')}: messages have no assistant turn")
        msgs = row["messages"][: last + 1]  # the loss is on the last assistant turn; nothing after it
        if has_template:
            full = tok.apply_chat_template(msgs, tokenize=False)
            prompt = (
                tok.apply_chat_template(msgs[:last], tokenize=False, add_generation_prompt=True)
                if last
                else _opening_prompt(tok, full)
            )
        else:
            full = "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + eos
            prompt = "".join(f"{m['role']}: {m['content']}\n" for m in msgs[:last]) + "assistant: "
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


def _opening_prompt(tok, full: str) -> str:
    """The text before the first turn's content when the assistant speaks first: templates refuse an
    empty conversation, so the assistant header is found as what `add_generation_prompt` appends."""
    probe = [{"role": "user", "content": ""}]
    with_header = tok.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    without = tok.apply_chat_template(probe, tokenize=False)
    header = with_header[len(without):] if with_header.startswith(without) else ""
    at = full.find(header) if header else -1
    return full[: at + len(header)] if at >= 0 else ""


def _split(tok, prompt: str, full: str) -> tuple[list[int], list[int]]:
    ids = tok(full, add_special_tokens=False)["input_ids"]
    n = len(tok(prompt, add_special_tokens=False)["input_ids"]) if prompt and full.startswith(prompt) else 0
    return ids, [IGNORE] * n + ids[n:]


@dataclass
class Dataset:
    train: list[tuple[list[int], list[int]]]
    eval: list[tuple[list[int], list[int]]]
    max_len: int
    n_records: int = 0
    dropped_lines: list[int] = field(default_factory=list)  # nothing to learn within seq_len
    truncated_lines: list[int] = field(default_factory=list)  # cut to seq_len tokens
    seq_len: int = 0
    longest: int = 0  # tokens in the longest record before truncation

    def notes(self) -> list[str]:
        """What the data preparation changed, for stderr and the summary: never silent."""
        out = []
        if self.dropped_lines:
            out.append(
                f"{len(self.dropped_lines)} of {self.n_records} records dropped: no token to learn within "
                f"seq_len {self.seq_len} (empty text, or a prompt that fills it; lines "
                f"{_lines(self.dropped_lines)})"
            )
        if self.truncated_lines:
            out.append(
                f"{len(self.truncated_lines)} of {self.n_records} records cut to seq_len {self.seq_len} "
                f"tokens (the longest has {self.longest}; lines {_lines(self.truncated_lines)})"
            )
        return out

    def to_dict(self) -> dict:
        return {
            "records": self.n_records,
            "train_sequences": len(self.train),
            "eval_sequences": len(self.eval),
            "seq_len": self.seq_len,
            "dropped": len(self.dropped_lines),
            "dropped_lines": self.dropped_lines[:100],
            "truncated": len(self.truncated_lines),
            "truncated_lines": self.truncated_lines[:100],
        }


def _lines(lines: list[int], n: int = 5) -> str:
    return ", ".join(map(str, lines[:n])) + (f" and {len(lines) - n} more" if len(lines) > n else "")


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
    examples, dropped, truncated, longest = [], [], [], 0
    for r in rows:
        ids, labels = encode(r, tok)
        longest = max(longest, len(ids))
        if len(ids) > seq_len:
            ids, labels = ids[:seq_len], labels[:seq_len]
            truncated.append(r.get("_line", 0))
        if not any(x != IGNORE for x in labels[1:]):
            dropped.append(r.get("_line", 0))  # nothing to learn (once truncated)
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
    gone = set(dropped)
    truncated = [n for n in truncated if n not in gone]
    return Dataset(tr, ev, max(len(x[0]) for x in tr), len(rows), dropped, truncated, seq_len, longest)


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


def collate(examples, pad_id: int, length=None):
    """Right-pad to the longest in the micro-batch, or to `length(longest)` (compiled layers: a few fixed
    lengths, speed.row_length); returns torch tensors.

    Packed rows (ids, labels, position_ids) get position_ids and no attention_mask, which makes
    transformers mask attention per document; padding there forms a document of its own.
    """
    import torch

    n = max(len(x[0]) for x in examples)
    n = length(n) if length else n
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
