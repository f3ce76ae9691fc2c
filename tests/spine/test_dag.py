"""Any traceable module as a weight space (issue 18): tracing, the DAG architecture value, the derived
permutation spec, and bad input, over the suite of architectures in ``helpers.dag_models``."""

import pytest
import torch
from torch import nn

import wsnets
from wsnets.symmetry import permutation_spec, permute, random_permutations
from wsnets.testing import assert_same_function, assert_spec_exact
from wsnets.trace import example_input, trace
from tests.spine.helpers import DAG_IDS, architectures, dag_models

MODELS = {name: (m, shape) for name, m, shape in dag_models()}


@pytest.mark.parametrize("name", DAG_IDS)
def test_traced_architecture_is_a_value_that_rebuilds_the_function(name):
    m, shape = MODELS[name]
    ws = wsnets.load(m, input_shape=shape)
    arch = ws.arch
    assert not arch.is_chain
    back = wsnets.Architecture.from_json(arch.to_json())
    assert back == arch and hash(back) == hash(arch) and back.describe() == arch.describe()
    assert_same_function(m, ws.to_module(), input_shape=shape)
    rebuilt = wsnets.WeightSpace(back, ws.params).to_module()
    assert set(rebuilt.state_dict()) - set(m.state_dict()) <= {k for k in rebuilt.state_dict()
                                                               if k.endswith("num_batches_tracked")}
    assert_same_function(m, rebuilt, input_shape=shape)


@pytest.mark.parametrize("name", DAG_IDS + ["mlp-bn", "cnn2d-bn"])
def test_spec_is_exact_both_ways(name):
    """(a) random permutations from the spec keep the function; (b) splitting any coupled group does not."""
    if name in MODELS:
        m, shape = MODELS[name]
        ws = wsnets.load(m, input_shape=shape)
    else:
        arch = dict((a[0], a[1]) for a in architectures())[name]
        ws = wsnets.WeightSpace.random(arch, generator=torch.Generator().manual_seed(1))
    assert_spec_exact(ws)


def test_spec_couplings_that_matter():
    """The residual stream is one group; q and k share one head-structured group, v and the attention
    output another, with the same head permutation (tie)."""
    ws = wsnets.load(*MODELS["transformer"][:1], input_shape=MODELS["transformer"][1])
    spec = permutation_spec(ws.arch)
    ax = dict(spec.axes)
    stream = ax["embed.weight"][0]
    assert ax["blocks.0.attn.o.weight"][0] == ax["blocks.1.fc2.weight"][0] == ax["head.weight"][1] == stream
    assert ax["blocks.0.norm1.weight"] == (stream,)
    q, k, v = ax["blocks.0.attn.q.weight"][0], ax["blocks.0.attn.k.weight"][0], ax["blocks.0.attn.v.weight"][0]
    assert q == k != v and ax["blocks.0.attn.o.weight"][1] == v
    heads = spec.head_structure
    assert heads[q][0] == heads[v][0] == 2 and heads[q][1] == heads[v][1]
    assert stream in spec.hidden and ax["head.weight"][0] in spec.fixed


def test_forgetting_a_coupling_breaks_the_function():
    """A spec that forgot the q/k coupling (q permuted, k not) or the residual coupling (one writer of the
    stream permuted alone) would claim symmetries that are not there: the function changes."""
    ws = wsnets.load(*MODELS["transformer"][:1], input_shape=MODELS["transformer"][1])
    x = torch.randn(4, 5, 8)
    ref = ws.to_module()(x)
    p = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    for keys in (["blocks.0.attn.q.weight", "blocks.0.attn.q.bias"], ["blocks.0.fc2.weight", "blocks.0.fc2.bias"]):
        params = dict(ws.params)
        for k in keys:
            params[k] = params[k][p]
        assert not torch.allclose(wsnets.WeightSpace(ws.arch, params).to_module()(x), ref, atol=1e-4)


