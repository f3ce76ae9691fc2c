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


@pytest.mark.parametrize("nan_at", [0, 1, 3])
def test_greedy_soup_ranks_an_ingredient_scored_nan_last(nan_at):
    """A diverged ingredient scores NaN: it must neither break the ranking (NaN compares false, so a plain
    sort leaves the order arbitrary) nor, ranked first, become the soup whose NaN no candidate can beat."""
    ms = [wsnets.WeightSpace.random(wsnets.mlp(4, [8], 2), generator=torch.Generator().manual_seed(i))
          for i in range(4)]
    scores = [0.5, 0.9, 0.7, 0.6]
    scores[nan_at] = float("nan")
    flats = [m.flat() for m in ms]

    def score(ws):   # each ingredient its score; a soup the mean of its members' (NaN members count 0)
        members = [i for i in range(4) if torch.equal(ws.flat(), flats[i])]
        if members:
            return scores[members[0]]
        return 0.0
    r = greedy_soup(ms, score)
    finite = [i for i in range(4) if i != nan_at]
    best = max(finite, key=lambda i: scores[i])
    assert r.ingredients == [best] and r.score == scores[best]
    assert [i for i, _, _ in r.history] == sorted(finite, key=lambda i: -scores[i])[1:] + [nan_at]
    with pytest.raises(wsnets.errors.ConfigError, match="every ingredient scored NaN"):
        greedy_soup(ms[:2], lambda ws: float("nan"))
