"""Permutations of hidden neurons keep the function; the spec drives everything."""

import pytest
import torch

import wsnets
from wsnets.symmetry import invert, permutation_spec, permute, random_permutations
from wsnets.testing import assert_same_function

from tests.spine.helpers import architectures, random_ws

ARCHS = architectures()


@pytest.mark.parametrize("name,arch,shape", ARCHS, ids=[a[0] for a in ARCHS])
def test_permuted_network_computes_same_function(name, arch, shape):
    ws = random_ws(arch)
    g = torch.Generator().manual_seed(1)
    perms = random_permutations(arch, generator=g)
    pw = permute(ws, perms)
    assert any(not torch.equal(pw.params[k], ws.params[k]) for k in ws.params)  # something moved
    assert_same_function(ws.to_module(), pw.to_module(), input_shape=shape)
    # inverse permutation restores the exact tensors
    back = permute(pw, {gid: invert(p) for gid, p in perms.items()})
    for k in ws.params:
        assert torch.equal(back.params[k], ws.params[k])


@pytest.mark.parametrize("name,arch,shape", ARCHS, ids=[a[0] for a in ARCHS])
def test_permuting_inputs_changes_function(name, arch, shape):
    ws = random_ws(arch)
    n = arch.group_sizes[0]
    p = torch.roll(torch.arange(n), 1)
    pw = permute(ws, {0: p}, allow_fixed=True)
    with pytest.raises(AssertionError):
        assert_same_function(ws.to_module(), pw.to_module(), input_shape=shape)
    with pytest.raises(wsnets.ConfigError, match="input/output"):
        permute(ws, {0: p})


def test_batched_per_network_permutations_match_single():
    arch = wsnets.cnn(1, [4, 6], 5, batchnorm=True)
    batch = wsnets.WeightSpace.random(arch, 3)
    perms = random_permutations(arch, 3, generator=torch.Generator().manual_seed(2))
    pb = permute(batch, perms)
    for i in range(3):
        single = permute(batch[i], {g: p[i] for g, p in perms.items()})
        for k in single.params:
            assert torch.equal(pb[i].params[k], single.params[k])


def test_spec_axes_cover_every_tensor_and_batchnorm_follows_its_channel():
    arch = wsnets.cnn(1, [4, 6], 5, batchnorm=True)
    spec = permutation_spec(arch)
    assert {k for k, _ in spec.axes} == set(arch.param_shapes)
    ax = dict(spec.axes)
    assert ax["1.running_mean"] == ax["0.bias"] == (1,)
    assert ax["0.weight"] == (1, 0, None, None)
    assert spec.rebasin()["0.weight"] == ("P1", None, None, None)
    assert spec.hidden == (1, 2)


@pytest.mark.parametrize("name,arch,shape", [a for a in ARCHS if "bn" in a[0]], ids=[a[0] for a in ARCHS if "bn" in a[0]])
def test_fold_batchnorm_keeps_function(name, arch, shape):
    ws = random_ws(arch)
    folded = ws.fold_batchnorm()
    assert not any(l.kind == "batchnorm" for l in folded.arch.layers)
    assert_same_function(ws.to_module(), folded.to_module(), input_shape=shape)


def test_fold_batchnorm_after_activation_is_refused():
    from wsnets.arch import Architecture, Layer
    arch = Architecture((Layer("linear", "0", 4, 5), Layer("act", fn="relu"), Layer("batchnorm", "2", 5, 5),
                         Layer("linear", "3", 5, 2)))
    with pytest.raises(wsnets.UnsupportedLayerError, match="'2'"):
        random_ws(arch).fold_batchnorm()
