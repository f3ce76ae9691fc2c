import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import wasserstein_distance

import wsnets
from wsnets.landscape import (HessianOperator, hutchinson_trace, slq_density, top_eigenvalues)
from wsnets.landscape._functional import FunctionalNet

from .helpers import trained_tiny


@pytest.fixture(scope="module")
def tiny():
    ws, (X, y) = trained_tiny()
    data = [(X[:50], y[:50]), (X[50:], y[50:])]  # uneven batches: weighting by size matters
    op = HessianOperator(ws, data)
    net = FunctionalNet(ws)
    H = torch.autograd.functional.hessian(lambda t: F.cross_entropy(net(t, X), y), net.theta0)
    return op, H, torch.linalg.eigvalsh(H)


def test_hvp_matches_exact_hessian_both_backends(tiny):
    op, H, _ = tiny
    V = torch.randn(4, op.size, dtype=torch.float64)
    assert torch.allclose(op.matmat(V), V @ H, atol=1e-10)
    op2 = HessianOperator(op.net.ws, op.data, backend="autograd")
    assert torch.allclose(op2.matmat(V), V @ H, atol=1e-10)


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_top5_match_eigvalsh(tiny, method):
    op, _, ev = tiny
    exact = ev.flip(0)[:5]
    assert exact[4] > ev.min().abs() * 10  # the top-5 are also the largest in magnitude here
    vals, vecs = top_eigenvalues(op, 5, method=method, tol=1e-7) if method == "power" else top_eigenvalues(op, 5)
    assert torch.allclose(vals, exact, rtol=1e-3)
    # and they are eigenvectors: H v = lambda v
    resid = op.matmat(vecs) - vals[:, None] * vecs
    assert (resid.norm(dim=1) / vals).max() < 0.05


def test_hutchinson_trace_within_5_percent(tiny):
    op, H, _ = tiny
    est, se = hutchinson_trace(op, 1000, batch=250)
    exact = float(H.trace())
    assert abs(est - exact) / exact < 0.05
    # the reported standard error is honest: within 4 standard errors, and the closed-form
    # variance of the Rademacher estimator (2 * sum of squared off-diagonal entries) agrees
    assert abs(est - exact) < 4 * se
    var = 2 * float((H ** 2).sum() - (H.diag() ** 2).sum())
    assert se == pytest.approx((var / 1000) ** 0.5, rel=0.3)


def test_slq_density_integrates_to_one_where_the_eigenvalues_are(tiny):
    op, _, ev = tiny
    d = slq_density(op, n_vectors=8, m=25)
    nodes, w = d.flat()
    assert w.sum() == pytest.approx(1.0, abs=1e-10)
    span = float(ev.max() - ev.min())
    # the quadrature measure is close to the exact spectral measure (uniform over eigenvalues)
    assert wasserstein_distance(nodes, ev.numpy(), w) < 0.05 * span
    sigma = 0.01 * span
    grid = np.linspace(float(ev.min()) - 10 * sigma, float(ev.max()) + 10 * sigma, 4001)
    dens = d.density(grid, sigma)
    assert np.trapezoid(dens, grid) == pytest.approx(1.0, abs=1e-3)
    # mass above the 5th largest exact eigenvalue ~ 5/P, mass near zero ~ most of it
    P = len(ev)
    top_mass = np.trapezoid(dens[grid > float(ev.flip(0)[5] + ev.flip(0)[4]) / 2], grid[grid > float(ev.flip(0)[5] + ev.flip(0)[4]) / 2])
    assert top_mass == pytest.approx(5 / P, abs=0.06)


def test_bad_backend():
    ws, data = trained_tiny(steps=1)
    with pytest.raises(wsnets.ConfigError):
        HessianOperator(ws, data, backend="jax")
