"""The fused Triton step kernel (wsnets.zoo.fused) computes what the torch MLP engine computes.

On a machine with CUDA the kernel runs on the GPU; elsewhere Triton's interpreter runs it on the CPU
(``TRITON_INTERPRET=1``), so these tests check the kernel's arithmetic wherever Triton is installed."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import (tests/conftest.py sets it too)
pytest.importorskip("triton")

import wsnets  # noqa: E402
from wsnets.errors import ConfigError  # noqa: E402
from wsnets.zoo.recipe import RunSpec  # noqa: E402
from wsnets.zoo.trainer import DataBank, train_group  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _bank(n=60, d=5, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, xt = torch.randn(1, n, d, generator=g), torch.randn(1, 40, d, generator=g)
    y, yt = torch.randint(0, classes, (1, n), generator=g), torch.randint(0, classes, (1, 40), generator=g)
    return DataBank(["x"], x.to(DEV), y.to(DEV), torch.tensor([n], device=DEV), xt.to(DEV), yt.to(DEV),
                    torch.tensor([40], device=DEV), classes)


def _runs(arch, hps):
    base = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0, "init_scale": 1.0, "dropout": 0.0,
            "label_noise": 0.0, "train_fraction": 1.0, "grad_clip": 1e9}
    return [RunSpec(i, f"f-{i}", 50 + i, arch, "x", {**base, **hp}) for i, hp in enumerate(hps)]


HPS = [{"optimizer": "sgd", "lr": 0.1, "weight_decay": 0.01}, {"optimizer": "adam", "lr": 0.01},
       {"optimizer": "sgd", "lr": 0.3, "momentum": 0.0, "label_noise": 0.3, "grad_clip": 0.05},  # clipping binds
       {"optimizer": "adam", "lr": 0.02, "weight_decay": 0.1, "train_fraction": 0.4, "grad_clip": 0.1}]


def _train(arch, runs, bank, fused, epochs=2, batch=20):
    return list(train_group(arch, runs, epochs=epochs, checkpoints=[epochs], batch_size=batch, bank=bank, device=DEV,
                            fused=fused))[-1]


@pytest.mark.parametrize("act,hidden", [(a, [7, 20]) for a in ("relu", "tanh", "sigmoid", "gelu", "silu", "elu",
                                                                 "softplus", "leaky_relu")] + [("relu", [33]), ("tanh", [16, 5, 9, 40])])
def test_fused_step_matches_torch_engine(act, hidden):
    """Mixed SGD/AdamW, weight decay, binding gradient clipping, label noise, a training subset, widths
    and batch (20 of a padded 32) that are not tile sizes: the same weights and metrics after 2 epochs."""
    arch = wsnets.mlp(5, hidden, 4, act)
    runs, bank = _runs(arch, HPS), _bank()
    a, b = _train(arch, runs, bank, False), _train(arch, runs, bank, True)
    for k in a.params:
        torch.testing.assert_close(b.params[k], a.params[k], rtol=1e-4, atol=1e-5, msg=k)
    torch.testing.assert_close(b.metrics["train_loss"], a.metrics["train_loss"], rtol=1e-4, atol=1e-5)


def test_fused_dropout_is_reproducible_and_per_model():
    """Dropout masks depend on the step and the model: rerunning gives the same weights, a model without
    dropout is unaffected by its neighbours' dropout, and dropout changes the models that have it."""
    arch = wsnets.mlp(5, [16], 4, "relu")
    bank = _bank()
    runs = _runs(arch, [{"dropout": 0.0}, {"dropout": 0.5}, {"dropout": 0.5, "lr": 0.07}])
    first, again = _train(arch, runs, bank, True), _train(arch, runs, bank, True)
    plain = _train(arch, _runs(arch, [{"dropout": 0.0}, {"dropout": 0.0}, {"dropout": 0.0, "lr": 0.07}]), bank, True)
    torch_ref = _train(arch, runs[:1], bank, False)
    for k in first.params:
        assert torch.equal(first.params[k], again.params[k])
        torch.testing.assert_close(first.params[k][0], torch_ref.params[k][0], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(first.params[k][1:], plain.params[k][1:], atol=1e-4)


def test_a_failing_kernel_hands_the_group_to_the_torch_path(monkeypatch):
    """If the kernel cannot compile or launch (another GPU, another Triton) in automatic mode, the group
    goes on with the torch path from that step, on the same weights and optimizer state: after a failure
    at step 4, the result equals a torch-path run; with fused=True the error is raised."""
    from wsnets.zoo import fused, trainer as T
    arch = wsnets.mlp(5, [7, 20], 4, "tanh")
    runs, bank = _runs(arch, HPS), _bank()
    real, calls = fused.step, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) >= 4:
            raise RuntimeError("out of resources")
        return real(*a, **k)
    monkeypatch.setattr(fused, "step", flaky)
    with pytest.raises(RuntimeError, match="out of resources"):
        _train(arch, runs, bank, True)
    calls.clear()
    real_plan = T._MLPEngine._fused_plan

    def auto(self, *a):  # fused=True's kernel with automatic mode's fallback
        used = real_plan(self, *a)
        self.fz_insist = False
        return used
    monkeypatch.setattr(T._MLPEngine, "_fused_plan", auto)
    with pytest.warns(RuntimeWarning, match="torch path"):
        got = _train(arch, runs, bank, True)
    monkeypatch.setattr(fused, "step", real)
    mixed = _train(arch, runs, bank, False)
    assert len(calls) == 4
    for k in got.params:
        torch.testing.assert_close(got.params[k], mixed.params[k], rtol=1e-4, atol=1e-5)


