"""Networks no other spine test has: a tensor used at two places, operands that broadcast, operands or
weight layers whose axes are positions rather than neurons. Each is represented exactly (spec exact both
ways, graph round trip, encoders invariant) or refused at load with one line naming the layer."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import wsnets
from wsnets.symmetry import permutation_spec
from wsnets.testing import assert_invariant, assert_spec_exact


class CalledTwice(nn.Module):
    """One Linear applied twice (shared weights): its input and output are one neuron group."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.o = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.o(torch.relu(self.b(torch.relu(self.b(h)))))


class NormTwice(nn.Module):
    """One LayerNorm applied on the stream and inside the residual branch."""

    def __init__(self):
        super().__init__()
        self.a, self.n, self.f, self.o = nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 3)
        with torch.no_grad():
            self.n.weight.normal_(), self.n.bias.normal_()

    def forward(self, x):
        h = self.a(x)
        return self.o(self.n(h) + self.f(torch.relu(self.n(h))))


class ScalarGate(nn.Module):
    """A one-unit branch broadcast over the features: multiplied (gate) and added."""

    def __init__(self):
        super().__init__()
        self.a, self.g, self.s, self.o = nn.Linear(6, 8), nn.Linear(6, 1), nn.Linear(6, 1), nn.Linear(8, 3)

    def forward(self, x):
        return self.o(torch.relu(self.a(x) * torch.sigmoid(self.g(x)) + self.s(x)))


class ChannelParam(nn.Module):
    """Per-channel ``[C, 1, 1]`` bias and ``[C]``-wide layer scale on conv maps and tokens."""

    def __init__(self):
        super().__init__()
        self.c, self.c2, self.fc = nn.Conv2d(2, 6, 3, padding=1), nn.Conv2d(6, 4, 1), nn.Linear(4, 3)
        self.cb = nn.Parameter(torch.randn(6, 1, 1))
        self.gamma = nn.Parameter(torch.randn(1, 4, 1, 1))

    def forward(self, x):
        h = torch.relu(self.c(x) + self.cb)
        return self.fc((self.gamma * self.c2(h)).mean((2, 3)))


class SpatialParam(nn.Module):
    """A learned ``[H, W]`` map added to a ``[C, H, W]`` feature map with ``C == W``: its last axis is a
    position axis, not the channels (coupling it with the channels would be a false symmetry)."""

    def __init__(self):
        super().__init__()
        self.c, self.c2, self.fc = nn.Conv2d(2, 6, 3, padding=1), nn.Conv2d(6, 4, 1), nn.Linear(4, 3)
        self.sb = nn.Parameter(torch.randn(6, 6))

    def forward(self, x):
        return self.fc(self.c2(torch.relu(self.c(x) + self.sb)).mean((2, 3)))


class TokenConv(nn.Module):
    """A Conv1d that mixes the tokens of ``[N, T, D]`` (reads T as channels)."""

    def __init__(self):
        super().__init__()
        self.emb, self.mix, self.fc = nn.Linear(4, 8), nn.Conv1d(5, 5, 1), nn.Linear(8, 3)

    def forward(self, x):
        h = self.emb(x)
        return self.fc((h + self.mix(h)).mean(1))


class Tied(nn.Module):
    """An output layer that reuses the embedding table (weight tying)."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc, self.out = nn.Embedding(20, 8), nn.Linear(8, 8), nn.Linear(8, 20, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        return self.out(torch.tanh(self.fc(self.emb(ids))).mean(1))


REPRESENTED = [("called-twice", CalledTwice, (6,)), ("norm-twice", NormTwice, (6,)),
               ("scalar-gate", ScalarGate, (6,)), ("channel-param", ChannelParam, (2, 5, 5))]


@pytest.mark.parametrize("name,cls,shape", REPRESENTED, ids=[r[0] for r in REPRESENTED])
def test_represented_exactly(name, cls, shape):
    from wsnets.nn.graph_encoder import NeuralGraphEncoder
    torch.manual_seed(0)
    m = cls().eval()
    ws = wsnets.load(m, input_shape=shape)
    x = torch.randn(16, *shape)
    with torch.no_grad():
        torch.testing.assert_close(ws.to_module()(x), m(x), rtol=1e-5, atol=1e-6)
    spec = permutation_spec(ws.arch)
    keys = [k for k, _ in spec.axes]
    assert sorted(keys) == sorted(set(keys)) == sorted(ws.params)   # each tensor once, permuted once
    for seed in range(3):
        assert_spec_exact(ws, x, seed=seed)
    back = wsnets.from_graph(ws.to_graph())
    assert back.arch == ws.arch and all(torch.equal(back.params[k], ws.params[k]) for k in ws.params)
    enc = NeuralGraphEncoder(hidden=8, layers=2, edge_dim=max(9, ws.arch.max_kernel_numel)).eval()
    assert_invariant(enc, [ws], rtol=1e-3)


def test_shared_layer_is_one_group():
    """``b`` applied twice: b's input and output axes, a's output and o's input are one group."""
    ws = wsnets.load(CalledTwice().eval(), input_shape=(6,))
    ax = dict(permutation_spec(ws.arch).axes)
    assert ax["b.weight"][0] == ax["b.weight"][1] == ax["a.weight"][0] == ax["o.weight"][1]


REFUSED = [("spatial-param", SpatialParam, (2, 6, 6), r"add .*param at 'sb' \[6, 6\].*do not line up"),
           ("token-conv", TokenConv, (5, 4), r"conv1d at 'mix' reads axis -2"),
           ("tied", Tied, (5,), r"'out.weight' is the same tensor as 'emb.weight' \(tied weights\)")]


@pytest.mark.parametrize("name,cls,shape,msg", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_at_load_naming_the_layer(name, cls, shape, msg):
    with pytest.raises(wsnets.UnsupportedLayerError, match=msg) as e:
        wsnets.load(cls().eval(), input_shape=shape)
    assert "\n" not in str(e.value)
