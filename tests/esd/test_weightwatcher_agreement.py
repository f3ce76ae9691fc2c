"""Same numbers as the reference implementation (weightwatcher 0.7.7) on the same small models."""

import numpy as np
import pytest
import torch
from torch import nn

from wsnets.esd import analyze, summary

from .conftest import quiet

COLUMNS = ("alpha_weighted", "log_norm", "log_spectral_norm", "stable_rank", "log_alpha_norm", "entropy")


def _heavy_tailed_(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, m in enumerate(model.modules()):
            if isinstance(m, (nn.Linear, nn.Conv2d)) and i % 2 == 0:  # mix Student-t and default init layers
                t = torch.distributions.StudentT(2.5).sample(m.weight.shape)
                m.weight.copy_(0.05 * t)
    return model


def _compare(ww, model, **kw):
    with quiet():
        ref = ww.WeightWatcher(model=model).analyze(**kw)
    ours = analyze(model, **kw)
    ref_names = [f"{n}.weight" for n in ref["longname"]]
    assert list(ours["name"]) == ref_names
    both = ((ours["status"] == "success").to_numpy()) & (ref["alpha"].to_numpy() > 0)
    assert both.sum() >= len(ref) - 1
    np.testing.assert_allclose(ours["alpha"][both], ref["alpha"][both], atol=0.02)
    for c in COLUMNS:
        np.testing.assert_allclose(ours[c][both], ref[c][both].astype(float), rtol=1e-4, err_msg=c)
    for c in ("N", "M", "rf", "num_pl_spikes", "matrix_rank"):
        np.testing.assert_array_equal(ours[c][both].astype(int), ref[c][both].astype(int), err_msg=c)
    return ours, ref


def test_mlp(ww):
    model = _heavy_tailed_(nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 48), nn.ReLU(),
                                         nn.Linear(48, 10)), seed=0)
    ours, ref = _compare(ww, model, mp_fit=True)
    np.testing.assert_allclose(ours["mp_softrank"], ref["mp_softrank"], rtol=1e-4)
    np.testing.assert_array_equal(ours["num_spikes"], ref["num_spikes"])
    s = summary(ours)
    with quiet():
        w = ww.WeightWatcher(model=model)
        w.analyze()
        ref_summary = w.get_summary()
    for k in ("alpha", "log_norm", "stable_rank", "alpha_weighted"):
        assert s[k] == pytest.approx(ref_summary[k], rel=1e-4)


def test_cnn_conv2d(ww):
    model = _heavy_tailed_(nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(),
                                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)), seed=1)
    ours, _ = _compare(ww, model)
    assert list(ours["rf"][:2]) == [9, 9]


def test_svd_method_gives_the_same_metrics_as_gram():
    model = _heavy_tailed_(nn.Sequential(nn.Linear(40, 80), nn.ReLU(), nn.Linear(80, 30)), seed=2)
    a, b = analyze(model), analyze(model, method="svd")
    np.testing.assert_allclose(a["alpha"], b["alpha"], rtol=1e-8)
    for c in COLUMNS:
        np.testing.assert_allclose(a[c], b[c], rtol=1e-8)


def test_cnn_per_slice_mode(ww):
    model = _heavy_tailed_(nn.Sequential(nn.Conv2d(8, 24, 3), nn.ReLU(), nn.Conv2d(24, 32, 2)), seed=3)
    with quiet():
        ref = ww.WeightWatcher(model=model).analyze(pool=False)
    ours = analyze(model, pool=False)
    assert len(ours) == len(ref) == 9 + 4
    np.testing.assert_array_equal(ours["slice_id"], ref["slice_id"])
    ok = ((ours["status"] == "success").to_numpy()) & (ref["alpha"].to_numpy() > 0)
    np.testing.assert_allclose(ours["alpha"][ok], ref["alpha"][ok], atol=0.02)
    for c in COLUMNS:
        np.testing.assert_allclose(ours[c][ok], ref[c][ok].astype(float), rtol=1e-4, err_msg=c)
