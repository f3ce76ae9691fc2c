"""Both graph encoders: invariance, identity of inputs/outputs, mixed batches, and that they can learn."""

import math

import pytest
import torch

import wsnets
from wsnets.errors import ShapeMismatchError
from wsnets.nn import NeuralGraphEncoder, NeuralGraphTransformer, RegressionHead
from wsnets.testing import assert_invariant, assert_sensitive_to_inputs

from .helpers import ARCHS, mixed, nets

ENCODERS = {
    "pna": lambda: NeuralGraphEncoder(hidden=16, layers=2, out_dim=8, edge_dim=9),
    "transformer": lambda: NeuralGraphTransformer(hidden=16, layers=2, heads=4, out_dim=8, edge_dim=9),
    # per-layer weight/bias scale features and the edge-group readout (the settings of train/*.toml)
    "pna-scaled": lambda: NeuralGraphEncoder(hidden=16, layers=2, out_dim=8, layer_scale=True, edge_readout=True),
    "transformer-scaled": lambda: NeuralGraphTransformer(hidden=16, layers=2, heads=4, out_dim=8, layer_scale=True,
                                                         edge_readout=True),
    # probe features and the standardized readout (train/graph.toml's settings) on the transformer
    "transformer-probes": lambda: NeuralGraphTransformer(hidden=16, layers=2, heads=4, out_dim=8, probes=3,
                                                         readout_norm=True),
}


@pytest.fixture(params=list(ENCODERS))
def encoder(request):
    return ENCODERS[request.param]().double().eval()


def _double(ws_list):
    return [w.map(torch.Tensor.double) for w in ws_list]


def test_mixed_batch_equals_each_graph_alone(encoder):
    networks = _double(mixed())
    assert len({w.arch for w in networks}) >= 3
    with torch.no_grad():
        out = encoder(wsnets.to_batch(networks))
        alone = torch.cat([encoder(wsnets.to_batch([w])) for w in networks])
    assert out.shape == (len(networks), encoder.out_dim)
    torch.testing.assert_close(out, alone, rtol=1e-9, atol=1e-9)


def test_invariant_to_hidden_permutations_mixed_with_batchnorm(encoder):
    assert_invariant(encoder, _double(mixed()), n_perms=2, rtol=1e-9)


def test_sensitive_to_input_and_output_permutations(encoder):
    networks = _double(mixed())
    assert_sensitive_to_inputs(encoder, networks)
    L = {w.arch: len(w.arch.group_sizes) - 1 for w in networks}
    flipped = [wsnets.permute(w, {L[w.arch]: torch.arange(w.arch.out_features).flip(0)}, allow_fixed=True)
               for w in networks]
    with torch.no_grad():
        diff = (encoder(wsnets.to_batch(networks)) - encoder(wsnets.to_batch(flipped))).abs().max()
    assert diff > 1e-6


def test_batched_weightspace_and_list_give_the_same_embedding(encoder):
    ws = nets(ARCHS["cnn2d_bn"], 3).map(torch.Tensor.double)
    with torch.no_grad():
        torch.testing.assert_close(encoder(wsnets.to_batch(ws)), encoder(wsnets.to_batch(list(ws))))


def test_kernel_larger_than_edge_dim_is_a_clear_error():
    enc = NeuralGraphEncoder(hidden=8, layers=1, edge_dim=4)
    with pytest.raises(ShapeMismatchError, match="edge_dim=4"):
        enc(wsnets.to_batch(nets(ARCHS["cnn2d_bn"], 1)))


