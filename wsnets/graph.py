"""Neural graphs: neurons are nodes, weights are edges (Kofinas et al. 2024, "Graph Neural Networks for
Learning Equivariant Representations of Neural Networks").

Layout of a graph made by :func:`to_graph` (plain ``torch_geometric.data.Data``):

=============  ===========  =====================================================================
attribute      shape        meaning
=============  ===========  =====================================================================
``x``          [N, 5]       bias, norm weight, norm bias, norm running mean, norm running var
                            (0, 1, 0, 0, 1 where a neuron has no bias / normalization; inputs: 0, 1, 0, 0, 1)
``node_type``  [N]          0 input, 1 hidden, 2 output
``node_layer`` [N]          neuron group: 0 input, 1..L-1 hidden layers, L output
``node_pos``   [N]          position within the group for input/output neurons, -1 for hidden ones
``node_act``   [N]          activation applied to the neuron (index into ``ACTIVATIONS``; 0 = identity)
``edge_index`` [2, E]       source = neuron j of layer l-1, target = neuron i of layer l
``edge_attr``  [E, D]       the weight (column 0) or the flattened kernel, zero-padded to D
``edge_type``  [E]          0 linear, 1 conv1d, 2 conv2d
``edge_layer`` [E]          index of the weight layer the edge belongs to
``arch``       str          the architecture as JSON, so :func:`from_graph` can rebuild the network
=============  ===========  =====================================================================

Hidden neurons carry no identity of their own (``node_pos = -1``), so permuting a hidden layer of the
network relabels nodes of the graph and nothing else; input and output neurons keep their position.
BatchNorm is *kept* as node features (its four eval-mode parameters on the neurons it normalizes),
not folded; fold it first with :meth:`WeightSpace.fold_batchnorm` if you prefer (same function).
LayerNorm contributes weight and bias (mean 0, var 1). A conv layer followed by global average
pooling feeds a Linear layer through its channel nodes.

Speed: the topology of an architecture is built once (cached) and the features of many networks are
filled in bulk; :func:`to_batch` returns a ready ``Batch`` without building one ``Data`` per graph.

DAG architectures (residual networks, transformers; :class:`DagTopology`)
--------------------------------------------------------------------------
Following Kofinas et al. 2024 (Sec. on residual connections and transformers), with these choices:

* Nodes come in *node sets*, one per activation that has neurons of its own: the input, the output of
  every weight layer, every residual ``add`` (and ``mul``), a token concatenation. ``node_layer`` is the
  node set's index (a topological order; for a chain it is the neuron group, as above).
* A residual ``add`` is a node set fed by *identity edges* (weight 1, edge type 4) from each operand's
  neurons: the sum is a linear map with identity blocks, so an encoder sees exactly what the network
  adds, and the permutation shared by a residual stream (one spec group) relabels every node set of the
  stream alike. Kofinas et al. add such edges between the neurons a skip connection joins.
* A norm or activation sits on its input's nodes (as in a chain) when those nodes feed nothing else and
  carry no norm/activation yet; otherwise (a pre-LN transformer's LayerNorm reads a stream that the next
  ``add`` reads too) it gets its own node set behind identity edges, so features never describe a neuron
  the network does not compute.
* An embedding table or a learned tensor (class token, positional table) is a set of edges (type 3) from
  one *input* node per row (token id, position) with its entries as weights: a lookup is a linear map of a
  one-hot vector. Token ids have no input nodes of their own.
* Attention: q, k, v are the nodes of their projections (for ``nn.MultiheadAttention`` three node sets
  fed by ``in_proj_weight``); parameter-free attention adds edges q(h,i) -> k(h,i) (type 5: the neurons a
  dot product multiplies) and k(h,i) -> v(h,j) within each head (type 6: head ``h``'s scores weigh head
  ``h``'s values); the attention output is the value nodes, read by the output projection. Both edge
  kinds are invariant under the spec's head-structured permutations, and message passing reaches from
  the input through q and k to v and on.
* A concatenation along features is the union of its parts' node sets (no new nodes).

``from_graph`` inverts all of it exactly (each edge block and node feature knows its tensor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Sequence

import torch

from .arch import ACTIVATIONS, Architecture
from .errors import ShapeMismatchError, UnsupportedLayerError
from .symmetry import param_axis
from .weights import WeightSpace

NODE_FEATURES = ("bias", "norm_weight", "norm_bias", "norm_mean", "norm_var")
NODE_DEFAULTS = (0.0, 1.0, 0.0, 0.0, 1.0)
EDGE_TYPES = {"linear": 0, "conv1d": 1, "conv2d": 2, "table": 3, "identity": 4, "query_key": 5, "key_value": 6,
              "product": 7, "scale": 8}
NODE_TYPES = ("input", "hidden", "output")
_NORM_KEYS = {"weight": 1, "bias": 2, "running_mean": 3, "running_var": 4}


@dataclass(frozen=True)
class Topology:
    """Everything about a graph that depends on the architecture only (built once per architecture)."""

    arch: Architecture
    group_offsets: tuple[int, ...]  # first node of each group
    num_nodes: int
    num_edges: int
    edge_offsets: tuple[int, ...]   # first edge of each weight layer
    edge_index: torch.Tensor        # [2, E]
    node_type: torch.Tensor
    node_layer: torch.Tensor
    node_pos: torch.Tensor
    node_act: torch.Tensor
    edge_type: torch.Tensor
    edge_layer: torch.Tensor
    arch_json: str


@lru_cache(maxsize=512)
def topology(arch: Architecture) -> Topology:
    """Node and edge structure of an architecture's neural graph (cached)."""
    if not arch.is_chain:
        return _DagGraph(arch).build()
    sizes = arch.group_sizes
    L = len(sizes) - 1
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    N = offsets[-1]
    node_layer = torch.repeat_interleave(torch.arange(L + 1), torch.tensor(sizes))
    node_type = torch.ones(N, dtype=torch.long)
    node_type[: sizes[0]] = 0
    node_type[offsets[L]:] = 2
    node_pos = torch.full((N,), -1, dtype=torch.long)
    node_pos[: sizes[0]] = torch.arange(sizes[0])
    node_pos[offsets[L]:] = torch.arange(sizes[L])
    node_act = torch.zeros(N, dtype=torch.long)
    seen_norm: set[int] = set()
    for l, g in zip(arch.layers, arch.layer_group):
        if l.kind == "act" and 0 < g:
            node_act[offsets[g]:offsets[g + 1]] = ACTIVATIONS.index(l.fn)
        if l.is_norm:
            if g in seen_norm:
                raise UnsupportedLayerError(f"{l.kind} at {l.name!r}: a second normalization on the same neurons")
            seen_norm.add(g)
    src, dst, etype, elayer, eoff = [], [], [], [], [0]
    for li, l in enumerate(arch.weight_layers):
        n_out, n_in = l.out_features, l.in_features
        i = torch.arange(n_out).repeat_interleave(n_in)  # row-major over [out, in]
        j = torch.arange(n_in).repeat(n_out)
        src.append(offsets[li] + j)
        dst.append(offsets[li + 1] + i)
        etype.append(torch.full((n_out * n_in,), EDGE_TYPES[l.kind]))
        elayer.append(torch.full((n_out * n_in,), li))
        eoff.append(eoff[-1] + n_out * n_in)
    return Topology(arch, tuple(offsets[:-1]), N, eoff[-1], tuple(eoff), torch.stack([torch.cat(src), torch.cat(dst)]),
                    node_type, node_layer, node_pos, node_act, torch.cat(etype), torch.cat(elayer), arch.to_json())


