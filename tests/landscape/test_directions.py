import pytest
import torch

import wsnets
from wsnets.landscape import directions as D


ARCHS = [wsnets.mlp(12, [16, 8], 5, batchnorm=True), wsnets.cnn(2, [4, 6], 5, batchnorm=True, kernel_size=[3, 5]),
         wsnets.mlp(6, [7], 3, layernorm=True)]


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.describe())
def test_filter_normalization_matches_each_filter_norm(arch):
    ws = wsnets.WeightSpace.random(arch)
    d = D.random_direction(ws, "filter")
    for l in arch.layers:
        for k in l.param_shapes():
            key = f"{l.name}.{k}"
            if l.is_weight and k == "weight":
                w, v = ws.params[key], d.params[key]
                assert torch.allclose(v.flatten(1).norm(dim=1), w.flatten(1).norm(dim=1), rtol=1e-5)
                # not just a copy of the weights: the direction is random
                assert not torch.allclose(v, w)
            else:  # biases, norm weights/biases and running statistics do not move by default
                assert (d.params[key] == 0).all(), key


def test_include_bias_and_norm_and_layer_norm():
    arch = ARCHS[0]
    ws = wsnets.WeightSpace.random(arch)
    d = D.random_direction(ws, "layer", include_bias=True, include_norm=True)
    for key, w in ws.params.items():
        v = d.params[key]
        if key.endswith(("running_mean", "running_var")):
            assert (v == 0).all()
        else:
            assert torch.allclose(v.norm(), w.norm(), rtol=1e-5), key
    # layer normalization does not equalize filters (so it differs from filter normalization)
    w0, v0 = ws.weight(0), d.weight(0)
    assert not torch.allclose(v0.norm(dim=1), w0.norm(dim=1), rtol=1e-3)


def test_batched_normalization_is_per_network():
    ws = wsnets.WeightSpace.random(ARCHS[1], batch_size=3)
    d = D.random_direction(ws)
    for i in range(3):
        assert torch.allclose(d[i].weight(0).flatten(1).norm(dim=1), ws[i].weight(0).flatten(1).norm(dim=1), rtol=1e-5)


def test_interpolation_plane_contains_the_models():
    arch = wsnets.mlp(5, [4], 3)
    models = [wsnets.WeightSpace.random(arch, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    plane = D.interpolation_directions(models)
    u, v = (d.flat() for d in plane.directions)
    assert abs(float(u @ v)) < 1e-4 * float(u.norm() * v.norm())
    for m, c in zip(models, plane.coords):
        rebuilt = models[0].flat() + c[0] * u + c[1] * v
        assert torch.allclose(rebuilt, m.flat(), atol=1e-5)
    assert torch.allclose(plane.coords[1], torch.tensor([1.0, 0.0]), atol=1e-5)


def test_pca_recovers_a_planar_trajectory():
    arch = wsnets.mlp(5, [4], 3)
    final = wsnets.WeightSpace.random(arch)
    P = final.flat().numel()
    basis = torch.linalg.qr(torch.randn(P, 2)).Q.T  # two orthonormal directions
    t = torch.linspace(0, 1, 12)
    coords = torch.stack([3 * (1 - t), (1 - t) ** 2], 1)
    traj = [wsnets.landscape._functional.flat_to_weightspace(final, final.flat() + c @ basis) for c in coords]
    for tr in traj:  # keep the running statistics out of it (an MLP has none)
        assert tr.arch == arch
    plane = D.pca_directions(traj, 2, final=final)
    assert float(plane.explained_variance.sum()) == pytest.approx(1.0, abs=1e-5)
    Dm = torch.stack([d.flat() for d in plane.directions])
    # the PCA directions span the same plane: projection of the true basis onto them is lossless
    assert torch.allclose((basis @ Dm.T) @ Dm, basis, atol=1e-4)
    assert torch.allclose(plane.coords @ Dm, coords @ basis, atol=1e-4)


def test_errors():
    ws = wsnets.WeightSpace.random(ARCHS[0])
    with pytest.raises(wsnets.ConfigError, match="normalization"):
        D.random_direction(ws, "spectral")
    other = wsnets.WeightSpace.random(ARCHS[2])
    with pytest.raises(wsnets.ArchitectureMismatchError):
        D.normalize_direction(other, ws)
    with pytest.raises(wsnets.ConfigError):
        D.interpolation_directions([ws])
