"""Permutation symmetry of a network: the one source of truth, derived from the architecture's DAG.

The :class:`PermutationSpec` of an architecture says which axis of which tensor is permuted by which
permutation (as Git Re-Basin's ``PermutationSpec``, Ainsworth et al. 2023, "Git Re-Basin: Merging
Models modulo Permutation Symmetries"). It is *derived*, not written per layer kind:

1. Every weight layer (Linear, Conv, Embedding, the projections of attention) starts a new *axis* of
   neurons: its output features. A parameter-free op, a normalization, an activation or pooling
   keeps the axis of its input (they act on every neuron alike or per neuron).
2. Axes joined by an element-wise op with two operands (a residual ``add``, a gating ``mul``, a
   learned positional table added to tokens, a token concatenation) must be permuted together: they
   are merged, union-find style, into one *group*. This is why a residual stream of a ResNet or a
   transformer is one group however many blocks write into it (Kofinas et al. 2024, "Graph Neural
   Networks for Learning Equivariant Representations of Neural Networks"; Lim et al. 2024, "Graph
   Metanetworks for Processing Diverse Neural Architectures").
3. A concatenation along the feature axis makes a *block* group: its permutation is the direct sum of
   its parts' permutations, which stay free (a concatenated axis is not one free group).
4. Attention (``attention``, ``mha``) couples its query and key axes into one group and its value axis
   with its output; both are *head-structured*: a permutation of the heads, shared by q/k and v/o of
   one attention, composed with an independent permutation inside each head (Transformer-NFN, Tran et
   al., ICLR 2025, "Equivariant Neural Functional Networks for Transformers"). GroupNorm's groups are
   head-structured the same way.
5. The network's input and output axes are fixed, and so is every group merged with them.
6. Operands of ``add``/``mul`` broadcast from the right: their feature axes must sit at the same place
   from the end. An operand of extent 1 there (a per-sample gate ``[N, 1]``, a one-unit branch) is
   broadcast and couples nothing; an operand whose neurons sit on another axis (a learned ``[H, W]``
   map added to ``[N, C, H, W]``), or a Linear/Conv reading an axis that is not its input's neuron
   axis (a Conv1d mixing tokens), is refused, naming the op. A free tensor's (``param``) neuron axis
   is its last axis wider than 1 (``[C, 1, 1]``: the channels).
7. A tensor used at several places (a module called twice) is one tensor: each of its axes is one
   group across all uses. Tied weights (one Parameter under two state-dict keys) are refused at trace.

A group's permutation acts on every tensor axis of that group (output axis and bias of the layer that
starts it, the input axis of every layer that reads it, norm parameters and running statistics).
Hidden groups are the groups that are neither fixed nor blocks. For a sequential MLP/CNN this gives
the classic spec: group 0 input, groups ``1..L-1`` the hidden layers, group ``L`` the output.

The graph converter, :func:`permute`/:func:`random_permute`, weight and activation matching
(:mod:`wsnets.merge.align`), the equivariant layers and :mod:`wsnets.testing` all read this spec.
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
    group_sizes : neurons per group (for a chain: input, hidden..., output).
    axes : state-dict key -> tuple with, per axis, the group index or None (kernel, vocabulary and
        position axes).
    fixed_groups : groups that never move (network input/output and what is merged with them).
    blocks : block group -> its parts (a concatenated axis; its permutation is the parts' direct sum).
    heads : head-structured group -> (number of heads, tie): groups with one tie share the head
        permutation (q/k with v/o of one attention).
    layer_groups : for each layer, the group of its output's feature axis (None: token ids).
    layer_axes : for each layer, where that feature axis is in its output, counted from the end.
    """

    group_sizes: tuple[int, ...]
    axes: tuple[tuple[str, tuple[int | None, ...]], ...]
    fixed_groups: tuple[int, ...] = ()
    blocks: tuple[tuple[int, tuple[int, ...]], ...] = ()
    heads: tuple[tuple[int, int, int], ...] = ()
    layer_groups: tuple[int | None, ...] = ()
    layer_axes: tuple[int, ...] = ()

    @property
    def hidden(self) -> tuple[int, ...]:
        """Indices of the permutable groups (neither fixed nor blocks)."""
        skip = set(self.fixed_groups) | {g for g, _ in self.blocks}
        return tuple(g for g in range(len(self.group_sizes)) if g not in skip)

    @property
    def fixed(self) -> tuple[int, ...]:
        return self.fixed_groups

    @property
    def head_structure(self) -> dict[int, tuple[int, int]]:
        return {g: (h, t) for g, h, t in self.heads}

    def axes_of(self, key: str) -> tuple[int | None, ...]:
        return dict(self.axes)[key]

    def parts(self, g: int) -> list[tuple[int, int]]:
        """``[(group, offset), ...]``: the atomic groups a (block) group is made of, with their offsets."""
        blocks = dict(self.blocks)
        if g not in blocks:
            return [(g, 0)]
        out, off = [], 0
        for c in blocks[g]:
            for cg, o in self.parts(c):
                out.append((cg, off + o))
            off += self.group_sizes[c]
        return out

    def group_members(self) -> dict[int, list[tuple[str, int]]]:
        """group -> [(key, axis), ...]: every whole tensor axis a group's permutation acts on (a block
        axis is listed under the block group; :meth:`slices` resolves it into its parts)."""
        out: dict[int, list[tuple[str, int]]] = {g: [] for g in range(len(self.group_sizes))}
        for key, ax in self.axes:
            for a, g in enumerate(ax):
                if g is not None:
                    out[g].append((key, a))
        return out

    def slices(self) -> dict[int, list[tuple[str, int, int]]]:
        """atomic group -> [(key, axis, offset), ...]: where its permutation acts, block axes resolved."""
        out: dict[int, list[tuple[str, int, int]]] = {}
        for key, ax in self.axes:
            for a, g in enumerate(ax):
                if g is not None:
                    for cg, off in self.parts(g):
                        out.setdefault(cg, []).append((key, a, off))
        return out

    @property
    def activation_layers(self) -> dict[int, int]:
        """Layer index -> hidden (non-head) group, for the last layer whose output carries that group
        before the next weight layer (activation matching compares these activations)."""
        heads = self.head_structure
        last: dict[int, int] = {}
        for i, g in enumerate(self.layer_groups):
            if g is not None and g in self.hidden and g not in heads:
                last[g] = i
        return {i: g for g, i in last.items()}

    def full_perm(self, g: int, perms: Mapping[int, torch.Tensor]) -> torch.Tensor | None:
        """The permutation of group ``g`` given permutations of atomic groups (a block group's is the
        direct sum of its parts'); None if nothing in it moves."""
        if g not in dict(self.blocks):
            return perms.get(g)
        parts = self.parts(g)
        if not any(c in perms for c, _ in parts):
            return None
        ref = next(perms[c] for c, _ in parts if c in perms)
        return torch.cat([(perms[c] if c in perms else torch.arange(self.group_sizes[c], device=ref.device)
                           .expand(*ref.shape[:-1], -1)) + off for c, off in parts], dim=-1)

    def rebasin(self) -> dict[str, tuple[str | None, ...]]:
        """Git Re-Basin style: key -> per-axis permutation name (``"P1"``...), None where fixed; a block
        axis is named by its parts (``"P3+P5"``)."""
        fixed = set(self.fixed)

        def name(g):
            if g is None:
                return None
            parts = [c for c, _ in self.parts(g)]
            names = [f"P{c}" for c in parts if c not in fixed]
            if not names:
                return None
            return "+".join(f"P{c}" if c not in fixed else "I" for c in parts) if len(parts) > 1 else names[0]
        return {k: tuple(name(g) for g in ax) for k, ax in self.axes}


