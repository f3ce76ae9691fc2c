"""Equivariant linear layers on the weight space of one fixed architecture (NFN / DWS style).

Zhou et al. 2023, "Permutation Equivariant Neural Functionals" (NP and HNP layers) and Navon et al.
2023, "Equivariant Architectures for Learning in Deep Weight Spaces" (DWS).

Layout (:class:`WSFeatures`): for weight layer ``i`` (neuron group ``i`` -> group ``i+1``), weights
``[B, C, n_{i+1}, n_i]`` and biases ``[B, C, n_{i+1}]``; a convolution kernel ``[out, in, *k]`` enters as
``prod(k)`` channels. Both NP and HNP layers are the same construction, :class:`WeightSpaceLinear`:

* every *fixed* neuron axis (none for NP; the input and output groups for HNP) is folded into the
  channel dimension, so each tensor has 0, 1 or 2 *free* (permutable) axes;
* every tensor is mean-pooled over each subset of its free axes, and the pools indexed by the same
  set of groups are concatenated along channels;
* output tensor ``s`` is the sum, over the subsets ``T`` of its free axes, of a channel-linear map of
  the pool indexed by ``T``, broadcast over the remaining axes.

That is the full NP (resp. HNP) basis of Zhou et al. for MLPs. Maps only mix channels and broadcast,
so they commute with permutations of free groups by construction; the tests check it numerically.
No Python loop runs over neurons: loops run over layers (a handful) only.

Batch normalization: :meth:`WeightSpaceEncoder.forward` folds eval-mode BatchNorm into the preceding
layer first (the same function; :func:`wsnets.fold_batchnorm`), so the encoders read BN networks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from typing import Callable, Sequence

import torch
from einops import rearrange
from torch import nn

from ..arch import ACTIVATIONS, Architecture
from ..errors import ArchitectureMismatchError, ConfigError
from ..weights import MixedBatch, WeightSpace, activation_codes
from .common import make_mlp
from .probes import ProbeField, logit_features, probe_logits


@dataclass(frozen=True)
class WSFeatures:
    """Weight-space features: ``weights[i]`` ``[B, C, n_{i+1}, n_i]``, ``biases[i]`` ``[B, C, n_{i+1}]``."""

    weights: tuple[torch.Tensor, ...]
    biases: tuple[torch.Tensor, ...]

    @classmethod
    def from_weightspace(cls, ws: WeightSpace, *, scale: bool = True) -> "WSFeatures":
        """Kernel taps become channels; with ``scale``, each layer is multiplied by ``sqrt(fan_in)`` so
        default-initialized weights are O(1) whatever the width (a fixed, invertible rescaling)."""
        ws = ws.batched()
        weights, biases = ws.tensors()
        ow, ob = [], []
        for l, w, b in zip(ws.arch.weight_layers, weights, biases):
            w = rearrange(w.reshape(*w.shape[:3], -1), "b o i k -> b k o i")
            s = math.sqrt(l.in_features * l.kernel_numel) if scale else 1.0
            ow.append(w * s)
            ob.append(b.unsqueeze(1) * s)
        return cls(tuple(ow), tuple(ob))

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "WSFeatures":
        return WSFeatures(tuple(fn(w) for w in self.weights), tuple(fn(b) for b in self.biases))

    def __add__(self, other: "WSFeatures") -> "WSFeatures":
        return WSFeatures(tuple(a + b for a, b in zip(self.weights, other.weights)),
                          tuple(a + b for a, b in zip(self.biases, other.biases)))

    def tensors(self) -> list[torch.Tensor]:
        """Weights and biases interleaved: ``[W0, b0, W1, b1, ...]``."""
        return [t for pair in zip(self.weights, self.biases) for t in pair]

    @classmethod
    def from_tensors(cls, ts: Sequence[torch.Tensor]) -> "WSFeatures":
        return cls(tuple(ts[0::2]), tuple(ts[1::2]))

    def permute(self, perms: dict[int, torch.Tensor]) -> "WSFeatures":
        """Permute neuron group ``g`` by ``perms[g]`` (``[n_g]``): new neuron ``i`` = old ``perm[i]``."""
        ws, bs = [], []
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            if i + 1 in perms:
                w, b = w.index_select(2, perms[i + 1].to(w.device)), b.index_select(2, perms[i + 1].to(b.device))
            if i in perms:
                w = w.index_select(3, perms[i].to(w.device))
            ws.append(w)
            bs.append(b)
        return WSFeatures(tuple(ws), tuple(bs))


def shape_signature(arch: Architecture) -> tuple[tuple[int, ...], ...]:
    """What a fixed-architecture encoder depends on: per weight layer ``(out, in, *kernel)``, after folding BN."""
    return tuple((l.out_features, l.in_features, *l.kernel_size) for l in arch.weight_layers)


class WeightSpaceLinear(nn.Module):
    """Linear map between weight-space features, equivariant to permutations of the free neuron groups.

    Parameters
    ----------
    group_sizes : neurons per group (input, hidden..., output), as ``Architecture.group_sizes``.
    in_channels : channels of every tensor, or one per tensor in ``[W0, b0, W1, b1, ...]`` order.
    out_channels : channels of every output tensor.
    fixed : groups whose neurons keep their identity: ``()`` for NP, ``(0, L)`` for HNP.

    Input and output: :class:`WSFeatures`.
    """

    def __init__(self, group_sizes: Sequence[int], in_channels: int | Sequence[int], out_channels: int,
                 fixed: Sequence[int] = ()) -> None:
        super().__init__()
        self.group_sizes = tuple(group_sizes)
        L = len(self.group_sizes) - 1
        self.fixed = tuple(sorted(set(fixed)))
        cin = [in_channels] * (2 * L) if isinstance(in_channels, int) else list(in_channels)
        if len(cin) != 2 * L:
            raise ValueError(f"in_channels needs {2 * L} entries (weights and biases of {L} layers), got {len(cin)}")
        self.in_channels, self.out_channels = tuple(cin), out_channels
        # per tensor: axes (groups), free axes, folded channel counts in and out
        self.axes = [((i + 1, i) if t == 0 else (i + 1,)) for i in range(L) for t in (0, 1)]
        self.free = [tuple(g for g in ax if g not in self.fixed) for ax in self.axes]
        fixn = [math.prod(self.group_sizes[g] for g in ax if g in self.fixed) for ax in self.axes]
        self.fin = [c * f for c, f in zip(cin, fixn)]
        self.fout = [out_channels * f for f in fixn]
        # channels of each pool, keyed by the (sorted) tuple of groups it is indexed by
        pool_ch: dict[tuple[int, ...], int] = {}
        for t, fr in enumerate(self.free):
            for T in _subsets(fr):
                pool_ch[T] = pool_ch.get(T, 0) + self.fin[t]
        self.pool_ch = pool_ch
        self.maps = nn.ModuleDict()
        for s, fr in enumerate(self.free):
            subsets = _subsets(fr)
            bound = 1.0 / math.sqrt(sum(pool_ch[T] for T in subsets))
            for T in subsets:
                lin = nn.Linear(pool_ch[T], self.fout[s], bias=not T)
                nn.init.uniform_(lin.weight, -bound, bound)
                if lin.bias is not None:
                    nn.init.uniform_(lin.bias, -bound, bound)
                self.maps[_key(s, T)] = lin

    def _fold(self, t: int, x: torch.Tensor) -> torch.Tensor:
        """[B, C, *axes] -> [B, C * prod(fixed sizes), *free axes]."""
        ax, fr = self.axes[t], self.free[t]
        if len(ax) == 1:
            return x if fr else x.flatten(1)
        if len(fr) == 2:
            return x
        if not fr:
            return x.flatten(1)
        return rearrange(x, "b c o i -> b (c o) i") if fr == (ax[1],) else rearrange(x, "b c o i -> b (c i) o")

    def _unfold(self, t: int, x: torch.Tensor) -> torch.Tensor:
        ax, fr = self.axes[t], self.free[t]
        c, sz = self.out_channels, self.group_sizes
        if len(ax) == 1:
            return x if fr else x.reshape(x.shape[0], c, sz[ax[0]])
        if len(fr) == 2:
            return x
        if not fr:
            return x.reshape(x.shape[0], c, sz[ax[0]], sz[ax[1]])
        if fr == (ax[1],):
            return rearrange(x, "b (c o) i -> b c o i", c=c)
        return rearrange(x, "b (c i) o -> b c o i", c=c)

    def forward(self, feats: WSFeatures) -> WSFeatures:
        xs = [self._fold(t, x) for t, x in enumerate(feats.tensors())]
        pools: dict[tuple[int, ...], list[torch.Tensor]] = {}
        for t, (x, fr) in enumerate(zip(xs, self.free)):
            for T in _subsets(fr):
                drop = [2 + k for k, g in enumerate(fr) if g not in T]
                pools.setdefault(T, []).append(x.mean(dim=drop) if drop else x)
        cat = {T: torch.cat(v, dim=1) for T, v in pools.items()}
        out = []
        for s, fr in enumerate(self.free):
            y = None
            for T in _subsets(fr):
                z = self.maps[_key(s, T)](cat[T].movedim(1, -1)).movedim(-1, 1)
                for k, g in enumerate(fr):  # broadcast over the free axes not in T
                    if g not in T:
                        z = z.unsqueeze(2 + k)
                y = z if y is None else y + z
            out.append(self._unfold(s, y))
        return WSFeatures.from_tensors(out)

    def extra_repr(self) -> str:
        return f"groups={self.group_sizes}, out_channels={self.out_channels}, fixed={self.fixed}"


def _subsets(free: tuple[int, ...]) -> list[tuple[int, ...]]:
    return [tuple(sorted(c)) for r in range(len(free) + 1) for c in combinations(free, r)]


def _key(s: int, T: tuple[int, ...]) -> str:
    return f"t{s}_" + "_".join(map(str, T))


class NPLinear(WeightSpaceLinear):
    """NP layer (Zhou et al. 2023): equivariant to permutations of *every* neuron group, inputs and outputs too."""

    def __init__(self, group_sizes: Sequence[int], in_channels: int | Sequence[int], out_channels: int) -> None:
        super().__init__(group_sizes, in_channels, out_channels, fixed=())


class HNPLinear(WeightSpaceLinear):
    """HNP layer (Zhou et al. 2023): equivariant to hidden-neuron permutations; input and output neurons are fixed."""

    def __init__(self, group_sizes: Sequence[int], in_channels: int | Sequence[int], out_channels: int) -> None:
        super().__init__(group_sizes, in_channels, out_channels, fixed=(0, len(group_sizes) - 1))


class ChannelNorm(nn.Module):
    """LayerNorm over channels at every weight-space entry (pointwise, hence equivariant)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, feats: WSFeatures) -> WSFeatures:
        return feats.map(lambda x: self.norm(x.movedim(1, -1)).movedim(-1, 1))


