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
