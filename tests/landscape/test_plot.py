import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from wsnets.landscape import IntrinsicResult, SpectralDensity, Surface
from wsnets.landscape import plot


def _png_ok(path):
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200
    assert img[..., :3].std() > 0.05  # not a blank canvas


def test_every_plot_writes_a_readable_png(tmp_path):
    xs = np.linspace(-1, 1, 9)
    loss2 = 0.01 + np.add.outer(xs ** 2, 2 * xs ** 2)
    s2 = Surface(xs, xs, loss2, 1 - loss2 / loss2.max(), {"architecture": "mlp:2-3-2:relu", "dataset": "toy"})
    s1 = Surface(xs, None, loss2[:, 4], 1 - loss2[:, 4], {})
    _png_ok(plot.contour(s2, tmp_path / "c.png"))
    _png_ok(plot.surface3d(s2, tmp_path / "s.png"))
    _png_ok(plot.curve(s1, tmp_path / "l.png"))
    with pytest.raises(ValueError):
        plot.contour(s1, tmp_path / "bad.png")
    d = SpectralDensity(torch.tensor([[0.0, 1.0, 3.0]]), torch.tensor([[0.8, 0.1, 0.1]]))
    _png_ok(plot.spectral_density(d, tmp_path / "d.png", exact=np.array([0.0, 1.0, 3.0])))
    r = IntrinsicResult([10, 100, 1000], [0.3, 0.85, 0.9], [0.3, 0.85, 0.95], 0.92, 1.0, 5000, "dense")
    assert r.d_int90 == 100
    _png_ok(plot.intrinsic_curve([r, r], tmp_path / "i.png", labels=["a", "b"]))
