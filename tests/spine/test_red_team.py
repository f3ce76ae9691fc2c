"""Networks no other spine test has: a tensor used at two places, operands that broadcast, operands or
weight layers whose axes are positions rather than neurons. Each is represented exactly (spec exact both
ways, graph round trip, encoders invariant) or refused at load with one line naming the layer."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import wsnets
from wsnets.merge.align import weight_matching
from wsnets.symmetry import permutation_spec, permute, random_permutations
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


class CatTwice(nn.Module):
    """One tensor concatenated with itself: a block axis whose two parts move together."""

    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(6, 5), nn.Linear(10, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.o(torch.cat([h, h], 1))


def _heads(t, n):
    return t.view(t.shape[0], t.shape[1], n, -1).transpose(1, 2)


class NoOutProj(nn.Module):
    """Attention written straight into the stream (no output projection): the stream is head-structured."""

    def __init__(self):
        super().__init__()
        self.emb, self.q, self.k, self.v, self.o = (nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 8),
                                                    nn.Linear(8, 8), nn.Linear(8, 3))

    def forward(self, x):
        h = self.emb(x)
        y = F.scaled_dot_product_attention(_heads(self.q(h), 2), _heads(self.k(h), 2), _heads(self.v(h), 2))
        return self.o(h + y.transpose(1, 2).reshape(h.shape)).mean(1)


class CrossWide(nn.Module):
    """Cross attention: queries from one branch, keys/values from another, values wider than keys."""

    def __init__(self):
        super().__init__()
        self.e1, self.e2, self.q, self.k = nn.Linear(4, 8), nn.Linear(4, 6), nn.Linear(8, 8), nn.Linear(6, 8)
        self.v, self.p, self.o = nn.Linear(6, 12), nn.Linear(12, 8), nn.Linear(8, 3)

    def forward(self, x):
        h, m = self.e1(x), torch.relu(self.e2(x))
        y = F.scaled_dot_product_attention(_heads(self.q(h), 2), _heads(self.k(m), 2), _heads(self.v(m), 2))
        return self.o(h + self.p(y.transpose(1, 2).reshape(h.shape[0], h.shape[1], 12)))[:, 0]


REPRESENTED = [("called-twice", CalledTwice, (6,)), ("norm-twice", NormTwice, (6,)),
               ("scalar-gate", ScalarGate, (6,)), ("channel-param", ChannelParam, (2, 5, 5)),
               ("cat-twice", CatTwice, (6,)), ("no-out-proj", NoOutProj, (5, 4)), ("cross-wide", CrossWide, (5, 4))]


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
    # weight matching undoes a random spec permutation of a perturbed copy
    g = torch.Generator().manual_seed(1)
    noisy = ws.map(lambda t: t + 0.01 * torch.randn(t.shape, generator=g))
    aligned, _ = weight_matching(ws, permute(noisy, random_permutations(ws.arch, generator=g)))
    assert all(torch.equal(aligned.params[k], noisy.params[k]) for k in ws.params)


def test_shared_layer_is_one_group():
    """``b`` applied twice: b's input and output axes, a's output and o's input are one group."""
    ws = wsnets.load(CalledTwice().eval(), input_shape=(6,))
    ax = dict(permutation_spec(ws.arch).axes)
    assert ax["b.weight"][0] == ax["b.weight"][1] == ax["a.weight"][0] == ax["o.weight"][1]


class TokenNorm(nn.Module):
    """BatchNorm1d / GroupNorm on ``[N, T, D]``: they normalize axis 1, the tokens (``T == D``)."""

    def __init__(self, norm):
        super().__init__()
        self.a, self.n, self.o = nn.Linear(4, 6), norm, nn.Linear(6, 3)

    def forward(self, x):
        return self.o(torch.relu(self.n(self.a(x))))[:, 0]


REFUSED = [("spatial-param", SpatialParam, (2, 6, 6), r"add .*param at 'sb' \[6, 6\].*do not line up"),
           ("bn-tokens", lambda: TokenNorm(nn.BatchNorm1d(6)), (6, 4), r"batchnorm at 'n' acts on axis -2"),
           ("gn-tokens", lambda: TokenNorm(nn.GroupNorm(2, 6)), (6, 4), r"groupnorm at 'n' acts on axis -2"),
           ("token-conv", TokenConv, (5, 4), r"conv1d at 'mix' acts on axis -2"),
           ("tied", Tied, (5,), r"'out.weight' is the same tensor as 'emb.weight' \(tied weights\)")]


