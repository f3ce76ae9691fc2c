"""Tiny networks shared by the wsnets.nn tests."""

import torch

import wsnets

# one of each kind the encoders must read: MLP, MLP+BN, CNN2d+BN (3x3), CNN1d (5 taps)
ARCHS = {
    "mlp": wsnets.mlp(6, [5, 4], 3),
    "mlp_bn": wsnets.mlp(6, [7], 3, batchnorm=True),
    "cnn2d_bn": wsnets.cnn(2, [4, 3], 3, batchnorm=True),
    "cnn1d": wsnets.cnn(1, [3], 2, dims=1, kernel_size=5),
}


def nets(arch, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return wsnets.WeightSpace.random(arch, n, generator=g)


def mixed(seed=0):
    """A list of single networks of four architectures, interleaved."""
    out = []
    for k, a in enumerate(ARCHS.values()):
        out += list(nets(a, 2, seed + k))
    return out[0::2] + out[1::2]