class DWSBlock(nn.Module):
    """DWS-style residual block: ``x + dropout(act(linear(norm(x))))`` with an equivariant linear map."""

    def __init__(self, group_sizes: Sequence[int], channels: int, fixed: Sequence[int] = (), dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = ChannelNorm(channels)
        self.linear = WeightSpaceLinear(group_sizes, channels, channels, fixed)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, feats: WSFeatures) -> WSFeatures:
        return feats + self.linear(self.norm(feats)).map(lambda x: self.dropout(self.act(x)))


class WeightSpacePool(nn.Module):
    """Invariant pooling: mean and max of every tensor over its free axes -> ``[B, out_dim]``.

    Fixed axes (HNP) stay as features, so the pool of an HNP stack still tells inputs apart.
    """

    def __init__(self, layer: WeightSpaceLinear) -> None:
        super().__init__()
        self.free, self.axes, self.fold = layer.free, layer.axes, layer._fold
        self.out_dim = sum(f * (2 if fr else 1) for f, fr in zip(layer.fout, layer.free))

    def forward(self, feats: WSFeatures) -> torch.Tensor:
        outs = []
        for t, x in enumerate(feats.tensors()):
            x = self.fold(t, x)
            dims = list(range(2, x.dim()))
            outs += [x.mean(dim=dims), x.amax(dim=dims)] if dims else [x]
        return torch.cat(outs, dim=1)