def test_fused_true_refuses_what_the_kernel_does_not_cover():
    arch = wsnets.mlp(5, [64] * 4, 4, "relu")  # 128 * (16 + 4 * 64 + 16) values per program: too many registers
    with pytest.raises(ConfigError, match=r"summed padded widths <= 20480.*\(36864\)"):
        _train(arch, _runs(arch, HPS[:1]), _bank(), True, batch=128)



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_zoo_built_with_the_fused_kernel_reproduces_its_recorded_accuracy(tmp_path):
    """A 300-model group (fused kernel) built by `zoo build` on the GPU: each stored checkpoint, loaded
    into a plain nn.Module, gives exactly its recorded test accuracy, and the zoo records the trainer tag."""
    import sqlite3

    from wsnets.zoo import build, datasets, open as open_zoo, parse_recipe
    from wsnets.zoo.trainer import TRAINER_VERSION
    r = parse_recipe({"name": "fz", "seed": 5, "population": 300, "datasets": ["digits"], "epochs": 2,
                      "checkpoints": [2], "batch_size": 64, "group_size": 300,
                      "architecture": {"kind": "mlp", "depth": 2, "width": 32, "activation": "relu"},
                      "hyperparameters": {"optimizer": ["sgd", "adam"], "lr": {"log_uniform": [1e-3, 0.3]},
                                          "dropout": {"uniform": [0, 0.3], "zero": 0.5},
                                          "label_noise": {"uniform": [0, 0.3], "zero": 0.5}}})
    build(r, tmp_path / "z", progress=False, device="cuda")
    con = sqlite3.connect(str(tmp_path / "z" / "index.sqlite"))
    assert con.execute("SELECT value FROM meta WHERE key = 'trainer'").fetchone()[0] == f"{TRAINER_VERSION}+cuda+fused-ieee"
    con.close()
    _, _, xt, yt = datasets.load("digits")
    xt, yt = xt.cuda(), yt.cuda()
    recs = list(open_zoo(tmp_path / "z").filter(epoch=2))
    assert len(recs) == 300
    for rec in recs:
        with torch.no_grad():
            acc = (rec.to_module().cuda()(xt).argmax(1) == yt).sum().item() / len(yt)
        assert acc == rec["test_acc"], rec["model_id"]