@pytest.mark.parametrize("name", list(ENCODERS))
def test_learns_a_weight_property_across_architectures(name):
    """Regress log(init scale) of random MLPs and CNNs of several shapes: must beat the mean by far."""
    g = torch.Generator().manual_seed(0)
    archs = [ARCHS["mlp"], ARCHS["cnn1d"], wsnets.mlp(6, [9], 3)]
    ws, y = [], []
    for i in range(48):
        s = float(torch.empty(1).uniform_(0.3, 3.0, generator=g))
        ws.append(wsnets.WeightSpace.random(archs[i % 3], generator=g, scale=s))
        y.append(s)
    y = torch.tensor(y).log().unsqueeze(1)
    batch = wsnets.to_batch(ws)
    enc = ENCODERS[name]()
    head = RegressionHead(enc.out_dim, 1, hidden=(16,)).fit_targets(y)
    opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=3e-3)
    for _ in range(60):
        opt.zero_grad()
        loss = head.loss(enc(batch), y)
        loss.backward()
        opt.step()
    assert loss.item() < 0.1  # standardized MSE: 1.0 is the mean predictor


@pytest.mark.parametrize("sort", [True, False])
def test_pna_aggregate_matches_scatter_reference(sort):
    from torch_geometric.utils import scatter

    from wsnets.nn.graph_encoder import pna_aggregate, segments
    g = torch.Generator().manual_seed(0)
    n, E, H = 7, 40, 3
    index = torch.randint(0, n - 1, (E,), generator=g)  # node n-1 receives nothing
    index = index.sort().values if sort else index
    m = torch.randn(E, H, generator=g, dtype=torch.float64)
    got = pna_aggregate(m, index, segments(index, n), delta=2.0)
    mean = scatter(m, index, 0, dim_size=n, reduce="mean")
    deg = torch.bincount(index, minlength=n).to(m.dtype)
    agg = torch.cat([mean, scatter(m, index, 0, dim_size=n, reduce="max")], 1)
    torch.testing.assert_close(got, torch.cat([agg, agg * ((deg + 1).log() / 2.0).unsqueeze(1)], 1))
    assert (got[n - 1] == 0).all()


def test_layer_rms_matches_a_loop_and_layer_scale_keeps_the_scale():
    from wsnets.nn.graph_encoder import GraphFeaturizer, layer_rms
    g = torch.Generator().manual_seed(0)
    sq = torch.rand(30, generator=g, dtype=torch.float64)
    group = torch.randint(0, 5, (30,), generator=g)            # group 5 is empty
    got = layer_rms(sq, group, 6, eps=1e-3)
    for k in range(6):
        ref = (sq[group == k].mean() if (group == k).any() else torch.zeros((), dtype=sq.dtype)) + 1e-6
        torch.testing.assert_close(got[k], ref.sqrt())
    # with layer_scale: 2x weights and biases leave the scale-free columns alone and shift the log RMS by log 2
    feat = GraphFeaturizer(8, layer_scale=True).double()
    ws = _double(list(nets(ARCHS["mlp"], 1)))[0]
    n1, e1, _ = feat.inputs(wsnets.to_batch([ws]))
    n2, e2, _ = feat.inputs(wsnets.to_batch([ws.map(lambda t: 2 * t)]))
    D = feat.edge_dim
    torch.testing.assert_close(e2[:, -D - 1:-1], e1[:, -D - 1:-1], atol=1e-4, rtol=0)   # up to the eps floor
    torch.testing.assert_close(e2[:, -1], e1[:, -1] + math.log(2), atol=1e-4, rtol=0)
    hidden = wsnets.to_batch([ws]).node_type > 0             # input neurons have no bias nor incoming weights
    torch.testing.assert_close(n2[:, -3], n1[:, -3], atol=1e-4, rtol=0)
    torch.testing.assert_close(n2[hidden, -2:], n1[hidden, -2:] + math.log(2), atol=1e-4, rtol=0)
    assert (e2[:, :D] - e1[:, :D]).abs().max() > 1e-3      # the raw weights still carry the scale


