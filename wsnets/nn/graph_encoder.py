"""Message passing over neural graphs (Kofinas et al. 2024, "Graph Neural Networks for Learning
Equivariant Representations of Neural Networks"; Lim et al. 2024, "Graph Metanetworks").

Input: a ``torch_geometric`` ``Batch`` from :func:`wsnets.to_batch` (``representation = "graph"``),
which may mix MLPs and CNNs of any widths, depths and kernel sizes. Output: ``[B, out_dim]``.

Features (:class:`GraphFeaturizer`), all functions of what a node/edge *is*, never of its index:

* edges: the weight or kernel, zero-padded to ``edge_dim`` and multiplied by ``sqrt(in-degree)`` of
  the target neuron (so default-initialized weights are O(1) at any width), plus an edge-type
  embedding and a depth encoding of the layer;
* nodes: bias (same scaling), BatchNorm weight/bias/mean and ``log`` variance, node-type and
  activation embeddings, a depth encoding (absolute layer index and fraction of the network's
  depth), and a sinusoidal *position* encoding for input and output neurons only (separate for
  the two), which is what breaks the symmetry the network does not have.

Layers (:class:`EdgePNALayer`): edge update from both endpoints, then messages in both directions
(forward to the target, backward to the source), aggregated PNA-style (Corso et al. 2020: mean and
max; identity and log-degree amplification scalers), pre-LayerNorm residual updates.

Readout (:func:`graph_readout`): mean over input, hidden and output nodes separately, max and
signed-log sum over all nodes, and mean over edges, per graph.

Hidden neurons carry no identity, so the encoder is invariant to hidden-neuron permutations by
construction; every op is batched over the whole batch: gathers, sparse sums and segment reductions
over its edges (no loop over graphs, nodes or edges).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch_geometric.utils import scatter

from ..arch import ACTIVATIONS
from ..graph import EDGE_TYPES
from ..errors import ShapeMismatchError
from .common import make_mlp, sinusoidal, signed_log
from .probes import OutputProbeReadout, ProbeField, graph_probe_activations

PNA_AGGREGATORS = ("mean", "max")


def _edge_type_table(hidden: int) -> nn.Embedding:
    """Embeddings of the edge types: linear, conv1d, conv2d drawn from the global random stream as they
    always were (so seeded encoders initialize as before), the DAG edge types (tables, identity,
    attention, ...) from a fixed separate stream."""
    first = nn.Embedding(3, hidden)
    extra = torch.randn(len(EDGE_TYPES) - 3, hidden, generator=torch.Generator().manual_seed(18))
    return nn.Embedding(len(EDGE_TYPES), hidden, _weight=torch.cat([first.weight.detach(), extra]))


class GraphFeaturizer(nn.Module):
    """Initial node ``[N, hidden]`` and edge ``[E, edge_hidden]`` embeddings of a neural-graph batch."""

    def __init__(self, hidden: int, edge_dim: int = 9, pos_dim: int = 16, layer_scale: bool = False,
                 probes: int = 0, edge_hidden: int | None = None) -> None:
        super().__init__()
        eh = edge_hidden or hidden
        self.hidden, self.edge_dim, self.pos_dim, self.layer_scale = hidden, edge_dim, pos_dim, layer_scale
        self.probes = probes
        extra = 3 if layer_scale else 0     # value / layer RMS and log layer RMS (see layer_rms)
        extra += 2 * probes + 1 if probes else 0   # probe activations / group RMS, signed log, log group RMS
        self.node_in = make_mlp([5 + 2 * pos_dim + pos_dim + 1 + extra, hidden, hidden])
        self.node_type = nn.Embedding(3, hidden)
        self.node_act = nn.Embedding(len(ACTIVATIONS), hidden)
        self.edge_in = make_mlp([edge_dim + 1 + pos_dim + 1 + (edge_dim + 1 if layer_scale else 0), eh, eh])
        self.edge_type = _edge_type_table(eh)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # meta-models saved before DAG edge types existed have a 3-row edge-type table: keep its rows
        key = prefix + "edge_type.weight"
        old = state_dict.get(key)
        if old is not None and old.shape[0] < self.edge_type.num_embeddings:
            state_dict[key] = torch.cat([old, self.edge_type.weight.detach()[old.shape[0]:].to(old)])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, batch, probe_acts: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        nfeats, p, node_batch = self._parts(batch, probe_acts)
        h = self.node_in(nfeats) + self.node_type(batch.node_type) + self.node_act(batch.node_act)
        src, dst = batch.edge_index
        N = nfeats.shape[0]
        aux = {"batch": node_batch, "seg_in": segments(dst, N), "seg_out": segments(src, N)}
        last = self.edge_in[2]      # Linear(GELU(first)) + edge-type embedding, summed in one buffer
        e = gather_linear(self.edge_in[1](self._edge_first_layer(p, aux["seg_in"])), last.weight,
                          self.edge_type.weight, batch.edge_type).add_(last.bias)
        return h, e, aux

    def _edge_first_layer(self, p: dict, seg_in: Segments | None = None) -> torch.Tensor:
        """``edge_in[0]`` applied to :meth:`inputs`' edge features ``[E, F_e]`` without building them: the
        first linear map split by column blocks, the weight block applied to the unpadded kernels (zero
        padding adds nothing), and the blocks of per-neuron columns applied on the nodes and gathered
        once (``[N] -> [E]``). The same numbers as ``edge_in[0](inputs(...)[1])`` (tested)."""
        W, bias = self.edge_in[0].weight, self.edge_in[0].bias
        ed, D = self.edge_dim, p["ea"].shape[1]
        dst, s_dst = p["dst"], p["scale_dst"]
        # per-edge columns (raw kernels times the target's scale, [with layer_scale: / its weight RMS], signed
        # log norm) and their weight blocks: one [E, k] x [k, eh] product, k <= 2 D + 1
        cols, blocks = [p["ea"] * s_dst], [W[:, :D]]
        if self.layer_scale:
            cols.append(p["ea"] * (p["scale"] / p["w_rms"]).index_select(0, dst).unsqueeze(1))
            blocks.append(W[:, ed + self.pos_dim + 2:ed + self.pos_dim + 2 + D])
        cols.append(signed_log(p["wnorm"]))
        blocks.append(W[:, ed:ed + 1])
        node_cols = [p["lay"], p["frac"]] + ([p["log_w_rms"]] if self.layer_scale else [])
        node_w = [W[:, ed + 1:ed + self.pos_dim + 2]] + ([W[:, -1:]] if self.layer_scale else [])
        at_node = torch.nn.functional.linear(torch.cat(node_cols, 1), torch.cat(node_w, 1), bias)   # [N, eh]
        return gather_linear(torch.cat(cols, 1), torch.cat(blocks, 1), at_node, dst if seg_in is None else seg_in)

    def inputs(self, batch, probe_acts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw node ``[N, F_n]`` and edge ``[E, F_e]`` features before the input MLPs, and the batch vector.

        Edges: the weight or kernel zero-padded to ``edge_dim`` and multiplied by ``sqrt(in-degree)`` of
        its target, the signed log of its norm, the depth code and fraction of its target's layer. With
        ``layer_scale`` the last node columns are bias / bias RMS, log bias RMS, log incoming-weight
        RMS, and the last edge columns weight / weight RMS (``edge_dim``) and log weight RMS. With probes,
        ``probe_acts`` ``[N, P]`` (:func:`wsnets.nn.probes.graph_probe_activations`) adds each neuron's
        activations divided by their RMS over its group (per network), their signed log, and the log RMS.
        (:meth:`forward` computes the first edge layer from the parts, without building ``[E, F_e]``.)
        """
        nfeats, p, node_batch = self._parts(batch, probe_acts)
        dst = p["dst"]
        w = torch.nn.functional.pad(p["ea"], (0, self.edge_dim - p["ea"].shape[1])) * p["scale"][dst].unsqueeze(1)
        efeats = [w, signed_log(p["wnorm"]), p["lay"][dst], p["frac"][dst]]
        if self.layer_scale:
            efeats += [w / p["w_rms"][dst].unsqueeze(1), p["log_w_rms"][dst]]
        return nfeats, torch.cat(efeats, dim=1), node_batch

    def _parts(self, batch, probe_acts: torch.Tensor | None) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """Node features ``[N, F_n]``, the pieces of the edge features (per edge: raw kernels ``ea``, the
        scaled norm ``wnorm``; per node: ``scale``, ``lay``, ``frac``, ``w_rms``) and the batch vector."""
        x, ea, (src, dst) = batch.x, batch.edge_attr, batch.edge_index
        dev, dt = x.device, x.dtype
        N, E, D = x.shape[0], ea.shape[0], ea.shape[1]
        if D > self.edge_dim:
            raise ShapeMismatchError(f"graph batch has {D}-entry edge features (kernels of {D} taps) but the "
                                     f"encoder was built with edge_dim={self.edge_dim}")
        node_batch = batch.batch if getattr(batch, "batch", None) is not None else x.new_zeros(N, dtype=torch.long)
        deg_in = torch.bincount(dst, minlength=N).to(dt)
        scale = deg_in.clamp(min=1).sqrt()
        # depth: absolute group index and fraction of this graph's number of groups
        layer = batch.node_layer
        depth = scatter(layer, node_batch, 0, reduce="max")[node_batch].clamp(min=1)
        frac = (layer.to(dt) / depth.to(dt)).unsqueeze(1)
        lay = sinusoidal(layer.to(dt), self.pos_dim, max_period=64.0).to(dt)
        pos = batch.node_pos
        code = sinusoidal(pos.clamp(min=0).to(dt), self.pos_dim, max_period=1000.0).to(dt)
        is_in = (batch.node_type == 0).to(dt).unsqueeze(1)
        is_out = (batch.node_type == 2).to(dt).unsqueeze(1)
        bias = x[:, :1] * scale.unsqueeze(1)
        scale_dst = scale.index_select(0, dst).unsqueeze(1)
        wnorm = ea.norm(dim=1, keepdim=True) * scale_dst
        nfeats = [bias, x[:, 1:4], x[:, 4:5].clamp(min=1e-8).log(), code * is_in, code * is_out, lay, frac]
        p = {"ea": ea, "dst": dst, "scale": scale, "scale_dst": scale_dst, "wnorm": wnorm, "lay": lay, "frac": frac}
        if self.layer_scale:
            # per network and neuron layer: RMS of the incoming weights and of the biases, so the MLPs see
            # each value relative to its layer (scale-free shape) and the layer's scale on a log axis
            n_layers = int(layer.max()) + 1 if N else 1
            group = node_batch * n_layers + layer
            G = (int(node_batch.max()) + 1 if N else 1) * n_layers
            w_rms = layer_rms(wnorm.squeeze(1) ** 2, group[dst], G)[group]      # [N]
            b_rms = layer_rms(bias.squeeze(1) ** 2, group, G)[group]
            nfeats += [bias / b_rms.unsqueeze(1), b_rms.log().unsqueeze(1), w_rms.log().unsqueeze(1)]
            p |= {"w_rms": w_rms, "log_w_rms": w_rms.log().unsqueeze(1)}
        if self.probes:
            if probe_acts is None or probe_acts.shape != (N, self.probes):
                raise ShapeMismatchError(f"the featurizer takes {self.probes} probe activations per node, got "
                                         f"{None if probe_acts is None else tuple(probe_acts.shape)}")
            n_layers = int(layer.max()) + 1 if N else 1
            group = node_batch * n_layers + layer
            G = (int(node_batch.max()) + 1 if N else 1) * n_layers
            a = probe_acts.to(dt)
            rms = layer_rms(a.square().mean(1), group, G)[group].unsqueeze(1)
            nfeats += [a / rms, signed_log(a), rms.log()]
        return torch.cat(nfeats, dim=1), p, node_batch


