"""Record what bitsandbytes' own loader picks, release by release: tests/bnb_loader_cases.json.

    git clone https://github.com/bitsandbytes-foundation/bitsandbytes BNB
    python scripts/bnb_loader_cases.py BNB > tests/bnb_loader_cases.json

For every release tag whose version falls in a matrix/bitsandbytes.toml [[release]] range, the tag's
own loader modules (cextension.py, cuda_specs.py, consts.py; cuda_setup/ before 0.43.1) are copied
into a scratch package next to empty libbitsandbytes_*.so files (the release's shipped set), and
imported with a stand-in `torch` (CUDA/HIP version, GPUs) and a stand-in ctypes loader that records
which file it was asked to load. Nothing of theirs is kept: the output is only (inputs, outcome).
Before 0.41 the CUDA version came from the system's libcudart; the stand-in answers torch's.
Outcome: the library name that was loaded ('cuda121', 'cpu'), or 'error' (setup raised, or the
loader installed its error placeholder / left `lib` None).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import io
import json
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qdoctor import matrix  # noqa: E402
from qdoctor.rules.common import bnb_release  # noqa: E402

URL = "https://github.com/bitsandbytes-foundation/bitsandbytes/blob/{tag}/bitsandbytes/"


def scenarios(libs: list[str], nocublaslt: bool) -> list[dict]:
    """Inputs that separate the loader rules: exact, missing, same major, override, no GPU, old GPU."""
    cuda = sorted(libs, key=lambda n: (int(n[4:6]), int(n[6:])))
    first, last = cuda[0], cuda[-1]

    def v(name):  # 'cuda121' -> '12.1'
        return f"{int(name[4:6])}.{int(name[6:])}"

    major12 = [n for n in cuda if n.startswith("cuda12")]
    gap = None  # a CUDA 12 minor between two shipped ones, or just above the highest
    for minor in range(0, 10):
        name = f"cuda12{minor}"
        if name not in cuda and major12 and major12[0] < name:
            gap = f"12.{minor}"
            break
    out = [
        {"torch_cuda": v(last), "ccs": ["9.0"]},
        {"torch_cuda": v(first), "ccs": ["8.0"]},
        {"torch_cuda": "13.0", "ccs": ["9.0"]},
        {"torch_cuda": "11.7" if "cuda117" not in cuda else "11.0", "ccs": ["8.6"]},
        {"torch_cuda": "12.0", "ccs": ["8.0"]},
        {"torch_cuda": v(last), "ccs": ["7.0"]},
        {"torch_cuda": v(last), "ccs": ["8.0", "6.1"]},
        {"torch_cuda": v(last), "ccs": ["9.0"], "env": {"BNB_CUDA_VERSION": first[4:]}},
        {"torch_cuda": v(last), "ccs": ["7.0"], "env": {"BNB_CUDA_VERSION": first[4:]}},
        {"torch_cuda": v(last), "ccs": ["9.0"], "env": {"BNB_CUDA_VERSION": "999"}},
        {"torch_cuda": v(last), "ccs": ["9.0"], "env": {"BNB_CUDA_VERSION": ""}},
        {"torch_cuda": v(last), "ccs": ["9.0"], "env": {"BNB_CUDA_VERSION": f"{v(first)}"}},
        {"torch_cuda": None, "ccs": []},
        {"torch_cuda": v(last), "ccs": [], "cuda_available": False},
        {"torch_hip": "6.4.43482", "ccs": ["9.4"], "extra_libs": ["rocm64", "rocm71"]},
        {"torch_hip": "6.3.1", "ccs": ["9.4"], "extra_libs": ["rocm64", "rocm71"]},
        {"torch_hip": "6.4.43482", "ccs": ["9.4"], "extra_libs": ["rocm64"],
         "env": {"BNB_CUDA_VERSION": "124"}},
        {"torch_hip": "7.1.1", "ccs": ["9.4"], "extra_libs": ["rocm64", "rocm72"],
         "env": {"BNB_ROCM_VERSION": "64"}},
        {"torch_hip": "7.13.0", "ccs": ["9.4"], "extra_libs": ["rocm713", "rocm83"]},  # minor >= 10
    ]
    if gap:
        out.append({"torch_cuda": gap, "ccs": ["8.9"]})
    for case in out:
        case["extra"] = case.pop("extra_libs", [])
        case.setdefault("env", {})
        gpu_torch = bool(case.get("torch_cuda") or case.get("torch_hip"))
        case.setdefault("cuda_available", bool(case["ccs"]) and gpu_torch)
    return out


def shipped(case: dict) -> list[str]:
    return sorted({*case["base"], *case["extra"]})


def fake_torch(case: dict) -> types.ModuleType:
    torch = types.ModuleType("torch")
    ccs = [tuple(int(x) for x in c.split(".")) for c in case["ccs"]]
    torch.version = types.SimpleNamespace(cuda=case.get("torch_cuda"), hip=case.get("torch_hip"), xpu=None)
    torch.cuda = types.SimpleNamespace(
        is_available=lambda: case["cuda_available"], device_count=lambda: len(ccs),
        get_device_capability=lambda d=None: ccs[d if isinstance(d, int) else 0],
        device=lambda i: i, is_initialized=lambda: False)
    torch._C = types.SimpleNamespace(_has_xpu=False)
    torch.__version__ = "2.5.0"
    return torch


CUDA_ONLY = ("get_context", "cadam32bit_grad_fp32", "get_cusparse", "cget_managed_ptr")


class FakeLoader:
    """ctypes.cdll stand-in: records the path; a CUDA/ROCm library exposes the CUDA-only symbols."""

    def __init__(self):
        self.loaded = None

    def LoadLibrary(self, path):  # noqa: N802 - ctypes' name
        name = os.path.basename(str(path))
        if not os.path.exists(str(path)):
            raise OSError(f"{path}: cannot open shared object file: No such file or directory")
        self.loaded = name
        gpu = "cuda" in name or "rocm" in name

        class Fn:
            restype = None

            def __call__(self, *a):
                return 0

        class Dll:
            def __getattr__(self, attr):
                if not gpu and attr in CUDA_ONLY:
                    raise AttributeError(attr)
                fn = Fn()
                setattr(self, attr, fn)
                return fn

        return Dll()


def run_case(src: dict[str, str], case: dict) -> str:
    """Import the tag's loader with the stand-ins; return the loaded library name or 'error'."""
    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / "bitsandbytes"
        for rel, text in src.items():
            f = pkg / rel
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(text)
        (pkg / "__init__.py").write_text("")
        for lib in shipped(case):
            (pkg / f"libbitsandbytes_{lib}.so").write_bytes(b"")
        saved = {k: v for k, v in sys.modules.items() if k == "torch" or k.startswith("bitsandbytes")}
        for k in saved:
            del sys.modules[k]
        sys.modules["torch"] = fake_torch(case)
        loader, real = FakeLoader(), ctypes.cdll
        ctypes.cdll = loader
        env_keys = ("BNB_CUDA_VERSION", "BNB_ROCM_VERSION", "BITSANDBYTES_NOWELCOME")
        old_env = {k: os.environ.get(k) for k in env_keys}
        for k in env_keys:
            os.environ.pop(k, None)
        os.environ.update(case["env"])
        os.environ["BITSANDBYTES_NOWELCOME"] = "1"
        sys.path.insert(0, tmp)
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                if "cuda_setup/main.py" in src:
                    main = importlib.import_module("bitsandbytes.cuda_setup.main")
                    ccs = case["ccs"]
                    cuda = case.get("torch_cuda")
                    digits = "".join(cuda.split(".")[:2]) if cuda else None
                    main.determine_cuda_runtime_lib_path = lambda: "/usr/lib/libcudart.so"
                    main.get_cuda_lib_handle = lambda: object()
                    if hasattr(main, "get_compute_capability"):
                        best = max(ccs, key=lambda c: tuple(map(int, c.split(".")))) if ccs else None
                        main.get_compute_capability = lambda cuda=None: best
                    if "get_cuda_version(cuda, cudart_path)" in src["cuda_setup/main.py"]:
                        main.get_cuda_version = lambda *a: digits
                try:
                    mod = importlib.import_module("bitsandbytes.cextension")
                except Exception:
                    return "error"
            lib = getattr(mod, "lib", None)
            if lib is None or "ErrorHandler" in type(lib).__name__:
                return "error"
            name = loader.loaded or ""
            return name[len("libbitsandbytes_"):].rsplit(".", 1)[0] if name else "error"
        finally:
            sys.path.remove(tmp)
            ctypes.cdll = real
            for k in [k for k in sys.modules if k == "torch" or k.startswith("bitsandbytes")]:
                del sys.modules[k]
            sys.modules.update(saved)
            for k, v in old_env.items():
                os.environ.pop(k, None)
                if v is not None:
                    os.environ[k] = v


