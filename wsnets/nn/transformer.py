"""Attention over the neurons of neural graphs with edge features as attention biases
(relational-transformer style: Diao & Loynd 2023, "Relational Attention"; Kofinas et al. 2024).

Every neuron attends to every neuron of its own network. The attention logit of query ``i`` and key
``j`` gets a per-head bias from the edge between them (``j -> i`` and ``i -> j`` through separate
projections, so direction is known) plus a learned bias for their layer distance (clipped to
``±max_hop``); keys of other graphs in the batch are masked out. After each attention block the
edges are updated from their endpoints (sparse, ``[E, H]``), so the weights keep shaping later
layers. Node/edge features and the readout are those of :mod:`wsnets.nn.graph_encoder`.

Memory: the dense bias is ``[B, heads, N_max, N_max]`` (N_max = most neurons of one graph in the batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.utils import to_dense_batch

from .common import make_mlp
from .graph_encoder import EdgeUpdate, GraphFeaturizer, graph_readout, readout_dim


class RelationalAttentionLayer(nn.Module):
    """Multi-head self-attention per graph with edge-feature and layer-distance biases, FFN, edge update."""

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
        self.hop = nn.Embedding(2 * max_hop + 1, heads)
        self.ffn = make_mlp([hidden, 2 * hidden, hidden], dropout=dropout)
        self.edge = EdgeUpdate(hidden, dropout)

    def forward(self, h: torch.Tensor, e: torch.Tensor, batch, aux: dict) -> tuple[torch.Tensor, torch.Tensor]:
        nb = aux["batch"]
        src, dst = batch.edge_index
        hn = self.norm1(h)
        dense, mask = to_dense_batch(hn, nb)                      # [B, M, H], [B, M]
        B, M, H = dense.shape
        nh, hd = self.heads, H // self.heads
        q, k, v = self.qkv(dense).reshape(B, M, 3, nh, hd).permute(2, 0, 3, 1, 4)  # [B, nh, M, hd] each
        local = aux["local"]
        bias = self.hop_bias(batch.node_layer, nb, M)               # [B, nh, M(query), M(key)]
        en = self.norm_e(e)
        eb = nb[src]
        qi, kj = torch.cat([local[dst], local[src]]), torch.cat([local[src], local[dst]])   # both directions
        bias = _add_pairs(bias, torch.cat([eb, eb]), qi, kj, torch.cat([self.bias_fwd(en), self.bias_bwd(en)]))
        bias = bias.masked_fill(~mask[:, None, None, :], float("-inf"))
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype),
                                             dropout_p=self.dropout if self.training else 0.0)
        att = att.transpose(1, 2).reshape(B, M, H)[mask]          # back to [N, H]
        h = h + self.out(att)
        h = h + self.ffn(self.norm2(h))
        return h, self.edge(self.norm2(h), en, e, src, dst)

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


def _add_pairs(bias: torch.Tensor, b: torch.Tensor, i: torch.Tensor, j: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    """``bias[b, :, i, j] += val`` for every edge (``val [E, heads]``), out of place (autograd-safe).

    Indexes ``bias`` in its own ``[B, heads, M, M]`` layout, so no permuted copy is made."""
    B, nh, M, _ = bias.shape
    heads = torch.arange(nh, device=b.device).unsqueeze(0)                # [1, nh]
    idx = (((b * nh).unsqueeze(1) + heads) * M + i.unsqueeze(1)) * M + j.unsqueeze(1)   # [E, nh]
    return bias.reshape(-1).index_add(0, idx.reshape(-1), val.to(bias.dtype).reshape(-1)).reshape(B, nh, M, M)


class NeuralGraphTransformer(nn.Module):
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
    layer_scale, edge_readout : as in :class:`~wsnets.nn.graph_encoder.NeuralGraphEncoder`.

    Defaults are sized for CPU training on zoos (cost grows with ``hidden**2 x edges x layers``);
    on a GPU, ``hidden=64..128`` and ``layers=4`` are affordable.
    """

    representation = "graph"

    def __init__(self, hidden: int = 32, layers: int = 3, heads: int = 4, out_dim: int = 64, edge_dim: int = 9,
                 dropout: float = 0.0, pos_dim: int = 16, layer_scale: bool = False, edge_readout: bool = False) -> None:
        super().__init__()
        self.featurizer = GraphFeaturizer(hidden, edge_dim, pos_dim, layer_scale)
        self.layers = nn.ModuleList(RelationalAttentionLayer(hidden, heads, dropout) for _ in range(layers))
        self.norm_h, self.norm_e = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.head = make_mlp([readout_dim(hidden, edge_readout), 2 * hidden, out_dim], dropout=dropout, norm=True)
        self.out_dim, self.hidden, self.edge_readout = out_dim, hidden, edge_readout

    def forward(self, batch) -> torch.Tensor:
        h, e, aux = self.featurizer(batch)
        nb = aux["batch"]
        ptr = torch.zeros(int(nb.max()) + 2 if nb.numel() else 1, dtype=torch.long, device=nb.device)
        ptr[1:] = torch.bincount(nb, minlength=ptr.numel() - 1).cumsum(0)
        aux["local"] = torch.arange(nb.numel(), device=nb.device) - ptr[nb]
        for layer in self.layers:
            h, e = layer(h, e, batch, aux)
        return self.head(graph_readout(self.norm_h(h), self.norm_e(e), batch, aux, self.edge_readout))
