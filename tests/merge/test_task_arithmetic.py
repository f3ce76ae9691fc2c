
import pytest
import torch

import wsnets
from wsnets.errors import ConfigError
from wsnets.merge import task_arithmetic, task_vectors, ties, ties_vector, trim

ARCH = wsnets.mlp(5, [6], 3, batchnorm=True)


def _family(T, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    base = wsnets.WeightSpace.random(ARCH, generator=g)
    fts = [base.map(lambda t: t + scale * torch.randn(t.shape, generator=g)) for _ in range(T)]
    return base, fts


def test_ties_density_one_single_task_equals_task_arithmetic():
    base, (ft,) = _family(1)
    for lam in (0.3, 1.0):
        a, b = ties(base, [ft], density=1.0, scale=lam), task_arithmetic(base, [ft], scale=lam)
        torch.testing.assert_close(a.flat(), b.flat(), atol=1e-6, rtol=0)
    # ...and the result really moved away from the base
    assert (ties(base, [ft], density=1.0).flat() - base.flat()).abs().max() > 1e-2


def test_task_arithmetic_closed_form():
    base, fts = _family(3)
    got = task_arithmetic(base, fts, scale=1 / 3)  # = plain average of the fine-tuned parameters
    for k in base.params:
        if "running" in k:
            continue
        ref = torch.stack([f.params[k] for f in fts]).mean(0)
        torch.testing.assert_close(got.params[k], ref, atol=1e-6, rtol=1e-6)
    tv = task_vectors(base, fts)
    assert tv.batch_size == 3
    torch.testing.assert_close(tv[1].params["0.weight"], fts[1].params["0.weight"] - base.params["0.weight"])


def _ties_reference(tvs: torch.Tensor, density: float) -> torch.Tensor:
    """Element-by-element TIES, written as in the paper's Algorithm 1 (slow; tiny inputs only)."""
    T, P = tvs.shape
    k = int(torch.tensor(density * P).ceil().item())
    trimmed = torch.zeros_like(tvs)
    for t in range(T):
        order = sorted(range(P), key=lambda p: -abs(float(tvs[t, p])))[:k]
        for p in order:
            trimmed[t, p] = tvs[t, p]
    def sgn(v: float) -> int:
        return (v > 0) - (v < 0)
    out = torch.zeros(P)
    for p in range(P):
        col = [float(trimmed[t, p]) for t in range(T)]
        sign = sgn(sum(col))
        vals = [v for v in col if v != 0 and sgn(v) == sign]
        out[p] = sum(vals) / len(vals) if vals else 0.0
    return out


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_matches_elementwise_reference(density):
    g = torch.Generator().manual_seed(3)
    tvs = torch.randn(4, 37, generator=g)
    torch.testing.assert_close(ties_vector(tvs, density), _ties_reference(tvs, density), atol=1e-6, rtol=1e-6)


def test_trim_keeps_top_fraction_per_task():
    tvs = torch.randn(3, 50)
    t = trim(tvs, 0.2)
    assert ((t != 0).sum(1) == 10).all()
    kept_min = torch.where(t != 0, t.abs(), torch.inf).min(1).values
    dropped_max = torch.where(t == 0, tvs.abs(), 0.0).max(1).values
    assert (kept_min >= dropped_max).all()
    with pytest.raises(ConfigError):
        trim(tvs, 0.0)


def test_ties_on_models_equals_vector_form():
    base, fts = _family(3, seed=5)
    got = ties(base, fts, density=0.3, scale=0.8)
    keys = [k for k in base.params if "running" not in k]
    tv = torch.cat([torch.stack([f.params[k] - base.params[k] for f in fts]).flatten(1) for k in keys], 1)
    ref = torch.cat([base.params[k].flatten() for k in keys]) + 0.8 * _ties_reference(tv, 0.3)
    torch.testing.assert_close(torch.cat([got.params[k].flatten() for k in keys]), ref, atol=1e-5, rtol=1e-5)
    # running statistics: mean of the fine-tuned models
    torch.testing.assert_close(got.params["1.running_var"], torch.stack([f.params["1.running_var"] for f in fts]).mean(0))
