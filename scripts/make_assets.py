"""Build the embedded default's data files in qdoctor/assets/ (reproducible: fixed seed, no network).

    python scripts/make_assets.py          # rewrites qdoctor/assets/{instructions.jsonl,tokenizer.json,...}

The dataset is synthetic on purpose: short prompt/completion pairs with learnable patterns (arithmetic,
word reversal, capitals of invented countries, copying, upper-casing), so a tiny random-init model with
LoRA shows a clearly falling loss within a minute on two CPU cores. The tokenizer is a byte-level BPE
trained on that dataset only (small vocabulary keeps the embedding and the logits cheap).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "qdoctor" / "assets"
SEED = 1234
N_EXAMPLES = 600
VOCAB_SIZE = 512

WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "tiger",
    "lemon",
    "piano",
    "garden",
    "silver",
    "rocket",
    "candle",
    "forest",
    "window",
    "yellow",
    "bridge",
    "planet",
    "marble",
    "orange",
    "castle",
    "dragon",
    "butter",
    "spider",
    "winter",
    "summer",
    "mirror",
    "pencil",
]
# Invented places, so no real-world knowledge is implied; the mapping is fixed and learnable.
CAPITALS = {
    "Veloria": "Quenby",
    "Ostrand": "Malvik",
    "Pellucia": "Tarrow",
    "Zembra": "Ulmet",
    "Caradoc": "Feyne",
    "Morvath": "Glent",
    "Isquen": "Dorra",
    "Thalmor": "Brisk",
    "Ankeru": "Solvey",
    "Rusk": "Emberly",
    "Lorendi": "Hask",
    "Vayne": "Corrow",
}
SPECIAL = ["<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def example(rng: random.Random) -> dict:
    kind = rng.choice(["add", "sub", "reverse", "capital", "copy", "upper"])
    if kind == "add":
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        return {"prompt": f"What is {a} plus {b}?", "completion": str(a + b)}
    if kind == "sub":
        a = rng.randint(10, 60)
        b = rng.randint(0, a)
        return {"prompt": f"What is {a} minus {b}?", "completion": str(a - b)}
    if kind == "reverse":
        w = rng.choice(WORDS)
        return {"prompt": f"Reverse the word {w}.", "completion": w[::-1]}
    if kind == "capital":
        c = rng.choice(sorted(CAPITALS))
        return {
            "prompt": f"What is the capital of {c}?",
            "completion": f"The capital of {c} is {CAPITALS[c]}.",
        }
    if kind == "copy":
        ws = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4)))
        return {"prompt": f"Repeat after me: {ws}", "completion": ws}
    w = rng.choice(WORDS)
    return {"prompt": f"Write {w} in capitals.", "completion": w.upper()}


def build_dataset() -> list[dict]:
    rng = random.Random(SEED)
    return [example(rng) for _ in range(N_EXAMPLES)]


def build_tokenizer(rows: list[dict]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = [r["prompt"] + "\n" + r["completion"] for r in rows] + [CHAT_TEMPLATE]
    tok.train_from_iterator(texts, trainer)
    return tok


def main() -> None:
    rows = build_dataset()
    ASSETS.mkdir(parents=True, exist_ok=True)
    with open(ASSETS / "instructions.jsonl", "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    tok = build_tokenizer(rows)
    tok.save(str(ASSETS / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "model_max_length": 256,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }
    (ASSETS / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (ASSETS / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, indent=2) + "\n"
    )
    vocab = tok.get_vocab_size()
    model_cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": 128,
        "intermediate_size": 352,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "bos_token_id": tok.token_to_id("<s>"),
        "eos_token_id": tok.token_to_id("</s>"),
        "pad_token_id": tok.token_to_id("<pad>"),
        "dtype": "float32",
    }
    (ASSETS / "tiny-llama.json").write_text(json.dumps(model_cfg, indent=2) + "\n")
    print(f"wrote {len(rows)} examples, vocab {vocab}, to {ASSETS}")


if __name__ == "__main__":
    main()
