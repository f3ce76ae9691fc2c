"""The reference nfn HNP encoder: invariant to hidden permutations, sensitive to input permutations."""

import pytest
import torch

import wsnets
from wsnets.errors import ArchitectureMismatchError
from wsnets.testing import assert_invariant, assert_sensitive_to_inputs
from wsnets.train.meta_model import build_encoder

pytest.importorskip("nfn")


def test_nfn_hnp_symmetry_and_shape():
    nets = wsnets.WeightSpace.random(wsnets.mlp(6, [8, 5], 3, batchnorm=True), 4)
    enc = build_encoder({"name": "nfn-hnp", "hidden": 4, "out_dim": 7}, nets)
    assert enc(nets).shape == (4, 7)
    assert_invariant(enc, nets, represent=lambda x: x)
    assert_sensitive_to_inputs(enc, nets, represent=lambda x: x)
    with pytest.raises(ArchitectureMismatchError, match="nfn-hnp was built for"):
        enc(wsnets.WeightSpace.random(wsnets.mlp(6, [9, 5], 3), 2))


def test_nfn_hnp_reads_small_cnn_zoo_networks_with_mixed_activations():
    """As nfn does for the Small CNN Zoo: Conv2d kernels [out, in, k, k], GAP, a Linear head; relu and tanh mixed."""
    from wsnets.weights import stack_shapes
    relu = wsnets.cnn(2, [4, 4, 3], 3, "relu", kernel_size=3, dims=2, stride=2)
    tanh = wsnets.cnn(2, [4, 4, 3], 3, "tanh", kernel_size=3, dims=2, stride=2)
    g = torch.Generator().manual_seed(0)
    singles = [w.map(torch.Tensor.double) for a in (relu, tanh) for w in wsnets.WeightSpace.random(a, 2, generator=g)]
    enc = build_encoder({"name": "nfn-hnp", "hidden": 4, "out_dim": 5}, singles).double().eval()
    assert enc(stack_shapes(singles)).shape == (4, 5)
    assert_invariant(enc, singles, represent=stack_shapes)
    assert_sensitive_to_inputs(enc, wsnets.stack(singles[:2]), represent=lambda x: x)
    with pytest.raises(wsnets.UnsupportedLayerError, match="conv1d"):
        build_encoder({"name": "nfn-hnp"}, wsnets.WeightSpace.random(wsnets.cnn(1, [3], 2, dims=1, kernel_size=5), 2))
