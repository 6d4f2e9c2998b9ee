"""The per-probe table for the text and markdown views: probe, status, time, peak memory, key numbers."""

from __future__ import annotations

from qdoctor.smoke.result import ProbeResult


def _g(v, fmt="{:.3g}") -> str:
    return fmt.format(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def key_numbers(r: ProbeResult) -> str:
    m = r.measurements or {}
    p = r.probe
    if r.status != "pass":
        return r.reason or ""
    if p == "imports":
        lib = m.get("bnb_library_class") or "-"
        return f"torch {m.get('torch_version') or '-'}, bnb {m.get('bitsandbytes_version') or '-'} ({lib})"
    if p == "device":
        devs = m.get("devices") or []
        return f"{len(devs)} device(s), matmul rel err {_g(m.get('rel_err'))}"
    if p == "nf4":
        f4 = "{:.4f}"
        return (f"rel err nf4 {_g(m.get('nf4_rel_err'), f4)} / +dq {_g(m.get('nf4_dq_rel_err'), f4)},"
                f" fp4 {_g(m.get('fp4_rel_err'), f4)} / +dq {_g(m.get('fp4_dq_rel_err'), f4)}")
    if p == "matmul4bit":
        return f"{m.get('compute_dtype', '-')}, rel err {_g(m.get('rel_err'))}"
    if p == "lora_step":
        return (f"{m.get('compute_dtype', '-')}, loss {_g(m.get('loss_first'), '{:.3f}')} -> "
                f"{_g(m.get('loss_last'), '{:.3f}')}, base unchanged {m.get('base_4bit_unchanged', '-')}")
    if p == "optim8bit":
        s = f"update rel err {_g(m.get('update_rel_err'))}"
        paged = m.get("paged")
        if paged == "ran":
            s += f", paged {_g(m.get('paged_update_rel_err'))}"
        elif paged:
            s += ", paged skipped"
        return s
    if p == "save_load":
        return f"max |logit diff| {_g(m.get('max_abs_diff'))}, adapter effect {_g(m.get('adapter_effect'))}"
    if p == "precision":
        scaler = " + GradScaler" if m.get("grad_scaler") else ""
        return f"{m.get('autocast_dtype', '-')}{scaler}, loss finite {m.get('loss_finite', '-')}"
    if p == "ddp":
        return (f"{m.get('world_size', '-')} processes ({m.get('backend', '-')}), all-reduce ok "
                f"{m.get('allreduce_ok', '-')}, grad diff across ranks {_g(m.get('grad_diff_across_ranks'))}")
    return ""


def rows(results: list[ProbeResult]) -> list[list[str]]:
    out = []
    for r in results:
        mem = f"{r.peak_memory_mib:.0f} MiB" if r.peak_memory_mib else "-"
        if r.peak_cuda_mib:
            mem += f" (+{r.peak_cuda_mib:.0f} GPU)"
        t = f"{r.duration_s:.1f} s" if r.status != "skip" else "-"
        out.append([r.probe, r.status, t, mem, key_numbers(r)])
    return out


HEAD = ["probe", "status", "time", "peak memory", "key numbers"]


def text_table(results: list[ProbeResult]) -> list[str]:
    data = [HEAD, *rows(results)]
    widths = [max(len(row[i]) for row in data) for i in range(4)]
    lines = []
    for row in data:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + row[4])
    return lines


def markdown_table(results: list[ProbeResult]) -> str:
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    for row in rows(results):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    return "#### probes\n\n" + "\n".join(lines)
