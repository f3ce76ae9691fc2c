"""Permutation symmetry of a network: the one source of truth.

The :class:`PermutationSpec` of an architecture says which axis of which tensor belongs to which
neuron group (as Git Re-Basin's ``PermutationSpec``, Ainsworth et al. 2023). Group 0 is the input,
group ``L`` the output; both are fixed. The hidden groups ``1..L-1`` may be permuted freely without
changing the network's function: a weight layer's output axis and its bias follow the permutation of
its output group, the next layer's input axis follows it too, and BatchNorm/LayerNorm parameters and
running statistics move with their channel.

The graph converter, :func:`permute`, weight matching (:mod:`wsnets.merge`), the equivariant layers
and :mod:`wsnets.testing` all read this spec, so a new layer kind is taught here once.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping, Sequence

import torch

from .arch import Architecture, Layer
from .errors import ConfigError, ShapeMismatchError, UnsupportedLayerError


@dataclass(frozen=True)
class PermutationSpec:
    """Which neuron group each tensor axis belongs to.

    Attributes
    ----------
    group_sizes : neurons per group (input, hidden..., output).
    axes : state-dict key -> tuple with, per axis, the group index or None (kernel axes).
    """

    group_sizes: tuple[int, ...]
    axes: tuple[tuple[str, tuple[int | None, ...]], ...]

    @property
    def hidden(self) -> tuple[int, ...]:
        """Indices of the permutable groups."""
        return tuple(range(1, len(self.group_sizes) - 1))

    @property
    def fixed(self) -> tuple[int, ...]:
        return (0, len(self.group_sizes) - 1)

    def axes_of(self, key: str) -> tuple[int | None, ...]:
        return dict(self.axes)[key]

    def group_members(self) -> dict[int, list[tuple[str, int]]]:
        """group -> [(key, axis), ...]: every tensor axis a group's permutation acts on."""
        out: dict[int, list[tuple[str, int]]] = {g: [] for g in range(len(self.group_sizes))}
        for key, ax in self.axes:
            for a, g in enumerate(ax):
                if g is not None:
                    out[g].append((key, a))
        return out

    def rebasin(self) -> dict[str, tuple[str | None, ...]]:
        """Git Re-Basin style: key -> per-axis permutation name (``"P1"``...), None where fixed."""
        fixed = set(self.fixed)
        return {k: tuple(None if g is None or g in fixed else f"P{g}" for g in ax) for k, ax in self.axes}


@lru_cache(maxsize=256)
def permutation_spec(arch: Architecture) -> PermutationSpec:
    """The :class:`PermutationSpec` of a sequential architecture."""
    axes: list[tuple[str, tuple[int | None, ...]]] = []
    for l, g in zip(arch.layers, arch.layer_group):
        if l.is_weight:
            k = (None,) * len(l.kernel_size)
            axes.append((f"{l.name}.weight", (g, g - 1, *k)))
            if l.bias:
                axes.append((f"{l.name}.bias", (g,)))
        elif l.is_norm:
            for key in l.param_shapes():
                axes.append((f"{l.name}.{key}", (g,)))
    return PermutationSpec(arch.group_sizes, tuple(axes))


PermLike = Mapping[int, torch.Tensor] | Sequence[torch.Tensor]


def _as_dict(spec: PermutationSpec, perms: PermLike, allow_fixed: bool) -> dict[int, torch.Tensor]:
    if isinstance(perms, Mapping):
        d = dict(perms)
    else:
        perms = list(perms)
        if len(perms) != len(spec.hidden):
            raise ShapeMismatchError(f"got {len(perms)} permutations for {len(spec.hidden)} hidden layers")
        d = dict(zip(spec.hidden, perms))
    for g, p in d.items():
        if g in spec.fixed and not allow_fixed:
            raise ConfigError(f"group {g} is an input/output group; pass allow_fixed=True to permute it")
        if not 0 <= g < len(spec.group_sizes):
            raise ShapeMismatchError(f"no neuron group {g}")
        if p.shape[-1] != spec.group_sizes[g]:
            raise ShapeMismatchError(f"permutation for group {g} has {p.shape[-1]} entries, group has {spec.group_sizes[g]}")
    return d