def test_head_permutation_must_respect_heads():
    """Permuting the q/k axis across heads with one unstructured permutation changes the function."""
    ws = wsnets.load(*MODELS["bert-block"][:1], input_shape=MODELS["bert-block"][1])
    spec = permutation_spec(ws.arch)
    q = dict(spec.axes)["attention.self.query.weight"][0]
    x = torch.randn(3, 5, 16)
    ref = ws.to_module()(x)
    p = torch.tensor([0, 8] + list(range(1, 8)) + list(range(9, 16)))   # swaps neurons across the two heads
    params = dict(ws.params)
    for key, ax in spec.axes:  # the re-indexing permute() would do, without its checks
        for a, g in enumerate(ax):
            if g == q:
                params[key] = params[key].index_select(a, p)
    assert not torch.allclose(wsnets.WeightSpace(ws.arch, params).to_module()(x), ref, atol=1e-4)
    with pytest.raises(wsnets.ConfigError, match=f"group {q} splits an attention head"):
        permute(ws, {q: p})
    v = dict(spec.axes)["attention.self.value.weight"][0]
    swap = torch.cat([torch.arange(8, 16), torch.arange(8)])   # whole heads swapped on q/k only, v/o left alone
    with pytest.raises(wsnets.ConfigError, match="must move their heads alike"):
        permute(ws, {q: swap})
    torch.testing.assert_close(permute(ws, {q: swap, v: swap}).to_module()(x), ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(wsnets.ConfigError, match="not a permutation"):
        permute(ws, {q: torch.zeros(16, dtype=torch.long)})
    ok = permute(ws, random_permutations(ws.arch, generator=torch.Generator().manual_seed(3))).to_module()(x)
    torch.testing.assert_close(ok, ref, rtol=1e-4, atol=1e-5)


def test_batched_permutations_of_a_dag():
    ws = wsnets.load(*MODELS["vit"][:1], input_shape=MODELS["vit"][1])
    batch = wsnets.stack([ws, ws, ws])
    perms = random_permutations(ws.arch, 3, generator=torch.Generator().manual_seed(0))
    pb = permute(batch, perms)
    for i in range(3):
        single = permute(ws, {g: p[i] for g, p in perms.items()})
        assert all(torch.equal(pb[i].params[k], single.params[k]) for k in ws.params)


def test_sequential_modules_stay_chains():
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(), nn.Linear(4, 3))
    arch = wsnets.load(m).arch
    assert arch.is_chain and arch.describe() == "cnn2d:1-4-3:relu+bn" and arch.input_shape is None


def test_minilm_style_bert_embeddings_are_canonical():
    arch = wsnets.load(MODELS["bert"][0], input_shape=(7,)).arch
    modes = {l.name: l.mode for l in arch.layers if l.kind == "embedding"}
    assert modes == {"embeddings.word_embeddings": "", "embeddings.position_embeddings": "positions",
                     "embeddings.token_type_embeddings": "zeros"}
    assert sum(l.kind == "attention" for l in arch.layers) == 2
    # the traced example length is not baked in: longer inputs run the same
    m = MODELS["bert"][0]
    x = example_input(m, (11,), 3)
    with torch.no_grad():
        torch.testing.assert_close(wsnets.WeightSpace(arch, wsnets.load(m, input_shape=(7,)).params).to_module()(x),
                                   m(x), rtol=1e-4, atol=1e-5)


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.gate = _Gate()

    def forward(self, x):
        return self.gate(self.fc(x))


class _Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:
            return self.lin(x)
        return -self.lin(x)


class _Cumsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer3 = nn.Sequential(nn.Linear(4, 4), _CumsumOp())
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.layer3(x))


class _CumsumOp(nn.Module):
    def forward(self, x):
        return torch.cumsum(x, dim=1)


def test_untraceable_module_names_module_and_op():
    with pytest.raises(wsnets.UnsupportedLayerError) as e:
        wsnets.load(_DataDependent(), input_shape=(4,))
    msg = str(e.value)
    assert "\n" not in msg and "_Gate at 'gate'" in msg and "gt" in msg and "control flow" in msg


