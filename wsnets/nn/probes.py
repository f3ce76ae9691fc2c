"""Probe features: run every network on a few learned inputs and read what its neurons do.

Kofinas et al. 2024 ("Graph Neural Networks for Learning Equivariant Representations of Neural
Networks", probe features) and Kahana et al. 2025 (ProbeGen, "Deep Linear Probe Generators for
Weight Space Learning") feed networks learned input probes and use the activations as features.
Weight statistics only see the parameters; probes see the *function*, which is what test accuracy
is a property of (on the zoos of ``benchmarks/metamodel_quality.py``, gradient-boosted trees on the
outputs for 32 random probes rank test accuracy 0.05 (CNN zoo) to 0.06 (MLP zoo) better than on
weight statistics).

* :class:`ProbeField` makes ``P`` probe inputs for *any* input shape: probe ``p`` at input position
  ``(channel, *spatial)`` is the ``p``-th output of a small MLP of fixed sinusoidal codes of that
  position (a coordinate network). Its weights are learned with the meta-model, and it needs no list
  of input shapes, so an encoder with probes still reads any architecture.
* :func:`graph_probe_activations` rebuilds the networks of a neural-graph ``Batch`` (vectorized per
  architecture; no loop over networks, neurons or edges), runs them on the probes with
  :func:`wsnets.functional.forward` and returns every neuron's activation per probe (spatial mean for
  channels), in node order, and a summary of each network's outputs. A neuron's activations move with the neuron, so features built from them
  keep the graph encoder invariant to hidden-neuron permutations. Residual networks and transformers
  (DAG architectures) are rebuilt too and give their logits (output nodes) and the summary.
* :func:`output_summary`: per network and probe, the largest softmax probability, the entropy and
  the top-1 margin (invariant to every neuron permutation).

Activations are differentiable in the probes, so the probes learn what to ask.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch
from torch import nn

from ..arch import Architecture
from ..functional import forward
from ..graph import _NORM_KEYS, dag_params, set_rows, topology
from .common import make_mlp, sinusoidal

MAX_AXES = 4          # channel + up to 3 spatial axes
DEFAULT_SPATIAL = 8   # spatial size assumed for a CNN whose architecture records no input shape


def input_shape(arch: Architecture) -> tuple[int, ...]:
    """The shape of one input of ``arch`` (its recorded ``input_shape``, else ``(in,)`` for an MLP and
    ``(in_channels, 8, ..)`` for a CNN)."""
    if arch.input_shape is not None:
        return tuple(arch.input_shape)
    first = arch.weight_layers[0]
    if first.kind == "linear":
        return (first.in_features,)
    return (first.in_features,) + (DEFAULT_SPATIAL,) * first.dims


class ProbeField(nn.Module):
    """``P`` probe inputs of any shape: ``field(shape) -> [P, *shape]``.

    A probe is fixed standard Gaussian noise (drawn from a generator seeded by the shape, so the same
    shape always gets the same noise, on any device) plus a learned part: at every input position, an
    MLP of the position's code (for each axis, channel then spatial axes, a sinusoidal code of the
    integer index, ``max_period`` 64; ``MAX_AXES`` axes, absent ones zeros) gives the ``P`` probes'
    values there. The MLP's last layer starts at zero, so training starts from white-noise probes
    (which beat smooth random ones: Kendall τ 0.817 vs 0.787 for an MLP on the normalized outputs
    of CNN-zoo networks); ``learn=False`` keeps them.
    """

    def __init__(self, probes: int = 16, hidden: int = 64, code_dim: int = 16, learn: bool = True) -> None:
        super().__init__()
        self.probes, self.code_dim = probes, code_dim
        self.mlp = make_mlp([MAX_AXES * code_dim, hidden, hidden, probes])
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        if not learn:
            self.requires_grad_(False)
        self._codes: dict[tuple[int, ...], torch.Tensor] = {}
        self._noise: dict[tuple[int, ...], torch.Tensor] = {}

    def noise(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The fixed Gaussian part ``[P, *shape]`` (cached per shape)."""
        key = tuple(shape)
        if key not in self._noise:
            g = torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))
            self._noise[key] = torch.randn((self.probes, *key), generator=g)
        return self._noise[key].to(device)

    def codes(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """``[prod(shape), MAX_AXES * code_dim]`` position codes (cached per shape)."""
        key = tuple(shape)
        if key not in self._codes:
            if len(key) > MAX_AXES:
                raise ValueError(f"probe inputs of {len(key)} axes are not supported (at most {MAX_AXES})")
            grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in key], indexing="ij")
            parts = [sinusoidal(g.reshape(-1), self.code_dim, max_period=64.0) for g in grids]
            parts += [torch.zeros(math.prod(key), self.code_dim)] * (MAX_AXES - len(key))
            self._codes[key] = torch.cat(parts, dim=1)
        return self._codes[key].to(device)

    def forward(self, shape: tuple[int, ...]) -> torch.Tensor:
        p = next(self.parameters())
        z = self.mlp(self.codes(shape, p.device).to(p.dtype))            # [positions, P]
        return self.noise(shape, p.device).to(p.dtype) + z.t().reshape(self.probes, *shape)

    def extra_repr(self) -> str:
        return f"probes={self.probes}, code_dim={self.code_dim}"


