import math

import numpy as np
import pytest
import torch

from wsnets.esd.eigen import layer_spectrum
from wsnets.esd.metrics import (_linear_kde, fit_mp, jensen_shannon_distance, norm_metrics,
                                randomized_eigenvalues)

from .conftest import quiet


def _evals(w):
    return layer_spectrum(w, 2).evals[0].numpy()


def test_gaussian_matrix_is_pure_mp_bulk():
    g = torch.Generator().manual_seed(0)
    for N, M in ((400, 200), (300, 300)):
        r = fit_mp(_evals(torch.randn(N, M, generator=g)), N, M)
        assert r["num_spikes"] == 0
        assert abs(r["mp_softrank"] - 1) < 0.1
        assert abs(r["sigma_mp"] - 1) < 0.1  # unit-variance entries after rescaling


def test_planted_rank_one_spike_is_found():
    g = torch.Generator().manual_seed(1)
    N, M = 400, 200
    u, v = torch.randn(N, 1, generator=g), torch.randn(1, M, generator=g)
    theta = 2.0 * (math.sqrt(N) + math.sqrt(M))  # twice the bulk edge in singular value
    w = torch.randn(N, M, generator=g) + theta * (u / u.norm()) @ (v / v.norm())
    assert fit_mp(_evals(w), N, M)["num_spikes"] == 1


def test_mp_fit_matches_weightwatcher(ww):
    w = torch.randn(120, 60, dtype=torch.float64)
    w[:, 0] += 2.0
    ev = _evals(w)
    with quiet():
        ref = ww.WeightWatcher().mp_fit(ev, 120, 60, 1, "x", 0, 0, False, False, "/tmp", "b", 0.5, True, ev)
    ours = fit_mp(ev, 120, 60)
    got = (ours["num_spikes"], ours["sigma_mp"], ours["mp_softrank"], ours["bulk_min"], ours["bulk_max"], ours["W_scale"])
    np.testing.assert_allclose(np.array(got, float), np.array(ref, float), rtol=1e-9)


def test_linear_kde_matches_sklearn():
    from sklearn.neighbors import KernelDensity
    d = np.random.default_rng(0).standard_normal(80)
    grid = np.linspace(-3, 3, 200)
    ref = np.exp(KernelDensity(kernel="linear", bandwidth=0.1).fit(d[:, None]).score_samples(grid[:, None]))
    np.testing.assert_allclose(_linear_kde(d, grid, 0.1), ref, atol=1e-12)


def test_norm_metrics_closed_forms():
    ev = torch.tensor([[1.0, 2.0, 4.0, 8.0]], dtype=torch.float64)
    m = norm_metrics(ev, torch.tensor([2.0], dtype=torch.float64), N=10, M=4)
    assert float(m["log_norm"]) == pytest.approx(math.log10(15))
    assert float(m["stable_rank"]) == pytest.approx(15 / 8)
    assert float(m["alpha_weighted"]) == pytest.approx(2 * math.log10(8))
    assert float(m["log_alpha_norm"]) == pytest.approx(math.log10(1 + 4 + 16 + 64))
    p = ev[0].numpy() / 15 + 1e-10
    assert float(m["entropy"]) == pytest.approx(-(p * np.log(p)).sum() / math.log(4 + 1e-10))
    assert int(m["matrix_rank"]) == 4
    nan = norm_metrics(ev, torch.tensor([float("nan")], dtype=torch.float64), N=10, M=4)
    assert math.isnan(float(nan["alpha_weighted"])) and math.isfinite(float(nan["log_norm"]))


def test_randomized_eigenvalues_keep_the_entries_and_js_matches_scipy():
    from scipy.spatial.distance import jensenshannon
    w = torch.randn(3, 20, 10)
    r = randomized_eigenvalues(w, 2, replicas=2, generator=torch.Generator().manual_seed(0))
    assert r.shape == (3, 20)
    # shuffling keeps the Frobenius norm: sum of eigenvalues per replica equals ||W||^2
    torch.testing.assert_close(r.sum(1), 2 * w.double().pow(2).sum((1, 2)))
    p, q = torch.rand(2, 15, dtype=torch.float64), torch.rand(2, 15, dtype=torch.float64)
    ours = jensen_shannon_distance(p, q)
    for i in range(2):
        assert float(ours[i]) == pytest.approx(jensenshannon(p[i].numpy(), q[i].numpy()), rel=1e-10)
