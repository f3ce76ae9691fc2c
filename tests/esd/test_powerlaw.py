import math

import numpy as np
import pytest
import torch

from wsnets.esd.powerlaw import fit_powerlaw, fit_powerlaw_ragged

from .conftest import quiet


def _pareto(alpha: float, shape, seed: int) -> torch.Tensor:
    """Continuous power law p(x) ~ x^-alpha on [1, inf) by inverse CDF."""
    g = torch.Generator().manual_seed(seed)
    return (1 - torch.rand(shape, generator=g, dtype=torch.float64)) ** (-1 / (alpha - 1))


@pytest.mark.parametrize("alpha", [1.5, 2.0, 2.5])
def test_recovers_known_exponent(alpha):
    f = fit_powerlaw(_pareto(alpha, (4, 2000), seed=int(alpha * 10)))
    assert f.ok.all()
    assert (f.alpha - alpha).abs().max() < 0.1
    assert (f.sigma > 0).all() and (f.n_tail > 100).all()


def test_brute_force_ks_selection_and_closed_form_mle():
    x = np.sort(_pareto(2.2, 60, seed=3).numpy())
    best = (np.inf, None, None)
    for i in range(len(x) - 1):  # reference: every candidate xmin, one at a time
        tail = x[i:]
        a = 1 + len(tail) / np.log(tail / x[i]).sum()
        d = np.abs(1 - (tail / x[i]) ** (1 - a) - np.arange(len(tail)) / len(tail)).max() if a > 1 else 1.0
        if d < best[0]:
            best = (d, x[i], a)
    f = fit_powerlaw(torch.tensor(x))
    assert float(f.D[0]) == pytest.approx(best[0], rel=1e-10)
    assert float(f.xmin[0]) == best[1]
    assert float(f.alpha[0]) == pytest.approx(best[2], rel=1e-10)
    n_tail = int((x >= best[1]).sum())
    assert int(f.n_tail[0]) == n_tail
    assert float(f.sigma[0]) == pytest.approx((best[2] - 1) / math.sqrt(n_tail), rel=1e-10)


def test_batch_equals_rows_and_thresholded_values_are_dropped():
    x = _pareto(2.5, (3, 300), seed=1)
    x[1, :40] = 0.0  # below WeightWatcher's 1e-5 threshold: not part of the sample
    f = fit_powerlaw(x)
    for i in range(3):
        g = fit_powerlaw(x[i][x[i] > 1e-5])
        torch.testing.assert_close(f.alpha[i], g.alpha[0])
        torch.testing.assert_close(f.D[i], g.D[0])
    assert int(f.n_fit[1]) == 260


def test_too_few_values_fail_with_nan_and_status():
    f = fit_powerlaw_ragged([torch.tensor([0.0, 0.0, 2.0]), torch.tensor([1.0]), _pareto(2, 50, 0)])
    assert torch.isnan(f.alpha[:2]).all() and not f.ok[:2].any()
    assert f.status(0).startswith("failed: 1 eigenvalue")
    assert f.status(2) == "success"


def test_agrees_with_weightwatcher_wwfit_including_small_samples(ww):
    from weightwatcher.WW_powerlaw import WWFit
    rng = np.random.default_rng(0)
    rows = []
    for n in (9, 12, 19, 20, 40, 200):
        for _ in range(4):
            rows.append(np.sort(rng.pareto(rng.uniform(0.5, 3), n) + 0.05))
    ours = fit_powerlaw_ragged([torch.tensor(r) for r in rows])
    for i, r in enumerate(rows):
        with quiet():
            ref = WWFit(r)
        assert float(ours.alpha[i]) == pytest.approx(ref.alpha, rel=1e-9)
        assert float(ours.xmin[i]) == pytest.approx(ref.xmin, rel=1e-12)
        assert float(ours.D[i]) == pytest.approx(ref.D, rel=1e-9, abs=1e-12)
        if ref.sigma >= 0:  # WeightWatcher's small-sample fallback reports -1/sqrt(n) (a bug)
            assert float(ours.sigma[i]) == pytest.approx(ref.sigma, rel=1e-9)