def network_activations(arch: Architecture, params: dict[str, torch.Tensor], probes: torch.Tensor
                        ) -> list[torch.Tensor]:
    """Per neuron group of ``B`` stacked networks, ``[B, P, n_g]``: the probes themselves (inputs, spatial
    mean per channel), each hidden group's activation (spatial mean per channel) and the logits."""
    acts: dict[int, torch.Tensor] = {}
    out = forward(arch, params, probes, activations=acts)             # [B, P, out]
    B, P = out.shape[:2]

    def pooled(h: torch.Tensor) -> torch.Tensor:
        return h.flatten(3).mean(3) if h.dim() > 3 else h
    first = probes.reshape(P, probes.shape[1], -1).mean(2) if probes.dim() > 2 else probes
    groups = [first.unsqueeze(0).expand(B, -1, -1)]
    groups += [pooled(acts[g]) for g in range(1, arch.num_groups - 1)]
    groups.append(pooled(out))
    return groups


def graph_probe_activations(batch, field: ProbeField) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations ``[N, P]`` of every node of a neural-graph ``Batch`` on the probes of ``field``, and
    :func:`output_summary` of every graph's logits ``[B, 3P]``.

    Networks are rebuilt per architecture (``batch.arch``) from the edge and node features, by each
    node's index inside its group (its position for inputs/outputs, its rank by node id for hidden
    neurons, as :func:`wsnets.from_graph` does), so a graph whose hidden nodes were relabeled gives
    the same activations, relabeled. BatchNorm runs with its running statistics. Networks of other
    architectures (DAGs: residual networks, transformers) are rebuilt from their graph the same way
    (as :func:`wsnets.from_graph` does for them) and give their output neurons' logits and the summary;
    their input and hidden nodes get zeros (a DAG's node sets are not its activations one to one).
    """
    x, ea = batch.x, batch.edge_attr
    src, dst = batch.edge_index
    N = x.shape[0]
    dev = x.device
    nb = batch.batch if getattr(batch, "batch", None) is not None else torch.zeros(N, dtype=torch.long, device=dev)
    archs = batch.arch if isinstance(batch.arch, (list, tuple)) else [batch.arch]
    B = len(archs)
    layer = batch.node_layer
    n_layers = int(layer.max()) + 1
    # local index of every node inside its group: one sort by (graph, layer, node id)
    key = (nb * n_layers + layer) * N + torch.arange(N, device=dev)
    order = key.argsort()
    grp = (nb * n_layers + layer)[order]
    start = torch.zeros(B * n_layers, dtype=torch.long, device=dev).scatter_reduce(
        0, grp, torch.arange(N, device=dev), reduce="amin", include_self=False)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(N, device=dev) - start[grp]
    local = torch.where(batch.node_pos >= 0, batch.node_pos, rank)
    # graphs grouped by architecture (np.unique on the JSON strings); position of each graph in its group
    kinds, inverse = np.unique(np.asarray(archs, dtype=object), return_inverse=True)
    arch_id = torch.as_tensor(inverse.reshape(-1), dtype=torch.long)
    g_order = arch_id.argsort(stable=True)
    counts = torch.bincount(arch_id, minlength=len(kinds))
    first = torch.cumsum(counts, 0) - counts
    gpos = torch.empty(B, dtype=torch.long)
    gpos[g_order] = torch.arange(B) - first[arch_id[g_order]]
    arch_id, gpos = arch_id.to(dev), gpos.to(dev)
    eg = nb[dst]
    # edges and nodes sorted by (architecture, layer): one split per weight layer of each architecture
    elay = batch.edge_layer
    L = int(elay.max()) + 1 if elay.numel() else 1
    e_key = arch_id[eg] * L + elay
    e_order = e_key.argsort(stable=True)
    e_parts = torch.split(e_order, torch.bincount(e_key, minlength=len(kinds) * L).tolist())
    n_key = arch_id[nb] * n_layers + layer
    n_order = n_key.argsort(stable=True)
    n_parts = torch.split(n_order, torch.bincount(n_key, minlength=len(kinds) * n_layers).tolist())
    out = x.new_zeros(N, field.probes)
    summary = x.new_zeros(B, 3 * field.probes)
    for k, arch_json in enumerate(kinds):   # a handful of architectures per batch
        arch = Architecture.from_json(arch_json)
        Bk = int(counts[k])
        if not arch.is_chain:     # residual networks, transformers: the logits on the probes
            nodes = [n_parts[k * n_layers + s] for s in range(n_layers)]
            params = dag_params(arch, Bk, ea, x, layer, local, gpos[eg], gpos[nb], src, dst, e_parts[k * L:],
                                 nodes)
            logits = forward(arch, params, field(input_shape(arch)))      # [Bk, P, C]
            topo = topology(arch)
            outs = tuple(int(s) for s in topo.node_layer[topo.node_type == 2].unique())
            n = torch.cat([nodes[s] for s in outs])
            out[n] = logits[gpos[nb[n]], :, set_rows(topo, outs, layer[n], local[n])].to(out.dtype)
            summary[g_order[first[k]:first[k] + Bk].to(dev)] = output_summary(logits).to(out.dtype)
            continue
        params: dict[str, torch.Tensor] = {}
        for li, l in enumerate(arch.weight_layers):
            e = e_parts[k * L + li]
            kn = l.kernel_numel
            w = ea.new_zeros(Bk, l.out_features, l.in_features, kn)
            w[gpos[eg[e]], local[dst[e]], local[src[e]]] = ea[e, :kn]
            params[f"{l.name}.weight"] = w.reshape(Bk, l.out_features, l.in_features, *l.kernel_size)
            if l.bias:
                n = n_parts[k * n_layers + li + 1]
                b = x.new_zeros(Bk, l.out_features)
                b[gpos[nb[n]], local[n]] = x[n, 0]
                params[f"{l.name}.bias"] = b
        for l, g in zip(arch.layers, arch.layer_group):
            if l.is_norm:
                n = n_parts[k * n_layers + g]
                for name in l.param_shapes():
                    t = x.new_zeros(Bk, l.out_features)
                    t[gpos[nb[n]], local[n]] = x[n, _NORM_KEYS[name]]
                    params[f"{l.name}.{name}"] = t
        probes = field(input_shape(arch))
        groups = network_activations(arch, params, probes)
        for g, v in enumerate(groups):    # v [Bk, P, n_g]
            n = n_parts[k * n_layers + g]
            out[n] = v[gpos[nb[n]], :, local[n]].to(out.dtype)
        summary[g_order[first[k]:first[k] + Bk].to(dev)] = output_summary(groups[-1]).to(out.dtype)
    return out, summary


def output_summary(logits: torch.Tensor) -> torch.Tensor:
    """``[B, P, C]`` logits -> ``[B, 3P]``: per probe the largest softmax probability, the entropy
    (divided by ``log C``) and the gap between the two largest probabilities."""
    p = logits.float().softmax(-1)
    C = logits.shape[-1]
    top = p.topk(min(2, C), dim=-1).values
    margin = top[..., 0] - top[..., 1] if C > 1 else top[..., 0]
    ent = -(p * p.clamp(min=1e-12).log()).sum(-1) / max(math.log(C), 1e-6)
    return torch.cat([top[..., 0], ent, margin], dim=1)


class OutputProbeReadout(nn.Module):
    """What the outputs say on the probes, per graph ``[B, 2 width + 1 + 3P]``: a DeepSets readout over
    the output neurons of each network (mean and max), the log scale of its logits and
    :func:`output_summary`.

    Each output neuron ``c`` brings its position code and, per probe, its logit centered over the
    network's outputs (softmax ignores a shared shift) divided by the RMS of all centered logits of the
    network (a ReLU network scaled up has the same argmax: the scale goes in a separate ``log`` column),
    its gap to the largest logit (0 for the predicted class), and the probe's confidence and entropy.
    An MLP of that, pooled over the outputs, is invariant to every hidden permutation and keeps each
    output's identity (its position). Giving every output the per-probe context, and pooling by mean
    and max, ranked CNN-zoo test accuracy as well as an MLP on the flattened ``[P, C]`` logits (τ 0.806
    vs 0.803; mean pooling without the context: 0.771).
    """

    def __init__(self, probes: int, width: int = 64, pos_dim: int = 16) -> None:
        super().__init__()
        self.probes, self.width, self.pos_dim = probes, width, pos_dim
        self.phi = make_mlp([pos_dim + 4 * probes, width, width])
        self.out_dim = 2 * width + 1 + 3 * probes

    def forward(self, acts: torch.Tensor, summary: torch.Tensor, batch, node_batch: torch.Tensor) -> torch.Tensor:
        from torch_geometric.utils import scatter
        B, P = summary.shape[0], self.probes
        is_out = batch.node_type == 2
        z, g = acts[is_out], node_batch[is_out]
        z = z - scatter(z, g, 0, dim_size=B, reduce="mean")[g]
        rms = scatter(z.square().mean(1), g, 0, dim_size=B, reduce="mean").add(1e-12).sqrt()    # [B]
        zn = z / rms[g].unsqueeze(1)
        gap = zn - scatter(zn, g, 0, dim_size=B, reduce="max")[g]
        pos = sinusoidal(batch.node_pos[is_out].clamp(min=0).to(z.dtype), self.pos_dim, max_period=1000.0).to(z.dtype)
        h = self.phi(torch.cat([pos, zn, gap, summary[g, :2 * P]], dim=1))
        pooled = [scatter(h, g, 0, dim_size=B, reduce="mean"), scatter(h, g, 0, dim_size=B, reduce="max")]
        return torch.cat([*pooled, rms.log().unsqueeze(1), summary], dim=1)


def probe_logits(x, field: ProbeField) -> torch.Tensor:
    """Logits ``[B, P, C]`` of a batched WeightSpace or :class:`~wsnets.weights.MixedBatch` on the probes
    (one batched forward per architecture present; BatchNorm with running statistics)."""
    from ..weights import MixedBatch
    if not isinstance(x, MixedBatch):
        return forward(x.arch, x.params, field(input_shape(x.arch)))
    out = None
    for arch, idx in x.groups():     # one forward per architecture (relu / tanh), not per network
        params = {k: v[idx] for k, v in x.ws.params.items()}
        o = forward(arch, params, field(input_shape(arch)))
        out = o.new_zeros(len(x), *o.shape[1:]) if out is None else out
        out = out.index_put((idx.to(o.device),), o)
    return out


def logit_features(logits: torch.Tensor) -> torch.Tensor:
    """``[B, P, C]`` -> ``[B, P C + 1 + 3P]`` for a fixed output layer: the logits centered over classes and
    divided by their RMS over the network (scale-free), the log of that RMS, and :func:`output_summary`."""
    z = logits - logits.mean(2, keepdim=True)
    rms = z.square().mean((1, 2)).add(1e-12).sqrt()
    return torch.cat([(z / rms[:, None, None]).flatten(1), rms.log().unsqueeze(1), output_summary(logits).to(z.dtype)], 1)
