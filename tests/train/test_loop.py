"""The training loop on a tiny in-memory zoo: it learns, keeps the best epoch, stops early, schedules lr."""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _fakes  # noqa: E402

from wsnets.train import MetaModel, evaluate, fit  # noqa: E402
from wsnets.train.loop import normalization  # noqa: E402
from wsnets.train.meta_model import build_encoder  # noqa: E402


def _model(ds, cfg):
    enc = build_encoder(cfg.encoder, ds["train"].weightspaces())
    return MetaModel(enc, cfg.data.targets, classes={"dataset": _fakes.CLASSES},
                     normalization=normalization(ds["train"], cfg.data.targets), representation="flat")


def test_learns_several_targets_and_restores_best_epoch():
    ds = _fakes.splits()
    cfg = _fakes.config(epochs=25, optim={"patience": 0})
    mm = _model(ds, cfg)
    before = evaluate(mm, ds["val"])
    res = fit(mm, ds["train"], ds["val"], cfg)
    after = evaluate(mm, ds["val"])
    val_losses = [h["val"]["loss"] for h in res.history]
    assert res.epochs_run == 25
    assert after["loss"] == pytest.approx(min(val_losses), rel=1e-6)          # best weights, not the last
    assert res.best_epoch == val_losses.index(min(val_losses))
    assert after["loss"] < 0.6 * before["loss"]
    assert after["test_acc"]["kendall_tau"] > 0.5 and after["gen_gap"]["kendall_tau"] > 0.3
    assert after["dataset"]["accuracy"] > 0.7
    # normalization: predictions come back in target units
    assert abs(after["test_acc"]["mae"]) < 0.2


def test_early_stopping_and_cosine_schedule():
    ds = _fakes.splits()
    cfg = _fakes.config(epochs=40, optim={"patience": 2, "lr": 0.05})
    res = fit(_model(ds, cfg), ds["train"], ds["val"], cfg)
    assert res.epochs_run == 40 or res.epochs_run == res.best_epoch + 3    # stops after `patience` bad epochs
    cfg = _fakes.config(epochs=4, optim={"patience": 0, "warmup_epochs": 1})
    res = fit(_model(ds, cfg), ds["train"], ds["val"], cfg)
    lrs = [h["lr"] for h in res.history]
    steps = math.ceil(64 / 16)
    total, warm = 4 * steps, steps
    expect = [3e-3 * 0.5 * (1 + math.cos(math.pi * ((e + 1) * steps - warm) / (total - warm))) for e in range(4)]
    assert lrs == pytest.approx(expect, abs=1e-12)


def test_empty_training_split_is_an_error():
    ds = _fakes.splits()
    cfg = _fakes.config()
    empty = torch.utils.data.Subset(ds["train"], [])
    empty.collate = ds["train"].collate
    from wsnets.errors import ConfigError
    with pytest.raises(ConfigError, match="training split is empty"):
        fit(_model(ds, cfg), empty, ds["val"], cfg)


def test_select_tau_keeps_the_epoch_of_best_mean_validation_tau():
    from wsnets.errors import ConfigError
    ds = _fakes.splits()
    cfg = _fakes.config(epochs=12, optim={"patience": 0, "select": "tau", "lr": 0.03})
    mm = _model(ds, cfg)
    res = fit(mm, ds["train"], ds["val"], cfg)
    score = [(h["val"]["test_acc_tau"] + h["val"]["gen_gap_tau"] + h["val"]["dataset_acc"]) / 3 for h in res.history]
    assert res.best_epoch == score.index(max(score))
    after = evaluate(mm, ds["val"])
    got = (after["test_acc"]["kendall_tau"] + after["gen_gap"]["kendall_tau"] + after["dataset"]["accuracy"]) / 3
    assert got == pytest.approx(max(score), abs=1e-9)                        # the kept weights are that epoch's
    with pytest.raises(ConfigError, match="optim.select"):
        _fakes.config(optim={"select": "r2"})


def test_augment_permute_feeds_permuted_networks_and_refuses_feature_batches():
    import wsnets
    from wsnets.errors import ConfigError
    from wsnets.functional import forward
    from wsnets.train.loop import _augmenter
    from wsnets.weights import stack_shapes
    relu, tanh = wsnets.mlp(4, [6, 5], 3), wsnets.mlp(4, [6, 5], 3, "tanh")
    g = torch.Generator().manual_seed(0)
    nets = [w for a in (relu, tanh) for w in wsnets.WeightSpace.random(a, 2, generator=g)]
    aug = _augmenter(_fakes.config(data={"augment_permute": True}))
    x = torch.randn(3, 4)
    mixed = stack_shapes(nets)
    out = aug(mixed)
    assert not torch.equal(out.ws.params["0.weight"], mixed.ws.params["0.weight"])      # hidden neurons moved
    for arch, idx in mixed.groups():                                                     # each keeps its function
        before = forward(arch, {k: v[idx] for k, v in mixed.ws.params.items()}, x)
        after = forward(arch, {k: v[idx] for k, v in out.ws.params.items()}, x)
        torch.testing.assert_close(after, before)
    plain = wsnets.stack(nets[:2])
    torch.testing.assert_close(forward(relu, aug(plain).params, x), forward(relu, plain.params, x))
    assert _augmenter(_fakes.config())(x) is x
    with pytest.raises(ConfigError, match="tensors"):
        aug(torch.zeros(2, 5))
