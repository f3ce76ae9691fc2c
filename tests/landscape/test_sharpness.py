import pytest
import torch
import torch.nn.functional as F

import wsnets
from wsnets.landscape import naive_surface, random_direction
from wsnets.landscape._functional import FunctionalNet, flat_to_weightspace
from wsnets.landscape.sharpness import flatness, sharpness

from .helpers import trained_tiny


def test_batched_summary_matches_per_model_exact_values():
    ws_a, (X, y) = trained_tiny(steps=200)
    ws_b, _ = trained_tiny(steps=40)  # a less trained, sharper-or-not second checkpoint
    models = [ws_a, ws_b]
    out = sharpness(models, (X, y), lanczos_steps=30, hutchinson_samples=100, n_directions=4, radius=0.3)
    for ws, r in zip(models, out):
        net = FunctionalNet(ws)
        H = torch.autograd.functional.hessian(lambda t: F.cross_entropy(net(t, X), y), net.theta0)
        ev = torch.linalg.eigvalsh(H)
        top = ev[ev.abs().argmax()]
        assert r["top_eigenvalue"] == pytest.approx(float(top), rel=1e-3)
        assert abs(r["trace"] - float(H.trace())) < 4 * r["trace_stderr"]
        assert r["loss"] == pytest.approx(float(F.cross_entropy(net(net.theta0, X), y)), rel=1e-9)


def test_flatness_is_the_mean_loss_increase_along_filter_normalized_directions():
    ws_a, (X, y) = trained_tiny(steps=100)
    ws_b, _ = trained_tiny(steps=30)
    batch = wsnets.stack([ws_a, ws_b])
    got = flatness(batch, (X, y), n_directions=3, radius=0.4, seed=5)
    g = torch.Generator().manual_seed(5)  # same draws as flatness() makes
    dirs = [random_direction(batch, "filter", generator=g) for _ in range(3)]
    for m, ws in enumerate([ws_a, ws_b]):
        d = [dd[m] for dd in dirs]
        coeffs = 0.4 * torch.eye(3, dtype=torch.float64)
        pert, _ = naive_surface(ws, d, torch.cat([torch.zeros(1, 3, dtype=torch.float64), coeffs]), (X, y))
        assert float(got[m]) == pytest.approx(float(pert[1:].mean() - pert[0]), rel=1e-6, abs=1e-9)
    assert torch.allclose(flatness(batch, (X, y), radius=0.0), torch.zeros(2, dtype=torch.float64))