def test_unknown_op_names_op_and_place():
    with pytest.raises(wsnets.UnsupportedLayerError, match=r"unknown op .*cumsum at 'layer3.1'"):
        wsnets.load(_Cumsum(), input_shape=(4,))


@pytest.mark.parametrize("name", DAG_IDS)
def test_neural_graph_round_trips_and_encoders_see_the_symmetry(name):
    """(d) from_graph(to_graph(ws)) is exact; (c) graph encoders are invariant to the spec's permutations
    and sensitive to permuting the input neurons; DAG graphs batch with sequential ones."""
    from wsnets.nn.graph_encoder import NeuralGraphEncoder
    from wsnets.nn.transformer import NeuralGraphTransformer
    from wsnets.testing import assert_invariant, assert_sensitive_to_inputs
    m, shape = MODELS[name]
    ws = wsnets.load(m, input_shape=shape)
    g = ws.to_graph()
    back = wsnets.from_graph(g)
    assert back.arch == ws.arch and all(torch.equal(back.params[k], ws.params[k]) for k in ws.params)
    mlp = wsnets.WeightSpace.random(wsnets.mlp(12, [8], 5))
    batch = wsnets.to_batch([ws, mlp, ws])
    assert batch.num_graphs == 3 and torch.equal(batch[0].edge_attr, g.edge_attr)
    torch.manual_seed(0)
    for cls in (NeuralGraphEncoder, NeuralGraphTransformer):
        enc = cls(hidden=16, layers=2, edge_dim=max(9, ws.arch.max_kernel_numel)).eval()
        assert_invariant(enc, [ws, mlp], rtol=1e-3)
        spec = permutation_spec(ws.arch)
        if 0 in spec.fixed and spec.group_sizes[0] > 1:
            assert_sensitive_to_inputs(enc, [ws], atol=1e-5)


@pytest.mark.parametrize("name", DAG_IDS)
def test_weight_matching_recovers_a_spec_permutation(name):
    """Two perturbed copies, one permuted by a random permutation from the spec: weight matching
    (head-structured for attention, block axes for concatenation) undoes it exactly."""
    from wsnets.merge.align import activation_matching, weight_matching
    m, shape = MODELS[name]
    ws = wsnets.load(m, input_shape=shape)
    g = torch.Generator().manual_seed(1)
    noisy = ws.map(lambda t: t + 0.01 * torch.randn(t.shape, generator=g))
    b = permute(noisy, random_permutations(ws.arch, generator=g))
    b2, _ = weight_matching(ws, b)
    assert all(torch.equal(b2.params[k], noisy.params[k]) for k in ws.params)
    x = example_input(ws.to_module(), shape, 32)
    b3, _ = activation_matching(ws, b, x)   # function-preserving whatever it finds
    assert_same_function(b.to_module(), b3.to_module(), x)


class _ShapeBranch(nn.Module):
    """Python control flow on a shape: torch.fx cannot trace it, torch.export can."""

    def __init__(self, op=None):
        super().__init__()
        self.a, self.n, self.b = nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3)
        self.layer3 = nn.Sequential(nn.Identity(), _CumsumOp()) if op == "cumsum" else None

    def forward(self, x):
        if x.shape[-1] == 4:
            x = self.a(x)
        h = torch.relu(self.n(x))
        if self.layer3 is not None:
            h = self.layer3(h)
        return self.b(h)


def test_export_fallback_where_fx_fails():
    m = _ShapeBranch().eval()
    ws = wsnets.load(m, input_shape=(4,))
    assert [l.kind for l in ws.arch.layers] == ["linear", "layernorm", "act", "linear"]
    assert_same_function(m, ws.to_module(), input_shape=(4,))


def test_unknown_aten_op_names_op_and_place():
    with pytest.raises(wsnets.UnsupportedLayerError, match=r"unknown op aten.cumsum at 'layer3.1'"):
        wsnets.load(_ShapeBranch("cumsum"), input_shape=(4,))
