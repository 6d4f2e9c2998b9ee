"""Build a random-init Llama-shaped model (about 1.1B params, TinyLlama's shape) and save it locally in bf16.

For the H200 validation run of `qdoctor train` (no download needed):

    python scripts/make_random_model.py --out /tmp/rand-1b
    qdoctor train --model /tmp/rand-1b --max-steps 300 --output /tmp/run-1b --json

The tokenizer saved with it is qdoctor's embedded one, so the embedded dataset trains it; vocab_size is
32000 (as TinyLlama) so the embedding/logits cost is realistic, ids above the tokenizer's 512 are unused.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qdoctor.train.model import assets_dir

    t0 = time.time()
    torch.manual_seed(a.seed)
    cfg = LlamaConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    out = Path(a.out)
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(assets_dir() / f, out / f)
    print(f"saved {n / 1e9:.3f}B params (bf16) to {out} in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
