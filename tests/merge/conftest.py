"""Small trained networks on sklearn digits, shared by the merge tests (module-scoped, a few seconds)."""

import pytest
import torch
import torch.nn.functional as F

import wsnets
from wsnets.zoo import datasets


def fit(ws: wsnets.WeightSpace, x, y, *, epochs: int = 5, lr: float = 0.1, seed: int = 0, batch_size: int = 64):
    """Plain PyTorch SGD training of ``ws.to_module()``; returns the trained WeightSpace."""
    g = torch.Generator().manual_seed(seed)
    net = ws.to_module().train()
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    return _read(ws, net)


def _read(ws, net):
    sd = net.state_dict()
    params = {}
    for i, l in enumerate(ws.arch.layers):
        for k in l.param_shapes():
            params[f"{l.name}.{k}"] = sd[f"{i}.{k}"].detach().clone()
    return wsnets.WeightSpace(ws.arch, params)


@pytest.fixture(scope="module")
def digits():
    return datasets.load("digits")


@pytest.fixture(scope="module")
def digits_img():
    return datasets.load("digits-img")


@pytest.fixture(scope="session")
def train():
    """The ``fit`` helper (tests cannot import conftest under --import-mode=importlib)."""
    return fit
