"""Networks used across the spine tests."""

import torch
from torch import nn

import wsnets


def architectures():
    """(name, Architecture, input_shape) for the families the spine must support."""
    return [
        ("mlp", wsnets.mlp(12, [16, 8], 5, "relu"), (12,)),
        ("mlp-bn", wsnets.mlp(12, [16, 8], 5, "tanh", batchnorm=True), (12,)),
        ("mlp-ln", wsnets.mlp(12, [16], 5, "gelu", layernorm=True), (12,)),
        ("cnn2d", wsnets.cnn(3, [4, 6], 5), (3, 8, 8)),
        ("cnn2d-bn", wsnets.cnn(2, [4, 6], 5, batchnorm=True, kernel_size=[3, 5]), (2, 9, 9)),
        ("cnn1d-bn", wsnets.cnn(2, [4, 6], 3, dims=1, batchnorm=True, kernel_size=5), (2, 20)),
    ]


def random_ws(arch, seed=0):
    return wsnets.WeightSpace.random(arch, generator=torch.Generator().manual_seed(seed))


class Custom(nn.Module):
    """A custom container whose forward applies children in registration order."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 7)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(7, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Skippy(Custom):
    """Registration order lies about the forward: the activation is never applied."""

    def forward(self, x):
        return self.fc2(self.fc1(x))
