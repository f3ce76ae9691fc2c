import numpy as np
import pytest
import torch

import wsnets
from wsnets.landscape import naive_surface, random_directions, surface_1d, surface_2d, evaluate_points, Surface

ARCHS = [(wsnets.mlp(12, [16, 8], 5), (12,)), (wsnets.mlp(12, [16], 5, "tanh", batchnorm=True), (12,)),
         (wsnets.cnn(2, [4, 6], 5, batchnorm=True, kernel_size=[3, 5]), (2, 7, 7)),
         (wsnets.cnn(2, [4], 3, dims=1, kernel_size=5), (2, 20))]


@pytest.mark.parametrize("trick", [True, False])
@pytest.mark.parametrize("arch,shape", ARCHS, ids=lambda a: a.describe() if isinstance(a, wsnets.Architecture) else "")
def test_batched_points_equal_naive_loop(arch, shape, trick):
    ws = wsnets.WeightSpace.random(arch)
    X, y = torch.randn(60, *shape), torch.randint(0, arch.out_features, (60,))
    dirs = random_directions(ws, 2, include_bias=True, include_norm=True)
    coeffs = torch.randn(23, 2)
    # data given as two uneven batches: the mean must weight them by size
    data = [(X[:40], y[:40]), (X[40:], y[40:])]
    loss, acc = evaluate_points(ws, dirs, coeffs, data, chunk_size=7, first_layer_trick=trick)
    ref_loss, ref_acc = naive_surface(ws, dirs, coeffs, (X, y))
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(acc, ref_acc)
    assert loss.std() > 0  # the grid points really differ


def test_surface_2d_grid_layout_and_origin(tmp_path):
    arch = wsnets.mlp(12, [16], 5)
    ws = wsnets.WeightSpace.random(arch)
    X, y = torch.randn(50, 12), torch.randint(0, 5, (50,))
    d1, d2 = random_directions(ws, 2)
    xs, ys = np.linspace(-1, 1, 5), np.linspace(-0.5, 0.5, 3)
    s = surface_2d(ws, d1, d2, (X, y), xs, ys, meta={"dataset": "toy"})
    assert s.loss.shape == (5, 3)
    # [i, j] is (xs[i], ys[j]): check one off-centre point against a direct evaluation
    m = wsnets.landscape._functional.FunctionalNet(ws)
    theta = m.theta0 + xs[4] * d1.flat() + ys[0] * d2.flat()
    ref = torch.nn.functional.cross_entropy(m(theta.float(), X), y)
    assert s.loss[4, 0] == pytest.approx(float(ref), rel=1e-5)
    # the origin is the model itself
    assert s.loss[2, 1] == pytest.approx(float(torch.nn.functional.cross_entropy(ws.to_module()(X), y).detach()), rel=1e-5)
    path = s.save(tmp_path / "s.npz")
    back = Surface.load(path)
    assert np.array_equal(back.loss, s.loss) and np.array_equal(back.ys, ys)
    assert back.meta["dataset"] == "toy" and wsnets.Architecture.from_json(back.meta["arch"]) == arch
    line = surface_1d(ws, d1, (X, y), xs)
    assert np.allclose(line.loss, s.loss[:, 1], rtol=1e-5)
    assert Surface.load(line.save(tmp_path / "l.npz")).ys is None


def test_wrong_direction_architecture():
    ws = wsnets.WeightSpace.random(wsnets.mlp(12, [16], 5))
    other = wsnets.WeightSpace.random(wsnets.mlp(12, [8], 5))
    with pytest.raises(wsnets.ArchitectureMismatchError, match="direction 0"):
        evaluate_points(ws, [other], torch.zeros(1, 1), (torch.randn(3, 12), torch.zeros(3, dtype=torch.long)))
