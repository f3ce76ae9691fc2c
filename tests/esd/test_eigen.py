import numpy as np
import pytest
import torch

from wsnets.esd.eigen import layer_spectrum, layout, matrix_eigenvalues, numerical_rank
from wsnets.errors import ShapeMismatchError


def test_gram_and_svd_agree_and_match_numpy():
    w = torch.randn(5, 30, 12, dtype=torch.float64)
    g = matrix_eigenvalues(w, method="gram")
    s = matrix_eigenvalues(w, method="svd")
    torch.testing.assert_close(g, s, rtol=1e-10, atol=1e-10)
    ref = np.sort(np.linalg.svd(w[2].numpy(), compute_uv=False) ** 2)
    np.testing.assert_allclose(g[2].numpy(), ref, rtol=1e-10)


def test_conv2d_slicing_and_norm_match_an_explicit_loop():
    w = torch.randn(2, 6, 4, 3, 3)  # batch of 2 Conv2d kernels [out=6, in=4, 3, 3]
    spec = layer_spectrum(w, 4)
    for b in range(2):
        ref = np.concatenate([np.linalg.svd(w[b, :, :, i, j].double().numpy(), compute_uv=False) ** 2
                              for i in range(3) for j in range(3)])
        np.testing.assert_allclose(spec.evals[b].numpy(), np.sort(ref) * 0.5, rtol=1e-9)  # conv2d_norm halves
    assert spec.layout == layout((6, 4, 3, 3))
    assert (spec.layout.N, spec.layout.M, spec.layout.rf, spec.layout.num_evals) == (6, 4, 9, 36)
    no_norm = layer_spectrum(w, 4, conv2d_norm=False)
    torch.testing.assert_close(no_norm.evals, 2 * spec.evals)


def test_wide_matrix_is_transposed_and_conv1d_is_sliced_without_rescaling():
    w = torch.randn(8, 20)
    assert layout(tuple(w.shape)).N == 20
    torch.testing.assert_close(layer_spectrum(w, 2).evals, layer_spectrum(w.T.contiguous(), 2).evals)
    k = torch.randn(7, 5, 3)
    ref = np.sort(np.concatenate([np.linalg.svd(k[:, :, i].double().numpy(), compute_uv=False) ** 2 for i in range(3)]))
    np.testing.assert_allclose(layer_spectrum(k, 3).evals[0].numpy(), ref, rtol=1e-9)


def test_rank_of_rank_deficient_matrix_is_right_for_both_methods():
    a = torch.randn(40, 3, dtype=torch.float64) @ torch.randn(3, 20, dtype=torch.float64)  # rank 3
    for method in ("gram", "svd"):
        ev = matrix_eigenvalues(a, method=method)
        assert int(numerical_rank(ev, 40, method=method)) == 3
    assert int(layer_spectrum(a, 2).rank_loss[0]) == 17


def test_bad_shape_names_the_tensor():
    with pytest.raises(ShapeMismatchError, match="'bias'"):
        layout((5,), name="bias")
