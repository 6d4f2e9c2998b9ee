"""Verify the compatibility matrix by running it: one isolated environment per combination of
bitsandbytes x peft x transformers x accelerate, `qdoctor check --json` and `qdoctor smoke --json` in
each, and the results in matrix/verified/<platform>.json (read by `check` and `qdoctor matrix`).

How an environment is built, and why: a venv per combination (`python -m venv --without-pip`, 0.1 s)
whose site-packages holds a `.pth` line naming a *base* directory: symlinks to everything the base
interpreter has installed except the grid packages and their version-bound companions (tokenizers,
huggingface-hub, safetensors, hf-xet) and qdoctor. pip (run with `--python` into that venv) sees torch
as installed, so it resolves each combination's own dependencies (transformers 4 and 5 pin different
tokenizers and hubs) and never downloads torch; the venv's own packages come first on sys.path.
`pip install --target --no-deps` layered on PYTHONPATH would need a hand-written resolver, and
installing torch 35 times would take longer than the probes.

Downloads are reused: each combination is resolved against the base (`pip install --dry-run --report`),
the wheels the wheelhouse lacks are downloaded into it (--wheels, else <work>/wheels), and the environment
is installed from the wheelhouse alone (`--no-index`), so no wheel is fetched twice and a filled wheelhouse
can be carried. Environments run in parallel (-j); each finished combination is written to the output at
once, so an interrupted run resumes where it stopped (--redo to run done ones again).

CPU machine (here: torch 2.13.0+cpu in the base venv):

    nohup nice -n 10 python scripts/verify_matrix.py run --grid scripts/grids/cpu.toml -j 2 &

GPU machine without network (the H200): on a networked machine, first collect every wheel the grid
needs for the GPU machine's Python (torch excluded: the base venv there has its CUDA build):

    python scripts/verify_matrix.py download --grid scripts/grids/h200.toml --wheels wheels/ \
        --python-version 3.12

(each combination is resolved against this machine's base, so what the base already holds -- torch and
the stack's common dependencies -- is not downloaded: the GPU machine's base venv must hold them too, as a
venv with the `train` extra does), then carry the repository and wheels/ over and run there, with the base
venv that holds the CUDA torch:

    python scripts/verify_matrix.py run --grid scripts/grids/h200.toml --wheels wheels/ --offline \
        --base-python /opt/torch/.venv/bin/python -j 4

which writes matrix/verified/linux-x86_64-cuda-sm_90.json. `render` rewrites docs/matrix.md from every
platform's file.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qdoctor import verified  # noqa: E402

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

AXES = ("bitsandbytes", "peft", "transformers", "accelerate")
VERIFIED_CODES = ("QD510", "QD511")  # check's findings from earlier measurements: not a prediction
# left out of the base: the grid and what each release pins differently; qdoctor comes from ROOT
EXCLUDE = re.compile(r"^(transformers|peft|bitsandbytes|accelerate|huggingface[-_]hub|tokenizers|safetensors|"
                     r"hf[-_]xet|qdoctor|_?editable[-_].*|__editable__.*|pip|_distutils_hack)([-_.].*)?$",
                     re.IGNORECASE)


# ---------------------------------------------------------------- the grid
def load_grid(path: str) -> list[dict]:
    """[[block]] tables, each a cross product of its lists -> [{'versions': {...}, 'env': {...}}]."""
    with open(path, "rb") as fh:
        doc = tomllib.load(fh)
    out, seen = [], set()
    for block in doc.get("block", []):
        lists = [block[a] if isinstance(block[a], list) else [block[a]] for a in AXES]
        for env in block.get("env", [{}]):
            for combo in itertools.product(*lists):
                c = {"versions": dict(zip(AXES, combo, strict=True)),
                     "env": {k: str(v) for k, v in env.items()}}
                if combo_id(c) not in seen:
                    seen.add(combo_id(c))
                    out.append(c)
    return out


def combo_id(c: dict) -> str:
    v = c["versions"]
    s = f"bnb-{v['bitsandbytes']}_peft-{v['peft']}_tf-{v['transformers']}_acc-{v['accelerate']}"
    return s + "".join(f"_{k}-{val}" for k, val in sorted(c.get("env", {}).items()))


# ---------------------------------------------------------------- environments
def run(cmd, env=None, timeout=None, cwd=None) -> tuple[int, str, str]:
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
        return p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        return 124, e.stdout or "", (e.stderr or "") + f"\n(timed out after {timeout} s)"


def purelib(python: str) -> str:
    rc, out, err = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    if rc:
        raise SystemExit(f"verify_matrix: cannot run {python}: {err.strip()}")
    return out.strip()


def make_base(python: str, dest: Path) -> Path:
    """Symlinks to the base interpreter's packages minus the grid (torch and its dependencies stay)."""
    src = Path(purelib(python))
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for entry in sorted(os.listdir(src)):
        if EXCLUDE.match(entry) or entry.endswith(".pth") or entry == "__pycache__":
            continue
        (dest / entry).symlink_to(src / entry)
    return dest