def layer_rms(sq: torch.Tensor, group: torch.Tensor, n_groups: int, eps: float = 1e-3) -> torch.Tensor:
    """``sqrt(mean(sq) + eps²)`` over the entries of each group ``[n_groups]`` (``group``: index of each
    entry of ``sq``); empty groups give ``eps``."""
    return scatter(sq, group, 0, dim_size=n_groups, reduce="mean").add(eps * eps).sqrt()


class Segments:
    """The edges grouped by one endpoint (``index [E]`` into ``n`` nodes), built once per batch and shared by
    every layer: an ordering that sorts ``index`` and its inverse (``order``; None when ``index`` is sorted
    already, as targets of :func:`wsnets.to_batch` are), the number of edges per node (``lengths [n]``),
    and, for sums, an ``[n, E]`` 0/1 CSR matrix: one sparse-dense product sums ``[E, H]`` rows by node
    several times faster than ``index_add`` on a CPU (a scatter), sorted or not."""

    def __init__(self, index: torch.Tensor, n: int) -> None:
        self.index, self.n, self.order = index, n, None
        if index.numel() > 1 and not bool((index[1:] >= index[:-1]).all()):
            # 32-bit keys sort ~2x faster; the inverse of a permutation is a scatter, not a second sort
            perm = (index.int() if n < 2**31 else index).argsort(stable=True)
            inverse = torch.empty_like(perm).index_copy_(0, perm, torch.arange(len(perm), device=perm.device))
            self.order = (perm, inverse)
        self.lengths = torch.bincount(index, minlength=n)
        self._csr: dict = {}

    def __iter__(self):      # ``order, lengths = seg``
        return iter((self.order, self.lengths))

    def csr(self, dtype: torch.dtype) -> torch.Tensor:
        """The ``[n, E]`` matrix with a 1 at (``index[e]``, ``e``), in ``dtype``."""
        if dtype not in self._csr:
            E, dev = len(self.index), self.index.device
            crow = torch.cat([self.lengths.new_zeros(1), self.lengths.cumsum(0)])
            col = torch.arange(E, device=dev) if self.order is None else self.order[0].long()
            with warnings.catch_warnings():     # "sparse CSR support is in beta"
                warnings.simplefilter("ignore")
                self._csr[dtype] = torch.sparse_csr_tensor(crow, col, torch.ones(E, dtype=dtype, device=dev),
                                                           (self.n, E), check_invariants=False)
        return self._csr[dtype]

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Rows ``x [E, H]`` summed by ``index`` -> ``[n, H]`` (the backward is a gather)."""
        return _SegmentSum.apply(x, self)

    def sum_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """:meth:`sum` without autograd: the gradient of a gather by ``index``."""
        if grad.dim() != 2 or not len(self.index) or grad.dtype not in (torch.float32, torch.float64):
            return grad.new_zeros((self.n, *grad.shape[1:])).index_add_(0, self.index, grad)
        return self.csr(grad.dtype) @ grad.contiguous()


def segments(index: torch.Tensor, n: int) -> Segments:
    """:class:`Segments` of ``index`` (``order, lengths = segments(index, n)`` unpacks as before)."""
    return Segments(index, n)


class _SegmentSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, seg: Segments) -> torch.Tensor:
        ctx.seg = seg
        return seg.sum_grad(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.index_select(0, ctx.seg.index), None


class _Gather(torch.autograd.Function):
    """``x.index_select(0, index)`` whose backward is one ``index_add_`` (PyTorch's own backward scatters
    through an expanded index, ~5x slower on CPU for edge-sized gradients), or, when ``index`` is a
    permutation with known inverse, a gather by the inverse (no scatter at all)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(index, inverse if inverse is not None else index)
        ctx.n, ctx.perm = x.shape[0], inverse is not None
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        index, inverse = ctx.saved_tensors
        if ctx.perm:
            return grad.index_select(0, inverse), None, None
        return grad.new_zeros((ctx.n, *grad.shape[1:])).index_add_(0, index, grad), None, None


