"""Conversions between ``nn.Module``s, bare state_dicts and :class:`~wsnets.arch.Architecture`.

* :func:`arch_from_module` traces the module (:mod:`wsnets.trace`; a sequential network is the
  simplest case) and names every unsupported layer or op, e.g. ``LSTM at 'rnn'``.
* :func:`arch_from_state_dict` infers a sequential MLP from keys and shapes alone, never guessing:
  layers in the natural order of their keys (``'2'`` before ``'10'``), 2-d weights Linear, 1-d
  weights with running statistics BatchNorm, without LayerNorm; the activation is not stored in a
  state_dict, so it is an argument (default ReLU). What keys and shapes do not determine is refused
  with a message saying how to give the architecture (:data:`HOW_TO_GIVE`): a convolution (padding,
  stride, pooling), and any key layout other than an ``nn.Sequential``'s (skip connections,
  attention, embeddings).
* :func:`build_module` makes a runnable module for an architecture: an ``nn.Sequential`` for a chain,
  a :class:`DagModule` (real ``nn.Linear``/``nn.Conv2d``... under the original names, run by
  :func:`wsnets.functional.forward`) for a DAG.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .arch import Architecture, Layer, _name
from .errors import ShapeMismatchError, UnsupportedLayerError

_SKIP_KEYS = ("num_batches_tracked",)


def arch_from_module(module: nn.Module, input_shape: tuple[int, ...] | None = None) -> Architecture:
    """Architecture of ``module``: traced by :func:`wsnets.trace.trace` (the one path for every module)."""
    from .trace import trace
    return trace(module, input_shape)


def _mlp_input(layers: list[Layer]) -> tuple[int, ...] | None:
    """``(in_features,)`` for a network that starts with a Linear layer (as :func:`wsnets.arch.mlp` records)."""
    first = next((l for l in layers if l.is_weight or l.kind == "flatten"), None)
    return (first.in_features,) if first is not None and first.kind == "linear" else None


HOW_TO_GIVE = ("give the architecture: the module (wsnets.load(path, module=MyNet())), --module file.py:Class, "
               "or --arch arch.json")


def natural_key(prefix: str) -> tuple:
    """Sort key of a layer prefix by its numeric structure: ``'2'`` before ``'10'``, ``'net.2'`` before
    ``'net.10'`` (safetensors files store keys alphabetically, so file order means nothing)."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in prefix.split("."))


def _sequential_prefixes(prefixes: list[str]) -> str | None:
    """None if the prefixes look like one (possibly nested) ``nn.Sequential``, else the first that does not."""
    for p in prefixes:
        parts = p.split(".")
        i = next((k for k, x in enumerate(parts) if x.isdigit()), None)
        if i is None or not all(x.isdigit() for x in parts[i:]):
            return p
    heads = {".".join(x for x in p.split(".") if not x.isdigit()) for p in prefixes}
    if len(heads) > 1:
        return sorted(prefixes, key=natural_key)[-1]
    return None


def arch_from_state_dict(sd: Mapping[str, torch.Tensor], activation: str = "relu",
                         input_shape: tuple[int, ...] | None = None) -> Architecture:
    """Infer a sequential MLP from a bare state_dict, or refuse (see module docstring).

    Layers are ordered by the numeric structure of their keys (natural order), never by file order.
    Only what keys and shapes determine is accepted: Linear layers (2-d weights) with BatchNorm (1-d
    weight and running statistics) or LayerNorm (1-d weight, no statistics) between them, under the
    keys of an ``nn.Sequential``. A convolution (its padding, stride and pooling are not stored), a
    non-sequential key layout (a skip connection, attention, embeddings cannot be seen in keys) or
    tensors of another kind are refused with a message saying how to give the architecture.
    """
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf in _SKIP_KEYS:
            continue
        groups.setdefault(prefix, {})[leaf] = t
    order = sorted(groups, key=natural_key)
    groups = {p: groups[p] for p in order}
    for prefix, g in groups.items():
        w = g.get("weight")
        if w is not None and w.dim() in (3, 4):
            raise UnsupportedLayerError(
                f"layer {prefix!r} is a convolution: its padding, stride and pooling are not in a state_dict; "
                + HOW_TO_GIVE)
        unknown = set(g) - {"weight", "bias", "running_mean", "running_var"}
        if unknown:
            raise UnsupportedLayerError(f"unsupported layer at {prefix!r}: unexpected tensors {sorted(unknown)}; "
                                        + HOW_TO_GIVE)
    odd = _sequential_prefixes(order)
    if odd is not None:
        raise UnsupportedLayerError(
            f"keys like {odd!r} are not those of an nn.Sequential: skip connections, attention or embeddings "
            f"cannot be read from keys and shapes; " + HOW_TO_GIVE)
    layers: list[Layer] = []
    act = [] if activation == "identity" else [Layer("act", fn=activation)]
    weight_layers = [p for p, g in groups.items() if "weight" in g and g["weight"].dim() >= 2]
    for prefix, g in groups.items():
        w = g.get("weight")
        if w is None:
            if "running_mean" in g:  # BatchNorm without affine parameters
                n = g["running_mean"].shape[0]
                layers.append(Layer("batchnorm", prefix, n, n, affine=False))
                continue
            raise UnsupportedLayerError(f"unsupported layer at {prefix!r}: bias without weight")
        if w.dim() == 2:
            layers.append(Layer("linear", prefix, w.shape[1], w.shape[0], bias="bias" in g))
        elif w.dim() == 1:
            n = w.shape[0]
            if "running_mean" in g:
                layers.append(Layer("batchnorm", prefix, n, n, dims=0))
            else:
                layers.append(Layer("layernorm", prefix, n, n))
        else:
            raise UnsupportedLayerError(f"unsupported layer at {prefix!r}: {w.dim()}-d weight {tuple(w.shape)}")
        if weight_layers and prefix != weight_layers[-1] and (w.dim() == 1 or _next_is_weight(groups, prefix)):
            layers += act
    if not weight_layers:
        raise UnsupportedLayerError("state_dict holds no Linear or Conv weight")
    return Architecture(tuple(layers), input_shape or _mlp_input(layers))