def python_of(env_dir: Path) -> Path:
    return env_dir / "bin" / "python"


def make_env(python: str, env_dir: Path, base: Path) -> None:
    """A venv whose .pth names its own copy of the base (symlinks), so what pip installs into the venv can
    hide the base's copy of the same distribution (see hide_shadowed)."""
    if env_dir.exists():
        shutil.rmtree(env_dir)  # a combination interrupted half-way starts again
    rc, _, err = run([python, "-m", "venv", "--without-pip", str(env_dir)])
    if rc:
        raise RuntimeError(f"venv failed: {err.strip()}")
    own = env_dir / "base"
    own.mkdir()
    for entry in os.listdir(base):
        (own / entry).symlink_to(os.readlink(base / entry))
    site = Path(purelib(str(python_of(env_dir))))
    (site / "_qdoctor_verify.pth").write_text(f"{own}\n{ROOT}\n")


def _dist_name(entry: str) -> str | None:
    m = re.match(r"(.+?)-[^-]+\.dist-info$", entry)
    return m.group(1).lower().replace("_", "-") if m else None


def _top_level(dist_info: Path) -> set[str]:
    """The import names a distribution installs (top_level.txt, else the first parts of RECORD)."""
    tl = dist_info / "top_level.txt"
    if tl.is_file():
        return {ln.strip() for ln in tl.read_text().splitlines() if ln.strip()}
    names = set()
    rec = dist_info / "RECORD"
    for ln in rec.read_text().splitlines() if rec.is_file() else []:
        first = ln.split(",", 1)[0].split("/", 1)[0]
        if first and not first.endswith((".dist-info", ".data")) and first not in ("..", "__pycache__"):
            names.add(first.removesuffix(".py"))
    return names


def hide_shadowed(env_dir: Path) -> list[str]:
    """pip installs a different version of a base distribution into the venv (numpy<2 for transformers 4.42):
    drop the base's copy from this environment, as a real install would replace it. Returns their names."""
    installed = set(installed_in(env_dir))
    own = env_dir / "base"
    hidden = []
    for entry in sorted(os.listdir(own)):
        name = _dist_name(entry)
        if name in installed:
            for mod in _top_level(own / entry):
                for cand in (own / mod, own / f"{mod}.py"):
                    if cand.is_symlink():
                        cand.unlink()
            (own / entry).unlink()
            hidden.append(name)
    return hidden


def pip_cmd(args, python: str, env_dir: Path, cache: Path) -> list[str]:
    return [python, "-m", "pip", "--python", str(python_of(env_dir)), "--disable-pip-version-check",
            "--no-input", "--cache-dir", str(cache), *args]


def wheelhouse(args) -> Path:
    """Where every wheel a combination needs is kept: --wheels when given (so a networked run fills the
    folder to carry to an offline machine), else <work>/wheels. Shared by all combinations and runs."""
    return Path(args.wheels).resolve() if args.wheels else Path(args.work).resolve() / "wheels"


def resolve(c: dict, env_dir: Path, args, cache: Path) -> tuple[list[str] | None, str]:
    """The exact distributions pip would add to this environment (torch is already in its base)."""
    report = env_dir / "report.json"
    wh = wheelhouse(args)
    rc, out, err = run(pip_cmd(["install", "--dry-run", "--quiet", "--report", str(report), "--find-links",
                                str(wh), *requirements(c)], args.base_python, env_dir, cache))
    if rc:
        return None, err or out
    items = json.loads(report.read_text())["install"]
    return sorted(f"{i['metadata']['name']}=={i['metadata']['version']}" for i in items), ""


def install(c: dict, env_dir: Path, args, cache: Path) -> tuple[int, str, str]:
    """Offline: from --wheels only. Otherwise resolve, download what the wheelhouse lacks (a wheel already
    there is reused, never fetched again), then install from the wheelhouse alone."""
    wh = wheelhouse(args)
    if not args.offline:
        wh.mkdir(parents=True, exist_ok=True)
        pins, why = resolve(c, env_dir, args, cache)
        if pins is None:
            return 1, "", why
        fetch = ["download", "--disable-pip-version-check", "--quiet", "--no-deps", "-d", str(wh),
                 "--find-links", str(wh), "--cache-dir", str(cache)]
        rc, out, err = run([args.base_python, "-m", "pip", *fetch, *pins], timeout=args.install_timeout)
        if rc:
            return rc, out, err
    return run(pip_cmd(["install", "--progress-bar", "off", "--no-index", "--find-links", str(wh),
                        *requirements(c)], args.base_python, env_dir, cache), timeout=args.install_timeout)


