"""Neural graphs: counts, invariance up to relabeling, exact inversion, batching."""

import pytest
import torch
from torch import nn
from torch_geometric.data import Batch
from torch_geometric.nn import GINEConv, global_add_pool

import wsnets
from wsnets.symmetry import permute, random_permutations
from wsnets.testing import assert_same_function

from tests.spine.helpers import architectures, random_ws

ARCHS = architectures()


def test_documented_counts():
    g = wsnets.to_graph(random_ws(wsnets.mlp(64, [32, 32], 10)))
    assert (g.num_nodes, g.num_edges) == (138, 3392)
    g = wsnets.to_graph(random_ws(wsnets.cnn(1, [8, 16], 10, kernel_size=3)))
    assert (g.num_nodes, g.num_edges) == (1 + 8 + 16 + 10, 8 + 128 + 160)
    assert g.edge_attr.shape == (296, 9)


class TinyMPNN(nn.Module):
    """A message-passing net that sees positions of input/output neurons (not of hidden ones)."""

    def __init__(self, edge_dim, max_pos=64):
        super().__init__()
        torch.manual_seed(0)
        self.pos = nn.Embedding(max_pos + 1, 8)
        self.kind = nn.Embedding(3, 8)
        self.inp = nn.Linear(5, 8)
        self.c1 = GINEConv(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16)), edge_dim=edge_dim)
        self.c2 = GINEConv(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8)), edge_dim=edge_dim)

    def forward(self, b):
        h = self.inp(b.x) + self.pos(b.node_pos + 1) + self.kind(b.node_type)
        h = self.c1(h, b.edge_index, b.edge_attr).relu()
        h = self.c2(h, b.edge_index, b.edge_attr)
        return global_add_pool(h, b.batch if hasattr(b, "batch") and b.batch is not None else
                               torch.zeros(h.shape[0], dtype=torch.long))


def _multiset(t):
    return sorted(map(tuple, t.tolist()))


@pytest.mark.parametrize("name,arch,shape", ARCHS, ids=[a[0] for a in ARCHS])
def test_permuted_graph_is_relabeled_graph(name, arch, shape):
    ws = random_ws(arch).to(torch.float64)
    pw = permute(ws, random_permutations(arch, generator=torch.Generator().manual_seed(3)))
    g, pg = wsnets.to_graph(ws), wsnets.to_graph(pw)
    assert (g.num_nodes, g.num_edges) == (pg.num_nodes, pg.num_edges)
    node = lambda d: torch.cat([d.x, d.node_type[:, None], d.node_layer[:, None], d.node_pos[:, None], d.node_act[:, None]], 1)
    assert _multiset(node(g)) == _multiset(node(pg))
    edge = lambda d: torch.cat([d.edge_attr, d.edge_type[:, None], d.edge_layer[:, None]], 1)
    assert _multiset(edge(g)) == _multiset(edge(pg))
    assert not torch.equal(g.edge_attr, pg.edge_attr)  # the permutation did something
    net = TinyMPNN(g.edge_attr.shape[1]).double()
    out, pout = net(Batch.from_data_list([g])), net(Batch.from_data_list([pg]))
    assert torch.allclose(out, pout, rtol=1e-5, atol=1e-8)
    # (c) permuting input features is not a relabeling the encoder may ignore
    n = arch.group_sizes[0]
    iw = permute(ws, {0: torch.roll(torch.arange(n), 1)}, allow_fixed=True)
    assert not torch.allclose(out, net(Batch.from_data_list([wsnets.to_graph(iw)])), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name,arch,shape", ARCHS, ids=[a[0] for a in ARCHS])
def test_from_graph_inverts_exactly(name, arch, shape):
    ws = random_ws(arch)
    back = wsnets.from_graph(wsnets.to_graph(ws))
    assert back.arch == ws.arch
    for k in ws.params:
        assert torch.equal(back.params[k], ws.params[k]), k
    assert_same_function(ws.to_module(), back.to_module(), input_shape=shape)


def test_from_graph_of_relabeled_graph_is_permuted_network():
    arch = wsnets.mlp(6, [9, 7], 4, batchnorm=True)
    ws = random_ws(arch)
    g = wsnets.to_graph(ws)
    perm = torch.randperm(g.num_nodes, generator=torch.Generator().manual_seed(5))
    # relabel nodes: new node i is old node perm[i]
    inv = perm.argsort()
    g2 = g.clone()
    for a in ("x", "node_type", "node_layer", "node_pos", "node_act"):
        g2[a] = g[a][perm]
    g2.edge_index = inv[g.edge_index]
    back = wsnets.from_graph(g2)
    assert_same_function(ws.to_module(), back.to_module(), input_shape=(6,))


def test_mixed_batch_keeps_order_and_matches_single_graphs():
    nets = [random_ws(a, i) for i, (_, a, _) in enumerate(ARCHS)] + [random_ws(ARCHS[0][1], 9)]
    nets = [nets[i] for i in (0, 3, 1, 4, 6, 2, 5)]
    b = wsnets.to_batch(nets)
    assert b.num_graphs == len(nets)
    D = max(n.arch.max_kernel_numel for n in nets)
    ref = Batch.from_data_list([wsnets.to_graph(n, edge_dim=D) for n in nets])
    for key in ("x", "edge_index", "edge_attr", "node_type", "node_layer", "node_pos", "node_act", "edge_type",
                "edge_layer", "batch", "ptr"):
        assert torch.equal(b[key], ref[key]), key
    for i, n in enumerate(nets):
        back = wsnets.from_graph(b[i])
        for k in n.params:
            assert torch.equal(back.params[k], n.params[k])


def test_batched_fast_path_equals_per_graph():
    arch = wsnets.mlp(10, [8, 8], 3, batchnorm=True)
    batch = wsnets.WeightSpace.random(arch, 5)
    b = wsnets.to_batch(batch)
    ref = Batch.from_data_list([wsnets.to_graph(batch[i]) for i in range(5)])
    for key in ("x", "edge_index", "edge_attr", "batch", "ptr", "node_pos"):
        assert torch.equal(b[key], ref[key]), key
    assert [d.num_nodes for d in b.to_data_list()] == [arch.group_sizes and sum(arch.group_sizes)] * 5
