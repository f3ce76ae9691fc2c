import numpy as np
import pytest
import torch
from scipy.linalg import hadamard

import wsnets
from wsnets.landscape.intrinsic import (DenseProjection, FastfoodProjection, SparseProjection, d_int90, fwht,
                                        intrinsic_dimension, make_projection)


def test_fwht_is_hadamard_matrix():
    x = torch.randn(3, 16, dtype=torch.float64)
    assert torch.allclose(fwht(x), x @ torch.tensor(hadamard(16), dtype=torch.float64), atol=1e-12)
    with pytest.raises(wsnets.ConfigError):
        fwht(torch.randn(12))


def test_fastfood_equals_its_factors():
    D, d = 50, 7
    p = FastfoodProjection(D, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    L = p.L
    H = torch.tensor(hadamard(L), dtype=torch.float64)
    Pi = torch.eye(L, dtype=torch.float64)[:, p.Pi]  # x @ Pi == x[..., Pi]
    V = torch.diag(p.B) @ H @ Pi @ torch.diag(p.G) @ H * p.scale  # row-vector convention: z V
    z = torch.randn(4, d, dtype=torch.float64)
    zp = torch.nn.functional.pad(z, (0, L - d))
    assert torch.allclose(p(z), (zp @ V)[:, :D], atol=1e-10)


@pytest.mark.parametrize("kind", ["dense", "sparse", "fastfood"])
def test_projections_are_linear_with_unit_columns(kind):
    D, d = 3000, 40
    p = make_projection(kind, D, d, generator=torch.Generator().manual_seed(0))
    M = p.matrix()
    assert M.shape == (D, d)
    z = torch.randn(5, d)
    assert torch.allclose(p(z), z @ M.T, atol=1e-4)
    norms = M.norm(dim=0)
    if kind == "fastfood":  # unit norm in expectation (the Gaussian diagonal varies)
        assert norms.pow(2).mean() == pytest.approx(1.0, rel=0.1)
    else:
        assert torch.allclose(norms, torch.ones(d), atol=1e-5)
    if kind == "sparse":
        density = (M != 0).float().mean()
        assert density < 3 / D ** 0.5
    # nearly orthogonal columns
    G = M.T @ M
    assert (G - torch.diag(G.diag())).abs().max() < 0.15


def test_d_int90_picks_smallest_reaching_threshold():
    assert d_int90([10, 100, 50, 200], [0.2, 0.95, 0.89, 0.99], 1.0) == 100
    assert d_int90([10, 20], [0.1, 0.2], 1.0) is None


def test_batched_sweep_equals_training_each_d_alone():
    """Masking z to the first d coordinates makes the models independent: sweeping [3, 8] together
    gives exactly the d=8 model of a sweep over [8] alone, and more dimensions fit better."""
    xtr = torch.randn(200, 2)
    ytr = (xtr[:, 0] > 0).long() + 2 * (xtr[:, 1] > 0).long()
    arch = wsnets.mlp(2, [16], 4)
    ws = wsnets.WeightSpace.random(arch, generator=torch.Generator().manual_seed(0))
    kw = dict(steps=60, batch_size=64, lr=0.05, full_lr=0.01, seed=3)
    both = intrinsic_dimension(ws, (xtr, ytr), (xtr, ytr), [1, 40], **kw)
    alone = intrinsic_dimension(ws, (xtr, ytr), (xtr, ytr), [40], **kw)
    assert both.test_acc[1] == pytest.approx(alone.test_acc[0], abs=1e-6)
    assert both.full_test_acc == pytest.approx(alone.full_test_acc, abs=1e-6)
    assert both.full_train_acc > 0.9 and both.train_acc[1] > both.train_acc[0]
    assert both.to_dict()["d_int90"] == both.d_int90
    with pytest.raises(wsnets.ConfigError, match="subspace"):
        intrinsic_dimension(ws, (xtr, ytr), (xtr, ytr), [10_000], steps=1)
    with pytest.raises(wsnets.ConfigError, match="projection"):
        intrinsic_dimension(ws, (xtr, ytr), (xtr, ytr), [4], projection="orthogonal", steps=1)