def permute(ws, perms: PermLike, *, allow_fixed: bool = False):
    """Apply neuron permutations to a WeightSpace: new neuron ``i`` of group ``g`` is old ``perms[g][i]``.

    ``perms`` is a sequence over hidden groups, or a mapping group -> permutation. A permutation is
    ``[n]`` (shared by the batch) or ``[B, n]`` (one per network of a batched WeightSpace).
    Input/output groups are permuted only with ``allow_fixed=True`` (that changes the function).
    """
    from .weights import WeightSpace
    spec = permutation_spec(ws.arch)
    d = _as_dict(spec, perms, allow_fixed)
    lead = 0 if ws.batch_size is None else 1
    params = dict(ws.params)
    for key, ax in spec.axes:
        t = params[key]
        for a, g in enumerate(ax):
            if g is None or g not in d:
                continue
            p = d[g].to(t.device)
            dim = a + lead
            if p.dim() == 1:
                t = t.index_select(dim, p)
            else:  # per-network permutations: gather along dim with an expanded index
                shape = [1] * t.dim()
                shape[0], shape[dim] = p.shape[0], p.shape[1]
                t = t.gather(dim, p.view(shape).expand(t.shape))
        params[key] = t
    return WeightSpace(ws.arch, params, ws.batch_size, check=False)


def random_permutations(arch: Architecture, batch_size: int | None = None, *,
                        generator: torch.Generator | None = None) -> dict[int, torch.Tensor]:
    """Uniformly random permutations of every hidden group (``[n]``, or ``[B, n]`` if batched)."""
    spec = permutation_spec(arch)
    out = {}
    for g in spec.hidden:
        n = spec.group_sizes[g]
        if batch_size is None:
            out[g] = torch.randperm(n, generator=generator)
        else:
            out[g] = torch.rand(batch_size, n, generator=generator).argsort(dim=1)
    return out


def random_permute(ws, *, generator: torch.Generator | None = None):
    """``ws`` with independent random hidden permutations (per network if batched): a function-preserving
    augmentation."""
    return permute(ws, random_permutations(ws.arch, ws.batch_size, generator=generator))


def invert(perm: torch.Tensor) -> torch.Tensor:
    """Inverse permutation (last dim)."""
    return perm.argsort(dim=-1)


def fold_batchnorm(ws):
    """Fold every eval-mode BatchNorm into the Linear/Conv right before it (dropout between is allowed).

    ``W' = W * g/sqrt(v + eps)`` per output channel and ``b' = (b - m) * g/sqrt(v + eps) + beta``. The
    folded network computes the same function in eval mode. A BatchNorm that follows an activation
    cannot be folded and raises, naming it.
    """
    from .arch import Architecture
    from .weights import WeightSpace
    layers = list(ws.arch.layers)
    params = dict(ws.params)
    out_layers: list[Layer] = []
    last_weight: int | None = None  # index into out_layers
    for l in layers:
        if l.kind == "batchnorm":
            if last_weight is None:
                raise UnsupportedLayerError(f"batchnorm at {l.name!r} has no Linear/Conv right before it to fold into")
            wl = out_layers[last_weight]
            m, v = params.pop(f"{l.name}.running_mean"), params.pop(f"{l.name}.running_var")
            g = params.pop(f"{l.name}.weight", None)
            beta = params.pop(f"{l.name}.bias", None)
            scale = (v + l.eps).rsqrt() * (g if g is not None else 1.0)
            w = params[f"{wl.name}.weight"]
            b = params.get(f"{wl.name}.bias", torch.zeros_like(m))
            extra = w.dim() - scale.dim() - 1
            params[f"{wl.name}.weight"] = w * scale.reshape(*scale.shape, 1, *([1] * extra))
            nb = (b - m) * scale
            params[f"{wl.name}.bias"] = nb + beta if beta is not None else nb
            if not wl.bias:
                from dataclasses import replace
                out_layers[last_weight] = replace(wl, bias=True)
            continue
        if l.is_weight:
            last_weight = len(out_layers)
        elif l.kind not in ("dropout",):
            last_weight = None
        out_layers.append(l)
    arch = Architecture(tuple(out_layers), ws.arch.input_shape)
    return WeightSpace(arch, params, ws.batch_size)