class WeightSpaceEncoder(nn.Module):
    """Encoder for one weight-space shape: lift -> ``layers`` x :class:`DWSBlock` -> invariant pool -> MLP.

    Input: a batched :class:`~wsnets.WeightSpace`, or a :class:`~wsnets.weights.MixedBatch` of networks
    whose tensors share shapes but not activations (``representation = "tensors"``); BatchNorm is folded
    first. Output ``[B, out_dim]``. Other tensor shapes raise :class:`ArchitectureMismatchError`.

    Parameters
    ----------
    arch : the architecture it reads (or an example WeightSpace's ``arch``).
    hidden : channels per weight-space entry.
    layers : number of residual equivariant blocks.
    out_dim : embedding size.
    fixed_io : True for HNP (inputs/outputs keep identity), False for NP.
    act_embed : add a learned embedding of each layer's activation function (relu, tanh, ...) to that
        layer's lifted weights and biases, so networks of one shape but different activations (the
        Small CNN Zoo) are told apart; a per-layer constant, hence equivariant.
    probes : number of probe inputs (0: none). The networks' logits on them (centered, scale-free, plus
        their log scale and per-probe confidence; :func:`wsnets.nn.probes.logit_features`) join the
        pooled features. Output neurons are fixed, so this stays invariant for HNP; NP (which also
        permutes outputs) refuses probes.
    probe_learn : learn the probes (see :class:`~wsnets.nn.probes.ProbeField`).
    """

    representation = "tensors"

    def __init__(self, arch: Architecture, hidden: int = 16, layers: int = 2, out_dim: int = 64,
                 fixed_io: bool = True, dropout: float = 0.0, act_embed: bool = True, probes: int = 0,
                 probe_learn: bool = True) -> None:
        super().__init__()
        arch = _folded(arch)
        self.arch_describe = arch.describe()
        self.signature = shape_signature(arch)
        sizes = arch.group_sizes
        L = len(sizes) - 1
        fixed = (0, L) if fixed_io else ()
        if probes and not fixed_io:
            raise ConfigError("probes need fixed output neurons: use them with HNP, not NP")
        cin = [c for l in arch.weight_layers for c in (l.kernel_numel, 1)]
        self.lift = WeightSpaceLinear(sizes, cin, hidden, fixed)
        self.act_embed = nn.Embedding(len(ACTIVATIONS), hidden) if act_embed else None
        if self.act_embed is not None:
            nn.init.normal_(self.act_embed.weight, std=0.1)
        self.blocks = nn.ModuleList(DWSBlock(sizes, hidden, fixed, dropout) for _ in range(layers))
        self.norm = ChannelNorm(hidden)
        self.pool = WeightSpacePool(self.lift)
        self.probe_field = ProbeField(probes, learn=probe_learn) if probes else None
        n_probe = probes * sizes[-1] + 1 + 3 * probes if probes else 0
        self.head = make_mlp([self.pool.out_dim + n_probe, 2 * out_dim, out_dim], dropout=dropout)
        self.out_dim = out_dim

    def features(self, x: WeightSpace | MixedBatch) -> WSFeatures:
        """Check the shapes, fold BatchNorm and scale: the :class:`WSFeatures` the layers read."""
        ws = self._checked(x)
        p = next(self.parameters())
        return WSFeatures.from_weightspace(ws.to(device=p.device, dtype=p.dtype))

    def _checked(self, x: WeightSpace | MixedBatch) -> WeightSpace:
        if not isinstance(x, (WeightSpace, MixedBatch)):
            raise TypeError(f"{type(self).__name__} takes a batched WeightSpace or MixedBatch, got {type(x).__name__}")
        ws = _fold_ws(x.ws if isinstance(x, MixedBatch) else x)
        if shape_signature(ws.arch) != self.signature:
            raise ArchitectureMismatchError(
                f"{type(self).__name__} was built for {self.arch_describe}, got {ws.arch.describe()}")
        return ws

    def forward(self, x: WeightSpace | MixedBatch) -> torch.Tensor:
        h = self.lift(self.features(x))
        if self.act_embed is not None:
            e = self.act_embed(activation_codes(x).to(self.act_embed.weight.device))     # [B, L, hidden]
            h = h + WSFeatures(tuple(e[:, i, :, None, None] for i in range(len(h.weights))),
                               tuple(e[:, i, :, None] for i in range(len(h.biases))))
        for blk in self.blocks:
            h = blk(h)
        z = self.pool(self.norm(h))
        if self.probe_field is not None:
            p = next(self.parameters())
            logits = probe_logits(x.to(device=p.device, dtype=p.dtype), self.probe_field)
            z = torch.cat([z, logit_features(logits).to(z.dtype)], dim=1)
        return self.head(z)


