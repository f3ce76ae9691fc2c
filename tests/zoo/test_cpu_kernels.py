"""The fused CPU loops of the zoo trainer: built and checked where a C compiler exists, bit-identical
to the torch path (a zoo is the same number for number either way), rejected when they differ, and
never required."""

import shutil

import pytest
import torch

import wsnets
from tests.zoo.test_trainer import _runs as runs_of
from wsnets.zoo import cpu_kernels
from wsnets.zoo.trainer import DataBank, train_group

HAVE_CC = bool(shutil.which("cc") or shutil.which("gcc"))
needs_loops = pytest.mark.skipif(not HAVE_CC, reason="needs a C compiler")


@needs_loops
def test_loops_build_and_pass_their_check_where_a_compiler_exists():
    lib = cpu_kernels.load()
    assert lib is not None, cpu_kernels.status()
    assert cpu_kernels.status() == "ok"
    assert cpu_kernels._self_check(lib) == ""


def _runs(arch, n: int):
    """Every branch of the loops: SGD with one momentum or mixed momenta, clipped or not, with and
    without weight decay; AdamW with and without decay; dropout; label noise; training subsets."""
    g = torch.Generator().manual_seed(5)
    hps = []
    for i in range(n):
        u = torch.rand(8, generator=g).tolist()
        hps.append({"optimizer": "adam" if u[0] < 0.5 else "sgd",
                    "lr": 0.003 + 0.05 * u[1] if u[0] < 0.5 else 0.02 + 0.3 * u[1],
                    "momentum": 0.9 if (i % 3) else 0.0, "weight_decay": 0.0 if u[2] < 0.4 else 1e-3 * u[3],
                    "init_scale": 0.5 + 2 * u[4], "dropout": 0.0 if u[5] < 0.5 else 0.4 * u[5],
                    "label_noise": 0.0 if u[6] < 0.5 else 0.3, "train_fraction": 0.2 + 0.8 * u[7],
                    "grad_clip": 1e9 if i % 4 else 0.5})
    return runs_of(arch, hps)


@needs_loops
@pytest.mark.parametrize("act,chunk", [("relu", None), ("gelu", 4), ("tanh", 100)])
def test_trainer_with_loops_equals_torch_path(monkeypatch, act, chunk):
    """A group trained with the fused loops and with the torch/NumPy path: the same weights and metrics
    bit for bit, at every checkpoint (one flat block per model, or a block per layer)."""
    from wsnets.zoo import trainer as T
    assert cpu_kernels.load() is not None, cpu_kernels.status()
    arch = wsnets.mlp(2, [12, 9], 4, act)
    runs = _runs(arch, 23)
    bank = DataBank.build(["blobs2"])
    real = T._MLPEngine.__init__
    monkeypatch.setattr(T._MLPEngine, "__init__", lambda self, *a, **kw: real(self, *a, chunk=chunk, **kw))

    def train():
        return list(train_group(arch, runs, epochs=3, checkpoints=[0, 1, 3], batch_size=32, bank=bank))
    fused = train()
    monkeypatch.setattr(cpu_kernels, "load", lambda: None)
    plain = train()
    for a, b in zip(fused, plain):
        for k in a.params:
            assert torch.equal(a.params[k], b.params[k]), (a.epoch, k)
        for k in a.metrics:
            assert torch.equal(a.metrics[k], b.metrics[k]), (a.epoch, k)
    loss = [float(c.metrics["train_loss"].median()) for c in fused]
    assert loss[-1] < 0.85 * loss[0], loss  # the models trained


class _Perturbed:
    """The library with one loop made to differ slightly from the torch operations."""

    def __init__(self, lib, name):
        self.lib, self.name = lib, name

    def __getattr__(self, attr):
        fn = getattr(self.lib, attr)
        if attr not in self.name:
            return fn
        if attr == "adamw_update":
            return lambda p, m1, s, lr, qf, rows, cols, e: fn(p, m1, s, lr, qf, rows, cols, e * 1.5 + 1e-7)
        if attr == "adamw_onepass":
            return lambda *a: fn(*a[:12], a[12] * 1.5 + 1e-7, *a[13:])
        if attr == "sgd":
            return lambda p, g, buf, lr, wd, rows, cols, mom, moms, coef: fn(p, g, buf, lr, wd, rows, cols, mom * 0.999,
                                                                                moms, coef)
        if attr == "dropout_forward":
            return lambda st, y, out, stride, scale, thr, inv, rows, per_row: fn(st, y, out, stride, scale, thr, inv,
                                                                                  rows, per_row - 1 if per_row > 1 else 1)
        if attr == "epoch_order":
            return lambda key, memb, Smax, n_sub, K, g0, total, Nmax, out, work: fn(key, memb, Smax, n_sub, K, g0 + 1,
                                                                                    total, Nmax, out, work)
        if attr == "argmax_is":  # labels read one position late
            return lambda x, y, ystride, K, C, N, out, best, arg: fn(x, y + 8, ystride, K, C, N, out, best, arg)
        if attr == "rows_nonfinite":  # the last value of each row unread
            return lambda x, rows, cols, bad: fn(x, rows, cols - 1, bad)
        raise AssertionError(attr)


