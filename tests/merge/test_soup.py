import pytest
import torch

import wsnets
from wsnets.merge import average, dataset_evaluator, evaluate, greedy_soup, uniform_soup


@pytest.fixture(scope="module")
def family(digits, train):
    """A base trained on digits, fine-tuned 5 times with varied learning rates and data orders.

    The last 20% of the training split is held out (it is what ``dataset_evaluator("digits")`` scores on).
    """
    x, y, _, _ = digits
    n_val = round(0.2 * len(x))
    xtr, ytr = x[:-n_val], y[:-n_val]
    arch = wsnets.mlp(64, [32], 10)
    base = train(wsnets.WeightSpace.random(arch, generator=torch.Generator().manual_seed(0)), xtr, ytr,
                 epochs=2, lr=0.05)
    fts = [train(base, xtr, ytr, epochs=1, lr=lr, seed=s) for s, lr in enumerate([0.3, 0.01, 0.05, 0.1, 0.2])]
    return base, fts, x[-n_val:], y[-n_val:]


def test_greedy_soup_never_loses_to_its_best_ingredient(family):
    _, fts, xv, yv = family

    def acc(ws):
        return float(evaluate(ws, xv, yv)[1])
    r = greedy_soup(fts, acc)
    independent = [acc(m) for m in fts]
    assert r.scores == pytest.approx(independent)
    assert r.ingredients[0] == max(range(5), key=lambda i: independent[i])
    assert r.score == pytest.approx(acc(r.model))
    assert r.score >= max(independent)
    # the recorded soup is the average of the kept ingredients
    torch.testing.assert_close(r.model.flat(), average([fts[i] for i in r.ingredients]).flat())
    assert len(r.history) == 4


def test_greedy_soup_by_dataset_name(family):
    _, fts, xv, yv = family
    r = greedy_soup(fts, "digits")
    best = max(float(evaluate(m, xv, yv)[1]) for m in fts)
    assert r.score >= best
    ev, _ = dataset_evaluator("digits")
    assert ev(r.model) == pytest.approx(r.score)


def test_uniform_soup_is_the_average(family):
    _, fts, _, _ = family
    torch.testing.assert_close(uniform_soup(fts).flat(), torch.stack([m.flat() for m in fts]).mean(0))


def test_greedy_soup_rejects_a_harmful_ingredient(family):
    """A destroyed ingredient (weights scrambled) must be tried and refused."""
    _, fts, xv, yv = family
    bad = fts[0].map(lambda t: t[torch.randperm(t.shape[0])] * 5 if t.dim() == 2 else t)
    r = greedy_soup(fts[:2] + [bad], lambda ws: float(evaluate(ws, xv, yv)[1]))
    assert 2 not in r.ingredients
    assert any(i == 2 and not ok for i, _, ok in r.history)