def requirements(c: dict) -> list[str]:
    return [f"{k}=={v}" for k, v in c["versions"].items()]


def installed_in(env_dir: Path) -> dict[str, str]:
    site = Path(purelib(str(python_of(env_dir))))
    out = {}
    for d in site.glob("*.dist-info"):
        m = re.match(r"(.+?)-([^-]+)\.dist-info$", d.name)
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return dict(sorted(out.items()))


# ---------------------------------------------------------------- one combination
def qdoctor_json(env_dir: Path, cmd: list[str], env: dict, timeout: float) -> tuple[int, dict | None, str]:
    rc, out, err = run([str(python_of(env_dir)), "-m", "qdoctor", *cmd, "--json"], env=env, timeout=timeout,
                       cwd=str(env_dir))
    try:
        return rc, json.loads(out), err
    except json.JSONDecodeError:
        return rc, None, (err or out)[-2000:]


_PATHS: dict[str, str] = {}  # machine paths -> placeholders, so no local path lands in the data


def scrub(text: str) -> str:
    for path, name in sorted(_PATHS.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(path, name)
    return re.sub(r"(?:<\w+>)?(?:/[\w.+-]+)*/site-packages/", "<site-packages>/", text)


def tail(text: str | None, n: int = 3) -> str:
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return scrub("\n".join(lines[-n:]))


def judge_check(doc: dict | None) -> dict:
    if doc is None:
        return {"predicted": None, "errors": [], "warnings": []}
    def of(sev):
        rows = [{"code": f["code"], "title": scrub(f["title"])}
                for f in doc["findings"] if f["severity"] == sev]
        return [dict(t) for t in dict.fromkeys(tuple(r.items()) for r in rows)]

    errs, warns = of("error"), of("warning")
    return {"predicted": predicted(errs, warns), "errors": errs, "warnings": warns}


def predicted(errs: list, warns: list) -> str:
    """What the version tables say, the verified results set aside (they are what is being measured):
    'broken' on an error, 'warned' on a warning (e.g. QD413: a probe will fail, training routes around it)."""
    errs = [e for e in errs if e["code"] not in VERIFIED_CODES]
    warns = [w for w in warns if w["code"] not in VERIFIED_CODES]
    return "broken" if errs else "warned" if warns else "working"


def probe_rows(doc: dict | None) -> list[dict]:
    rows = []
    for p in (doc or {}).get("probes") or []:
        rows.append({"probe": p["probe"], "status": p["status"],
                     "reason": scrub(p.get("reason") or "") or None,
                     "error": tail(p.get("error")) or None,
                     "known_failure": (p.get("finding") or {}).get("code"),
                     "duration_s": round(p.get("duration_s") or 0.0, 1)})
    return rows


def verify_one(c: dict, args, base: Path, cache: Path) -> dict:
    t0 = time.monotonic()
    env_dir = Path(args.work) / "envs" / combo_id(c)
    res = {"id": combo_id(c), "versions": dict(c["versions"]), "env": dict(c["env"]),
           "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    make_env(args.base_python, env_dir, base)
    rc, out, err = install(c, env_dir, args, cache)
    if rc:
        res.update(status="not-installable", error=tail(err or out, 6),
                   duration_s=round(time.monotonic() - t0))
        cleanup(env_dir, args)
        return res
    res["installed"] = installed_in(env_dir)
    res["replaced_in_base"] = hide_shadowed(env_dir)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", *verified.ENV_KEYS)}
    env.update(c["env"])
    env.update(XDG_CACHE_HOME=str(env_dir / "cache"), QDOCTOR_VERIFY="1")
    rc_c, check, err_c = qdoctor_json(env_dir, ["check"], env, 120)
    res["versions"]["torch"] = ((check or {}).get("facts") or {}).get("packages", {}).get("torch")
    res["check"] = {"exit": rc_c, **judge_check(check)}
    if check is None:
        res["check"]["error"] = tail(err_c, 6)
    rc_s, smoke, err_s = qdoctor_json(env_dir, ["smoke", "--timeout", str(args.timeout)], env,
                                      args.timeout * 10 + 300)
    probes = probe_rows(smoke)
    res["smoke"] = {"exit": rc_s, "device": (smoke or {}).get("device"), "probes": probes}
    bad = [p for p in probes if p["status"] in ("fail", "crash", "timeout")]
    if smoke is None or not probes:
        res.update(status="smoke-error", error=tail(err_s, 6))
    elif bad:
        res.update(status="broken", error=f"{bad[0]['probe']}: {bad[0]['reason'] or bad[0]['status']}"
                   + (f"\n{bad[0]['error']}" if bad[0]["error"] else ""))
    else:
        res["status"] = "working"
    measured = res["status"] in ("working", "broken")
    res["agrees"] = agrees(res["check"]["predicted"], res["status"]) if measured else None
    res["duration_s"] = round(time.monotonic() - t0)
    cleanup(env_dir, args)
    return res


def agrees(pred: str | None, status: str) -> bool:
    """A measured break was flagged (an error, or a warning naming the failing probes); a measured success
    got no error."""
    return (pred in ("broken", "warned")) if status == "broken" else pred != "broken"


def cleanup(env_dir: Path, args) -> None:
    if not args.keep_envs:
        shutil.rmtree(env_dir, ignore_errors=True)


# ---------------------------------------------------------------- the output file
def machine(facts: dict) -> dict:
    from qdoctor.rules.common import visible_gpus

    plat = facts.get("platform") or {}
    gpus = visible_gpus(facts)
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "")
    except OSError:
        pass
    if gpus:
        desc = ", ".join(f"{g.get('name')} (CC {g.get('compute_capability')})" for g in gpus)
        desc += f", driver {(facts.get('nvidia') or {}).get('driver')}"
    else:
        desc = f"{plat.get('cpu_count')}-core {plat.get('machine')} CPU, no GPU"
    return {"description": desc, "cpu": cpu, "cpu_count": plat.get("cpu_count"),
            "memory_total_mib": plat.get("memory_total_mib"),
            "os": f"{plat.get('system')} {plat.get('libc')}",
            "python": plat.get("python"), "container": plat.get("container")}


def base_facts(python: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rc, out, err = run([python, "-m", "qdoctor", "check", "--json"], env=env, timeout=120)
    try:
        return json.loads(out)["facts"]
    except (json.JSONDecodeError, KeyError):
        msg = f"verify_matrix: `qdoctor check` failed in the base interpreter: {tail(err)}"
        raise SystemExit(msg) from None


class Output:
    """matrix/verified/<platform>.json, rewritten atomically after every combination (the resume state)."""

    def __init__(self, path: Path, head: dict):
        self.path, self.lock = path, threading.Lock()
        old = json.loads(path.read_text()) if path.is_file() else {}
        self.results = {r["id"]: r for r in old.get("results", [])}
        self.head = head

    def done(self, cid: str) -> bool:
        r = self.results.get(cid)
        return r is not None and r.get("status") in ("working", "broken", "not-installable")

    def add(self, res: dict) -> None:
        with self.lock:
            self.results[res["id"]] = res
            doc = {**self.head, "date": res["date"][:10],
                   "results": sorted(self.results.values(), key=lambda r: r["id"])}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(doc, indent=1) + "\n")
            os.replace(tmp, self.path)


# ---------------------------------------------------------------- commands
def cmd_run(args) -> int:
    combos = load_grid(args.grid)
    work = Path(args.work).resolve()
    _PATHS.update({str(work / "envs"): "<envs>", str(work): "<work>", str(ROOT): "<repo>",
                   os.path.expanduser("~"): "~"})
    cache = work / "pip-cache"
    rc, sha, _ = run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    facts = base_facts(args.base_python)
    platform = args.platform or verified.platform_key(facts)
    out_path = Path(args.out or ROOT / "matrix" / "verified" / f"{platform}.json")
    head = {"schema": verified.SCHEMA, "platform": platform, "machine": machine(facts),
            "base": {"torch": (facts.get("packages") or {}).get("torch"),
                     "python": facts["platform"].get("python")},
            "method": "scripts/verify_matrix.py: a venv per combination over the base interpreter's torch; "
                      "`qdoctor check --json` and `qdoctor smoke --json` in each",
            "qdoctor_commit": sha.strip() if rc == 0 else None}
    output = Output(out_path, head)
    todo = [c for c in combos if args.redo or not output.done(combo_id(c))]
    print(f"verify_matrix: {platform}: {len(combos)} combinations, {len(combos) - len(todo)} already done, "
          f"{len(todo)} to run with -j {args.jobs}", flush=True)
    base = make_base(args.base_python, work / "base")
    with cf.ThreadPoolExecutor(args.jobs) as pool:
        futs = {pool.submit(verify_one, c, args, base, cache): c for c in todo}
        for i, fut in enumerate(cf.as_completed(futs), 1):
            c = futs[fut]
            try:
                res = fut.result()
            except Exception as e:  # one broken environment never stops the others
                res = {"id": combo_id(c), "versions": c["versions"], "env": c["env"],
                       "status": "harness-error",
                       "error": f"{type(e).__name__}: {e}",
                       "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
            output.add(res)
            why = f" -- {res['error'].splitlines()[0][:120]}" if res.get("error") else ""
            print(f"[{i}/{len(todo)}] {res['id']}: {res['status']} ({res.get('duration_s', '?')} s){why}",
                  flush=True)
    render(ROOT / "docs" / "matrix.md")
    return 0


def cmd_download(args) -> int:
    """Resolve each combination against the base's torch (pip --dry-run --report), then fetch exactly
    those wheels (--no-deps) for the target Python into --wheels, to carry to a machine without network."""
    combos = load_grid(args.grid)
    work = Path(args.work)
    base = make_base(args.base_python, work / "base")
    dest = Path(args.wheels).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    pins: set[str] = set()
    for c in combos:
        env_dir = work / "envs" / ("dl-" + combo_id(c))
        make_env(args.base_python, env_dir, base)
        got, why = resolve(c, env_dir, args, work / "pip-cache")
        if got is None:
            print(f"{combo_id(c)}: cannot resolve: {tail(why)}")
        pins.update(got or [])
        shutil.rmtree(env_dir, ignore_errors=True)
    target = ["--python-version", args.python_version, "--only-binary=:all:",
              "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64",
              "--platform", "manylinux_2_24_x86_64", "--platform", "manylinux_2_17_x86_64"]
    rc, out, err = run([args.base_python, "-m", "pip", "download", "--no-deps", "-d", str(dest), *target,
                        *sorted(pins)])
    print(out[-2000:], err[-2000:])
    return rc


def render(path: Path) -> None:
    parts = ["# Verified combinations", "",
             "Generated by `scripts/verify_matrix.py` (and printed by `qdoctor matrix`); do not edit by "
             "hand. Each row is one environment that was built and run: `qdoctor check --json` gave the "
             "prediction (\"check said\": broken on an error, warned on a warning such as QD413 that names "
             "the probe that will fail; the verified results themselves left out), `qdoctor smoke --json` "
             "the measurement (\"status\": broken when any probe fails). `check` "
             "reads these files: a combination verified broken on your platform is an error (QD510) naming "
             "the failing probe, one verified working is shown as verified (QD511).", ""]
    for p in verified.platforms(str(ROOT / "matrix" / "verified")):
        doc = verified.load.__wrapped__(p, str(ROOT / "matrix" / "verified"))
        if doc:
            parts += [f"## {p}", "", verified.render_table(doc, "markdown")]
    path.write_text("\n".join(parts).rstrip() + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("run", "download"):
        p = sub.add_parser(name)
        p.add_argument("--grid", default=str(ROOT / "scripts" / "grids" / "cpu.toml"))
        p.add_argument("--base-python", default=sys.executable,
                       help="an interpreter with torch installed (its packages form the base)")
        p.add_argument("--work", default=str(ROOT / ".verify"), help="environments, base and pip cache")
        p.add_argument("--wheels", default=None, help="a folder of wheels (pip --find-links)")
    r = sub.choices["run"]
    r.add_argument("-j", "--jobs", type=int, default=2)
    r.add_argument("--offline", action="store_true", help="install from --wheels only (pip --no-index)")
    r.add_argument("--platform", default=None, help="override the platform key (default: from check's facts)")
    r.add_argument("--out", default=None, help="default: matrix/verified/<platform>.json")
    r.add_argument("--timeout", type=int, default=600, help="seconds per probe (smoke --timeout)")
    r.add_argument("--install-timeout", type=int, default=1800)
    r.add_argument("--redo", action="store_true", help="run combinations that already have a result")
    r.add_argument("--keep-envs", action="store_true")
    d = sub.choices["download"]
    d.add_argument("--python-version", default="3.12", help="the GPU machine's Python (pip download)")
    sub.add_parser("render", help="rewrite docs/matrix.md from matrix/verified/*.json")
    args = ap.parse_args(argv)
    if args.cmd == "render":
        render(ROOT / "docs" / "matrix.md")
        return 0
    if args.cmd == "download" and not args.wheels:
        ap.error("download needs --wheels DIR")
    return cmd_run(args) if args.cmd == "run" else cmd_download(args)


if __name__ == "__main__":
    sys.exit(main())
