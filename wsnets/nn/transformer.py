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
from .graph_encoder import EdgeUpdate, GraphFeaturizer, graph_readout


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
        layer, _ = to_dense_batch(batch.node_layer, nb, fill_value=0)
        hop = (layer.unsqueeze(1) - layer.unsqueeze(2)).clamp(-self.max_hop, self.max_hop) + self.max_hop
        bias = self.hop(hop).permute(0, 3, 1, 2)                 # [B, nh, M(query), M(key)]
        en = self.norm_e(e)
        eb = nb[src]
        bias = _add_pairs(bias, eb, local[dst], local[src], self.bias_fwd(en))
        bias = _add_pairs(bias, eb, local[src], local[dst], self.bias_bwd(en))
        bias = bias.masked_fill(~mask[:, None, None, :], float("-inf"))
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype),
                                             dropout_p=self.dropout if self.training else 0.0)
        att = att.transpose(1, 2).reshape(B, M, H)[mask]          # back to [N, H]
        h = h + self.out(att)
        h = h + self.ffn(self.norm2(h))
        return h, self.edge(self.norm2(h), en, e, src, dst)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, heads={self.heads}, max_hop={self.max_hop}"


def _add_pairs(bias: torch.Tensor, b: torch.Tensor, i: torch.Tensor, j: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    """``bias[b, :, i, j] += val`` for every edge (``val [E, heads]``), out of place (autograd-safe)."""
    B, nh, M, _ = bias.shape
    flat = bias.permute(0, 2, 3, 1).reshape(B * M * M, nh)
    idx = (b * M + i) * M + j
    flat = flat.index_add(0, idx, val.to(flat.dtype))
    return flat.reshape(B, M, M, nh).permute(0, 3, 1, 2)


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

    Defaults are sized for CPU training on zoos (cost grows with ``hidden**2 x edges x layers``);
    on a GPU, ``hidden=64..128`` and ``layers=4`` are affordable.
    """

    representation = "graph"

    def __init__(self, hidden: int = 32, layers: int = 3, heads: int = 4, out_dim: int = 64, edge_dim: int = 9,
                 dropout: float = 0.0, pos_dim: int = 16) -> None:
        super().__init__()
        self.featurizer = GraphFeaturizer(hidden, edge_dim, pos_dim)
        self.layers = nn.ModuleList(RelationalAttentionLayer(hidden, heads, dropout) for _ in range(layers))
        self.norm_h, self.norm_e = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.head = make_mlp([7 * hidden, 2 * hidden, out_dim], dropout=dropout, norm=True)
        self.out_dim, self.hidden = out_dim, hidden

    def forward(self, batch) -> torch.Tensor:
        h, e, aux = self.featurizer(batch)
        nb = aux["batch"]
        ptr = torch.zeros(int(nb.max()) + 2 if nb.numel() else 1, dtype=torch.long, device=nb.device)
        ptr[1:] = torch.bincount(nb, minlength=ptr.numel() - 1).cumsum(0)
        aux["local"] = torch.arange(nb.numel(), device=nb.device) - ptr[nb]
        for layer in self.layers:
            h, e = layer(h, e, batch, aux)
        return self.head(graph_readout(self.norm_h(h), self.norm_e(e), batch, aux))