def _next_is_weight(groups, prefix) -> bool:
    keys = list(groups)
    i = keys.index(prefix)
    if i + 1 >= len(keys):
        return False
    nxt = groups[keys[i + 1]].get("weight")
    return nxt is not None and nxt.dim() >= 2


_ACT_BUILD = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "elu": nn.ELU,
              "silu": nn.SiLU, "softplus": nn.Softplus, "identity": nn.Identity}


def build_layer(l: Layer) -> nn.Module:
    """A fresh ``nn.Module`` for one layer description."""
    if l.kind == "linear":
        return nn.Linear(l.in_features, l.out_features, bias=l.bias)
    if l.kind in ("conv1d", "conv2d"):
        cls = nn.Conv1d if l.kind == "conv1d" else nn.Conv2d
        return cls(l.in_features, l.out_features, l.kernel_size, stride=l.stride or 1, padding=l.padding or 0,
                   dilation=l.dilation or 1, bias=l.bias)
    if l.kind == "batchnorm":
        cls = nn.BatchNorm2d if l.dims == 2 else nn.BatchNorm1d
        return cls(l.out_features, eps=l.eps, momentum=l.momentum, affine=l.affine)
    if l.kind == "layernorm":
        return nn.LayerNorm(l.out_features, eps=l.eps, elementwise_affine=l.affine, bias=l.bias)
    if l.kind == "act":
        return nn.LeakyReLU(l.slope) if l.fn == "leaky_relu" else _ACT_BUILD[l.fn]()
    if l.kind == "dropout":
        return nn.Dropout(l.p)
    if l.kind == "gap":
        return nn.AdaptiveAvgPool1d(1) if l.dims == 1 else nn.AdaptiveAvgPool2d(1)
    if l.kind in ("maxpool", "avgpool"):
        cls = {("maxpool", 1): nn.MaxPool1d, ("maxpool", 2): nn.MaxPool2d,
               ("avgpool", 1): nn.AvgPool1d, ("avgpool", 2): nn.AvgPool2d}[(l.kind, l.dims)]
        return cls(l.kernel_size, stride=l.stride or None, padding=l.padding or 0)
    if l.kind == "flatten":
        return nn.Flatten()
    if l.kind == "embedding":
        return nn.Embedding(l.in_features, l.out_features)
    if l.kind == "mha":
        return nn.MultiheadAttention(l.out_features, l.heads, bias=l.bias, batch_first=True)
    if l.kind == "groupnorm":
        return nn.GroupNorm(l.heads, l.out_features, eps=l.eps, affine=l.affine)
    if l.kind == "rmsnorm":
        return nn.RMSNorm(l.out_features, eps=l.eps or None, elementwise_affine=l.affine)
    raise UnsupportedLayerError(f"cannot build layer {l!r}")  # pragma: no cover - Layer validates kinds


def build_module(arch: Architecture) -> nn.Module:
    """A chain: a flat ``nn.Sequential`` whose child ``i`` is layer ``i``; a DAG: a :class:`DagModule`
    (parameters uninitialized-random)."""
    if not arch.is_chain:
        return DagModule(arch)
    return nn.Sequential(*[build_layer(l) for l in arch.layers])


class DagModule(nn.Module):
    """A DAG architecture as an ``nn.Module``: its weight layers are real modules under their original
    names (``state_dict()`` has the original keys), its forward is :func:`wsnets.functional.forward` on
    ``K = 1`` views of them (so training mode updates BatchNorm statistics in place)."""

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.arch = arch
        for l in sorted((l for l in arch.layers if l.has_params), key=lambda l: l.name.count(".")):
            *path, leaf = l.name.split(".")
            parent = self
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            if l.kind == "param":
                parent.register_parameter(leaf, nn.Parameter(torch.randn(l.shape) * 0.02))
            else:
                parent.add_module(leaf, build_layer(l))
        self._keys = tuple(arch.param_shapes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .functional import forward
        state = dict(self.named_parameters())
        state.update(self.named_buffers())
        params = {k: state[k].unsqueeze(0) for k in self._keys}
        return forward(self.arch, params, x, train=self.training)[0]

    def extra_repr(self) -> str:
        return self.arch.describe()


def canonical(arch: Architecture) -> Architecture:
    """The same architecture with layers named by position (the names :func:`build_module` uses); a DAG
    keeps its names (its module uses them)."""
    if not arch.is_chain:
        return arch
    return Architecture(_name(arch.layers), arch.input_shape)