class _Groups:
    """Union-find over neuron axes with fixed flags, block (concatenated) axes and head structure."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.fixed: list[bool] = []
        self.block: dict[int, list[int]] = {}
        self.heads: dict[int, tuple[int, int]] = {}
        self.tie_parent: list[int] = []

    def new(self, n: int, fixed: bool = False, block: list[int] | None = None) -> int:
        e = len(self.parent)
        self.parent.append(e)
        self.size.append(int(n))
        self.fixed.append(fixed)
        if block is not None:
            self.block[e] = block
        return e

    def find(self, e: int) -> int:
        while self.parent[e] != e:
            self.parent[e] = self.parent[self.parent[e]]
            e = self.parent[e]
        return e

    def tie(self) -> int:
        self.tie_parent.append(len(self.tie_parent))
        return len(self.tie_parent) - 1

    def tie_find(self, t: int) -> int:
        while self.tie_parent[t] != t:
            t = self.tie_parent[t]
        return t

    def fix(self, e: int) -> None:
        r = self.find(e)
        self.fixed[r] = True

    def set_heads(self, e: int, n: int, tie: int) -> None:
        r = self.find(e)
        if r in self.block or self.size[r] % n:
            self.fixed[r] = True
            return
        if r in self.heads:
            h, t = self.heads[r]
            if h != n:
                self.fixed[r] = True
            else:
                self.tie_parent[self.tie_find(tie)] = self.tie_find(t)
            return
        self.heads[r] = (n, tie)

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        if self.size[a] != self.size[b]:
            raise ShapeMismatchError(f"axes of {self.size[a]} and {self.size[b]} neurons are joined")
        if a in self.block and b in self.block:
            pa, pb = self.block[a], self.block[b]
            if [self.size[x] for x in pa] == [self.size[x] for x in pb]:
                for x, y in zip(pa, pb):
                    self.union(x, y)
            else:
                self.fixed[a] = self.fixed[b] = True
        elif b in self.block or a in self.block:
            if b in self.block:
                a, b = b, a
            if b in self.heads:   # a plain axis that must follow a block structure and a head structure
                self.fixed[a] = True
        else:
            if b in self.heads:
                if a in self.heads:
                    (ha, ta), (hb, tb) = self.heads[a], self.heads[b]
                    if ha == hb:
                        self.tie_parent[self.tie_find(tb)] = self.tie_find(ta)
                    else:
                        self.fixed[a] = True
                else:
                    self.heads[a] = self.heads[b]
        self.parent[b] = a
        self.fixed[a] = self.fixed[a] or self.fixed[b]
        return a


def _derive(arch: Architecture) -> PermutationSpec:
    G = _Groups()
    n = len(arch.layers)
    cls: list[int | None] = [None] * n
    feat: list[int] = [-1] * n           # feature axis of each output, counted from the end
    shapes = arch.shapes if not arch.is_chain else None
    ids_input = any(l.kind == "embedding" and not l.mode and -1 in ins for l, ins in zip(arch.layers, arch.inputs))
    input_cls: list[int | None] = []
    axes: list[tuple[str, tuple[int | None, ...]]] = []
    where: dict[str, int] = {}
    seen_weight = False

    def put(entry: tuple[str, tuple[int | None, ...]]) -> None:
        """Record the groups of a tensor's axes; a tensor used at several places (a module called twice)
        is one tensor: each of its axes is one group across all uses, and an axis that one use cannot
        permute (a kernel, vocabulary or position axis) fixes the groups of the others."""
        key, ax = entry
        if key not in where:
            where[key] = len(axes)
            axes.append(entry)
            return
        old = axes[where[key]][1]
        merged = []
        for a, b in zip(old, ax):
            if a is None or b is None:
                for c in (a, b):
                    if c is not None:
                        G.fix(c)
                merged.append(None)
            else:
                merged.append(G.union(a, b))
        axes[where[key]] = (key, tuple(merged))

    def rank(j: int) -> int:
        if shapes is None:
            return 2
        return len(shapes[j]) if j >= 0 else 1 + len(arch.input_shape)

    def of(j: int) -> int | None:
        if j >= 0:
            return cls[j]
        if ids_input:
            return None
        if not input_cls:
            first = arch.weight_layers[0] if arch.weight_layers else None
            size = (arch.input_shape[0] if last_axis_input is False else arch.input_shape[-1]) if arch.input_shape \
                else first.in_features
            input_cls.append(G.new(size, fixed=True))
        return input_cls[0]

    def out_shape(j: int) -> tuple[int, ...]:
        return tuple(shapes[j]) if j >= 0 else (1, *(arch.input_shape or ()))

    def shown(j: int) -> list[int]:
        return list(out_shape(j) if j >= 0 and arch.layers[j].kind == "param" else out_shape(j)[1:])

    def extent(j: int, f: int) -> int:
        """Size of axis ``f`` (counted from the end) of input ``j``; 1 where it broadcasts."""
        sh = out_shape(j)
        return sh[f] if -f <= len(sh) else 1

    def describe(j: int) -> str:
        if j < 0:
            return "the input"
        l = arch.layers[j]
        return f"{l.kind} at {l.name!r}" if l.name else f"{l.kind} #{j}"

    def feat_of(j: int) -> int:
        if j >= 0:
            return feat[j]
        return -1 if rank(-1) == 2 or last_axis_input else 1 - rank(-1)

    # the input's feature axis: the last one if the ops reading it work on the last axis (tokens)
    readers = {arch.layers[i].kind for i, ins in enumerate(arch.inputs) if -1 in ins}
    last_axis_input = bool(readers & {"linear", "layernorm", "rmsnorm", "mha", "attention", "mean", "select"}) \
        and not readers & {"conv1d", "conv2d", "batchnorm", "groupnorm", "maxpool", "avgpool", "gap"}

    for i, (l, ins) in enumerate(zip(arch.layers, arch.inputs)):
        k = l.kind
        x = ins[0] if ins else None
        c_in = of(x) if x is not None else None
        f_in = feat_of(x) if x is not None else -1
        if k in ("linear", "conv1d", "conv2d", "batchnorm", "groupnorm", "layernorm", "rmsnorm") and \
                shapes is not None and c_in is not None:
            # Linear and LayerNorm/RMSNorm act on the last axis, Conv/BatchNorm/GroupNorm on axis 1: it must
            # be the axis the input's neurons are on (else the layer mixes or normalizes positions)
            reads = -1 if k in ("linear", "layernorm", "rmsnorm") else 1 - rank(x)
            if f_in != reads or G.size[G.find(c_in)] != l.in_features:
                raise UnsupportedLayerError(
                    f"{k} at {l.name!r} acts on axis {reads} of {describe(x)} {shown(x)}, whose neurons are on "
                    f"axis {f_in}: a layer over positions (token mixing) has no neuron-level symmetry wsnets knows")
        if k in ("linear", "conv1d", "conv2d"):
            out = G.new(l.out_features)
            kern = (None,) * len(l.kernel_size)
            put((l.key("weight"), (out, c_in, *kern)))
            if l.bias:
                put((l.key("bias"), (out,)))
            cls[i], feat[i] = out, (-1 if k == "linear" else 1 - rank(i))
            seen_weight = True
        elif k == "embedding":
            out = G.new(l.out_features)
            put((l.key("weight"), (None, out)))
            cls[i], feat[i] = out, -1
            seen_weight = True
        elif k == "mha":
            D, H, t = l.out_features, l.heads, G.tie()
            qk, v, out = G.new(D), G.new(D), G.new(D)
            G.set_heads(qk, H, t)
            G.set_heads(v, H, t)
            blk = G.new(3 * D, block=[qk, qk, v])
            put((l.key("in_proj_weight"), (blk, c_in)))
            if l.bias:
                put((l.key("in_proj_bias"), (blk,)))
            put((l.key("out_proj.weight"), (out, v)))
            if l.bias:
                put((l.key("out_proj.bias"), (out,)))
            cls[i], feat[i] = out, -1
            seen_weight = True
        elif k == "param":
            a = param_axis(l.shape)
            out = G.new(l.shape[a]) if l.shape else None
            put((l.key(""), tuple(out if d == a else None for d in range(len(l.shape)))))
            cls[i], feat[i] = out, (a - len(l.shape) if l.shape else -1)
        elif k in ("batchnorm", "layernorm", "rmsnorm", "groupnorm"):
            if k == "groupnorm" and c_in is not None:
                G.set_heads(c_in, l.heads, G.tie())
            for suffix in l.param_shapes():
                put((l.key(suffix), (c_in,)))
            cls[i], feat[i] = c_in, f_in
        elif k in ("add", "mul"):
            cs = [(j, of(j), feat_of(j)) for j in ins]
            r = max(rank(j) for j in ins)
            # operands broadcast from the right: feature axes at the same place from the end are one axis;
            # an operand of extent 1 there (a per-sample gate, a scalar branch) is broadcast over it
            with_group = [(j, c, f) for j, c, f in cs if c is not None]
            main = next(((j, c, f) for j, c, f in with_group if G.size[G.find(c)] > 1),
                        with_group[0] if with_group else None)
            if main is not None and shapes is not None:
                for j, c, f in with_group:
                    if (j, c, f) == main:
                        continue
                    e = extent(j, main[2])
                    if f == main[2] and e == G.size[G.find(main[1])]:
                        G.union(main[1], c)
                    elif not (e == 1 and (f == main[2] or G.size[G.find(c)] == 1)):
                        raise UnsupportedLayerError(
                            f"{k} #{i} of {describe(j)} {shown(j)} and {describe(main[0])} {shown(main[0])}: their feature axes do not line up (a tensor over "
                            "positions, not neurons?); wsnets adds and multiplies along the feature axis only")
            elif main is not None:
                for j, c, f in with_group:
                    G.union(main[1], c)
            cls[i] = main[1] if main is not None else None
            feat[i] = main[2] if main is not None and r else -1
        elif k == "concat":
            cs = [of(j) for j in ins]
            if l.dim == f_in and all(c is not None for c in cs):
                cls[i] = G.new(sum(G.size[G.find(c)] for c in cs), block=list(cs))
            else:
                joined = [c for c in cs if c is not None]
                for c in joined[1:]:
                    G.union(joined[0], c)
                cls[i] = joined[0] if joined else None
            feat[i] = f_in
        elif k == "attention":
            q, kk, v = (of(j) for j in ins)
            t = G.tie()
            G.union(q, kk)
            G.set_heads(q, l.heads, t)
            G.set_heads(v, l.heads, t)
            cls[i], feat[i] = v, -1
        elif k == "tokens":
            cls[i], feat[i] = c_in, -1
        elif k in ("mean", "select"):
            if l.dim == f_in and c_in is not None:
                G.fix(c_in)
            cls[i], feat[i] = c_in, (f_in + 1 if l.dim > f_in else f_in)
        elif k == "flatten":
            if not seen_weight and x == -1 and (arch.input_shape is None or len(arch.input_shape) > 1):
                nxt = next((w for w in arch.layers[i:] if w.is_weight), None)
                size = 1
                for s_ in (arch.input_shape or ()):
                    size *= s_
                cls[i] = G.new(size if arch.input_shape else nxt.in_features, fixed=True)
                if input_cls == []:
                    input_cls.append(None)
            else:
                cls[i] = c_in
            feat[i] = -1
        elif k == "gap":
            cls[i], feat[i] = c_in, f_in
        else:  # act, dropout, scale, pools: per neuron or per channel
            cls[i], feat[i] = c_in, f_in
    if cls[-1] is not None:
        G.fix(cls[-1])
    for e in range(len(G.parent)):  # a fixed block fixes its parts; a block with a fixed root stays a block
        r = G.find(e)
        if G.fixed[r] and r in G.block:
            for c in G.block[r]:
                G.fix(c)
    # number the groups by first appearance (chains: input, hidden layers in order, output)
    number: dict[int, int] = {}
    order = [G.find(e) for e in range(len(G.parent))]
    for r in order:
        if r not in number and (G.size[r] > 0):
            number[r] = len(number)

    def num(e):
        return None if e is None else number[G.find(e)]
    sizes = [0] * len(number)
    for r, g in number.items():
        sizes[g] = G.size[r]
    ties: dict[int, int] = {}
    heads = []
    live = [(r, ht) for r, ht in G.heads.items() if r == G.find(r)]   # a merged group's entry moved to its root
    for r, (h, t) in sorted(live, key=lambda kv: number[kv[0]]):
        if not G.fixed[r]:
            heads.append((number[r], h, ties.setdefault(G.tie_find(t), len(ties))))
    return PermutationSpec(
        tuple(sizes), tuple((k, tuple(num(e) for e in ax)) for k, ax in axes),
        tuple(sorted(number[r] for r in number if G.fixed[r])),
        tuple((number[r], tuple(num(c) for c in G.block[r])) for r in sorted(number, key=number.get) if r in G.block),
        tuple(heads), tuple(num(c) for c in cls), tuple(feat))


def param_axis(shape: Sequence[int]) -> int:
    """The feature axis of a free tensor (``param`` layer): its last axis wider than 1 (``[1, T, D]``
    positions: ``D``; a per-channel ``[C, 1, 1]`` scale or bias: ``C``), the last axis if none is."""
    return next((d for d in range(len(shape) - 1, -1, -1) if shape[d] > 1), max(len(shape) - 1, 0))


@lru_cache(maxsize=256)
def permutation_spec(arch: Architecture) -> PermutationSpec:
    """The :class:`PermutationSpec` of an architecture (derived from its DAG; see the module docstring)."""
    return _derive(arch)


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
        n = p.shape[-1]
        if p.dtype.is_floating_point or p.dtype == torch.bool or p.dim() not in (1, 2) or not torch.equal(
                p.sort(dim=-1).values, torch.arange(n, device=p.device).expand(p.shape)):
            raise ConfigError(f"the permutation for group {g} is not a permutation of 0..{n - 1} "
                              f"(an integer tensor [n] or [B, n] holding each index once)")
    _check_heads(spec, d)
    return d


def _check_heads(spec: PermutationSpec, d: Mapping[int, torch.Tensor]) -> None:
    """A head-structured group's permutation must move whole heads, by one head map shared with its tie
    (q/k and v/o of one attention; a group of the tie not given stays put, so its heads do too): any
    other permutation changes the function."""
    maps: dict[int, tuple[int, torch.Tensor]] = {}
    for g, (H, t) in spec.head_structure.items():
        n = spec.group_sizes[g]
        p = d[g].cpu() if g in d else torch.arange(n)   # (compared on the CPU: a tie's groups may sit anywhere)
        heads = p.reshape(*p.shape[:-1], H, n // H) // (n // H)             # old head of each new neuron
        if not torch.equal(heads, heads[..., :1].expand(heads.shape)):
            raise ConfigError(f"the permutation for group {g} splits an attention head ({H} heads of "
                              f"{n // H}): it must move whole heads, and may permute inside each")
        hm = heads[..., 0]
        if t in maps:
            g0, hm0 = maps[t]
            try:
                same = torch.equal(*torch.broadcast_tensors(hm, hm0))
            except RuntimeError:  # batches of different sizes
                same = False
            if not same:
                raise ConfigError(f"groups {g0} and {g} (query/key and value/output of one attention) must move "
                                  "their heads alike: their permutations map heads differently")
        else:
            maps[t] = (g, hm)


def permute(ws, perms: PermLike, *, allow_fixed: bool = False):
    """Apply neuron permutations to a WeightSpace: new neuron ``i`` of group ``g`` is old ``perms[g][i]``.

    ``perms`` is a sequence over hidden groups, or a mapping group -> permutation. A permutation is
    ``[n]`` (shared by the batch) or ``[B, n]`` (one per network of a batched WeightSpace).
    Input/output groups are permuted only with ``allow_fixed=True`` (that changes the function).
    """
    from .weights import WeightSpace
    spec = permutation_spec(ws.arch)
    d = _as_dict(spec, perms, allow_fixed)
    for g, _ in spec.blocks:  # a block axis moves by the direct sum of its parts' permutations
        p = spec.full_perm(g, d)
        if p is not None:
            d[g] = p
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
    """Uniformly random permutations of every hidden group (``[n]``, or ``[B, n]`` if batched); a
    head-structured group gets a random head permutation (shared with its tie) composed with an
    independent random permutation inside each head."""
    spec = permutation_spec(arch)
    B = 1 if batch_size is None else batch_size
    heads = spec.head_structure
    tie_perm: dict[int, torch.Tensor] = {}
    out = {}
    for g in spec.hidden:
        n = spec.group_sizes[g]
        if g in heads:
            H, t = heads[g]
            d = n // H
            if t not in tie_perm:
                tie_perm[t] = torch.rand(B, H, generator=generator).argsort(dim=1)
            inner = torch.rand(B, H, d, generator=generator).argsort(dim=2)
            p = (tie_perm[t].unsqueeze(2) * d + inner).reshape(B, n)   # new (h, i) <- old (pi[h], sigma_h[i])
        else:
            p = torch.rand(B, n, generator=generator).argsort(dim=1)
        out[g] = p[0] if batch_size is None else p
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
    if not ws.arch.is_chain:
        raise UnsupportedLayerError("fold_batchnorm() folds sequential networks; a DAG keeps BatchNorm as is")
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
