"""Metrics agree with scipy / scikit-learn reference implementations, ties included."""

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn import metrics as skm

from wsnets.train import metrics as M


@pytest.mark.parametrize("ties", [False, True])
def test_kendall_spearman_match_scipy(ties):
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        a = torch.randn(40, generator=g)
        b = a + torch.randn(40, generator=g)
        if ties:
            a, b = (a * 2).round(), (b * 2).round()
        assert M.kendall_tau(a, b) == pytest.approx(stats.kendalltau(a, b).statistic, abs=1e-12)
        assert M.spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)


def test_rank_and_degenerate_cases():
    assert M.rank([3.0, 1.0, 3.0, 2.0]).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert np.isnan(M.kendall_tau([1, 1, 1], [1, 2, 3]))
    assert M.kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0


def test_r2_mae_match_sklearn():
    g = torch.Generator().manual_seed(2)
    t, p = torch.rand(30, generator=g, dtype=torch.float64), torch.rand(30, generator=g, dtype=torch.float64)
    assert M.r2(p, t) == pytest.approx(skm.r2_score(t, p), abs=1e-12)
    assert M.mae(p, t) == pytest.approx(skm.mean_absolute_error(t, p), abs=1e-12)
    assert M.r2(t, t) == 1.0


def test_classification_metrics_match_sklearn():
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 5, (60,), generator=g)
    p = torch.where(torch.rand(60, generator=g) < 0.6, t, torch.randint(0, 4, (60,), generator=g))
    cm = M.confusion_matrix(p, t, 5)
    assert cm.tolist() == skm.confusion_matrix(t, p, labels=range(5)).tolist()
    assert M.accuracy(p, t) == pytest.approx(skm.accuracy_score(t, p))
    assert M.macro_f1(p, t, 5) == pytest.approx(skm.f1_score(t, p, average="macro"), abs=1e-12)
    logits = torch.nn.functional.one_hot(p, 5).float()
    assert M.classification_metrics(logits, t, 5)["accuracy"] == pytest.approx(skm.accuracy_score(t, p))


def test_mean_std_over_seeds():
    ms = M.mean_std([0.5, 0.7, 0.6, float("nan")])
    assert ms["n"] == 3 and ms["mean"] == pytest.approx(0.6) and ms["std"] == pytest.approx(np.std([0.5, .7, .6], ddof=1))
    agg = M.aggregate([{"t": {"kendall_tau": 0.2, "confusion": [[1]]}}, {"t": {"kendall_tau": 0.4, "confusion": [[1]]}}])
    assert agg["t"]["kendall_tau"]["mean"] == pytest.approx(0.3) and "confusion" not in agg["t"]
    assert M.fmt(agg["t"]["kendall_tau"]) == "0.300 ± 0.141"
    assert M.fmt(M.mean_std([0.25])) == "0.250 (1 seed)"   # one value: no made-up ± 0.000