@needs_loops
@pytest.mark.parametrize("name,reported", [(("adamw_update", "adamw_onepass"), "adamw"), ("sgd", "sgd"), ("dropout_forward", "dropout"),
                                           ("epoch_order", "epoch_order"), ("argmax_is", "argmax_is"),
                                           ("rows_nonfinite", "rows_nonfinite")])
def test_check_rejects_a_loop_that_differs(name, reported):
    """The load-time check compares every loop with the operations it replaces: a loop that is off
    (another epsilon, momentum, a short row, another stream position) is named, and the trainer then
    keeps its torch path."""
    assert cpu_kernels._self_check(_Perturbed(cpu_kernels.load(), (name,) if isinstance(name, str) else name)) == reported


@needs_loops
def test_adamw_in_one_pass_and_in_two_equal_torch():
    """AdamW in one C pass (PyTorch's own square root called from C, where this build exports it) and
    in two passes around ``torch.sqrt`` both give the torch path's numbers."""
    lib = cpu_kernels.load()
    vsqrt = lib.vsqrt
    try:
        lib.vsqrt = None
        assert not cpu_kernels._check_adamw(lib)
    finally:
        lib.vsqrt = vsqrt
    assert not cpu_kernels._check_adamw(lib)


def test_without_a_compiler_or_when_disabled_the_torch_path_is_used(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernels, "_STATE", {})
    monkeypatch.setenv("WSNETS_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert cpu_kernels.load() is None
    assert "no-such-cc" in cpu_kernels.status()
    assert not list(tmp_path.rglob("*.so"))
    # a group still trains (the torch path), and the engine says it has no loops
    arch = wsnets.mlp(2, [6], 4)
    ck = list(train_group(arch, _runs(arch, 3), epochs=1, checkpoints=[1], batch_size=32,
                          bank=DataBank.build(["blobs2"])))
    assert torch.isfinite(ck[0].metrics["train_loss"]).all()
    monkeypatch.setattr(cpu_kernels, "_STATE", {})
    monkeypatch.setenv("WSNETS_CPU_KERNELS", "0")
    assert cpu_kernels.load() is None and "WSNETS_CPU_KERNELS=0" in cpu_kernels.status()


@needs_loops
def test_library_is_built_once_into_the_cache(monkeypatch, tmp_path):
    """Built into ``$WSNETS_CACHE/kernels`` under a content name; a new process reuses the file."""
    monkeypatch.setattr(cpu_kernels, "_STATE", {})
    monkeypatch.setenv("WSNETS_CACHE", str(tmp_path))
    assert cpu_kernels.load() is not None, cpu_kernels.status()
    files = list((tmp_path / "kernels").iterdir())
    assert len(files) == 1 and files[0].name.startswith("zoo_cpu_") and files[0].suffix == ".so"
    stamp = files[0].stat().st_mtime_ns
    monkeypatch.setattr(cpu_kernels, "_STATE", {})
    assert cpu_kernels.load() is not None
    assert [f.stat().st_mtime_ns for f in (tmp_path / "kernels").iterdir()] == [stamp]


@needs_loops
def test_zoo_build_says_whether_the_loops_ran_and_builds_the_same_zoo(monkeypatch, tmp_path, capsys):
    """``wsnets zoo build`` names the path it trained with; with the loops switched off it writes the
    same shards byte for byte (and the same index rows)."""
    from pathlib import Path

    from wsnets.cli import main
    root = Path(__file__).resolve().parents[2]
    args = ["zoo", "build", str(root / "zoo" / "digits-mlp.toml"), "--limit", "12", "--workers", "1"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "fused CPU loops)" in out and "off" not in out
    monkeypatch.setattr(cpu_kernels, "_STATE", {})
    monkeypatch.setenv("WSNETS_CPU_KERNELS", "0")
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    assert "fused CPU loops off (disabled by WSNETS_CPU_KERNELS=0)" in capsys.readouterr().out
    shards = {z: {f.name: f.read_bytes() for f in (tmp_path / z / "shards").iterdir()} for z in "ab"}
    assert len(shards["a"]) >= 2 and shards["a"] == shards["b"]
    rows = [[(r["model_id"], r["epoch"], r["test_acc"], r["train_loss"]) for r in wsnets.zoo.open(tmp_path / z).rows]
            for z in "ab"]
    assert len(rows[0]) == 36 and sorted(rows[0]) == sorted(rows[1])
