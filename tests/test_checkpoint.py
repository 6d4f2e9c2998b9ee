"""Checkpoint state without pickle: exact round trips of every optimizer's state, the RNGs and the schedule,
and one-line refusals for old, damaged, edited or foreign checkpoints."""

from __future__ import annotations

import json
import math
import random

import pytest

from qdoctor.train import checkpoint as K
from qdoctor.train import optim

KINDS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "cpu_adamw")


class Tiny:
    """A LoRA model (peft on two linear layers) with its optimizer, scheduler and scaler, seeded."""

    def __init__(self, kind: str, r: int = 16, scaling: bool = False, seed: int = 0):
        import torch
        from peft import LoraConfig, get_peft_model

        class Base(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.up = torch.nn.Linear(256, 256)  # LoRA A, B: 4096 values each: 8-bit states
                self.down = torch.nn.Linear(256, 8)  # LoRA B: 128 values: bnb keeps 32-bit states

            def forward(self, x):
                return self.down(torch.relu(self.up(x)))

        torch.manual_seed(seed)
        self.model = get_peft_model(Base(), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["up", "down"]))
        self.opt = optim.build(kind, self.model.parameters(), lr=1e-2, weight_decay=0.01)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, optim.schedule(2))
        self.scaler = torch.amp.GradScaler("cpu", enabled=scaling)

    def step(self, seed: int) -> None:
        import torch

        g = torch.Generator().manual_seed(seed)
        x = torch.randn(4, 256, generator=g)
        loss = self.model(x).pow(2).mean()
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)

    def lora(self) -> dict:
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}