@pytest.mark.parametrize("name,cls,shape,msg", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_at_load_naming_the_layer(name, cls, shape, msg):
    with pytest.raises(wsnets.UnsupportedLayerError, match=msg) as e:
        wsnets.load(cls().eval(), input_shape=shape)
    assert "\n" not in str(e.value)


class Encoder(nn.Module):
    """``nn.TransformerEncoder`` (post-LN layers, a final norm): its fast-path checks defeat torch.fx."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.emb, self.o = nn.Linear(4, 8), nn.Linear(8, 3)
        self.enc = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(8), enable_nested_tensor=False)

    def forward(self, x):
        return self.o(self.enc(self.emb(x)).mean(1))


def test_transformer_encoder_stack_is_read():
    torch.manual_seed(0)
    for m, shape in [(Encoder().eval(), (5, 4)),
                     (nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2,
                                            enable_nested_tensor=False).eval(), (5, 8))]:
        ws = wsnets.load(m, input_shape=shape)
        assert sum(l.kind == "mha" for l in ws.arch.layers) == 2
        x = torch.randn(6, *shape)
        with torch.no_grad():
            torch.testing.assert_close(ws.to_module()(x), m(x), rtol=1e-5, atol=1e-5)
        assert_spec_exact(ws, x)


class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.o(h), h


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:
            h = torch.relu(h)
        return self.o(h)


def test_tuple_output_and_untraceable_are_one_quiet_line(capsys):
    with pytest.raises(wsnets.UnsupportedLayerError, match="forward returns a tuple of 2 outputs"):
        wsnets.load(TwoOutputs(), input_shape=(6,))
    capsys.readouterr()
    with pytest.raises(wsnets.UnsupportedLayerError, match=r"DataDependent at '': cannot be traced .*torch.export"):
        wsnets.load(DataDependent(), input_shape=(6,))
    err = capsys.readouterr().err
    assert "def forward" not in err and "aten" not in err   # torch.export's dump of its partial graph


def test_landscape_of_a_network_with_a_scalar_parameter():
    """A 0-d parameter (a learned scale) round-trips through the flat parameter vector of the landscape."""
    from wsnets.landscape import random_direction, surface_1d

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.alpha, self.o = nn.Linear(6, 8), nn.Parameter(torch.tensor(0.7)), nn.Linear(8, 3)

        def forward(self, x):
            return self.o(torch.relu(self.a(x)) * self.alpha)
    m = Scaled().eval()
    ws = wsnets.load(m, input_shape=(6,))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 6, generator=g), torch.randint(0, 3, (20,), generator=g)
    surf = surface_1d(ws, random_direction(ws, generator=g), (x, y), [0.0, 0.5])
    assert abs(surf.loss[0] - F.cross_entropy(m(x), y).item()) < 1e-5


class NoBiasLN(nn.Module):
    """A pre-LN block whose LayerNorms have a weight but no bias (``nn.LayerNorm(bias=False)``)."""

    def __init__(self):
        super().__init__()
        self.emb, self.n1, self.f, self.n2, self.o = (nn.Linear(4, 8), nn.LayerNorm(8, bias=False), nn.Linear(8, 8),
                                                      nn.LayerNorm(8, bias=False), nn.Linear(8, 3))
        with torch.no_grad():
            self.n1.weight.normal_(), self.n2.weight.normal_()

    def forward(self, x):
        h = self.emb(x)
        return self.o(self.n2(h + self.f(torch.relu(self.n1(h))))).mean(1)


def test_layernorm_without_bias():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8, bias=False), nn.ReLU(), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        seq[1].weight.normal_()
    for m, shape in [(NoBiasLN().eval(), (5, 4)), (seq, (6,))]:
        ws = wsnets.load(m, input_shape=shape)
        norms = [l for l in ws.arch.layers if l.kind == "layernorm"]
        assert norms and all(not l.bias for l in norms) and "bias=False" in repr(ws.arch)
        assert wsnets.Architecture.from_json(ws.arch.to_json()) == ws.arch
        x = torch.randn(8, *shape)
        rebuilt = ws.to_module()
        with torch.no_grad():
            torch.testing.assert_close(rebuilt(x), m(x), rtol=1e-5, atol=1e-6)
        assert not any(k.endswith("n1.bias") or k == "1.bias" for k in rebuilt.state_dict())
        assert_spec_exact(ws, x)
        back = wsnets.from_graph(ws.to_graph())
        assert back.arch == ws.arch and all(torch.equal(back.params[k], ws.params[k]) for k in ws.params)


def test_a_failing_example_input_is_one_line():
    with pytest.raises(wsnets.ShapeMismatchError, match=r"fails at 'a'") as e:
        wsnets.load(CalledTwice(), input_shape=(5,))
    assert "\n" not in str(e.value)


class SubNeg(nn.Module):
    """Subtraction, negation and in-place methods: ``a - b`` is ``a + (-1) b``."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.f, self.o = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = (self.a(x) - self.b(x)).relu_()
        h = h - self.f(-h).tanh_()
        return self.o(h)


def test_subtraction_negation_and_inplace_methods():
    torch.manual_seed(0)
    m = SubNeg().eval()
    ws = wsnets.load(m, input_shape=(6,))
    x = torch.randn(16, 6)
    with torch.no_grad():
        torch.testing.assert_close(ws.to_module()(x), m(x), rtol=1e-5, atol=1e-6)
    assert sum(l.kind == "scale" and l.value == -1.0 for l in ws.arch.layers) == 3
    ax = dict(permutation_spec(ws.arch).axes)
    assert ax["a.weight"][0] == ax["b.weight"][0] == ax["f.weight"][0] == ax["o.weight"][1]
    assert_spec_exact(ws, x)


def test_sequence_first_attention_is_refused_saying_so():
    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.att, self.o = nn.Linear(4, 8), nn.MultiheadAttention(8, 2), nn.Linear(8, 3)

        def forward(self, x):
            h = self.emb(x).transpose(0, 1)
            return self.o(self.att(h, h, h, need_weights=False)[0].transpose(0, 1)).mean(1)
    with pytest.raises(wsnets.UnsupportedLayerError, match="batch axis .*batch_first=True"):
        wsnets.load(SeqFirst(), input_shape=(5, 4))


class MyLinear(nn.Module):
    """A user-written layer: ``F.linear`` on its own ``weight``/``bias``."""

    def __init__(self, i, o, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o, i) / i ** 0.5)
        self.bias = nn.Parameter(torch.randn(o)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class MyConv(nn.Module):
    def __init__(self, i, o):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(o, i, 3, 3) / 3), nn.Parameter(torch.randn(o))

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, padding=1)


class UserLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.a, self.b, self.o = MyConv(2, 4), MyLinear(4, 8), MyLinear(8, 8, bias=False), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.a(torch.relu(self.c(x)).mean((2, 3))))
        return self.o(h + self.b(h))


class LooseWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.W, self.o = nn.Parameter(torch.randn(8, 6)), nn.Linear(8, 3)

    def forward(self, x):
        return self.o(F.linear(x, self.W))


def test_user_written_layers_with_functional_calls():
    """F.linear / F.conv2d on a layer's own ``weight`` and ``bias`` are that layer; on a tensor not named
    like a layer's they are refused naming the op."""
    torch.manual_seed(0)
    m = UserLayers().eval()
    ws = wsnets.load(m, input_shape=(2, 5, 5))
    assert [(l.kind, l.name) for l in ws.arch.weight_layers] == [("conv2d", "c"), ("linear", "a"), ("linear", "b"),
                                                                 ("linear", "o")]
    assert sorted(ws.params) == sorted(m.state_dict())
    x = torch.randn(8, 2, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(ws.to_module()(x), m(x), rtol=1e-5, atol=1e-6)
    assert_spec_exact(ws, x)
    back = wsnets.from_graph(ws.to_graph())
    assert all(torch.equal(back.params[k], ws.params[k]) for k in ws.params)
    with pytest.raises(wsnets.UnsupportedLayerError, match=r"linear on tensors that are not parameters named"):
        wsnets.load(LooseWeight(), input_shape=(6,))
