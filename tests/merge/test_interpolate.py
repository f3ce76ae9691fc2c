import pytest
import torch

import wsnets
from wsnets.errors import ConfigError
from wsnets.merge import barrier, interpolate, interpolation_curve, train_bezier, weight_matching
from wsnets.merge.bezier import BezierCurve


def test_barrier_closed_form():
    assert barrier([1.0, 2.0, 1.0], [0, 0.5, 1]) == pytest.approx(1.0)
    assert barrier([1.0, 2.0, 3.0], [0, 0.5, 1]) == 0.0          # on the chord
    assert barrier([0.0, 1.0, 2.0, 4.0], [0, 0.25, 0.5, 1]) == pytest.approx(0.0)  # below the chord
    assert barrier([2.0, 3.0, 0.0], [0, 0.5, 1]) == pytest.approx(2.0)


@pytest.mark.parametrize("arch,shape", [(wsnets.mlp(64, [16], 10, layernorm=True), (64,)),
                                        (wsnets.cnn(1, [4, 6], 10, batchnorm=True, input_shape=(1, 8, 8)), (1, 8, 8))])
def test_barrier_of_a_model_with_itself_is_zero(arch, shape, digits):
    x, y, xt, yt = digits
    ws = wsnets.WeightSpace.random(arch, generator=torch.Generator().manual_seed(0))
    c = interpolation_curve(ws, ws.clone(), xt.reshape(-1, *shape), yt, steps=5, bn_data=x[:300].reshape(-1, *shape))
    assert c.barrier == pytest.approx(0.0, abs=1e-6)
    assert max(c.loss) - min(c.loss) < 1e-5


def test_batchnorm_path_needs_data(digits):
    ws = wsnets.WeightSpace.random(wsnets.mlp(64, [8], 10, batchnorm=True))
    _, _, xt, yt = digits
    with pytest.raises(ConfigError, match="bn_data"):
        interpolation_curve(ws, ws, xt, yt)


def test_interpolate_endpoints_and_midpoint():
    arch = wsnets.mlp(4, [6], 2, batchnorm=True)
    a, b = wsnets.WeightSpace.random(arch), wsnets.WeightSpace.random(arch)
    pts = interpolate(a, b, [0.0, 0.5, 1.0])
    for k in a.params:
        assert torch.equal(pts.params[k][0], a.params[k]) and torch.equal(pts.params[k][2], b.params[k])
        torch.testing.assert_close(pts.params[k][1], (a.params[k] + b.params[k]) / 2)


def test_untrained_bezier_is_the_straight_line():
    arch = wsnets.mlp(4, [6], 2)
    a, b = wsnets.WeightSpace.random(arch), wsnets.WeightSpace.random(arch)
    curve = train_bezier(a, b, torch.randn(8, 4), torch.randint(0, 2, (8,)), epochs=0)
    ts = torch.linspace(0, 1, 7)
    torch.testing.assert_close(curve.points(ts).flat(), interpolate(a, b, ts).flat(), atol=1e-6, rtol=1e-6)


@pytest.fixture(scope="module")
def two_mlps(digits, train):
    x, y, _, _ = digits
    arch = wsnets.mlp(64, [32], 10)
    return [train(wsnets.WeightSpace.random(arch, generator=torch.Generator().manual_seed(s)), x, y, epochs=3, seed=s)
            for s in (1, 2)]


def test_bezier_curve_beats_the_straight_line(two_mlps, digits):
    x, y, xt, yt = digits
    a, b = two_mlps
    line = interpolation_curve(a, b, xt, yt, steps=9)
    curve = train_bezier(a, b, x, y, epochs=4, lr=1e-2, seed=0)
    bez = curve.metrics(xt, yt, steps=9)
    assert bez.loss[0] == pytest.approx(line.loss[0], abs=1e-5) and bez.loss[-1] == pytest.approx(line.loss[-1], abs=1e-5)
    assert max(bez.loss) < max(line.loss)
    assert isinstance(curve, BezierCurve) and curve.midpoint.batch_size is None


def test_alignment_lowers_the_barrier(two_mlps, digits):
    _, _, xt, yt = digits
    a, b = two_mlps
    b_al, _ = weight_matching(a, b)
    before = interpolation_curve(a, b, xt, yt, steps=9)
    after = interpolation_curve(a, b_al, xt, yt, steps=9)
    assert after.loss[0] == pytest.approx(before.loss[0]) and after.loss[-1] == pytest.approx(before.loss[-1], abs=1e-5)
    assert after.barrier < before.barrier
