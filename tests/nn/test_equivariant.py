"""NP/HNP layers: equivariance, what each treats as fixed, and the encoders built from them."""

import pytest
import torch

import wsnets
from wsnets.errors import ArchitectureMismatchError
from wsnets.nn import HNPEncoder, HNPLinear, NPEncoder, NPLinear, WSFeatures
from wsnets.testing import assert_equivariant, assert_invariant, assert_sensitive_to_inputs

from .helpers import ARCHS, nets


def _feats(arch, B=3):
    return WSFeatures.from_weightspace(nets(arch, B).map(torch.Tensor.double))


def _in_channels(arch):
    return [c for l in wsnets.WeightSpace.random(arch).fold_batchnorm().arch.weight_layers for c in (l.kernel_numel, 1)]


def _perms(sizes, groups, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randperm(sizes[k], generator=g) for k in groups} for _ in range(n)]


@pytest.mark.parametrize("name", ["mlp", "cnn2d_bn", "cnn1d"])
def test_np_layer_equivariant_to_every_group(name):
    arch = wsnets.WeightSpace.random(ARCHS[name]).fold_batchnorm().arch
    sizes = arch.group_sizes
    layer = NPLinear(sizes, _in_channels(arch), 4).double()
    feats = _feats(arch)
    assert_equivariant(layer, feats, lambda f, p: f.permute(p), _perms(sizes, range(len(sizes))))


@pytest.mark.parametrize("name", ["mlp", "cnn2d_bn", "cnn1d"])
def test_hnp_layer_equivariant_to_hidden_groups(name):
    arch = wsnets.WeightSpace.random(ARCHS[name]).fold_batchnorm().arch
    sizes = arch.group_sizes
    layer = HNPLinear(sizes, _in_channels(arch), 4).double()
    assert_equivariant(layer, _feats(arch), lambda f, p: f.permute(p), _perms(sizes, range(1, len(sizes) - 1)))


def test_hnp_layer_not_equivariant_to_input_permutations():
    """HNP treats inputs as fixed: permuting them does not commute with the layer (NP's does)."""
    arch = ARCHS["mlp"]
    sizes = arch.group_sizes
    layer = HNPLinear(sizes, 1, 4).double()
    with pytest.raises(AssertionError, match="not equivariant"):
        assert_equivariant(layer, _feats(arch), lambda f, p: f.permute(p), _perms(sizes, [0], n=1))
    with pytest.raises(AssertionError, match="not equivariant"):
        assert_equivariant(layer, _feats(arch), lambda f, p: f.permute(p), _perms(sizes, [len(sizes) - 1], n=1))


def test_uncoupled_permutation_breaks_equivariance():
    """Sensitivity (as nfn's tests): permuting W0's rows but not b0 / W1's columns is not a symmetry."""
    arch = ARCHS["mlp"]
    layer = NPLinear(arch.group_sizes, 1, 4).double()
    feats = _feats(arch)
    p = torch.randperm(arch.group_sizes[1], generator=torch.Generator().manual_seed(1))

    def rows_only(f, p):
        return WSFeatures((f.weights[0][:, :, p], *f.weights[1:]), f.biases)
    with pytest.raises(AssertionError, match="not equivariant"):
        assert_equivariant(layer, feats, rows_only, [p])


def test_layer_is_linear_in_its_input():
    arch = ARCHS["mlp"]
    layer = NPLinear(arch.group_sizes, 1, 2).double()
    a, b = _feats(arch), _feats(ARCHS["mlp"], 3).map(lambda t: t.flip(0))
    zero = a.map(torch.zeros_like)
    lhs = layer(WSFeatures.from_tensors([x + 2 * y for x, y in zip(a.tensors(), b.tensors())]))
    rhs = [x + 2 * y - 2 * z for x, y, z in zip(layer(a).tensors(), layer(b).tensors(), layer(zero).tensors())]
    for u, v in zip(lhs.tensors(), rhs):
        torch.testing.assert_close(u, v)


@pytest.mark.parametrize("cls", [NPEncoder, HNPEncoder])
@pytest.mark.parametrize("name", ["mlp_bn", "cnn2d_bn", "cnn1d"])
def test_encoders_invariant_to_hidden_permutations(cls, name):
    ws = nets(ARCHS[name], 4)
    enc = cls(ws.arch, hidden=6, layers=2, out_dim=8).eval()
    assert_invariant(enc, ws, represent=lambda w: w)
    assert enc(ws).shape == (4, enc.out_dim)


def test_hnp_encoder_sees_inputs_np_encoder_does_not():
    ws = nets(ARCHS["mlp_bn"], 4)
    hnp = HNPEncoder(ws.arch, hidden=6, layers=1, out_dim=8).double().eval()
    np_ = NPEncoder(ws.arch, hidden=6, layers=1, out_dim=8).double().eval()
    ws = ws.map(torch.Tensor.double)
    assert_sensitive_to_inputs(hnp, ws, represent=lambda w: w)
    with pytest.raises(AssertionError, match="too symmetric"):
        assert_sensitive_to_inputs(np_, ws, represent=lambda w: w)
    L = len(ws.arch.group_sizes) - 1
    p = {0: torch.randperm(6), L: torch.tensor([2, 0, 1])}
    torch.testing.assert_close(np_(wsnets.permute(ws, p, allow_fixed=True)), np_(ws))


def test_fixed_arch_encoders_reject_other_architectures():
    enc = HNPEncoder(ARCHS["mlp"], hidden=4, layers=1)
    with pytest.raises(ArchitectureMismatchError, match="built for mlp:6-5-4-3"):
        enc(nets(wsnets.mlp(6, [5, 5], 3), 2))
    # BatchNorm is folded first, so a BN network of the same shapes is accepted
    assert HNPEncoder(ARCHS["mlp_bn"], hidden=4, layers=1)(nets(wsnets.mlp(6, [7], 3), 2)).shape == (2, 64)