@pytest.mark.parametrize("layer_scale", [False, True])
def test_first_edge_layer_from_parts_equals_the_layer_on_built_features(layer_scale):
    """forward() never builds the [E, F] edge features: the split computation must give the same numbers."""
    from wsnets.nn.graph_encoder import GraphFeaturizer
    from .helpers import mixed
    feat = GraphFeaturizer(8, layer_scale=layer_scale, edge_hidden=6).double()
    batch = wsnets.to_batch([w.map(torch.Tensor.double) for w in mixed()])
    _, efeats, _ = feat.inputs(batch)
    _, parts, _ = feat._parts(batch, None)
    torch.testing.assert_close(feat._edge_first_layer(parts), feat.edge_in[0](efeats))


def test_gather_gradients_match_autograd_through_index_select():
    from wsnets.nn.graph_encoder import gather
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, dtype=torch.float64, generator=g, requires_grad=True)
    index = torch.randint(0, 7, (20,), generator=g)
    assert torch.autograd.gradcheck(lambda t: gather(t, index), (x,))
    perm = torch.randperm(7, generator=g)
    assert torch.autograd.gradcheck(lambda t: gather(t, perm, perm.argsort()), (x,))
    w = torch.randn(20, 3, dtype=torch.float64, generator=g)
    (a,) = torch.autograd.grad((gather(x, index) * w).sum(), x)
    (b,) = torch.autograd.grad((x.index_select(0, index) * w).sum(), x)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("sort", [True, False])
def test_gather_linear_and_segment_sums_match_autograd_through_plain_ops(sort):
    """The fused per-edge sums and the sparse segment sums give autograd's values and gradients."""
    from wsnets.nn.graph_encoder import gather_linear, reduce_by, segments
    g = torch.Generator().manual_seed(0)
    n, E, H, K = 6, 30, 4, 3
    dst = torch.randint(0, n - 1, (E,), generator=g)        # node n-1 receives nothing
    dst = dst.sort().values if sort else dst
    src = torch.randint(0, n, (E,), generator=g)
    seg_dst, seg_src = segments(dst, n), segments(src, n)
    x, w = torch.randn(E, K, dtype=torch.float64, generator=g), torch.randn(H, K, dtype=torch.float64, generator=g)
    a, b = torch.randn(n, H, dtype=torch.float64, generator=g), torch.randn(n, H, dtype=torch.float64, generator=g)
    for ia, ib in [(dst, src), (seg_dst, seg_src)]:          # plain index (index_add) and Segments (sparse sum)
        assert torch.autograd.gradcheck(lambda *t: gather_linear(t[0], t[1], t[2], ia, t[3], ib), (
            x.requires_grad_(), w.requires_grad_(), a.requires_grad_(), b.requires_grad_()))
        assert torch.autograd.gradcheck(lambda *t: gather_linear(t[0], t[1], t[2], ia), (x, w, a))
    ref = a[dst] + b[src] + x @ w.T
    torch.testing.assert_close(gather_linear(x, w, a, seg_dst, b, seg_src), ref)
    m = torch.randn(E, H, dtype=torch.float64, generator=g, requires_grad=True)
    torch.testing.assert_close(seg_src.sum(m), torch.zeros(n, H, dtype=m.dtype).index_add(0, src, m))
    assert torch.autograd.gradcheck(seg_dst.sum, (m,))
    mean = reduce_by(m, dst, n, "mean")
    torch.testing.assert_close(mean[:-1], torch.stack([m[dst == k].mean(0) for k in range(n - 1)]))
    assert (mean[-1] == 0).all()


def test_max_over_equal_segments_matches_segment_reduce():
    """Segments of one length (a batch of one architecture) take a reshape: same values and gradients."""
    from wsnets.nn.graph_encoder import reduce_sorted
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4 * 5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    lengths = torch.full((4,), 5)
    got = reduce_sorted(x, lengths, "max")
    ref = torch.segment_reduce(x, "max", lengths=lengths, unsafe=True)
    torch.testing.assert_close(got, ref)
    w = torch.randn(4, 3, dtype=torch.float64, generator=g)
    (ga,) = torch.autograd.grad((got * w).sum(), x)
    (gb,) = torch.autograd.grad((ref * w).sum(), x)
    torch.testing.assert_close(ga, gb)
