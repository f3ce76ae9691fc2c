"""Tiny networks and data shared by the landscape tests."""

import torch
import torch.nn.functional as F

import wsnets
from wsnets.landscape._functional import FunctionalNet


def toy_data(n=120, d=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=dtype)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()
    return X, y


def trained_tiny(steps=300, dtype=torch.float64, arch=None, X=None, y=None):
    """A small tanh MLP (51 parameters) trained to near-zero loss, so its Hessian is nearly PSD."""
    arch = arch or wsnets.mlp(4, [6], 3, activation="tanh")
    if X is None:
        X, y = toy_data(dtype=dtype)
    ws = wsnets.WeightSpace.random(arch, generator=torch.Generator().manual_seed(1)).to(dtype)
    net = FunctionalNet(ws)
    th = net.theta0.clone().requires_grad_(True)
    opt = torch.optim.Adam([th], 0.05)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(th, X), y).backward()
        opt.step()
    return net.to_weightspace(th.detach()), (X, y)