def flat(obj, path=""):
    """Every leaf of a (nested) state dict by path, tuples and lists told apart."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(flat(v, f"{path}/{k!r}"))
        return out
    if isinstance(obj, (list, tuple)):
        out = {f"{path}:{type(obj).__name__}": len(obj)}
        for i, v in enumerate(obj):
            out.update(flat(v, f"{path}/{i}"))
        return out
    return {path: obj}


def assert_same(a, b) -> None:
    import torch

    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        x, y = fa[k], fb[k]
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape, k
            assert torch.equal(x.cpu(), y.cpu()), k
        else:
            assert type(x) is type(y) and x == y, (k, x, y)


@pytest.mark.parametrize("kind", KINDS)
def test_each_optimizer_state_round_trips_exactly_and_training_continues_bit_exact(tmp_path, kind):
    import torch

    a = Tiny(kind, scaling=kind == "adamw")
    for s in range(3):
        a.step(s)
    if kind.endswith("8bit"):  # the bitsandbytes layout we mean to cover: uint8 moments + absmax + qmap
        quant = [ps["__bnb_optimizer_quant_state__"] for ps in a.opt.state_dict()["state"].values()]
        eight = [q for q in quant if q["state1"].dtype == torch.uint8]
        assert eight and all(q["absmax2"].dtype == torch.float32 and "qmap2" in q for q in eight)
        assert any(q["state1"].dtype == torch.float32 for q in quant)  # small tensors stay 32-bit
    K.save(tmp_path, a.model, a.opt, a.sched, a.scaler, {"step": 3, "micro_batch": 4})
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["adapter", "state.json",
                                                                          "state.safetensors"]

    b = Tiny(kind, scaling=kind == "adamw")  # the same base (a checkpoint holds LoRA only)
    b.step(99)  # but another LoRA and optimizer state, so a load that restored nothing fails below
    assert any(not torch.equal(a.lora()[n], t) for n, t in b.lora().items())
    st = K.load(tmp_path, b.model, b.opt, b.sched, b.scaler)
    assert st == {"step": 3, "micro_batch": 4}
    assert_same(a.opt.state_dict(), b.opt.state_dict())
    assert_same(a.sched.state_dict(), b.sched.state_dict())
    assert_same(a.scaler.state_dict(), b.scaler.state_dict())
    for n, t in a.lora().items():
        assert torch.equal(t, b.lora()[n]), n
    for s in (3, 4):  # the continuation is the same computation, to the bit
        a.step(s)
        b.step(s)
    for n, t in a.lora().items():
        assert torch.equal(t, b.lora()[n]), n
    assert_same(a.opt.state_dict(), b.opt.state_dict())


def test_rng_states_round_trip_exactly_through_json():
    import numpy as np
    import torch

    random.seed(7)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    np.random.seed(7)
    np.random.standard_normal()  # and in numpy's
    tensors: dict = {}
    doc = json.loads(json.dumps(K.pack(K.rng_state(), tensors, "rng"), allow_nan=False))
    want = (random.gauss(0, 1), random.random(), np.random.standard_normal(), np.random.rand(3).tolist(),
            torch.rand(3))
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    K.set_rng_state(K.unpack(doc, tensors))
    got = (random.gauss(0, 1), random.random(), np.random.standard_normal(), np.random.rand(3).tolist(),
           torch.rand(3))
    assert want[:4] == got[:4] and torch.equal(want[4], got[4])
    assert tensors["rng/torch"].dtype == torch.uint8


def test_pack_tags_what_json_cannot_say_and_refuses_what_it_does_not_know(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    value = {
        "t": (1, 2.5, None),
        "ints": {0: "a", 3: [True]},
        "$odd": 1,
        "floats": [math.inf, -math.inf, 0.1 + 0.2],
        "x": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3),
        "scalar": torch.tensor(3.0),
    }
    tensors: dict = {}
    doc = json.loads(json.dumps(K.pack(value, tensors), allow_nan=False))
    save_file(tensors, str(tmp_path / "t.safetensors"))
    back = K.unpack(doc, load_file(str(tmp_path / "t.safetensors")))
    assert_same(back, value)
    nan = K.unpack(json.loads(json.dumps(K.pack(math.nan, {}))), {})
    assert math.isnan(nan)
    with pytest.raises(TypeError, match="set"):
        K.pack({"a": {1, 2}}, {})
    with pytest.raises(K.CheckpointError, match="no tensor"):
        K.unpack({"$tensor": "missing"}, {})


@pytest.fixture
def saved(tmp_path):
    a = Tiny("adamw")
    a.step(0)
    (tmp_path / "run.json").write_text(json.dumps({"identity": {"seed": 0}}))
    K.save(tmp_path, a.model, a.opt, a.sched, a.scaler, {"step": 1})
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["run"] == {"seed": 0}
    return tmp_path


def _flip_byte(p):
    data = bytearray(p.read_bytes())
    data[-1] ^= 1
    p.write_bytes(bytes(data))


def _edit_json(key, value):
    def f(ck):
        doc = json.loads((ck / "state.json").read_text())
        if value is None:
            doc.pop(key)
        else:
            doc[key] = value
        (ck / "state.json").write_text(json.dumps(doc))

    return f


def _garbage_with_its_digest(ck):
    """A tensor file that is not safetensors, with state.json updated to match (edited consistently)."""
    (ck / "state.safetensors").write_bytes(b"\xff" * 64)
    doc = json.loads((ck / "state.json").read_text())
    doc["files"]["state.safetensors"] = K._sha256(ck / "state.safetensors")
    (ck / "state.json").write_text(json.dumps(doc))


def _rename_a_tensor(ck):
    doc = (ck / "state.json").read_text().replace('"$tensor": "rng/torch"', '"$tensor": "rng/other"')
    (ck / "state.json").write_text(doc)


DAMAGE = {
    "legacy pickle": (lambda ck: (ck / "state.pt").write_bytes(b"\x80\x04K\x01."), "older qdoctor"),
    "no format": (_edit_json("format", None), "older qdoctor"),
    "newer format": (_edit_json("format", "qdoctor.checkpoint/99"), "reads qdoctor.checkpoint/1 only"),
    "no state.json": (lambda ck: (ck / "state.json").unlink(), "no state.json"),
    "state.json not JSON": (lambda ck: (ck / "state.json").write_text("{nope"), "unreadable"),
    "no digests": (_edit_json("files", None), "incomplete"),
    "tensors missing": (lambda ck: (ck / "state.safetensors").unlink(), "is missing"),
    "tensors edited": (lambda ck: _flip_byte(ck / "state.safetensors"), "does not match its sha256"),
    "adapter edited": (lambda ck: _flip_byte(ck / "adapter" / "adapter_model.safetensors"), "sha256"),
    "bad step": (_edit_json("step", "7"), "malformed loop position"),
    "tensors unreadable": (_garbage_with_its_digest, "a tensor file is unreadable"),
    "dangling tensor reference": (_rename_a_tensor, "has no tensor 'rng/other'"),
    "another run": (lambda ck: (ck.parent / "run.json").write_text('{"identity": {"seed": 1}}'),
                    "different run"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_old_damaged_edited_or_foreign_checkpoints_are_refused_in_one_line(saved, case):
    damage, words = DAMAGE[case]
    damage(saved / "checkpoint")
    b = Tiny("adamw", seed=1)
    before = b.lora()
    with pytest.raises(K.CheckpointError) as e:
        K.load(saved, b.model, b.opt, b.sched, b.scaler)
    msg = str(e.value)
    assert words in msg and "\n" not in msg and ("fresh --output" in msg or "qdoctor that wrote it" in msg)
    import torch

    assert all(torch.equal(before[n], t) for n, t in b.lora().items())  # refused before touching the model


def test_a_checkpoint_of_another_shape_does_not_fit(saved):
    b = Tiny("adamw", r=8)
    with pytest.raises(K.CheckpointError, match="does not fit this run"):
        K.load(saved, b.model, b.opt, b.sched, b.scaler)


def test_nothing_in_the_package_unpickles_or_trusts_remote_code():
    """A guard for the whole package: no torch.load, pickle, weights_only=False or trust_remote_code=True."""
    import re
    from pathlib import Path

    import qdoctor

    unsafe = re.compile(
        r"torch\.load\(|\bimport (c?pickle|dill|joblib|shelve|marshal)\b|\bpickle\.|weights_only\s*=\s*False"
        r"|trust_remote_code\s*=\s*True|allow_pickle\s*=\s*True"
    )
    root = Path(qdoctor.__file__).parent
    hits = [
        f"{p.relative_to(root)}:{n}: {line.strip()}"
        for p in sorted(root.rglob("*.py"))
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if unsafe.search(line)
    ]
    assert hits == []
    assert unsafe.search("blob = torch.load(ck / 'state.pt', weights_only=False)")  # the pattern bites