def sources(repo: str, tag: str) -> dict[str, str]:
    def show(path):
        r = subprocess.run(["git", "-C", repo, "show", f"{tag}:bitsandbytes/{path}"], capture_output=True,
                           text=True)
        return r.stdout if r.returncode == 0 else None

    out = {}
    for rel in ("cextension.py", "cuda_specs.py", "consts.py", "cuda_setup/__init__.py", "cuda_setup/main.py",
                "cuda_setup/env_vars.py"):
        text = show(rel)
        if text is not None:
            out[rel] = text
    if "cuda_setup/main.py" in out:
        out["cuda_setup/__init__.py"] = ""  # its package __init__ pulls the whole library in some tags
    return out


def main(repo: str) -> dict:
    from packaging.version import InvalidVersion, Version

    mx = matrix.load()
    tags = subprocess.run(["git", "-C", repo, "tag"], capture_output=True, text=True,
                          check=True).stdout.split()
    out = {"about": "What bitsandbytes' own loader loaded, per release tag: generated by "
                    "scripts/bnb_loader_cases.py from the tag's loader modules with a stand-in torch; "
                    "compared with qdoctor.bnb_loader by tests/test_bnb_loader.py.",
           "releases": []}
    for tag in sorted(tags, key=lambda t: Version(t) if t[0].isdigit() else Version("0")):
        try:
            ver = Version(tag)
        except InvalidVersion:
            continue
        if ver.is_prerelease:
            continue
        rel = bnb_release(mx, tag)
        if rel is None:
            continue
        src = sources(repo, tag)
        nocub = "_nocublaslt" in src.get("cextension.py", "") + src.get("cuda_setup/main.py", "")
        nocub_libs = {f"{n}_nocublaslt" for n in rel["cuda_libs"]} if nocub else set()
        base = sorted({"cpu", *rel["cuda_libs"]} | nocub_libs)
        cases = []
        for case in scenarios(list(rel["cuda_libs"]), nocub):
            case["loaded"] = run_case(src, {**case, "base": base})
            cases.append(case)
        files = [p for p in ("cextension.py", "cuda_specs.py", "cuda_setup/main.py") if p in src]
        out["releases"].append({"version": tag, "source": [URL.format(tag=tag) + p for p in files],
                                "shipped": base, "cases": cases})
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    doc = main(sys.argv[1])
    lines = ["{", f' "about": {json.dumps(doc["about"])},', ' "releases": [']
    for i, rel in enumerate(doc["releases"]):
        head = {k: v for k, v in rel.items() if k != "cases"}
        lines.append("  " + json.dumps(head)[:-1] + ', "cases": [')
        n = len(rel["cases"])
        lines += ["   " + json.dumps(c) + ("," if j < n - 1 else "") for j, c in enumerate(rel["cases"])]
        lines.append("  ]}" + ("," if i < len(doc["releases"]) - 1 else ""))
    lines += [" ]", "}"]
    sys.stdout.write("\n".join(lines) + "\n")