class NPEncoder(WeightSpaceEncoder):
    """:class:`WeightSpaceEncoder` with NP layers: invariant to input/output neuron permutations as well."""

    def __init__(self, arch: Architecture, hidden: int = 16, layers: int = 2, out_dim: int = 64, dropout: float = 0.0,
                 act_embed: bool = True):
        super().__init__(arch, hidden, layers, out_dim, fixed_io=False, dropout=dropout, act_embed=act_embed)


class HNPEncoder(WeightSpaceEncoder):
    """:class:`WeightSpaceEncoder` with HNP layers: input/output neurons keep their identity."""

    def __init__(self, arch: Architecture, hidden: int = 16, layers: int = 2, out_dim: int = 64, dropout: float = 0.0,
                 act_embed: bool = True, probes: int = 0, probe_learn: bool = True):
        super().__init__(arch, hidden, layers, out_dim, fixed_io=True, dropout=dropout, act_embed=act_embed,
                         probes=probes, probe_learn=probe_learn)


def _folded(arch: Architecture) -> Architecture:
    if not arch.is_chain:  # NP/HNP layers are the symmetry of a chain of weight layers (Zhou et al. 2023)
        from ..errors import UnsupportedLayerError
        raise UnsupportedLayerError(f"the NP/HNP equivariant layers take sequential MLPs/CNNs, not {arch.describe()}; "
                                    "use a graph encoder for residual networks and transformers")
    if not any(l.kind == "batchnorm" for l in arch.layers):
        return arch
    return WeightSpace.random(arch).fold_batchnorm().arch


def _fold_ws(ws: WeightSpace) -> WeightSpace:
    return ws.fold_batchnorm() if any(l.kind == "batchnorm" for l in ws.arch.layers) else ws