def gather(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``x[index]`` (``inverse``: the inverse permutation when ``index`` permutes the rows of ``x``)."""
    return _Gather.apply(x, index, inverse)


class _GatherLinear(torch.autograd.Function):
    """``a[ia] (+ b[ib]) + x @ weight.T`` written into one buffer: the gathers land in the output, the matrix
    product accumulates into it (``addmm_``), and the backward is one ``index_add`` per gathered operand and
    two matrix products, so no ``[E, H]`` intermediate is allocated and no sum is a separate pass."""

    @staticmethod
    def forward(ctx, x, weight, a, ia, b, ib):
        out = a.index_select(0, _index(ia))
        if b is not None:
            out.add_(b.index_select(0, _index(ib)))
        out.addmm_(x, weight.t())
        ctx.save_for_backward(x, weight)
        ctx.ia, ctx.ib, ctx.shapes = ia, ib, (a.shape, None if b is None else b.shape)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        gx = grad.mm(weight) if need[0] else None
        gw = grad.t().mm(x) if need[1] else None
        ga = _scatter_sum(grad, ctx.ia, ctx.shapes[0]) if need[2] else None
        gb = _scatter_sum(grad, ctx.ib, ctx.shapes[1]) if ctx.shapes[1] is not None and need[4] else None
        return gx, gw, ga, None, gb, None


def _index(i) -> torch.Tensor:
    return i.index if isinstance(i, Segments) else i


def _scatter_sum(grad: torch.Tensor, index, shape) -> torch.Tensor:
    if isinstance(index, Segments):
        return index.sum_grad(grad)
    return grad.new_zeros(shape).index_add_(0, index, grad)


def gather_linear(x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, ia: torch.Tensor | Segments,
                  b: torch.Tensor | None = None, ib: torch.Tensor | Segments | None = None) -> torch.Tensor:
    """``a[ia] + b[ib] + x @ weight.T`` (``b`` optional): per-edge sums of node parts and an edge linear map,
    as autograd through ``index_select``, ``+`` and ``F.linear`` would give them (tested), in one buffer.
    An index given as :class:`Segments` has its gradient summed by a sparse product instead of ``index_add``."""
    return _GatherLinear.apply(x, weight, a, ia, b, ib)


def pna_aggregate(m: torch.Tensor, index: torch.Tensor, seg: tuple, delta: float) -> torch.Tensor:
    """PNA aggregation of messages ``m [E, H]`` by their target ``index`` -> ``[n, 4H]`` (2 aggregators x
    2 scalers).

    ``seg`` comes from :func:`segments` of ``index``. Aggregators: mean and max. Corso et al.'s min and
    standard deviation are left out: messages leave a GELU, which is bounded below, so the min of many
    is nearly constant, and each aggregator costs passes over the edges forward and backward, the
    largest single cost of a layer. The mean is an ``index_add`` (its backward a gather; no sorting
    needed), the max a sorted segment reduction (several times faster than a scatter). Nodes that
    receive nothing get zeros. ``delta`` is the fixed log-degree normalizer of the amplification scaler
    ``log(d + 1) / delta`` (fixed, so a graph's embedding never depends on what else is in the batch).
    """
    order, lengths = seg
    deg = lengths.to(m.dtype).unsqueeze(1)
    mean = seg.sum(m) / deg.clamp(min=1)
    mx = reduce_sorted(m if order is None else gather(m, *order), lengths, "max")
    agg = torch.cat([mean, mx], dim=1)
    return torch.cat([agg, agg * ((deg + 1).log() / delta)], dim=1)


def reduce_sorted(x: torch.Tensor, lengths: torch.Tensor, how: str) -> torch.Tensor:
    """``torch.segment_reduce`` of rows ``x`` sorted by segment (``lengths`` rows each); empty segments give 0.
    Segments of one length (every network of a batch of one architecture) take a reshape instead: a max
    over a dimension, whose backward writes one row per output instead of comparing every row with it."""
    n = len(lengths)
    if how == "max" and n and x.shape[0] == n * int(lengths[0]) and x.shape[0] and bool((lengths == lengths[0]).all()):
        return x.reshape(n, -1, *x.shape[1:]).max(1).values
    out = torch.segment_reduce(x, how, lengths=lengths, unsafe=True)
    return torch.where((lengths > 0).unsqueeze(1), out, torch.zeros((), dtype=out.dtype, device=out.device))


def reduce_by(x: torch.Tensor, index: torch.Tensor | Segments, n: int, how: str) -> torch.Tensor:
    """Rows ``x [E, H]`` reduced by ``index`` (or its :class:`Segments`) into ``[n, H]``: a mean is a sparse
    sum (its backward a gather), a max a sorted segment reduction (a no-copy path when ``index`` is sorted,
    as the graph and edge order of :func:`wsnets.to_batch` is); empty rows give 0."""
    seg = index if isinstance(index, Segments) else segments(index, n)
    if how == "mean":
        return seg.sum(x) / seg.lengths.clamp(min=1).to(x.dtype).unsqueeze(1)
    order, lengths = seg
    return reduce_sorted(x if order is None else gather(x, *order), lengths, how)


class EdgeUpdate(nn.Module):
    """``e_ij + W2 act(A h_i + B h_j + C e_ij)``: an MLP on ``[h_i, h_j, e_ij]`` whose first linear map is
    split so the node parts run on the N nodes and are gathered, not recomputed on the E edges."""

    def __init__(self, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(hidden, hidden, bias=False), nn.Linear(hidden, hidden, bias=False)
        self.c = nn.Linear(hidden, hidden)
        self.out = nn.Sequential(nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, hidden))

    def forward(self, hn: torch.Tensor, en: torch.Tensor, e: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        return e + self.out(self.a(hn).index_select(0, dst) + self.b(hn).index_select(0, src) + self.c(en))


def edge_norm(e: torch.Tensor) -> torch.Tensor:
    """LayerNorm of edge embeddings ``[E, H]`` without weight or bias."""
    return torch.nn.functional.layer_norm(e, e.shape[-1:])


class EdgePNALayer(nn.Module):
    """One bidirectional message-passing layer with edge updates.

    ``e_ij <- e_ij + f_e([h_i, h_j, e_ij])``; forward messages ``act(W_f [h_j, e_ij])`` to target ``i``,
    backward messages ``act(W_b [h_i, e_ij])`` to source ``j``, each PNA-aggregated;
    ``h_i <- h_i + f_h([h_i, agg_f, agg_b])``. Pre-LayerNorm on nodes and edges (one normalization of
    the edges per layer, shared by the messages and the next layer's edge update).

    Edges outnumber nodes 10-50x, so everything is arranged to keep per-edge work small: linear maps
    of concatenations are split into node and edge parts, the node parts of the edge update and of
    both messages are computed on the nodes, and each per-edge sum of gathered node parts and an edge
    linear map is written into one buffer (:func:`gather_linear`), whose backward sums by endpoint with
    a sparse product (:class:`Segments`, built once per batch); edges and messages are ``edge_hidden``
    wide, nodes ``hidden``.
    """

    def __init__(self, hidden: int, dropout: float = 0.0, delta: float = 3.0, edge_hidden: int | None = None) -> None:
        super().__init__()
        eh = edge_hidden or hidden
        self.hidden, self.edge_hidden, self.delta = hidden, eh, delta
        self.norm_h = nn.LayerNorm(hidden)
        # node parts, [target side | source side]: target = (edge update, backward message), source = (edge,
        # forward message); they carry the biases of the sums they enter (a bias's gradient is then a sum
        # over nodes, not over edges)
        self.node_dst = nn.Linear(hidden, 2 * eh)
        self.node_src = nn.Linear(hidden, 2 * eh)
        self.edge_in = nn.Linear(eh, eh, bias=False)
        self.edge_out = nn.Linear(eh, eh)
        self.msg_f, self.msg_b = nn.Linear(eh, eh, bias=False), nn.Linear(eh, eh, bias=False)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        k = 2 * len(PNA_AGGREGATORS) * eh
        self.post_f, self.post_b = nn.Linear(k, hidden), nn.Linear(k, hidden)
        self.f_h = make_mlp([3 * hidden, 2 * hidden, hidden], dropout=dropout)

    def forward(self, h: torch.Tensor, e: torch.Tensor, en: torch.Tensor, edge_index: torch.Tensor, aux: dict
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(h, e, en) -> (h, e, en)``; ``en`` is ``e`` layer-normalized without an affine map (see
        :func:`edge_norm`), computed once per update and shared with the next layer: every map that
        reads it is linear, so it absorbs the affine part a separate LayerNorm would have."""
        src, dst = edge_index
        eh = self.edge_hidden
        hn = self.norm_h(h)
        d_edge, d_msg = self.node_dst(hn).split(eh, dim=1)        # [N, eh] each, gathered by gather_linear
        s_edge, s_msg = self.node_src(hn).split(eh, dim=1)
        seg_in, seg_out = aux["seg_in"], aux["seg_out"]            # Segments of dst and src
        pre = gather_linear(en, self.edge_in.weight, d_edge, seg_in, s_edge, seg_out)
        e = torch.addmm(e, self.dropout(self.act(pre)), self.edge_out.weight.t()).add_(self.edge_out.bias)
        en = edge_norm(e)
        m_f = self.act(gather_linear(en, self.msg_f.weight, s_msg, seg_out))   # to the target, from the source's side
        m_b = self.act(gather_linear(en, self.msg_b.weight, d_msg, seg_in))    # to the source, from the target's side
        agg_f = self.post_f(pna_aggregate(m_f, dst, seg_in, self.delta))
        agg_b = self.post_b(pna_aggregate(m_b, src, seg_out, self.delta))
        h = h + self.f_h(torch.cat([hn, agg_f, agg_b], dim=1))
        return h, e, en

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, edge_hidden={self.edge_hidden}, aggregators={PNA_AGGREGATORS}, delta={self.delta}"


def graph_readout(h: torch.Tensor, e: torch.Tensor, batch, aux: dict, edge_groups: bool = False) -> torch.Tensor:
    """Invariant per-graph readout ``[B, 5H + 2H_e]`` (``H_e`` the edge width): mean over input / hidden /
    output nodes, max and signed-log sum over all nodes, mean and max over edges; with ``edge_groups``
    also the mean over first-layer, middle and last-layer edges (``[B, 5H + 5H_e]``; a group a network
    lacks gives zeros)."""
    nb = aux["batch"]
    B = int(batch.num_graphs) if hasattr(batch, "num_graphs") else int(nb.max()) + 1
    H = h.shape[1]
    by_type = scatter(h, nb * 3 + batch.node_type, 0, dim_size=3 * B, reduce="mean").reshape(B, 3 * H)
    mx = scatter(h, nb, 0, dim_size=B, reduce="max")
    sm = signed_log(scatter(h, nb, 0, dim_size=B, reduce="sum"))
    src, dst = batch.edge_index
    eb = nb.index_select(0, src)
    seg = segments(eb, B)
    emean, emax = reduce_by(e, seg, B, "mean"), reduce_by(e, seg, B, "max")   # edges outnumber nodes: sorted
    parts = [by_type, mx, sm, emean, emax]                                  # segments, not scatters
    if edge_groups:
        nt = batch.node_type
        pos = torch.where(nt[src] == 0, 0, torch.where(nt[dst] == 2, 2, 1))
        parts.append(reduce_by(e, eb * 3 + pos, 3 * B, "mean").reshape(B, 3 * e.shape[1]))
    return torch.cat(parts, dim=1)


def readout_dim(hidden: int, edge_groups: bool, edge_hidden: int | None = None) -> int:
    """Width of :func:`graph_readout`'s output."""
    return 5 * hidden + (5 if edge_groups else 2) * (edge_hidden or hidden)


class ProbeReadoutMixin:
    """The probe path and readout standardization of the graph encoders (:class:`NeuralGraphEncoder`,
    :class:`~wsnets.nn.transformer.NeuralGraphTransformer`): ``probes`` learned inputs whose per-neuron
    activations go to the featurizer (only the logits unless ``probe_hidden``) and whose output summary
    joins the readout, then an optional ``BatchNorm1d`` over the readout (``readout_norm``)."""

    def _init_probes(self, width: int, hidden: int, pos_dim: int, probes: int, probe_learn: bool,
                     probe_hidden: bool) -> int:
        """Create the probe modules; returns the readout width the head takes (see :meth:`_init_readout_norm`)."""
        self.probe_field = ProbeField(probes, learn=probe_learn) if probes else None
        self.probe_readout = OutputProbeReadout(probes, 4 * hidden, pos_dim) if probes else None
        self.probe_hidden = probe_hidden
        return width + (self.probe_readout.out_dim if probes else 0)

    def _init_readout_norm(self, width: int, readout_norm: bool) -> None:
        """The readout standardization. Each encoder creates it where it always has (the PNA encoder after its
        head), since the order modules are registered in is the order of ``parameters()``: the optimizer's and
        gradient clipping's sums over them, and so the trained numbers, depend on it."""
        self.readout_norm = nn.BatchNorm1d(width) if readout_norm else nn.Identity()

    def probe_inputs(self, batch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Per-neuron probe activations ``[N, P]`` (zero off the output neurons unless ``probe_hidden``)
        and the per-graph output summary, or ``(None, None)`` without probes."""
        if self.probe_field is None:
            return None, None
        acts, summary = graph_probe_activations(batch, self.probe_field)
        if not self.probe_hidden:
            acts = acts * (batch.node_type == 2).unsqueeze(1)
        return acts, summary

    def finish_readout(self, r: torch.Tensor, acts, summary, batch, aux: dict) -> torch.Tensor:
        """The graph readout ``r`` with the probes' output readout appended, standardized if ``readout_norm``."""
        if summary is not None:
            r = torch.cat([r, self.probe_readout(acts.to(r.dtype), summary.to(r.dtype), batch, aux["batch"])], dim=1)
        bn = self.readout_norm
        if isinstance(bn, nn.BatchNorm1d) and bn.training and r.shape[0] < 2:
            # one network has no batch statistics (e.g. the last batch of an epoch): use the running ones
            return nn.functional.batch_norm(r, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0,
                                            bn.eps)
        return bn(r)


class NeuralGraphEncoder(ProbeReadoutMixin, nn.Module):
    """PNA-style message passing with edge updates over neural graphs -> ``[B, out_dim]``.

    Parameters
    ----------
    hidden : node/edge embedding size.
    layers : number of :class:`EdgePNALayer` (residual).
    out_dim : embedding size.
    edge_dim : largest kernel (taps) the encoder accepts; smaller kernels are zero-padded (9 = 3x3).
    dropout : dropout inside the MLPs.
    layer_scale : also give every weight and bias relative to the RMS of its layer (per network) and
        that RMS on a log axis (see :class:`GraphFeaturizer`).
    edge_readout : add the mean over first-layer / middle / last-layer edges to the readout.
    probes : number of learned probe inputs (0: none). Every network runs on them (a
        :class:`~wsnets.nn.probes.ProbeField`, which makes probes of any input shape); each neuron's
        activations become node features and a summary of each network's outputs (confidence,
        entropy, margin per probe) joins the readout (see :mod:`wsnets.nn.probes`).
    probe_learn : learn the probes (False: fixed random probes).
    probe_hidden : give the probe activations of input and hidden neurons to the featurizer (False: only
        the output neurons' logits, for every architecture). Residual networks and transformers have
        only their logits (:func:`~wsnets.nn.probes.graph_probe_activations`), so a split that trains on
        sequential networks and tests on residual ones needs ``False`` to see the same features on both.
    edge_hidden : width of the edge embeddings and messages (default ``hidden // 2``, at least 4). Edges
        outnumber nodes 10-50x, so this sets most of the cost: half the node width ranked a CNN zoo's test
        accuracy as well as the full width (Kendall τ 0.810 vs 0.804, 1 seed) in 0.75x the time.
    readout_norm : standardize the readout with a ``BatchNorm1d`` before the head. Networks of one
        architecture (a fine-tuning zoo) differ by well under 1% of the readout's norm, which the
        head cannot pick up otherwise; the running statistics are recomputed over the training split
        before every evaluation (:func:`wsnets.train.loop.recalibrate_batchnorm`).

    Defaults are sized for CPU training on zoos (cost grows with ``hidden**2 x edges x layers``);
    on a GPU, ``hidden=64..128`` and ``layers=4`` are affordable.

    Examples
    --------
    >>> import wsnets, torch
    >>> nets = [wsnets.WeightSpace.random(wsnets.mlp(8, [16], 3)), wsnets.WeightSpace.random(wsnets.cnn(1, [4], 3))]
    >>> NeuralGraphEncoder(hidden=16, layers=2, out_dim=8)(wsnets.to_batch(nets)).shape
    torch.Size([2, 8])
    """

    representation = "graph"

    def __init__(self, hidden: int = 32, layers: int = 3, out_dim: int = 64, edge_dim: int = 9,
                 dropout: float = 0.0, pos_dim: int = 16, layer_scale: bool = False, edge_readout: bool = False,
                 readout_norm: bool = False, probes: int = 0, probe_learn: bool = True,
                 edge_hidden: int | None = None, probe_hidden: bool = True) -> None:
        super().__init__()
        eh = edge_hidden or max(4, hidden // 2)
        self.featurizer = GraphFeaturizer(hidden, edge_dim, pos_dim, layer_scale, probes, eh)
        width = self._init_probes(readout_dim(hidden, edge_readout, eh), hidden, pos_dim, probes, probe_learn,
                                  probe_hidden)
        self.layers = nn.ModuleList(EdgePNALayer(hidden, dropout, edge_hidden=eh) for _ in range(layers))
        self.norm_h, self.norm_e = nn.LayerNorm(hidden), nn.LayerNorm(eh)
        self.head = make_mlp([width, 2 * hidden, out_dim], dropout=dropout, norm=True)
        self._init_readout_norm(width, readout_norm)
        self.out_dim, self.hidden, self.edge_readout = out_dim, hidden, edge_readout

    def forward(self, batch) -> torch.Tensor:
        acts, summary = self.probe_inputs(batch)
        h, e, aux = self.featurizer(batch, acts)
        en = edge_norm(e)
        for layer in self.layers:
            h, e, en = layer(h, e, en, batch.edge_index, aux)
        r = graph_readout(self.norm_h(h), torch.addcmul(self.norm_e.bias, en, self.norm_e.weight), batch, aux,
                          self.edge_readout)
        return self.head(self.finish_readout(r, acts, summary, batch, aux))
