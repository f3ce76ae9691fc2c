"""Relational attention over the neurons of neural graphs (Diao & Loynd 2023, "Relational
Attention"; Kofinas et al. 2024).

Every neuron attends to every neuron of its own network. The attention logit of query ``i`` and key
``j`` gets a per-head bias from the edge between them (``j -> i`` and ``i -> j`` through separate
projections, so direction is known) plus a learned bias for their layer distance (clipped to
``±max_hop``); keys of other graphs in the batch are masked out. An edge also carries a value: the
probability of ``(i, j)`` weights the key neuron's value plus the edge's own (a scalar per head and
direction times a learned vector per head). After each attention block the edges are updated from
their endpoints (sparse, ``[E, H]``), so the weights keep shaping later layers. Node/edge features and
the readout are those of :mod:`wsnets.nn.graph_encoder`.

Two choices keep the encoder sensitive to *which* input (or output) neuron a weight belongs to, the
one thing besides the weights that tells networks of one architecture apart when their hidden
neurons are anonymous (``tests/spine/test_dag.py`` asserts it on transformers and BERT):

* input and output neurons get their position code through a projection at the scale of the type
  embeddings (:func:`io_codes`; in :class:`~wsnets.nn.graph_encoder.GraphFeaturizer`'s node MLP the
  code alone moved an input neuron's attention value by ~2% of its spread);
* half of the heads start local: every edge's logit gets ``log(number of neurons)`` (a learned factor
  per head and direction, initialized to 1, the other heads' to 0), so a neuron's few graph
  neighbours outweigh the rest of the network at any size. With uniform attention a hidden neuron
  of a 400-neuron transformer gave 2% of its attention to its 8 inputs, so what their weights and
  identities told it was diluted ~50-fold; the global heads keep the whole-network view.

Memory: attention runs on groups of graphs of similar size (:func:`attention_groups`), each as dense
``[graphs, heads, M, M]`` logits built in place (M = most neurons of one graph in the group), so a batch
that mixes 100- and 1,300-neuron networks does not pad every graph to 1,300. The values are those of one
dense batch: every graph's keys are its own, padding is masked out.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.utils import to_dense_batch

from .common import make_mlp, sinusoidal
from .graph_encoder import EdgeUpdate, GraphFeaturizer, ProbeReadoutMixin, graph_readout, readout_dim


class RelationalAttentionLayer(nn.Module):
    """Multi-head self-attention per graph with edge-feature, neighbour and layer-distance biases, edge
    values, FFN, edge update (see the module docstring)."""

    def __init__(self, hidden: int, heads: int = 4, dropout: float = 0.0, max_hop: int = 3) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden={hidden} is not divisible by heads={heads}")
        self.hidden, self.heads, self.max_hop, self.dropout = hidden, heads, max_hop, dropout
        self.norm1, self.norm2, self.norm_e = nn.LayerNorm(hidden), nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.bias_fwd = nn.Linear(hidden, heads)   # key = source, query = target
        self.bias_bwd = nn.Linear(hidden, heads)   # key = target, query = source
        # edge values: a scalar per edge and head (both directions) times a learned vector per head
        self.value_fwd, self.value_bwd = nn.Linear(hidden, heads), nn.Linear(hidden, heads)
        self.value_dir = nn.Parameter(torch.randn(heads, hidden // heads))
        self.hop = nn.Embedding(2 * max_hop + 1, heads)
        # per head and direction, the weight of log(neurons in the graph) added to the logit of every edge:
        # 1 on the first half of the heads (a neighbour outweighs all non-neighbours together, at any graph
        # size), 0 on the rest (global attention)
        local = torch.zeros(2, heads)
        local[:, : heads // 2] = 1.0
        self.neighbour = nn.Parameter(local)
        self.ffn = make_mlp([hidden, 2 * hidden, hidden], dropout=dropout)
        self.edge = EdgeUpdate(hidden, dropout)

    def forward(self, h: torch.Tensor, e: torch.Tensor, batch, aux: dict) -> tuple[torch.Tensor, torch.Tensor]:
        src, dst = batch.edge_index
        hn, en = self.norm1(h), self.norm_e(e)
        groups = aux.get("groups")
        if groups is None:      # one dense batch
            att = self._attend(hn, en, src, dst, aux["batch"], batch.node_layer, aux["local"], aux["log_nodes"])
        else:
            parts = [self._attend(hn[g.nodes], en[g.edges], g.src, g.dst, g.batch, batch.node_layer[g.nodes],
                                  aux["local"][g.nodes], aux["log_nodes"][g.graphs]) for g in groups.parts]
            att = torch.cat(parts)[groups.inverse]
        h = h + self.out(att)
        h = h + self.ffn(self.norm2(h))
        return h, self.edge(self.norm2(h), en, e, src, dst)

    def _attend(self, hn: torch.Tensor, en: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, nb: torch.Tensor,
                node_layer: torch.Tensor, local: torch.Tensor, log_nodes: torch.Tensor) -> torch.Tensor:
        """Attention output ``[n, H]`` of the graphs in ``nb`` (their nodes contiguous and in order, edges
        indexing those nodes)."""
        dense, mask = to_dense_batch(hn, nb)                      # [B, M, H], [B, M]
        B, M, H = dense.shape
        nh, hd = self.heads, H // self.heads
        q, k, v = self.qkv(dense).reshape(B, M, 3, nh, hd).permute(2, 0, 3, 1, 4)  # [B, nh, M, hd] each
        bias = self.hop_bias(node_layer, nb, M)                     # [B, nh, M(query), M(key)]
        eb = nb[src]
        qi, kj = torch.cat([local[dst], local[src]]), torch.cat([local[src], local[dst]])   # both directions
        pair = _pair_index(B, nh, M, torch.cat([eb, eb]), qi, kj)                          # [2E, nh]
        log_n = log_nodes[eb].unsqueeze(1)                                               # [E, 1]
        val = torch.cat([self.bias_fwd(en) + log_n * self.neighbour[0], self.bias_bwd(en) + log_n * self.neighbour[1]])
        # hop bias, padded keys at -inf, edge biases, then q.k on top: in place on one [B, nh, M, M] tensor
        bias = bias.masked_fill_(~mask[:, None, None, :], float("-inf")).reshape(-1)
        bias = bias.index_add_(0, pair.reshape(-1), val.to(bias.dtype).reshape(-1)).reshape(B * nh, M, M)
        q, k = q.reshape(B * nh, M, hd), k.reshape(B * nh, M, hd)
        logits = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=hd ** -0.5)
        p = logits.softmax(-1).reshape(B, nh, M, M)
        if self.training and self.dropout > 0:
            p = F.dropout(p, self.dropout)
        # relational values: an edge's own value joins its key neuron's, weighted by the same probability
        ev = p.reshape(-1)[pair] * torch.cat([self.value_fwd(en), self.value_bwd(en)])          # [2E, nh]
        ev = p.new_zeros(B * nh * M).index_add_(0, (pair // M).reshape(-1), ev.reshape(-1))
        att = torch.matmul(p, v) + ev.reshape(B, nh, M, 1) * self.value_dir.unsqueeze(1)
        return att.reshape(B, nh, M, hd).transpose(1, 2).reshape(B, M, H)[mask]          # back to [n, H]

    def hop_bias(self, node_layer: torch.Tensor, nb: torch.Tensor, M: int) -> torch.Tensor:
        """``[B, heads, M, M]`` learned bias of the clipped layer distance ``layer(key) - layer(query)``.

        Built as ``onehot(query layer) @ table @ onehot(key layer)^T`` with a ``[L, L]`` table per head
        (L = number of layers in the batch): the same values as an embedding lookup per pair, but its
        backward is a small matmul instead of a scatter over ``B x M x M`` indices.
        """
        n_layers = int(node_layer.max()) + 1 if node_layer.numel() else 1
        onehot, _ = to_dense_batch(F.one_hot(node_layer, n_layers).to(self.hop.weight.dtype), nb, max_num_nodes=M)
        ar = torch.arange(n_layers, device=node_layer.device)
        dist = (ar.unsqueeze(0) - ar.unsqueeze(1)).clamp(-self.max_hop, self.max_hop) + self.max_hop   # [lq, lk]
        table = self.hop(dist).permute(2, 0, 1)                                      # [heads, lq, lk]
        left = torch.einsum("bql,hlk->bhqk", onehot, table)                          # [B, heads, M, L]
        return torch.matmul(left, onehot.transpose(1, 2).unsqueeze(1))

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, heads={self.heads}, max_hop={self.max_hop}"


class _Group(NamedTuple):
    graphs: torch.Tensor   # batch indices of the group's graphs, ascending
    nodes: torch.Tensor    # their nodes, in batch order
    edges: torch.Tensor    # their edges
    src: torch.Tensor      # edge endpoints as positions in ``nodes``
    dst: torch.Tensor
    batch: torch.Tensor    # each node's graph as a position in ``graphs``


class AttentionGroups(NamedTuple):
    parts: list[_Group]
    inverse: torch.Tensor  # ``cat(outputs of parts)[inverse]`` is in batch node order


def plan_groups(sizes: list[int], heads: int, overhead: int = 65536) -> list[list[int]]:
    """Partition graphs (by index) into groups that minimize the padded attention work
    ``sum(heads * len(group) * max_size(group)**2 + overhead)`` (``overhead``: the fixed cost of one more
    group, in elements). Groups are contiguous in size order, so the exact optimum is a dynamic program
    over the sorted sizes, its inner minimum vectorized (under 1 ms for 32 graphs, ~5 ms for 1,024)."""
    order = sorted(range(len(sizes)), key=sizes.__getitem__)
    s = np.asarray([sizes[i] for i in order], dtype=np.float64)
    best, cut = np.zeros(len(s) + 1), [0] * (len(s) + 1)
    for j in range(1, len(s) + 1):    # best[j]: the first j graphs (by size), the last group ending at j
        cost = best[:j] + (heads * s[j - 1] ** 2) * (j - np.arange(j)) + overhead
        cut[j] = int(cost.argmin())   # the first minimum: the same plan as min() over (cost, start) pairs
        best[j] = cost[cut[j]]
    groups, j = [], len(s)
    while j:
        groups.append(sorted(order[cut[j]:j]))
        j = cut[j]
    return groups[::-1]


def attention_groups(nb: torch.Tensor, edge_index: torch.Tensor, heads: int,
                     overhead: int = 65536) -> AttentionGroups | None:
    """Groups of similar-size graphs for :class:`RelationalAttentionLayer` (see :func:`plan_groups`);
    ``None`` when one dense batch is best."""
    counts = torch.bincount(nb)
    groups = plan_groups(counts.tolist(), heads, overhead)
    if len(groups) <= 1:
        return None
    dev = nb.device
    group_of = torch.empty(counts.numel(), dtype=torch.long)
    rank = torch.empty(counts.numel(), dtype=torch.long)
    for k, g in enumerate(groups):
        group_of[g] = k
        rank[g] = torch.arange(len(g))
    group_of, rank = group_of.to(dev), rank.to(dev)
    node_group = group_of[nb]
    node_order = torch.sort(node_group, stable=True).indices            # nodes by group, batch order within
    edge_order = torch.sort(node_group[edge_index[1]], stable=True).indices
    n_nodes = torch.bincount(node_group, minlength=len(groups)).tolist()
    n_edges = torch.bincount(node_group[edge_index[1]], minlength=len(groups)).tolist()
    pos = torch.empty_like(nb)                                           # a node's position in its group
    pos[node_order] = torch.cat([torch.arange(n, device=dev) for n in n_nodes])
    parts = []
    for g, nodes, edges in zip(groups, node_order.split(n_nodes), edge_order.split(n_edges)):
        src, dst = edge_index[0, edges], edge_index[1, edges]
        parts.append(_Group(torch.tensor(g, device=dev), nodes, edges, pos[src], pos[dst], rank[nb[nodes]]))
    return AttentionGroups(parts, torch.argsort(node_order))


def _pair_index(B: int, nh: int, M: int, b: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """``[E, heads]`` flat indices of ``[b, head, i, j]`` into a ``[B, heads, M, M]`` tensor, per pair and head
    (``index // M`` is the row ``[b, head, i]`` of a ``[B, heads, M, d]`` tensor)."""
    heads = torch.arange(nh, device=b.device).unsqueeze(0)                # [1, nh]
    return (((b * nh).unsqueeze(1) + heads) * M + i.unsqueeze(1)) * M + j.unsqueeze(1)


class NeuralGraphTransformer(ProbeReadoutMixin, nn.Module):
    """Graph transformer over neural graphs -> ``[B, out_dim]`` (same inputs and outputs as
    :class:`~wsnets.nn.graph_encoder.NeuralGraphEncoder`).

    Parameters
    ----------
    hidden : embedding size (divisible by ``heads``).
    layers : attention blocks.
    heads : attention heads.
    out_dim : embedding size.
    edge_dim : largest kernel (taps) accepted; smaller are zero-padded.
    dropout : attention and MLP dropout.
    layer_scale, edge_readout, probes, probe_learn, probe_hidden, readout_norm : as in
        :class:`~wsnets.nn.graph_encoder.NeuralGraphEncoder` (probes: each neuron's activations on learned
        probe inputs join its features, a summary of the outputs joins the readout; off by default).

    Defaults are sized for CPU training on zoos (cost grows with ``hidden**2 x edges x layers``);
    on a GPU, ``hidden=64..128`` and ``layers=4`` are affordable.
    """

    representation = "graph"

    def __init__(self, hidden: int = 32, layers: int = 3, heads: int = 4, out_dim: int = 64, edge_dim: int = 9,
                 dropout: float = 0.0, pos_dim: int = 16, layer_scale: bool = False, edge_readout: bool = False,
                 probes: int = 0, probe_learn: bool = True, probe_hidden: bool = True,
                 readout_norm: bool = False) -> None:
        super().__init__()
        self.featurizer = GraphFeaturizer(hidden, edge_dim, pos_dim, layer_scale, probes)
        width = self._init_probes(readout_dim(hidden, edge_readout), hidden, pos_dim, probes, probe_learn,
                                  probe_hidden)
        self._init_readout_norm(width, readout_norm)
        self.io_code = nn.Linear(2 * pos_dim, hidden, bias=False)
        nn.init.normal_(self.io_code.weight, std=(2.0 / pos_dim) ** 0.5)
        self.pos_dim = pos_dim
        self.layers = nn.ModuleList(RelationalAttentionLayer(hidden, heads, dropout) for _ in range(layers))
        self.norm_h, self.norm_e = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.head = make_mlp([width, 2 * hidden, out_dim], dropout=dropout, norm=True)
        self.out_dim, self.hidden, self.edge_readout = out_dim, hidden, edge_readout

    def forward(self, batch) -> torch.Tensor:
        acts, summary = self.probe_inputs(batch)
        h, e, aux = self.featurizer(batch, acts)
        h = h + self.io_code(io_codes(batch, self.pos_dim, h.dtype))
        nb = aux["batch"]
        ptr = torch.zeros(int(nb.max()) + 2 if nb.numel() else 1, dtype=torch.long, device=nb.device)
        ptr[1:] = torch.bincount(nb, minlength=ptr.numel() - 1).cumsum(0)
        aux["local"] = torch.arange(nb.numel(), device=nb.device) - ptr[nb]
        aux["log_nodes"] = (ptr[1:] - ptr[:-1]).clamp(min=1).to(h.dtype).log()
        aux["groups"] = attention_groups(nb, batch.edge_index, self.layers[0].heads) if self.layers else None
        for layer in self.layers:
            h, e = layer(h, e, batch, aux)
        r = graph_readout(self.norm_h(h), self.norm_e(e), batch, aux, self.edge_readout)
        return self.head(self.finish_readout(r, acts, summary, batch, aux))


def io_codes(batch, pos_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """``[N, 2 * pos_dim]``: the sinusoidal position code of input neurons in the first half, of output
    neurons in the second, zeros elsewhere."""
    code = sinusoidal(batch.node_pos.clamp(min=0).to(dtype), pos_dim, max_period=1000.0).to(dtype)
    t = batch.node_type.unsqueeze(1)
    return torch.cat([code * (t == 0).to(dtype), code * (t == 2).to(dtype)], dim=1)