def _features(ws: WeightSpace, topo: Topology, edge_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Node features [B, N, 5] and edge features [B, E, D] for a batched WeightSpace."""
    if isinstance(topo, DagTopology):
        return _dag_features(ws, topo, edge_dim)
    B = ws.batch_size
    arch = ws.arch
    dtype = ws.dtype
    x = torch.tensor(NODE_DEFAULTS, dtype=dtype).repeat(B, topo.num_nodes, 1)
    edges = []
    for li, l in enumerate(arch.weight_layers):
        off = topo.group_offsets[li + 1]
        b = ws.params.get(f"{l.name}.bias")
        if b is not None:
            x[:, off:off + l.out_features, 0] = b
        w = ws.params[f"{l.name}.weight"].reshape(B, l.out_features * l.in_features, -1)
        k = w.shape[-1]
        if k > edge_dim:
            raise ShapeMismatchError(f"layer {l.name!r} has a {k}-entry kernel, more than edge_dim={edge_dim}")
        edges.append(torch.nn.functional.pad(w, (0, edge_dim - k)) if k < edge_dim else w)
    for l, g in zip(arch.layers, arch.layer_group):
        if l.is_norm:
            off = topo.group_offsets[g]
            for key, col in _NORM_KEYS.items():
                t = ws.params.get(f"{l.name}.{key}")
                if t is not None:
                    x[:, off:off + l.out_features, col] = t
    return x, torch.cat(edges, dim=1)


def to_graph(ws: WeightSpace, *, edge_dim: int | None = None) -> Data:
    """The neural graph of one network (see module docstring). ``edge_dim`` defaults to the largest kernel."""
    if ws.batch_size is not None:
        raise TypeError("to_graph() takes one network; use to_batch() for a batch")
    topo = topology(ws.arch)
    D = edge_dim or ws.arch.max_kernel_numel
    x, e = _features(ws.batched(), topo, D)
    from torch_geometric.data import Data  # imported on use: torch_geometric costs ~1.5 s to import
    return Data(x=x[0], edge_index=topo.edge_index, edge_attr=e[0], node_type=topo.node_type,
                node_layer=topo.node_layer, node_pos=topo.node_pos, node_act=topo.node_act,
                edge_type=topo.edge_type, edge_layer=topo.edge_layer, arch=topo.arch_json, num_nodes=topo.num_nodes)


_NODE_ATTRS = ("node_type", "node_layer", "node_pos", "node_act")
_EDGE_ATTRS = ("edge_type", "edge_layer")


def to_batch(networks: WeightSpace | Iterable[WeightSpace], *, edge_dim: int | None = None) -> Batch:
    """Neural graphs of many networks as one ``torch_geometric`` ``Batch``.

    ``networks`` is a batched WeightSpace (the fast path: topology once, features in bulk, no Python
    loop over networks, edges or neurons) or any iterable of WeightSpaces, possibly of different
    architectures; graphs keep the input order. ``batch.to_data_list()``/``batch[i]`` work as usual.
    """
    if isinstance(networks, WeightSpace):
        groups = [networks.batched()]
        order = None
    else:
        nets = list(networks)
        if not nets:
            raise ValueError("to_batch() needs at least one network")
        by_arch: dict[Architecture, list[int]] = {}
        for i, n in enumerate(nets):
            by_arch.setdefault(n.arch, []).append(i)
        from .weights import stack
        groups, order = [], []
        for arch, idx in by_arch.items():
            singles = [nets[i] if nets[i].batch_size is None else None for i in idx]
            if any(s is None for s in singles):
                raise TypeError("to_batch() takes a batched WeightSpace or a list of single networks")
            groups.append(stack(singles))
            order += idx
    D = edge_dim or max(g.arch.max_kernel_numel for g in groups)
    parts = [_group_parts(g, D) for g in groups]
    return _assemble(parts, order)


def _group_parts(ws: WeightSpace, D: int) -> dict:
    topo = topology(ws.arch)
    x, e = _features(ws, topo, D)
    return {"topo": topo, "B": ws.batch_size, "x": x, "edge_attr": e}


def _cat(ts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    return ts[0] if len(ts) == 1 else torch.cat(ts, dim)


def _assemble(parts: list[dict], order: list[int] | None) -> Batch:
    """Concatenate per-architecture parts into a Batch, graphs in the requested order.

    Each big tensor is written once: edge indices of a group are its topology broadcast against the
    node offsets of its graphs (``[2, 1, E] + [1, B, 1]``), features are reshaped views.
    """
    counts_n = _cat([torch.full((p["B"],), p["topo"].num_nodes) for p in parts])
    counts_e = _cat([torch.full((p["B"],), p["topo"].num_edges) for p in parts])
    total = int(counts_n.numel())
    reorder = order is not None and order != sorted(order)
    if reorder:
        pos_inv = torch.tensor(order)                    # concatenation index -> output position
        pos = torch.empty(total, dtype=torch.long)
        pos[pos_inv] = torch.arange(total)               # pos[out] = index in concatenation order
    node_ptr = torch.zeros(total + 1, dtype=torch.long)
    node_ptr[1:] = (counts_n[pos] if reorder else counts_n).cumsum(0)
    edge_ptr = torch.zeros(total + 1, dtype=torch.long)
    edge_ptr[1:] = (counts_e[pos] if reorder else counts_e).cumsum(0)

    if not reorder:
        x = _cat([p["x"].reshape(-1, p["x"].shape[-1]) for p in parts])
        ea = _cat([p["edge_attr"].reshape(-1, p["edge_attr"].shape[-1]) for p in parts])
        attrs = {a: _cat([getattr(p["topo"], a).repeat(p["B"]) for p in parts]) for a in _NODE_ATTRS + _EDGE_ATTRS}
        archs = [p["topo"].arch_json for p in parts for _ in range(p["B"])]
        # global edge indices directly: topology + node offset of each graph, one write per group
        eis, base = [], 0
        for p in parts:
            t = p["topo"]
            offs = base + torch.arange(p["B"]) * t.num_nodes
            eis.append((t.edge_index.unsqueeze(1) + offs.view(1, -1, 1)).reshape(2, -1))
            base += p["B"] * t.num_nodes
        ei = _cat(eis, 1)
    else:
        # each group's blocks are written once, straight to their output places (graph k of the output
        # is input graph order[k]); no concatenate-then-gather copy of the large edge tensors
        N, E = int(node_ptr[-1]), int(edge_ptr[-1])
        x = parts[0]["x"].new_empty(N, parts[0]["x"].shape[-1])
        ea = parts[0]["edge_attr"].new_empty(E, parts[0]["edge_attr"].shape[-1])
        ei = torch.empty(2, E, dtype=torch.long)
        attrs = {a: torch.empty(N if a in _NODE_ATTRS else E, dtype=getattr(parts[0]["topo"], a).dtype)
                 for a in _NODE_ATTRS + _EDGE_ATTRS}
        archs = [None] * total
        start = 0
        for p in parts:
            t, B = p["topo"], p["B"]
            k = pos_inv[start:start + B]   # output positions of this group's graphs
            start += B
            nd = (node_ptr[k].unsqueeze(1) + torch.arange(t.num_nodes)).reshape(-1)
            ed = (edge_ptr[k].unsqueeze(1) + torch.arange(t.num_edges)).reshape(-1)
            x[nd] = p["x"].reshape(-1, x.shape[1])
            ea[ed] = p["edge_attr"].reshape(-1, ea.shape[1])
            ei[:, ed] = (t.edge_index.unsqueeze(1) + node_ptr[k].view(1, -1, 1)).reshape(2, -1)
            for a in _NODE_ATTRS:
                attrs[a][nd] = getattr(t, a).repeat(B)
            for a in _EDGE_ATTRS:
                attrs[a][ed] = getattr(t, a).repeat(B)
            for j in k.tolist():
                archs[j] = t.arch_json
        counts_n, counts_e = counts_n[pos], counts_e[pos]
    from torch_geometric.data import Batch, Data
    batch = Batch(_base_cls=Data)
    batch.x, batch.edge_index, batch.edge_attr = x, ei, ea
    for a, t in attrs.items():
        batch[a] = t
    batch.arch = archs
    batch.batch = torch.repeat_interleave(torch.arange(total), counts_n)
    batch.ptr = node_ptr
    batch._num_graphs = total
    zeros = torch.zeros(total, dtype=torch.long)
    batch._slice_dict = {"x": node_ptr, "edge_index": edge_ptr, "edge_attr": edge_ptr, "arch": torch.arange(total + 1),
                         **{a: node_ptr for a in _NODE_ATTRS}, **{a: edge_ptr for a in _EDGE_ATTRS}}
    batch._inc_dict = {"x": zeros, "edge_index": node_ptr[:-1], "edge_attr": zeros, "arch": None,
                       **{a: zeros for a in _NODE_ATTRS}, **{a: zeros for a in _EDGE_ATTRS}}
    return batch


def from_graph(data: Data) -> WeightSpace:
    """Rebuild the network of a neural graph made by :func:`to_graph` (exact inverse).

    Works from ``edge_index`` and node attributes, not from node order, so a graph whose nodes were
    relabeled yields the correspondingly permuted network (same function).
    """
    arch_json = data.arch[0] if isinstance(data.arch, (list, tuple)) else data.arch
    arch = Architecture.from_json(arch_json)
    topo = topology(arch)
    if data.num_nodes != topo.num_nodes or data.edge_index.shape[1] != topo.num_edges:
        raise ShapeMismatchError(f"graph has {data.num_nodes} nodes / {data.edge_index.shape[1]} edges, "
                                 f"architecture {arch.describe()} needs {topo.num_nodes} / {topo.num_edges}")
    # local index of each node inside its group: position for fixed groups, rank by node id for hidden ones
    layer = data.node_layer
    local = data.node_pos.clone()
    hidden = local < 0
    if hidden.any():
        ids = torch.arange(data.num_nodes)
        key = layer * data.num_nodes + ids
        order = key.argsort()
        sorted_layer = layer[order]
        first = torch.zeros(int(layer.max()) + 1, dtype=torch.long).scatter_reduce(
            0, sorted_layer, torch.arange(data.num_nodes), reduce="amin", include_self=False)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(data.num_nodes) - first[sorted_layer]
        local[hidden] = rank[hidden]
    if isinstance(topo, DagTopology):
        return _dag_from_graph(data, arch, topo, local)
    params: dict[str, torch.Tensor] = {}
    src, dst = data.edge_index
    x = data.x
    for li, l in enumerate(arch.weight_layers):
        m = data.edge_layer == li
        k = l.kernel_numel
        w = x.new_zeros(l.out_features, l.in_features, k)
        w[local[dst[m]], local[src[m]]] = data.edge_attr[m, :k]
        params[f"{l.name}.weight"] = w.reshape(l.out_features, l.in_features, *l.kernel_size)
        if l.bias:
            nodes = (layer == li + 1).nonzero().squeeze(1)
            b = x.new_zeros(l.out_features)
            b[local[nodes]] = x[nodes, 0]
            params[f"{l.name}.bias"] = b
    for l, g in zip(arch.layers, arch.layer_group):
        if l.is_norm:
            nodes = (layer == g).nonzero().squeeze(1)
            for key in l.param_shapes():
                t = x.new_zeros(l.out_features)
                t[local[nodes]] = x[nodes, _NORM_KEYS[key]]
                params[f"{l.name}.{key}"] = t
    return WeightSpace(arch, params)


def graph_summary(ws: WeightSpace) -> dict:
    """Counts a user wants to see for a checkpoint (used by ``wsnets graph``)."""
    topo = topology(ws.arch)
    return {"architecture": ws.arch.describe(), "layers": [repr(l) for l in ws.arch.layers],
            "groups": list(ws.arch.group_sizes), "nodes": topo.num_nodes, "edges": topo.num_edges,
            "edge_dim": ws.arch.max_kernel_numel, "parameters": ws.num_params}


# -- DAG architectures ------------------------------------------------------------------------------
@dataclass(frozen=True)
class DagTopology:
    """The neural graph structure of a DAG architecture (same attributes as :class:`Topology`, plus what
    :func:`_dag_features` and :func:`from_graph` need: edge blocks and node-feature sources)."""

    arch: Architecture
    num_nodes: int
    num_edges: int
    edge_index: torch.Tensor
    node_type: torch.Tensor
    node_layer: torch.Tensor
    node_pos: torch.Tensor
    node_act: torch.Tensor
    edge_type: torch.Tensor
    edge_layer: torch.Tensor
    arch_json: str
    set_sizes: tuple[int, ...]
    blocks: tuple   # (key or None, value, transpose, dst sets, src sets, n_edges, kernel shape)
    feats: tuple    # (key, column, sets)


class _DagGraph:
    """Builds a :class:`DagTopology` (see :func:`to_graph`'s notes on DAGs)."""

    def __init__(self, arch: Architecture) -> None:
        from .symmetry import permutation_spec
        self.arch, self.spec = arch, permutation_spec(arch)
        self.set_sizes: list[int] = []
        self.set_type: list[int] = []
        self.set_act: list[int] = []
        self.set_norm: list[bool] = []
        self.set_offset: list[int] = [0]
        self.blocks: list = []
        self.feats: list = []
        self.src: list[torch.Tensor] = []
        self.dst: list[torch.Tensor] = []
        self.etype: list[int] = []

    def new_set(self, n: int, type_: int = 1) -> int:
        self.set_sizes.append(int(n))
        self.set_type.append(type_)
        self.set_act.append(0)
        self.set_norm.append(False)
        self.set_offset.append(self.set_offset[-1] + int(n))
        return len(self.set_sizes) - 1

    def nodes(self, sets: list[int]) -> torch.Tensor:
        return torch.cat([torch.arange(self.set_offset[s], self.set_offset[s + 1]) for s in sets])

    def block(self, etype: int, dst: list[int], src: list[int], key: str | None = None, value: float = 1.0,
              dense: bool = True, transpose: bool = False, kernel: tuple[int, ...] = ()) -> None:
        """Edges from the nodes of ``src`` sets to those of ``dst`` sets: all pairs (a weight matrix,
        row-major over ``[dst, src]``, or ``[src, dst]`` if ``transpose``) or one-to-one (identity)."""
        d, s = self.nodes(dst), self.nodes(src)
        if dense:
            if transpose:
                ss, dd = s.repeat_interleave(len(d)), d.repeat(len(s))
            else:
                dd, ss = d.repeat_interleave(len(s)), s.repeat(len(d))
        else:
            dd, ss = d, s
        self.src.append(ss)
        self.dst.append(dd)
        self.etype.append(torch.full((len(dd),), etype))
        self.blocks.append((key, value, transpose, tuple(dst), tuple(src), len(dd), kernel))

    def identity(self, sets: list[int], etype: int = 4, value: float = 1.0) -> int:
        n = sum(self.set_sizes[s] for s in sets)
        out = self.new_set(n)
        self.block(etype, [out], sets, value=value, dense=False)
        return out

    def build(self) -> DagTopology:
        arch, spec = self.arch, self.spec
        n = len(arch.layers)
        sets: list[list[int] | None] = [None] * n
        ids_input = spec.layer_groups and any(
            l.kind == "embedding" and not l.mode and -1 in ins for l, ins in zip(arch.layers, arch.inputs))
        in_sets: list[int] = []
        owned: list[bool] = [False] * n   # the layer made its node set and may decorate it

        def of(j: int) -> list[int]:
            if j >= 0:
                return sets[j]
            if not in_sets:
                size = spec.group_sizes[0]
                in_sets.append(self.new_set(size, 0))
            return in_sets

        for i, (l, ins) in enumerate(zip(arch.layers, arch.inputs)):
            k = l.kind
            x = of(ins[0]) if ins and not (k == "embedding" and not l.mode) else None
            single = ins and ins[0] >= 0 and len(arch.consumers[ins[0]]) == 1 and owned[ins[0]]
            if k in ("linear", "conv1d", "conv2d"):
                out = self.new_set(l.out_features)
                self.block(EDGE_TYPES[k], [out], x, l.key("weight"), kernel=l.kernel_size)
                if l.bias:
                    self.feats.append((l.key("bias"), 0, (out,)))
                sets[i], owned[i] = [out], True
            elif k == "embedding" or k == "param":
                a = param_axis(l.shape) if k == "param" else 1   # a param's axes after ``a`` are all 1
                rows = l.in_features if k == "embedding" else max(1, math.prod(l.shape[:a]))
                width = l.out_features if k == "embedding" else (l.shape[a] if l.shape else 1)
                src = self.new_set(rows, 0)
                out = self.new_set(width)
                self.block(3, [out], [src], l.key("weight" if k == "embedding" else ""), transpose=True)
                sets[i], owned[i] = [out], True
            elif k == "mha":
                D = l.out_features
                q, kk, v = self.new_set(D), self.new_set(D), self.new_set(D)
                self.block(0, [q, kk, v], x, l.key("in_proj_weight"))
                if l.bias:
                    self.feats.append((l.key("in_proj_bias"), 0, (q, kk, v)))
                self._attention_edges([q], [kk], [v], l.heads)
                out = self.new_set(D)
                self.block(0, [out], [v], l.key("out_proj.weight"))
                if l.bias:
                    self.feats.append((l.key("out_proj.bias"), 0, (out,)))
                sets[i], owned[i] = [out], True
            elif k == "attention":
                self._attention_edges(of(ins[0]), of(ins[1]), of(ins[2]), l.heads)
                sets[i] = of(ins[2])
            elif k in ("batchnorm", "layernorm", "rmsnorm", "groupnorm"):
                s = x if single and len(x) == 1 and not self.set_norm[x[0]] and not self.set_act[x[0]] \
                    else [self.identity(x)]
                for suffix in l.param_shapes():
                    self.feats.append((l.key(suffix), _NORM_KEYS[suffix], (s[0],)))
                self.set_norm[s[0]] = True
                sets[i], owned[i] = s, True
            elif k == "act":
                s = x if single and len(x) == 1 and not self.set_act[x[0]] else [self.identity(x)]
                self.set_act[s[0]] = ACTIVATIONS.index(l.fn)
                sets[i], owned[i] = s, True
            elif k in ("add", "mul"):
                out = self.new_set(spec.group_sizes[spec.layer_groups[i]])
                for j in ins:   # one-to-one; an operand of one neuron is broadcast to all
                    self.block(4 if k == "add" else 7, [out], of(j),
                               dense=sum(self.set_sizes[s] for s in of(j)) == 1 < self.set_sizes[out])
                sets[i], owned[i] = [out], True
            elif k == "scale":
                sets[i], owned[i] = [self.identity(x, 8, l.value)], True
            elif k == "concat":
                if spec.layer_groups[i] is not None and dict(spec.blocks).get(spec.layer_groups[i]):
                    parts: list[int] = []
                    for j in ins:   # a tensor concatenated twice: its second copy is an identity copy
                        parts += [self.identity([s]) if s in parts else s for s in of(j)]
                    sets[i] = parts
                else:
                    out = self.new_set(spec.group_sizes[spec.layer_groups[i]])
                    for j in ins:
                        self.block(4, [out], of(j), dense=False)
                    sets[i], owned[i] = [out], True
            elif k == "flatten" and x is not None and ins[0] == -1 and spec.layer_groups[i] != spec.layer_groups[0]:
                in_sets.clear()
                sets[i] = [self.new_set(spec.group_sizes[spec.layer_groups[i]], 0)]
            else:  # dropout, pooling, gap, flatten, tokens, mean, select: the same neurons
                sets[i] = x
        out_sets = sets[-1]
        for s in out_sets:
            self.set_type[s] = 2
        return self._topology()

    def _attention_edges(self, q: list[int], k: list[int], v: list[int], heads: int) -> None:
        """q(h, i) -> k(h, i) (the dot product pairs them) and k(h, i) -> v(h, j) (head h's keys weigh its
        values): edge types 5 and 6, weight 1."""
        qn, kn, vn = self.nodes(q), self.nodes(k), self.nodes(v)
        self.src.append(qn)
        self.dst.append(kn)
        self.etype.append(torch.full((len(qn),), 5))
        self.blocks.append((None, 1.0, False, tuple(k), tuple(q), len(qn), ()))
        dk, dv = len(kn) // heads, len(vn) // heads
        h = torch.arange(heads)
        ks = (h.view(-1, 1, 1) * dk + torch.arange(dk).view(1, -1, 1)).expand(heads, dk, dv).reshape(-1)
        vs = (h.view(-1, 1, 1) * dv + torch.arange(dv).view(1, 1, -1)).expand(heads, dk, dv).reshape(-1)
        self.src.append(kn[ks])
        self.dst.append(vn[vs])
        self.etype.append(torch.full((len(ks),), 6))
        self.blocks.append((None, 1.0, False, tuple(v), tuple(k), len(ks), ()))

    def _topology(self) -> DagTopology:
        N = self.set_offset[-1]
        sizes = torch.tensor(self.set_sizes)
        node_layer = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
        node_type = torch.repeat_interleave(torch.tensor(self.set_type), sizes)
        local = torch.arange(N) - torch.tensor(self.set_offset[:-1]).repeat_interleave(sizes)
        node_pos = torch.where(node_type == 1, torch.full_like(local, -1), local)
        node_act = torch.repeat_interleave(torch.tensor(self.set_act), sizes)
        counts = torch.tensor([b[5] for b in self.blocks])
        edge_layer = torch.repeat_interleave(torch.arange(len(self.blocks)), counts)
        ei = torch.stack([torch.cat(self.src), torch.cat(self.dst)])
        return DagTopology(self.arch, N, ei.shape[1], ei, node_type, node_layer, node_pos, node_act,
                           torch.cat(self.etype), edge_layer, self.arch.to_json(), tuple(self.set_sizes),
                           tuple(self.blocks), tuple(self.feats))


def _dag_features(ws: WeightSpace, topo: DagTopology, edge_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Node features [B, N, 5] and edge features [B, E, D] of a batched WeightSpace of a DAG."""
    B, dtype = ws.batch_size, ws.dtype
    x = torch.tensor(NODE_DEFAULTS, dtype=dtype).repeat(B, topo.num_nodes, 1)
    offs = [0]
    for n in topo.set_sizes:
        offs.append(offs[-1] + n)
    for key, col, sets in topo.feats:
        t = ws.params[key]
        x[:, torch.cat([torch.arange(offs[s], offs[s + 1]) for s in sets]), col] = t
    e = x.new_zeros(B, topo.num_edges, edge_dim)   # written in place: no padded copies, no concatenation
    start = 0
    for key, value, transpose, dst, src, n, kernel in topo.blocks:
        if key is None:
            e[:, start:start + n, 0] = float(value)
        else:
            w = ws.params[key].reshape(B, n, -1)   # tables [V, D] / [*P, D] row-major; weights [out, in, *k]
            k = w.shape[-1]
            if k > edge_dim:
                raise ShapeMismatchError(f"tensor {key!r} has a {k}-entry kernel, more than edge_dim={edge_dim}")
            e[:, start:start + n, :k] = w
        start += n
    return x, e


def _dag_from_graph(data, arch: Architecture, topo: DagTopology, local: torch.Tensor) -> WeightSpace:
    layer = data.node_layer
    src, dst = data.edge_index
    e_parts = [(data.edge_layer == b).nonzero().squeeze(1) for b in range(len(topo.blocks))]
    nodes = [(layer == s).nonzero().squeeze(1) for s in range(len(topo.set_sizes))]
    params = dag_params(arch, 1, data.edge_attr, data.x, layer, local, torch.zeros_like(src), torch.zeros_like(layer),
                        src, dst, e_parts, nodes)
    return WeightSpace(arch, {k: v[0] for k, v in params.items()})


def set_rows(topo, sets: tuple[int, ...], node_set: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """Row of each node in the tensor dimension that spans the node sets ``sets`` (concatenated)."""
    table = torch.full((len(topo.set_sizes),), -1, dtype=torch.long, device=local.device)
    off = 0
    for s in sets:
        table[s] = off
        off += topo.set_sizes[s]
    return table[node_set] + local


def dag_params(arch: Architecture, B: int, ea: torch.Tensor, x: torch.Tensor, layer: torch.Tensor,
                local: torch.Tensor, edge_graph: torch.Tensor, node_graph: torch.Tensor, src: torch.Tensor,
                dst: torch.Tensor, e_parts, nodes: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stacked parameters ``[B, ...]`` of the ``B`` networks of one DAG architecture in a graph batch:
    the inverse of :func:`_dag_to_graph` (``e_parts[b]``: the edges of block ``b``, ``nodes[s]``: the nodes
    of node set ``s``, both restricted to these networks; ``edge_graph`` / ``node_graph``: the network's
    position among the ``B``). :func:`from_graph` is its one-network case; the probe features
    (:func:`wsnets.nn.probes.graph_probe_activations`) run it on a whole batch."""
    topo = topology(arch)
    shapes = arch.param_shapes
    free = {l.key("") for l in arch.layers if l.kind == "param"}
    params: dict[str, torch.Tensor] = {}
    for b, (key, _, transpose, dsets, ssets, _, kernel) in enumerate(topo.blocks):
        if key is None:
            continue
        e = e_parts[b]
        r = set_rows(topo, dsets, layer[dst[e]], local[dst[e]])
        c = set_rows(topo, ssets, layer[src[e]], local[src[e]])
        shape = shapes[key]
        if transpose:
            a = param_axis(shape) if key in free else len(shape) - 1   # tables [V, D]; params [*P, D, 1...]
            w = ea.new_zeros(B, max(1, math.prod(shape[:a])), shape[a] if shape else 1)
            w[edge_graph[e], c, r] = ea[e, 0]
        else:
            k = max(1, math.prod(kernel)) if kernel else 1
            w = ea.new_zeros(B, shape[0], shape[1], k)
            w[edge_graph[e], r, c] = ea[e, :k]
        params[key] = w.reshape(B, *shape)
    for key, col, sets in topo.feats:
        n = torch.cat([nodes[s] for s in sets])
        t = x.new_zeros(B, shapes[key][0])
        t[node_graph[n], set_rows(topo, sets, layer[n], local[n])] = x[n, col]
        params[key] = t
    return params
