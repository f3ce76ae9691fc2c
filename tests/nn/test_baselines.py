"""StatNN, StatGBM, FlatMLP (with permutation augmentation) and ESD-feature baselines."""

import numpy as np
import pytest
import torch

import wsnets
from wsnets.errors import ArchitectureMismatchError, ConfigError, ShapeMismatchError
from wsnets.nn import ESDFeatures, FlatMLP, StatGBM, build_encoder
from wsnets.testing import assert_invariant, assert_same_function

from .helpers import ARCHS, nets


def test_stat_features_are_the_unterthiner_statistics_and_invariant():
    ws = nets(ARCHS["cnn2d_bn"], 6)
    enc = build_encoder({"name": "stats", "hidden": [16], "out_dim": 4}, ws)
    x = enc.features(ws)
    torch.testing.assert_close(x, ws.stat_features())
    # the fitted standardization makes every non-constant column mean 0, std 1
    z = (x - enc.mean) / enc.std
    varying = x.std(0) > 1e-6
    torch.testing.assert_close(z.mean(0)[varying], torch.zeros(int(varying.sum())), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False)[varying], torch.ones(int(varying.sum())), atol=1e-4, rtol=0)
    assert_invariant(enc.eval(), ws, represent=lambda w: w.stat_features())
    with pytest.raises(ShapeMismatchError, match=r"\[B, 42\]"):
        enc(torch.zeros(2, 27))


def test_stat_gbm_regression_and_classification():
    """Targets that are functions of the statistics are learned (train R^2 > 0.9, accuracy 1)."""
    g = torch.Generator().manual_seed(0)
    scales = torch.empty(80).uniform_(0.3, 3.0, generator=g)
    ws = wsnets.stack([wsnets.WeightSpace.random(ARCHS["mlp"], generator=g, scale=float(s)) for s in scales])
    y = scales.log().numpy()
    gbm = StatGBM(max_iter=60).fit(ws, y)
    pred = gbm.predict(ws)
    assert pred.shape == (80,)
    assert 1 - ((pred - y) ** 2).mean() / y.var() > 0.9
    two = StatGBM(max_iter=30).fit(ws.stat_features(), np.stack([y, -y], 1))
    assert two.predict(ws).shape == (80, 2)
    labels = (scales > 1).long()
    clf = StatGBM(task="classification", max_iter=30).fit(ws, labels)
    assert (clf.predict(ws) == labels.numpy()).mean() == 1.0
    assert clf.predict_proba(ws).shape == (80, 2)
    with pytest.raises(ConfigError, match="task"):
        StatGBM(task="ranking")


def test_flat_mlp_augmentation_preserves_function_and_arch_is_checked():
    ws = nets(ARCHS["mlp_bn"], 3)
    enc = FlatMLP(ws.arch, out_dim=4, hidden=(8,), permutation_augment=True)
    aug = enc.augment(ws, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(aug.flat(), ws.flat())
    for i in range(3):
        assert_same_function(ws[i].to_module(), aug[i].to_module())
    # plain flat MLP is not permutation invariant: that is why it needs augmentation
    enc.eval()
    assert (enc(ws.flat()) - enc(aug.flat())).abs().max() > 1e-6
    assert enc(ws).shape == (3, 4)
    other = nets(ARCHS["mlp"], 2)
    with pytest.raises(ArchitectureMismatchError, match="built for mlp:6-7-3"):
        enc(other)
    with pytest.raises(ArchitectureMismatchError, match="parameters"):
        enc(other.flat())


def test_esd_features_head_reads_wsnets_esd():
    pytest.importorskip("wsnets.esd")
    from wsnets.esd import esd_features
    ws = nets(wsnets.mlp(16, [12], 10), 4)
    enc = build_encoder({"name": "esd", "out_dim": 3}, ws)
    torch.testing.assert_close(enc.features(ws), esd_features(ws))
    assert enc(ws).shape == (4, 3)
    assert torch.isfinite(enc(ws)).all()
    assert_invariant(enc.eval(), ws, represent=lambda w: esd_features(w), rtol=1e-3)


def test_esd_missing_is_a_config_error(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "wsnets.esd", None)  # import of wsnets.esd now fails
    enc = ESDFeatures(5)
    with pytest.raises(ConfigError, match="wsnets.esd"):
        enc(nets(ARCHS["mlp"], 2))
