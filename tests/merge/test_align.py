import itertools

import pytest
import torch

import wsnets
from wsnets.merge import activation_matching, matching_objective, weight_matching
from wsnets.symmetry import invert, permute, random_permutations
from wsnets.testing import assert_same_function


@pytest.mark.parametrize("arch,shape", [
    (wsnets.mlp(64, [32, 16], 10), (64,)),
    (wsnets.mlp(64, [32, 16], 10, batchnorm=True), (64,)),
    (wsnets.cnn(1, [6, 8], 10, batchnorm=True, input_shape=(1, 8, 8)), (1, 8, 8)),
])
def test_aligned_model_computes_the_same_function(arch, shape, digits, train):
    x, y, _, _ = digits
    x, y = x[:400].reshape(400, *shape), y[:400]
    a = train(wsnets.WeightSpace.random(arch, generator=torch.Generator().manual_seed(1)), x, y, epochs=2, seed=1)
    b = train(wsnets.WeightSpace.random(arch, generator=torch.Generator().manual_seed(2)), x, y, epochs=2, seed=2)
    b_al, perms = weight_matching(a, b)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())  # something moved
    assert_same_function(b.to_module(), b_al.to_module(), x[:64])
    assert matching_objective(a, b_al) >= matching_objective(a, b) - 1e-6
    b_act, _ = activation_matching(a, b, x[:256])
    assert_same_function(b.to_module(), b_act.to_module(), x[:64])


@pytest.mark.parametrize("arch", [wsnets.mlp(6, [7, 5, 4], 3, batchnorm=True),
                                  wsnets.cnn(2, [5, 6], 3, dims=1, batchnorm=True, hidden=[4])])
def test_weight_matching_recovers_a_known_permutation(arch):
    a = wsnets.WeightSpace.random(arch, generator=torch.Generator().manual_seed(0))
    P = random_permutations(arch, generator=torch.Generator().manual_seed(1))
    b = permute(a, P)
    b_al, perms = weight_matching(a, b)
    for g, p in P.items():
        assert torch.equal(perms[g], invert(p))
    for k in a.params:
        assert torch.equal(b_al.params[k], a.params[k])


def test_activation_matching_recovers_a_known_permutation():
    arch = wsnets.mlp(6, [7, 5], 3)
    a = wsnets.WeightSpace.random(arch, generator=torch.Generator().manual_seed(0))
    P = random_permutations(arch, generator=torch.Generator().manual_seed(1))
    _, perms = activation_matching(a, permute(a, P), torch.randn(200, 6))
    for g, p in P.items():
        assert torch.equal(perms[g], invert(p))


def test_weight_matching_is_the_brute_force_optimum_on_a_tiny_layer():
    """One hidden group of 5 neurons: the linear assignment must beat or tie all 120 permutations."""
    arch = wsnets.mlp(3, [5], 2)
    for seed in range(3):
        a = wsnets.WeightSpace.random(arch, generator=torch.Generator().manual_seed(10 + seed))
        b = wsnets.WeightSpace.random(arch, generator=torch.Generator().manual_seed(20 + seed))
        best = max(itertools.permutations(range(5)),
                   key=lambda p: matching_objective(a, permute(b, [torch.tensor(p)])))
        b_al, perms = weight_matching(a, b)
        assert perms[1].tolist() == list(best)
        assert matching_objective(a, b_al) == pytest.approx(matching_objective(a, permute(b, [torch.tensor(best)])))
