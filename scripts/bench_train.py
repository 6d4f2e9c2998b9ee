"""Side-by-side training throughput and memory: qdoctor's training path vs a plain loop vs Unsloth.

One invocation, one machine: for each model shape it builds a random-init Llama
(scripts/make_random_model.py), then runs each contender in its own process on the same tokens and
effective batch, and writes bench/results/<device>-<date>.json (commands, versions, tok/s, peak GPU
memory, model FLOP utilisation, first/last losses) and prints a table last.

    python scripts/bench_train.py --peers DIR [--models 1b,7b] [--shapes 8x1024,2x4096]
                                  [--variants lean,liger] [--contenders qdoctor,plain,unsloth]

DIR holds the peer loops (plain_loop.py, unsloth_loop.py): measuring instruments kept outside this
repository. Unsloth runs when it imports. qdoctor's contender runs in-process through the same functions
`qdoctor train` uses (config -> plan -> load_for_training -> loop.train_step), on the peers' tokens.

Variants of qdoctor's path (comma-separated, each its own process):
  plan      what `qdoctor train` chooses by itself for this shape
  prep      + peft's prepare_model_for_kbit_training (fp32 norms/embeddings; what it did before)
  lean      no fp32 upcast, no fused kernels
  liger     lean + liger-kernel (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy)
  compile   lean + torch.compile of each decoder layer
  liger+compile
  flce+compile  lean + liger's fused linear cross-entropy only, the rest left to torch.compile
  +flex     (suffix) attn_implementation="flex_attention"
  plan-pertensor  the plan, but the optimizer steps each LoRA tensor (not optim.FlatParams' one buffer)
  plan-dense  the plan, but SDPA with a dense document mask for packed rows instead of varlen attention
  plan-keep  the plan, but the compiled layers keep the partitioner's default cut (speed.RECOMPUTE_POINTWISE
            empty: pointwise outputs kept for backward, not recomputed)
  plan-mat  the plan, lifting only the partitioner's ban_recompute_materialized_backward (on CPU the same
            bytes kept as lifting all three, with fewer ops recomputed; not yet measured on a GPU)
  plan-ambNN  the plan with torch._functorch.config.activation_memory_budget = 0.NN for the compiled layers
  plan-nocg  the plan, but its compiled layers run without CUDA graphs (speed.uses_cudagraphs false: one
            launch per kernel and library call, as before session 6)
  ckpt      the plan with gradient checkpointing on (layer inputs on the GPU)
  offload   the plan with gradient checkpointing "offload" (layer inputs in pinned host memory)
The model runs in training mode, as loop.fit runs it (liger's fused loss skips the logits only there).
Packed shapes (seq > 1024) are fed as documents of 256-2048 tokens packed into full rows, as qdoctor's
packing lays them out, so its document-masked attention is what is timed (the peers attend across the
whole row).

--embedded also runs `qdoctor train` end to end on the embedded tiny model (what a first-time user runs)
and records wall time, tokens/s and the per-step time, which on a tiny model is host overhead.
--maxseq N,N runs one step at micro-batch 1 at each length with each contender's memory-saving mode (qdoctor
once per --maxseq-variants mode: ckpt, offload), reports the longest length that trained and the shortest
that ran out of memory, and fits a line through the peaks to the GPU's memory (or the cap); lengths may differ
per contender ("plain=N,N;ckpt=N,N;offload=N,N"). --mem-cap GIB runs every contender with its GPU memory
capped (torch.cuda.set_per_process_memory_fraction; the peers through scripts/mem_cap.py).
--snapshot breaks down qdoctor's peak by allocation site.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {
    "1b": [],
    "7b": ["--hidden", "4096", "--intermediate", "11008", "--layers", "32", "--heads", "32",
           "--kv-heads", "32"],
}
MEM_CAP = str(ROOT / "scripts" / "mem_cap.py")
EXPECT = "_expect_seqs"  # a run's lengths, so that those its process never reported are recorded as failed
H200_BF16_TFLOPS = 989.5  # dense bf16 peak of an H100/H200 SXM (NVIDIA's H200 datasheet)


def _json_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def _run(cmd: list[str], timeout: float, env=None) -> tuple[list[dict], str, float]:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        text = p.stdout + "\n" + p.stderr
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        text += "\nTIMEOUT"
    return _json_lines(text), text, time.perf_counter() - t0


def versions() -> dict:
    code = (
        "import json,importlib.metadata as m\n"
        "out={}\n"
        "for n in ['torch','transformers','peft','bitsandbytes','accelerate','triton',\n"
        "          'liger-kernel','unsloth']:\n"
        "    try: out[n]=m.version(n)\n"
        "    except Exception: out[n]=None\n"
        "import torch\n"
        "out['gpu']=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None\n"
        "print(json.dumps(out))\n"
    )
    recs, _, _ = _run([sys.executable, "-c", code], 120)
    return recs[0] if recs else {}


def model_flops_per_token(cfg: dict, seq: int) -> float:
    """LoRA on a frozen base: forward (2N) + input gradients (2N) per token, plus causal attention."""
    h, i, n_layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hd = h // heads
    linear = n_layers * (h * (heads * hd) * 2 + h * (kv * hd) * 2 + 3 * h * i) + h * cfg["vocab_size"]
    attn = n_layers * 2 * seq * h  # QK^T and AV, causal half, forward; x2 for backward below
    return 4 * linear + 2 * attn * 2


# ---------------------------------------------------------------------------------------------- worker


def _batches(shape: str, vocab: int, steps: int, seed: int = 0):
    """The peers' tokens: torch.randint(0, min(V, 512), (bs, seq), generator seeded 0 on cuda), one
    batch per step. Packed shapes (seq > 1024): the same stream cut into documents of 256-2048 tokens,
    as data.pack lays them out (position ids restarting at each document, its first label ignored)."""
    import random

    import torch

    from qdoctor.train.data import IGNORE

    bs, seq = (int(v) for v in shape.split("x"))
    g = torch.Generator(device="cuda").manual_seed(seed)
    rng = random.Random(seed)
    out = []
    for _ in range(steps):
        x = torch.randint(0, min(vocab, 512), (bs, seq), device="cuda", generator=g).cpu().tolist()
        rows = []
        for row in x:
            if seq <= 1024 or bs == 1:
                rows.append((row, list(row)))
                continue
            labels, pos, start = list(row), [], 0
            while start < seq:
                n = min(rng.randint(256, 2048), seq - start)
                labels[start] = IGNORE
                pos += range(n)
                start += n
            rows.append((row, labels, pos))
        out.append(rows)
    return out


def peak_breakdown(snap: dict, top: int = 25) -> dict:
    """What is allocated at the peak of a recorded step (torch.cuda.memory._snapshot()), grouped by the
    innermost frame outside torch itself: replays the allocation trace to its maximum, then again to there."""
    trace = (snap.get("device_traces") or [[]])[0]

    def replay(stop=None):
        live, total, best, best_i = {}, 0, 0, -1
        for i, ev in enumerate(trace):
            if stop is not None and i > stop:
                break
            act, addr = ev.get("action"), ev.get("addr")
            if act == "alloc":
                live[addr] = ev
                total += ev.get("size", 0)
                if total > best:
                    best, best_i = total, i
            elif act == "free_completed" and addr in live:
                total -= live.pop(addr).get("size", 0)
        return live, best, best_i

    _, best, best_i = replay()
    at_peak, _, _ = replay(best_i)

    def where(frames) -> str:
        for f in frames:
            fn = f.get("filename", "")
            if fn.endswith(".py") and "/torch/" not in fn:
                return f"{fn.rsplit('/', 2)[-2]}/{fn.rsplit('/', 1)[-1]}:{f.get('line')} {f.get('name')}"
        return "torch internals"

    groups: dict = {}
    for ev in at_peak.values():
        k = where(ev.get("frames") or [])
        n, size = groups.get(k, (0, 0))
        groups[k] = (n + 1, size + ev.get("size", 0))
    rows = sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]
    return {"peak_traced_gib": round(best / 2**30, 3),
            "groups": [{"where": k, "tensors": n, "gib": round(v / 2**30, 3)} for k, (n, v) in rows]}


def capped_facts(facts: dict, cap_gib: float) -> dict:
    """The facts as the plan should see them under --mem-cap: every GPU with `cap_gib` total and free."""
    import copy

    out = copy.deepcopy(facts)
    for g in (out.get("nvidia") or {}).get("gpus") or []:
        g["memory_total_mib"] = g["memory_free_mib"] = int(cap_gib * 1024)
    return out


def _is_oom(e: BaseException) -> bool:
    return type(e).__name__ == "OutOfMemoryError" or _text_is_oom(str(e))


def _text_is_oom(text: str) -> bool:
    """A process's output says it ran out of GPU memory (torch.OutOfMemoryError, or CUDA's own message)."""
    return "OutOfMemoryError" in text or "out of memory" in text.lower()


def _host_pinned_peak_gib() -> float | None:
    """Peak pinned host memory held by torch's host allocator (rounded blocks), where torch reports it."""
    import torch

    try:
        stats = torch.cuda.host_memory_stats()
    except Exception:
        return None
    peak = next((v for k, v in stats.items() if k.startswith("allocated_bytes") and k.endswith("peak")), None)
    return round(peak / 2**30, 2) if peak is not None else None


