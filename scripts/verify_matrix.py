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

GPU machine without network or pip index, whose system python3 already holds a CUDA torch, transformers,
peft and accelerate (the H200): only bitsandbytes varies there, and full wheels (43-73 MB each) do not fit
the 64 MiB a call carries. On a networked machine, build trimmed installs -- each release unpacked, keeping
the native libraries the grid's combinations load plus the CPU library -- into one tar.xz, with a tracked
manifest of what was dropped (scripts/grids/h200-carried.json); a grid combination whose library choice the
trimming would change is refused, here and again on the GPU machine against its torch:

    python scripts/verify_matrix.py carry --grid scripts/grids/h200.toml --out .gpu/matrix

then carry the repository and .gpu/matrix over and run there (no venvs, no pip: each release's folder goes
first on PYTHONPATH, then this repository, then those of qdoctor's own dependencies the machine lacks):

    python3 scripts/verify_matrix.py run --grid scripts/grids/h200.toml --carried .gpu/matrix \
        --base-python python3 -j 4 --deadline 330

which writes matrix/verified/linux-x86_64-cuda-sm_90.json. `render` rewrites docs/matrix.md from every
platform's file.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import hashlib
import itertools
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qdoctor import bnb_loader, verified  # noqa: E402
from qdoctor.rules.common import base as base_version  # noqa: E402

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
    """[[block]] tables, each a cross product of its lists -> [{'versions': {...}, 'env': {...}}]. An axis a
    block leaves out is the base interpreter's own package (the carried mode: only bitsandbytes travels)."""
    with open(path, "rb") as fh:
        doc = tomllib.load(fh)
    out, seen = [], set()
    for block in doc.get("block", []):
        axes = [a for a in AXES if a in block]
        lists = [block[a] if isinstance(block[a], list) else [block[a]] for a in axes]
        for env in block.get("env", [{}]):
            for combo in itertools.product(*lists):
                c = {"versions": dict(zip(axes, combo, strict=True)),
                     "env": {k: str(v) for k, v in env.items()}}
                if combo_id(c) not in seen:
                    seen.add(combo_id(c))
                    out.append(c)
    return out


def combo_id(c: dict) -> str:
    v = c["versions"]
    s = "_".join(f"{short}-{v[a]}" for a, short in zip(AXES, ("bnb", "peft", "tf", "acc"), strict=True)
                 if a in v)
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
def qdoctor_json(python: str, cmd: list[str], env: dict, timeout: float,
                 cwd: Path) -> tuple[int, dict | None, str]:
    rc, out, err = run([python, "-m", "qdoctor", *cmd, "--json"], env=env, timeout=timeout, cwd=str(cwd))
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


def new_result(c: dict) -> dict:
    return {"id": combo_id(c), "versions": dict(c["versions"]), "env": dict(c["env"]),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def child_env(c: dict, env_dir: Path, pythonpath: list | None = None) -> dict:
    """The environment qdoctor runs in: this machine's, less what would leak another setting in (a
    PYTHONPATH, a venv, a loader override), plus the combination's own settings."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", *verified.ENV_KEYS)}
    env.update(c["env"])
    env.update(XDG_CACHE_HOME=str(env_dir / "cache"), QDOCTOR_VERIFY="1")
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in pythonpath)
    return env


def verify_one(c: dict, args, base: Path, cache: Path) -> dict:
    """A venv with the combination installed by pip over the base, then `measure`."""
    t0 = time.monotonic()
    env_dir = Path(args.work) / "envs" / combo_id(c)
    res = new_result(c)
    make_env(args.base_python, env_dir, base)
    rc, out, err = install(c, env_dir, args, cache)
    if rc:
        res.update(status="not-installable", error=tail(err or out, 6),
                   duration_s=round(time.monotonic() - t0))
        cleanup(env_dir, args)
        return res
    res["installed"] = installed_in(env_dir)
    res["replaced_in_base"] = hide_shadowed(env_dir)
    measure(res, str(python_of(env_dir)), child_env(c, env_dir), env_dir, args)
    res["duration_s"] = round(time.monotonic() - t0)
    cleanup(env_dir, args)
    return res


def measure(res: dict, python: str, env: dict, cwd: Path, args) -> dict:
    """`qdoctor check --json` (the prediction) and `qdoctor smoke --json` (the measurement) with `python` in
    `env`; the versions the grid left to the base are filled in from check's facts, and a version check
    saw that is not the one the grid asked for is a harness error (the environment is not what it claims)."""
    rc_c, check, err_c = qdoctor_json(python, ["check"], env, 120, cwd)
    have = verified.installed_stack((check or {}).get("facts") or {})
    pk = ((check or {}).get("facts") or {}).get("packages") or {}
    for k in verified.GRID:
        res["versions"].setdefault(k, pk.get(k))
    res["check"] = {"exit": rc_c, **judge_check(check)}
    if check is None:
        res["check"]["error"] = tail(err_c, 6)
    else:
        wrong = [f"{k} {have.get(k)} (asked for {v})" for k, v in res["versions"].items()
                 if k != "torch" and v and have.get(k) != base_version(v)]
        if wrong:
            res.update(status="harness-error", error="check saw " + ", ".join(wrong), agrees=None)
            return res
    rc_s, smoke, err_s = qdoctor_json(python, ["smoke", "--timeout", str(args.timeout)], env,
                                      args.timeout * 10 + 300, cwd)
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
    return res


def agrees(pred: str | None, status: str) -> bool:
    """A measured break was flagged (an error, or a warning naming the failing probes); a measured success
    got no error."""
    return (pred in ("broken", "warned")) if status == "broken" else pred != "broken"


def cleanup(env_dir: Path, args) -> None:
    if not args.keep_envs:
        shutil.rmtree(env_dir, ignore_errors=True)


# ---------------------------------------------------------------- carried installs (no network, no pip index)
# A GPU machine without network gets bitsandbytes as trimmed installs: each release unpacked from its wheel,
# keeping the native libraries the grid loads (a full wheel is 43-73 MB; a call carries 64 MiB), packed in one
# tar.xz with a manifest (`carry`). `run --carried` layers a release's folder on PYTHONPATH over the base
# interpreter, whose own torch, transformers, peft and accelerate are the rest of the stack.
MANIFEST = "carried.json"
TARBALL = "bnb-carried.tar.xz"


def trim_artefact(c: dict, manifest: dict, torch_cuda: str | None, loader_rules: list) -> str | None:
    """Why a combination would measure the trimming rather than the release, or None: its release did not
    travel, its BNB_CUDA_VERSION names a library that was dropped, or (for this torch's CUDA) the loader
    would pick another library from the kept ones than from the whole wheel."""
    ver = c["versions"].get("bitsandbytes")
    entry = (manifest.get("bitsandbytes") or {}).get(ver)
    if entry is None:
        return f"bitsandbytes {ver} was not carried"
    ov = c["env"].get("BNB_CUDA_VERSION")
    if ov and f"cuda{ov}" in entry["dropped"]:
        return f"BNB_CUDA_VERSION={ov} names libbitsandbytes_cuda{ov}, which the trimming dropped"
    if torch_cuda:
        def choice(libs):
            sel = bnb_loader.select_library(ver, torch_cuda, None, libs, c["env"], loader_rules)
            return sel["selected"], bnb_loader.loaded(sel), sel["error"]

        full, kept = choice(entry["shipped"]), choice(entry["kept"])
        if full != kept:
            return (f"on torch CUDA {torch_cuda} the whole wheel loads {full[1] or 'nothing'} "
                    f"(looks for {full[0]}), the trimmed one {kept[1] or 'nothing'} (looks for {kept[0]})")
    return None


def grid_artefacts(combos: list[dict], manifest: dict, torch_cuda: str | None) -> list[str]:
    from qdoctor import matrix

    rules = bnb_loader.rules(matrix.load())
    return [f"{combo_id(c)}: {why}" for c in combos
            if (why := trim_artefact(c, manifest, torch_cuda, rules))]


def unpack_carried(src: Path, work: Path) -> tuple[Path, dict]:
    """The folder holding the manifest: `src` itself when unpacked, else its tar.xz unpacked (once per
    tarball) into <work>/carried."""
    if (src / MANIFEST).is_file():
        return src, json.loads((src / MANIFEST).read_text())
    tars = [src] if src.is_file() else sorted(src.glob("*.tar.xz"))
    if not tars:
        raise SystemExit(f"verify_matrix: no {MANIFEST} or *.tar.xz in {src} (made by `carry`)")
    dest = work / "carried"
    stamp = dest / ".unpacked-from"
    key = f"{tars[0].name} {tars[0].stat().st_size}"
    if not (stamp.is_file() and stamp.read_text() == key):
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        with tarfile.open(tars[0]) as tf:
            tf.extractall(dest, filter="data")
        stamp.write_text(key)
    return dest, json.loads((dest / MANIFEST).read_text())


def missing_dists(python: str, names: list[str]) -> set[str]:
    """The distributions `python` does not have installed on its own (no PYTHONPATH)."""
    code = ("import importlib.metadata as m, sys\n"
            "def has(n):\n"
            "    try:\n        return bool(m.distribution(n))\n"
            "    except m.PackageNotFoundError:\n        return False\n"
            "print(' '.join(n for n in sys.argv[1:] if not has(n)))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    rc, out, err = run([python, "-c", code, *names], env=env, timeout=60)
    if rc:
        raise SystemExit(f"verify_matrix: cannot run {python}: {tail(err)}")
    return set(out.split())


def deps_path(python: str, root: Path, manifest: dict) -> list[Path]:
    """qdoctor's own dependencies the base interpreter lacks, as folders to put on PYTHONPATH (only
    those: a carried copy never sits beside the machine's own, which `check` would report as a conflict)."""
    deps = manifest.get("deps") or {}
    lacking = missing_dists(python, sorted(deps))
    return [root / d["dir"] for name, d in sorted(deps.items()) if name in lacking]


def verify_carried(c: dict, args, root: Path, manifest: dict, deps: list[Path]) -> dict:
    """The base interpreter with this release's trimmed folder first on PYTHONPATH, then `measure`."""
    t0 = time.monotonic()
    env_dir = Path(args.work) / "envs" / combo_id(c)
    shutil.rmtree(env_dir, ignore_errors=True)
    env_dir.mkdir(parents=True)
    res = new_result(c)
    entry = manifest["bitsandbytes"][c["versions"]["bitsandbytes"]]
    res["carried"] = {"kept": entry["kept"], "dropped": entry["dropped"]}
    env = child_env(c, env_dir, [root / entry["dir"], ROOT, *deps])
    measure(res, args.base_python, env, env_dir, args)
    res["duration_s"] = round(time.monotonic() - t0)
    cleanup(env_dir, args)
    return res


def _unzip(wheel: Path, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            zf.extract(info, dest)
            mode = info.external_attr >> 16
            if mode:
                os.chmod(dest / info.filename, mode & 0o777)


def _pip_download(args, reqs: list[str], dest: Path, carry: dict) -> None:
    target = ["--only-binary=:all:", "--python-version", carry["python_version"], "--implementation", "cp",
              "--platform", carry["platform"], "--platform", "manylinux_2_17_x86_64",
              "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64"]
    rc, out, err = run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--quiet",
                        "--no-deps", "-d", str(dest), *target, *reqs])
    if rc:
        raise SystemExit(f"verify_matrix: pip download {' '.join(reqs)} failed: {tail(err or out, 6)}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def trim_release(wheel: Path, dest: Path, keep: list[str]) -> dict:
    """Unpack a bitsandbytes wheel into `dest` and delete every libbitsandbytes_* not in `keep`."""
    _unzip(wheel, dest)
    pkg = dest / "bitsandbytes"
    shipped = sorted(m.group("name") for f in os.listdir(pkg) if (m := bnb_loader.LIB_RE.match(f)))
    unknown = sorted(set(keep) - set(shipped))
    if unknown:
        raise SystemExit(f"verify_matrix: {wheel.name} ships no {', '.join(unknown)} (it has {shipped})")
    dropped = [n for n in shipped if n not in keep]
    for f in os.listdir(pkg):
        m = bnb_loader.LIB_RE.match(f)
        if m and m.group("name") in dropped:
            (pkg / f).unlink()
    for info in dest.glob("bitsandbytes-*.dist-info"):
        (info / "QDOCTOR_TRIMMED").write_text(
            "Trimmed by qdoctor's scripts/verify_matrix.py carry; native libraries removed:\n"
            + "".join(f"libbitsandbytes_{n}\n" for n in dropped))
    return {"dir": dest.name, "wheel": wheel.name, "sha256": _sha256(wheel), "shipped": shipped,
            "kept": sorted(keep), "dropped": dropped}


def cmd_carry(args) -> int:
    """Download the [carry] releases and deps of a grid, trim them, check the grid against the trimming,
    and write <out>/bnb-carried.tar.xz plus the tracked manifest next to the grid."""
    with open(args.grid, "rb") as fh:
        carry = tomllib.load(fh)["carry"]
    combos = load_grid(args.grid)
    work = Path(args.work).resolve() / "carry"
    wheels, stage = work / "wheels", work / "stage"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    wheels.mkdir(parents=True, exist_ok=True)
    manifest = {"schema": "qdoctor.carried/1", "grid": Path(args.grid).name,
                "python_version": carry["python_version"], "torch_cuda": carry.get("torch_cuda"),
                "why": "a full wheel is 43-73 MB and one call carries 64 MiB: each release keeps the native "
                       "libraries its grid combinations load on this torch CUDA, plus its CPU library; the "
                       "rest (CUDA libraries no combination selects, ROCm and XPU libraries) is dropped",
                "bitsandbytes": {}, "deps": {}}
    for ver, keep in sorted(carry["keep"].items()):
        have = sorted(wheels.glob(f"bitsandbytes-{ver}-*.whl"))
        if not have:
            _pip_download(args, [f"bitsandbytes=={ver}"], wheels, carry)
            have = sorted(wheels.glob(f"bitsandbytes-{ver}-*.whl"))
        manifest["bitsandbytes"][ver] = trim_release(have[0], stage / f"bitsandbytes-{ver}", keep)
    deps_wheels = work / "deps"
    shutil.rmtree(deps_wheels, ignore_errors=True)
    deps_wheels.mkdir()
    _pip_download(args, list(carry.get("deps") or []), deps_wheels, carry)
    for whl in sorted(deps_wheels.glob("*.whl")):
        name, version = whl.name.split("-")[:2]
        dist = name.lower().replace("_", "-")
        _unzip(whl, stage / "deps" / dist)
        info = next((stage / "deps" / dist).glob("*.dist-info"))
        manifest["deps"][dist] = {"dir": f"deps/{dist}", "version": version, "wheel": whl.name,
                                  "modules": sorted(_top_level(info))}
    bad = grid_artefacts(combos, manifest, carry.get("torch_cuda"))
    if bad:
        print("verify_matrix: the grid measures the trimming, not the releases:\n  " + "\n  ".join(bad),
              file=sys.stderr)
        return 2
    text = json.dumps(manifest, indent=1) + "\n"
    (stage / MANIFEST).write_text(text)
    tracked = Path(args.manifest or Path(args.grid).with_name(Path(args.grid).stem + "-carried.json"))
    tracked.write_text(text)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (TARBALL + ".tmp")
    with tarfile.open(tmp, "w:xz", preset=9 | lzma.PRESET_EXTREME) as tf:
        for entry in sorted(stage.iterdir()):
            tf.add(entry, arcname=entry.name)
    os.replace(tmp, out / TARBALL)
    size = (out / TARBALL).stat().st_size
    print(f"verify_matrix: {out / TARBALL}: {size / 2**20:.1f} MiB, {len(manifest['bitsandbytes'])} "
          f"releases, {len(combos)} combinations; manifest {tracked}")
    return 0


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


def base_facts(python: str, extra: tuple = ()) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in verified.ENV_KEYS}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *map(str, extra)])
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
    deps: list[Path] = []
    if args.carried:
        root, manifest = unpack_carried(Path(args.carried).resolve(), work)
        _PATHS[str(root)] = "<carried>"
        deps = deps_path(args.base_python, root, manifest)
    facts = base_facts(args.base_python, tuple(deps))
    if args.carried:
        bad = grid_artefacts(combos, manifest, (facts.get("torch") or {}).get("cuda"))
        if bad:
            print("verify_matrix: refusing combinations that would measure the trimming, not the release:\n  "
                  + "\n  ".join(bad), file=sys.stderr)
            return 2
    platform = args.platform or verified.platform_key(facts)
    if args.expect_platform and platform != args.expect_platform:
        print(f"verify_matrix: this machine is {platform}, not {args.expect_platform} (--expect-platform): "
              "nothing run", file=sys.stderr)
        return 2
    out_path = Path(args.out or ROOT / "matrix" / "verified" / f"{platform}.json")
    method = ("scripts/verify_matrix.py: a venv per combination over the base interpreter's torch; "
              "`qdoctor check --json` and `qdoctor smoke --json` in each")
    if args.carried:
        listed = f"scripts/grids/{manifest.get('grid', '?').removesuffix('.toml')}-carried.json"
        method = ("scripts/verify_matrix.py run --carried: each bitsandbytes release unpacked from its "
                  f"wheel with only the native libraries its combinations load ({listed}), first on "
                  "PYTHONPATH over the base interpreter's own torch, transformers, peft and accelerate; "
                  "`qdoctor check --json` and `qdoctor smoke --json` in each")
    head = {"schema": verified.SCHEMA, "platform": platform, "machine": machine(facts),
            "base": {"torch": (facts.get("packages") or {}).get("torch"),
                     "python": facts["platform"].get("python")},
            "method": method, "qdoctor_commit": args.commit or (sha.strip() if rc == 0 else None),
            "note": "check's prediction (check.predicted) leaves out QD510/QD511, which come from earlier "
                    "measurements"}
    output = Output(out_path, head)
    todo = [c for c in combos if args.redo or not output.done(combo_id(c))]
    print(f"verify_matrix: {platform}: {len(combos)} combinations, {len(combos) - len(todo)} already done, "
          f"{len(todo)} to run with -j {args.jobs}"
          + (f", carried dependencies: {', '.join(p.name for p in deps) or 'none needed'}" if args.carried
             else ""), flush=True)
    t_end = time.monotonic() + args.deadline if args.deadline else None

    def one(c):
        if t_end is not None and time.monotonic() > t_end:
            return None  # past --deadline: left for the next run (it resumes)
        if args.carried:
            return verify_carried(c, args, root, manifest, deps)
        return verify_one(c, args, base, cache)

    base = None if args.carried else make_base(args.base_python, work / "base")
    with cf.ThreadPoolExecutor(args.jobs) as pool:
        futs = {pool.submit(one, c): c for c in todo}
        for i, fut in enumerate(cf.as_completed(futs), 1):
            c = futs[fut]
            try:
                res = fut.result()
            except Exception as e:  # one broken environment never stops the others
                res = {"id": combo_id(c), "versions": c["versions"], "env": c["env"],
                       "status": "harness-error",
                       "error": f"{type(e).__name__}: {e}",
                       "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
            if res is None:
                print(f"[{i}/{len(todo)}] {combo_id(c)}: not started (--deadline)", flush=True)
                continue
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
    r.add_argument("--expect-platform", default=None,
                   help="stop unless this machine's platform key is this one (a GPU that is not seen would "
                        "otherwise add its results to the CPU file)")
    r.add_argument("--timeout", type=int, default=600, help="seconds per probe (smoke --timeout)")
    r.add_argument("--install-timeout", type=int, default=1800)
    r.add_argument("--redo", action="store_true", help="run combinations that already have a result")
    r.add_argument("--keep-envs", action="store_true")
    r.add_argument("--carried", default=None,
                   help="trimmed bitsandbytes installs made by `carry` (a folder with its tar.xz): no venvs, "
                        "no pip; the grid's other packages are the base interpreter's")
    r.add_argument("--commit", default=None, help="qdoctor's commit to record (default: git's HEAD; a copy "
                   "of the tree without .git records none)")
    r.add_argument("--deadline", type=float, default=None,
                   help="seconds after which no combination starts (a later run resumes)")
    c = sub.add_parser("carry", help="trimmed bitsandbytes installs for `run --carried` (an offline machine)")
    c.add_argument("--grid", default=str(ROOT / "scripts" / "grids" / "h200.toml"))
    c.add_argument("--work", default=str(ROOT / ".verify"), help="downloads and the staging folder")
    c.add_argument("--out", default=str(ROOT / ".gpu" / "matrix"), help="where the tar.xz is written")
    c.add_argument("--manifest", default=None, help="default: <grid>-carried.json next to the grid")
    d = sub.choices["download"]
    d.add_argument("--python-version", default="3.12", help="the GPU machine's Python (pip download)")
    sub.add_parser("render", help="rewrite docs/matrix.md from matrix/verified/*.json")
    args = ap.parse_args(argv)
    if args.cmd == "render":
        render(ROOT / "docs" / "matrix.md")
        return 0
    if args.cmd == "carry":
        return cmd_carry(args)
    if args.cmd == "download" and not args.wheels:
        ap.error("download needs --wheels DIR")
    return cmd_run(args) if args.cmd == "run" else cmd_download(args)


if __name__ == "__main__":
    sys.exit(main())