def _free_host_cache() -> None:
    """Give cached pinned blocks back: each length rounds to other power-of-two sizes, and the cache would
    otherwise keep every length's blocks."""
    import torch

    fn = getattr(torch._C, "_host_emptyCache", None)
    if fn is not None:
        fn()
    if hasattr(torch.cuda, "reset_peak_host_memory_stats"):
        torch.cuda.reset_peak_host_memory_stats()


def worker(a) -> None:
    """qdoctor's training path on the peers' tokens; prints one JSON line per shape. Under --mem-cap the
    process's GPU memory is capped (scripts/mem_cap.py) and the plan sees the cap as the GPU's size. A shape
    that fails (out of memory) is recorded and the next one runs: memory is freed, and the model is
    reloaded if memory stays held; if CUDA itself is unusable, the remaining shapes are recorded as
    skipped."""
    import gc

    import torch

    variant = a.variant
    from qdoctor.facts import collect
    from qdoctor.train import loop, offload, optim, speed
    from qdoctor.train import model as M
    from qdoctor.train import plan as P
    from qdoctor.train.config import TrainConfig
    from qdoctor.train.memory import shape_from_config

    cap_fraction = None
    if a.mem_cap:
        import mem_cap  # scripts/, next to this file

        cap_fraction = mem_cap.apply(a.mem_cap)
    mcfg = json.loads((Path(a.model) / "config.json").read_text())
    facts = collect()
    if a.mem_cap:
        facts = capped_facts(facts, a.mem_cap)
    results = []
    model, loaded_ckpt, broken = None, None, None
    shapes = a.shapes.split(",")
    for shape in shapes:
        bs, seq = (int(v) for v in shape.split("x"))
        if broken:
            rec = {"contender": "qdoctor", "variant": variant, "bs": bs, "seq": seq,
                   "error": f"skipped: CUDA unusable after an earlier failure ({broken})"}
            print(json.dumps(rec), flush=True)
            continue
        packed = seq > 1024 and bs > 1  # micro-batch 1 rows (the longest-sequence runs) are one document
        planned = variant.startswith("plan") or variant in ("ckpt", "offload")
        amb = re.search(r"amb(\d+)", variant)
        if amb:  # read when the compiled layers first run
            import torch._functorch.config as fconfig

            fconfig.activation_memory_budget = int(amb.group(1)) / 100
        if "keep" in variant.split("-"):  # a fresh process: the partitioner's defaults stand
            speed.RECOMPUTE_POINTWISE = {}
        elif "mat" in variant.split("-"):
            speed.RECOMPUTE_POINTWISE = {"ban_recompute_materialized_backward": False}
        if "nocg" in variant.split("-"):  # read when the layers compile and at each forward
            speed.uses_cudagraphs = lambda plan: False
        ckpt = {"ckpt": "on", "offload": "offload"}.get(variant, "auto" if planned else "off")
        cfg = TrainConfig(
            model=a.model, batch_size=bs, micro_batch=bs, seq_len=seq, packing=packed, lr=2e-4, lora_r=16,
            lora_alpha=32, lora_dropout=0.0, warmup_steps=0, max_grad_norm=1e9, device="cuda:0",
            dtype="bf16", quantization="nf4", optimizer="paged_adamw_8bit",
            gradient_checkpointing=ckpt,
            fused_loss="auto" if planned else "none",
            compile="auto" if planned else "off",
            attention="sdpa" if "dense" in variant else "auto",
        )
        src = M.resolve(a.model)
        hf_cfg = M.load_config(src)
        plan = P.make_plan(cfg, facts, [], shape=shape_from_config(hf_cfg), model_name=a.model,
                           embedded=False, n_train=10_000, max_len=seq, model_type=mcfg["model_type"])
        if "flex" in variant:
            plan.attention.value = "flex_attention"
        if model is not None and plan.gradient_checkpointing.value != loaded_ckpt:
            model = None  # checkpointing is set when the model loads: load it again the way this plan says
            gc.collect()
            torch.cuda.empty_cache()
        if model is None:
            t0 = time.perf_counter()
            model, _ = M.load_for_training(src, plan, 0)
            if "liger" in variant:
                speed.apply_liger(model, mcfg["model_type"])
            elif "flce" in variant:
                speed.apply_liger(model, mcfg["model_type"], parts=("fused_linear_cross_entropy",))
            if "compile" in variant:
                speed.compile_layers(model)
            load_s = time.perf_counter() - t0
            loaded_ckpt = plan.gradient_checkpointing.value
            init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            loaded_gib = torch.cuda.memory_allocated() / 2**30
        else:  # one load per process: each later shape gets the attention its own plan chose
            want = M._attn_implementation(plan)
            if model.config._attn_implementation != want:
                model.set_attn_implementation(want)
                if want == speed.VARLEN and speed.varlen_self_check("cuda:0", torch.bfloat16):
                    model.set_attn_implementation("sdpa")
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(init[n])
        opt = optim.build("paged_adamw_8bit", model.parameters(), 2e-4, 0.0,
                          flat=planned and "pertensor" not in variant)  # as qdoctor train does
        sched = torch.optim.lr_scheduler.LambdaLR(opt, optim.schedule(0))
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        run = loop.Run(model, opt, sched, scaler, [], [], plan, Path("."), 0, 2, "cuda:0", torch.bfloat16,
                       log=lambda m: print(m, file=sys.stderr), micro=bs)
        batches = _batches(shape, mcfg["vocab_size"], a.warm + a.steps)
        stats = offload.stats_of(model)
        if stats is not None:
            stats.reset()
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        losses, err, oom, moved = [], None, False, None
        model.train()  # as loop.fit does: liger's fused loss skips the logits only in training mode
        try:
            for i, ex in enumerate(batches):
                if i == a.warm:
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                loss, _ = loop.train_step(run, ex, bs, 1)
                losses.append(loss)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            moved = (stats.tensors, stats.bytes) if stats else None
            if a.snapshot and err is None:  # one more step, recorded allocation by allocation
                torch.cuda.memory._record_memory_history(max_entries=400_000, stacks="python")
                loop.train_step(run, batches[-1], bs, 1)
                torch.cuda.synchronize()
                snap = torch.cuda.memory._snapshot()
                torch.cuda.memory._record_memory_history(enabled=None)
                print(json.dumps({"breakdown": peak_breakdown(snap), "shape": shape}), flush=True)
        except Exception as e:  # report it and go on with the next shape
            import traceback

            traceback.print_exc()
            err, oom = repr(e)[:300], _is_oom(e)
            moved = (stats.tensors, stats.bytes) if stats else None
        rec = {"contender": "qdoctor", "variant": variant, "bs": bs, "seq": seq, "packed": packed,
               "plan_fused_loss": plan.fused_loss.value, "plan_compile": plan.compile.value,
               "plan_attention": model.config._attn_implementation,
               "load_s": round(load_s, 1),
               "plan_estimate_gib": round(plan.memory.estimate.total_gib, 2),
               "plan_checkpointing": plan.gradient_checkpointing.value,
               "ran_checkpointing": loaded_ckpt,
               "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        if cap_fraction is not None:
            rec.update({"mem_cap_gib": a.mem_cap, "mem_cap_fraction": round(cap_fraction, 4)})
        if speed.uses_cudagraphs(plan):  # graphs inductor declined to replay (CPU inputs, mutations...)
            from torch._dynamo.utils import counters

            rec["cudagraph_skips"] = int(counters["inductor"].get("cudagraph_skips", 0))
        if loaded_ckpt == "offload":
            done = max(1, len(losses))  # steps whose layer inputs were moved (a failed one: what it moved)
            rec.update({"plan_host_gib": round(plan.memory.estimate.host_gib, 2),
                        "host_offloaded_gib_per_step": round(moved[1] / done / 2**30, 2) if moved else None,
                        "host_offloaded_tensors_per_step": moved[0] // done if moved else None,
                        "pinned_host_peak_gib": _host_pinned_peak_gib()})
        if err is None:
            rec.update({"tok_s": round(bs * seq * a.steps / dt), "step_s": round(dt / a.steps, 4),
                        "loss0": round(losses[0], 4), "lossN": round(losses[-1], 4)})
        else:
            rec.update({"error": err, "oom": oom})
        del opt, run, batches
        model.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
        _free_host_cache()
        if err is not None:  # is the process still fit for the next shape?
            try:
                torch.ones(1, device="cuda").sum().item()
                held = torch.cuda.memory_allocated() / 2**30
                rec["allocated_after_gib"] = round(held, 2)
                if held > loaded_gib + 0.5:  # something of the failed step stayed: start from a fresh load
                    rec["reloaded"] = True
                    model = None
                    gc.collect()
                    torch.cuda.empty_cache()
            except Exception as e2:
                broken = repr(e2)[:200]
        print(json.dumps(rec), flush=True)
        results.append(rec)


# ---------------------------------------------------------------------------------------------- driver


def make_model(name: str, workdir: Path) -> Path:
    out = workdir / f"rand-{name}"
    if not (out / "config.json").is_file():
        cmd = [sys.executable, str(ROOT / "scripts" / "make_random_model.py"), "--out", str(out),
               *SHAPES[name]]
        recs, text, dt = _run(cmd, 600)
        if not (out / "config.json").is_file():
            raise SystemExit(f"could not build the {name} model:\n{text[-2000:]}")
        print(f"[bench] built {name} in {dt:.0f} s", file=sys.stderr, flush=True)
    return out


def embedded_run(workdir: Path, env: dict, timeout: float) -> dict:
    """`qdoctor train` with no model or data, end to end (pre-flight probes skipped)."""
    import shutil
    import statistics

    out = workdir / "embedded-run"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "qdoctor", "train", "--skip-probes", "--json", "--output", str(out)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    dt = time.perf_counter() - t0
    rec = {"contender": "qdoctor", "variant": "embedded", "model": "embedded", "command": "qdoctor train "
           "--skip-probes --json", "process_s": round(dt, 1)}
    try:
        summ = json.loads(p.stdout)
    except ValueError:
        rec["error"] = (p.stdout + p.stderr)[-600:]
        return rec
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    per_step = [s["tokens"] / s["tokens_per_s"] for s in steps if s.get("tokens_per_s")]
    rec.update({"status": summ["status"], "steps": summ["steps"], "tok_s": round(summ["tokens_per_s"] or 0),
                "wall_s": summ["wall_time_s"], "median_step_s": round(statistics.median(per_step), 4),
                "first_loss": summ["first_loss"], "final_loss": summ["final_loss"],
                "timings": summ.get("timings")})
    return rec


def gpu_total_gib() -> float | None:
    code = "import torch;print(torch.cuda.mem_get_info()[1] / 2**30 if torch.cuda.is_available() else '')"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    try:
        return float(p.stdout.strip())
    except ValueError:
        return None


def maxseq_lengths(spec: str) -> dict[str, list[int]]:
    """--maxseq: "N,N,.." for every contender, or per contender "KEY=N,N;KEY=N,N" (KEY: plain, unsloth,
    or a qdoctor --maxseq-variants name: ckpt, offload, ...), with an optional bare "N,N" for the others."""
    out: dict[str, list[int]] = {}
    for part in (p.strip() for p in spec.split(";")):
        if not part:
            continue
        key, _, lens = part.rpartition("=")
        try:
            out[key.strip()] = [int(n) for n in lens.split(",") if n.strip()]
        except ValueError:
            raise SystemExit(f"--maxseq: {part!r} is not KEY=N,N,.. or N,N,..") from None
    return out


def lengths_for(lens: dict[str, list[int]], key: str) -> list[int]:
    return lens.get(key, lens.get("", []))


def maxseq_key(r: dict) -> str:
    """Which line of the longest-sequence summary a record belongs to: the contender, and for qdoctor the
    checkpointing mode when it is not plain checkpointing ("qdoctor-offload")."""
    mode = r.get("maxseq_mode")
    return r["contender"] if mode in (None, "ckpt") or r["contender"] != "qdoctor" else f"qdoctor-{mode}"


def longest_sequences(records: list[dict], total_gib: float | None, cap_gib: float | None = None) -> dict:
    """Per model and contender (qdoctor once per checkpointing mode): the --maxseq lengths that trained, the
    longest of them and the shortest that ran out of memory (a measured bracket around the longest that
    fits), the lengths that failed otherwise, and the length where a least-squares line through the
    measured peaks (peak = a + b x seq; activations and attention grow linearly with flash attention and
    checkpointing) reaches the memory cap, or the GPU's memory without one. The line is a prediction from
    measured points, labelled as such."""
    out: dict = {}
    for r in records:
        if r.get("variant") != "maxseq" or r.get("seq") is None:
            continue
        out.setdefault(r["model"], {}).setdefault(maxseq_key(r), []).append(r)
    limit = cap_gib or total_gib
    res: dict = {}
    for m, per in out.items():
        for c, rs in per.items():
            ok = sorted((r["seq"], r["peak_gib"]) for r in rs if r.get("tok_s") and r.get("peak_gib"))
            oom = sorted(r["seq"] for r in rs if r.get("error") and r.get("oom"))
            other = sorted(r["seq"] for r in rs if r.get("error") and not r.get("oom"))
            longest = ok[-1][0] if ok else None
            fit = {"trained": [s for s, _ in ok], "longest_trained": longest, "peaks_gib": [p for _, p in ok],
                   "shortest_oom": oom[0] if oom else None, "failed_otherwise": other}
            if cap_gib:
                fit["mem_cap_gib"] = cap_gib
            if longest is not None and oom and oom[0] < longest:
                fit["note"] = (f"ran out of memory at {oom[0]} but trained at {longest}: not monotone "
                               "(fragmentation or another process), the bracket is not clean")
            if len(ok) >= 2 and limit:
                n = len(ok)
                mx = sum(s for s, _ in ok) / n
                my = sum(p for _, p in ok) / n
                sxx = sum((s - mx) ** 2 for s, _ in ok)
                b = sum((s - mx) * (p - my) for s, p in ok) / sxx if sxx else 0.0
                a0 = my - b * mx
                fit.update({"gib_per_1k_tokens": round(b * 1024, 3), "intercept_gib": round(a0, 2),
                            "predicted_to_gib": round(limit, 1),
                            "predicted_longest": int((limit - a0) / b) if b > 0 else None})
                if total_gib:
                    fit["gpu_total_gib"] = round(total_gib, 1)
            res.setdefault(m, {})[c] = fit
    return res


def missing_records(recs: list[dict], expect: list[int] | None, text: str) -> list[dict]:
    """Records for the lengths a worker was given but never reported (its process died or timed out). Not
    counted as out of GPU memory: a killed process says nothing about the GPU (the host may have run out)."""
    have = {r.get("seq") for r in recs}
    return [{"bs": 1, "seq": n, "error": f"no record: the process ended first ({text[-300:]})", "oom": False}
            for n in expect or [] if n not in have]


def build_runs(a, mdir: Path, unsloth: bool) -> list[tuple[str, str, list[str], dict]]:
    """The processes to run for one model: (contender, variant, command, fields every record of it gets).
    Under --mem-cap qdoctor's worker caps itself; a peer runs through scripts/mem_cap.py, unchanged."""
    cap = ["--mem-cap", str(a.mem_cap)] if a.mem_cap else []

    def peer(script: str, *args: str) -> list[str]:
        path = str(Path(a.peers) / script)
        return [sys.executable, *([MEM_CAP, str(a.mem_cap)] if a.mem_cap else []), path, *args]

    def worker(variant: str, shapes: str, steps: str, warm: str) -> list[str]:
        return [sys.executable, __file__, "--worker", "--model", str(mdir), "--variant", variant, "--shapes",
                shapes, "--steps", steps, "--warm", warm, *cap]

    runs = []
    for c in a.contenders.split(",") if a.shapes not in ("", "none") else []:
        if c == "qdoctor":
            for v in a.variants.split(","):
                runs.append((c, v, worker(v, a.shapes, str(a.steps), str(a.warm))
                             + (["--snapshot"] if a.snapshot else []), {}))
        elif c == "plain" and a.peers:
            for shape in a.shapes.split(","):
                bs, seq = shape.split("x")
                cmd = peer("plain_loop.py", str(mdir), "--bs", bs, "--seq", seq, "--gc", "0", "--prep", "0",
                           "--steps", str(a.steps), "--warm", str(a.warm))
                runs.append((c, "lean", cmd, {"bs": int(bs), "seq": int(seq)}))
        elif c == "unsloth" and a.peers and unsloth:
            runs.append((c, "gc0", peer("unsloth_loop.py", str(mdir), "--gc", "0", "--shapes", a.shapes,
                                        "--steps", str(a.steps), "--warm", str(a.warm)), {}))
    if not a.maxseq:
        return runs
    lens = maxseq_lengths(a.maxseq)

    def ms(key):
        return ",".join(f"1x{n}" for n in lengths_for(lens, key))

    for c in a.contenders.split(","):
        if c == "qdoctor":
            for v in a.maxseq_variants.split(","):
                if ms(v):
                    runs.append((c, "maxseq", worker(v, ms(v), "1", "0"),
                                 {"maxseq_mode": v, EXPECT: lengths_for(lens, v)}))
        elif c == "plain" and a.peers:
            for n in lengths_for(lens, "plain"):
                cmd = peer("plain_loop.py", str(mdir), "--bs", "1", "--seq", str(n), "--gc", "1",
                           "--prep", "0", "--steps", "1", "--warm", "0")
                runs.append((c, "maxseq", cmd, {"maxseq_mode": "gc1", "bs": 1, "seq": n}))
        elif c == "unsloth" and a.peers and unsloth and ms("unsloth"):
            runs.append((c, "maxseq", peer("unsloth_loop.py", str(mdir), "--gc", "unsloth", "--shapes",
                                           ms("unsloth"), "--steps", "1", "--warm", "0"),
                         {"maxseq_mode": "unsloth"}))
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="lean", help=argparse.SUPPRESS)
    ap.add_argument("--snapshot", action="store_true",
                    help="qdoctor's contender: also break down what is allocated at the peak of one step")
    ap.add_argument("--models", default="1b")
    ap.add_argument("--shapes", default="8x1024,2x4096", help="'none': only --maxseq / --embedded")
    ap.add_argument("--contenders", default="plain,unsloth,qdoctor")
    ap.add_argument("--variants", default="plan")
    ap.add_argument("--peers", default=None, help="folder with plain_loop.py and unsloth_loop.py")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/qbench")
    ap.add_argument("--out", default=None)
    ap.add_argument("--timeout", type=float, default=400)
    ap.add_argument("--embedded", action="store_true", help="also time `qdoctor train` on the embedded model")
    ap.add_argument("--maxseq", default=None, metavar="N,N,..|KEY=N,N;KEY=N,N",
                    help="also one step at micro-batch 1 at each sequence length, with each contender's "
                         "memory-saving mode (checkpointing; Unsloth's offloaded one), and the longest "
                         "sequence that fits: measured (longest trained, shortest out of memory) and from a "
                         "line through the measured peaks. Per contender: plain=..;ckpt=..;offload=..")
    ap.add_argument("--maxseq-variants", default="ckpt", metavar="ckpt,offload",
                    help="qdoctor's checkpointing modes for --maxseq: ckpt (layer inputs on the GPU), "
                         "offload (layer inputs in pinned host memory); one process each")
    ap.add_argument("--mem-cap", type=float, default=None, metavar="GIB",
                    help="cap every contender's GPU memory at GIB (torch.cuda.set_per_process_memory_"
                         "fraction; the peers through scripts/mem_cap.py); --maxseq then predicts to the cap")
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return

    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    vers = versions()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    records, breakdowns = [], []
    for name in a.models.split(","):
        mdir = make_model(name, workdir)
        mcfg = json.loads((mdir / "config.json").read_text())
        runs = build_runs(a, mdir, bool(vers.get("unsloth")))
        for c, v, cmd, meta in runs:
            recs, text, dt = _run(cmd, a.timeout, env)
            meta = dict(meta)
            expect = meta.pop(EXPECT, None)
            if not recs:
                recs = [{"error": text[-600:], "oom": _text_is_oom(text)}]
                print(text[-3000:], file=sys.stderr)
            recs += missing_records(recs, expect, text)
            breakdowns += [dict(r, model=name, variant=v) for r in recs if "breakdown" in r]
            recs = [r for r in recs if "breakdown" not in r]
            for r in recs:
                for k, val in meta.items():
                    r.setdefault(k, val)
                r.setdefault("contender", c)
                r["variant"] = v if v == "maxseq" else r.get("variant", v)
                r["model"] = name
                r["command"] = " ".join(Path(x).name if x == sys.executable else os.path.relpath(x, ROOT)
                                        if x in (__file__, MEM_CAP) else x for x in cmd)
                r["process_s"] = round(dt, 1)
                if a.mem_cap:
                    r.setdefault("mem_cap_gib", a.mem_cap)
                if r.get("tok_s") and r.get("seq"):
                    tflops = r["tok_s"] * model_flops_per_token(mcfg, r["seq"]) / 1e12
                    r["model_tflops"] = round(tflops, 1)
                    r["mfu"] = round(tflops / H200_BF16_TFLOPS, 3)
                records.append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
    if a.embedded:
        records.append(embedded_run(workdir, env, a.timeout))
        print(json.dumps(records[-1]), file=sys.stderr, flush=True)
    doc = {"date": time.strftime("%Y-%m-%d"), "machine": platform.node(), "versions": vers,
           "steps": a.steps, "warm": a.warm, "mem_cap_gib": a.mem_cap, "records": records,
           "longest_sequence": longest_sequences(records, gpu_total_gib(), a.mem_cap),
           "peak_breakdowns": breakdowns}
    out = Path(a.out) if a.out else ROOT / "bench" / "results" / (
        f"{(vers.get('gpu') or 'cpu').replace(' ', '-').lower()}-{doc['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {out}")
    print(f"{'model':<5} {'contender':<9} {'variant':<14} {'shape':<8} {'tok/s':>8} {'peak GiB':>9} "
          f"{'est GiB':>8} {'MFU':>6} {'loss0':>8}")
    for m, per in doc["longest_sequence"].items():
        for c, fit in per.items():
            capped = f", GPU memory capped at {a.mem_cap:g} GiB" if a.mem_cap else ""
            print(f"longest sequence, {m}, {c} (micro-batch 1, memory-saving mode{capped}): {fit}")
    for r in records:
        shape = f"{r.get('bs', '?')}x{r.get('seq', '?')}"
        print(f"{r['model']:<5} {r['contender']:<9} {r['variant']:<14} {shape:<8} "
              f"{r.get('tok_s', 'ERR')!s:>8} "
              f"{r.get('peak_gib', '')!s:>9} {r.get('plan_estimate_gib', '')!s:>8} {r.get('mfu', '')!s:>6} "
              f"{r.get('loss0', '')!s:>8}")


if __name__ == "__main__":
    main()
