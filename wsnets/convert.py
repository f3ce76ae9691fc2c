"""Conversions between ``nn.Module``s, bare state_dicts and :class:`~wsnets.arch.Architecture`.

* :func:`arch_from_module` walks a module's leaves in order (``nn.Sequential`` nesting, or custom
  containers whose ``forward`` applies their children in registration order, checked on a random
  input) and names every unsupported leaf, e.g. ``LSTM at 'rnn'``.
* :func:`arch_from_state_dict` infers a sequential MLP/CNN from key order and shapes alone: 2-d
  weights are Linear, 3-d Conv1d, 4-d Conv2d; 1-d weights with running statistics BatchNorm, without
  LayerNorm. The activation is not stored in a state_dict, so it is an argument (default ReLU);
  convolutions default to stride 1 and "same" padding. A Linear whose input count equals the
  preceding conv's channel count is read as global average pooling + flatten between them.
* :func:`build_module` makes a runnable ``nn.Sequential`` for an architecture.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

import torch
from torch import nn

from .arch import Architecture, Layer, _name
from .errors import ShapeMismatchError, UnsupportedLayerError

_ACT_MODULES = {
    nn.ReLU: "relu", nn.GELU: "gelu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.LeakyReLU: "leaky_relu",
    nn.ELU: "elu", nn.SiLU: "silu", nn.Softplus: "softplus", nn.Identity: "identity",
}
_SKIP_KEYS = ("num_batches_tracked",)


def _tup(v, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * n


def _layer_from_module(name: str, m: nn.Module) -> Layer | None:
    where = f"{type(m).__name__} at {name!r}"
    if isinstance(m, nn.Linear):
        return Layer("linear", name, m.in_features, m.out_features, bias=m.bias is not None)
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        d = 1 if isinstance(m, nn.Conv1d) else 2
        if m.groups != 1:
            raise UnsupportedLayerError(f"{where}: grouped convolution (groups={m.groups})")
        if isinstance(m.padding, str):
            if m.padding == "same" and all(k % 2 == 1 for k in m.kernel_size):
                pad = tuple((k - 1) * dl // 2 for k, dl in zip(m.kernel_size, m.dilation))
            elif m.padding == "valid":
                pad = (0,) * d
            else:
                raise UnsupportedLayerError(f"{where}: padding={m.padding!r} with an even kernel")
        else:
            pad = _tup(m.padding, d)
        if m.padding_mode != "zeros":
            raise UnsupportedLayerError(f"{where}: padding_mode={m.padding_mode!r}")
        return Layer(f"conv{d}d", name, m.in_channels, m.out_channels, kernel_size=_tup(m.kernel_size, d),
                     stride=_tup(m.stride, d), padding=pad, dilation=_tup(m.dilation, d), bias=m.bias is not None, dims=d)
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if not m.track_running_stats:
            raise UnsupportedLayerError(f"{where}: track_running_stats=False (no eval-mode statistics)")
        return Layer("batchnorm", name, m.num_features, m.num_features, affine=m.affine, eps=m.eps,
                     momentum=m.momentum,
                     dims=2 if isinstance(m, nn.BatchNorm2d) else 0)
    if isinstance(m, nn.LayerNorm):
        if len(m.normalized_shape) != 1:
            raise UnsupportedLayerError(f"{where}: normalized_shape={tuple(m.normalized_shape)} (only the last dim)")
        return Layer("layernorm", name, m.normalized_shape[0], m.normalized_shape[0],
                     affine=m.elementwise_affine, eps=m.eps)
    for cls, fn in _ACT_MODULES.items():
        if type(m) is cls:
            return Layer("act", fn=fn, slope=m.negative_slope if isinstance(m, nn.LeakyReLU) else 0.01)
    if isinstance(m, (nn.Dropout, nn.Dropout1d, nn.Dropout2d)):
        return Layer("dropout", p=float(m.p))
    if isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
        d = 1 if isinstance(m, nn.AdaptiveAvgPool1d) else 2
        if any(s != 1 for s in _tup(m.output_size, d)):
            raise UnsupportedLayerError(f"{where}: output_size={m.output_size} (only global pooling to 1)")
        return Layer("gap", dims=d)
    if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d)):
        d = 1 if isinstance(m, (nn.MaxPool1d, nn.AvgPool1d)) else 2
        kind = "maxpool" if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d)) else "avgpool"
        k = _tup(m.kernel_size, d)
        return Layer(kind, kernel_size=k, stride=_tup(m.stride or k, d), padding=_tup(m.padding, d), dims=d)
    if isinstance(m, nn.Flatten):
        return Layer("flatten")
    raise UnsupportedLayerError(f"unsupported layer {where}")


def _leaves(module: nn.Module, prefix: str = ""):
    children = list(module.named_children())
    if not children:
        yield prefix, module, False
        return
    custom = not isinstance(module, nn.Sequential)
    for name, child in children:
        for item in _leaves(child, f"{prefix}.{name}" if prefix else name):
            yield item[0], item[1], item[2] or custom


def arch_from_module(module: nn.Module, input_shape: tuple[int, ...] | None = None) -> tuple[Architecture, bool]:
    """Architecture of ``module`` and whether a custom container was involved (forward unverified)."""
    if isinstance(module, (nn.RNNBase, nn.MultiheadAttention, nn.Transformer)):
        raise UnsupportedLayerError(f"unsupported layer {type(module).__name__} at ''")
    layers, custom = [], False
    for name, leaf, in_custom in _leaves(module):
        if not name:  # the module itself is a leaf
            name = type(leaf).__name__.lower()
        layer = _layer_from_module(name, leaf)
        custom |= in_custom
        if layer is not None:
            layers.append(layer)
    layers = _insert_pooling(layers)
    return Architecture(tuple(layers), input_shape or _mlp_input(layers)), custom


def _mlp_input(layers: list[Layer]) -> tuple[int, ...] | None:
    """``(in_features,)`` for a network that starts with a Linear layer (as :func:`wsnets.arch.mlp` records)."""
    first = next((l for l in layers if l.is_weight or l.kind == "flatten"), None)
    return (first.in_features,) if first is not None and first.kind == "linear" else None


def _insert_pooling(layers: list[Layer]) -> list[Layer]:
    """A Linear right after a conv stack whose input count equals the channel count reads pooled channels
    (global average pooling + flatten are inserted). Anything else is left for validation to reject."""
    out: list[Layer] = []
    conv: Layer | None = None
    for l in layers:
        if l.kind in ("conv1d", "conv2d"):
            conv = l
        elif l.kind in ("gap", "flatten"):
            conv = None
        elif l.kind == "linear" and conv is not None:
            if l.in_features == conv.out_features:
                out += [Layer("gap", dims=conv.dims), Layer("flatten")]
            conv = None
        out.append(l)
    return out


def arch_from_state_dict(sd: Mapping[str, torch.Tensor], activation: str = "relu",
                         input_shape: tuple[int, ...] | None = None) -> Architecture:
    """Infer a sequential MLP/CNN from a bare state_dict (see module docstring for the rules)."""
    groups: "OrderedDict[str, dict[str, torch.Tensor]]" = OrderedDict()
    for key, t in sd.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf in _SKIP_KEYS:
            continue
        groups.setdefault(prefix, {})[leaf] = t
    layers: list[Layer] = []
    act = [] if activation == "identity" else [Layer("act", fn=activation)]
    weight_layers = [p for p, g in groups.items() if "weight" in g and g["weight"].dim() >= 2]
    for prefix, g in groups.items():
        w = g.get("weight")
        where = f"layer {prefix!r}"
        unknown = set(g) - {"weight", "bias", "running_mean", "running_var"}
        if unknown:
            raise UnsupportedLayerError(f"unsupported layer at {prefix!r}: unexpected tensors {sorted(unknown)}")
        if w is None:
            if "running_mean" in g:  # BatchNorm without affine parameters
                n = g["running_mean"].shape[0]
                layers.append(Layer("batchnorm", prefix, n, n, affine=False))
                continue
            raise UnsupportedLayerError(f"unsupported layer at {prefix!r}: bias without weight")
        if w.dim() == 2:
            layers.append(Layer("linear", prefix, w.shape[1], w.shape[0], bias="bias" in g))
        elif w.dim() in (3, 4):
            d = w.dim() - 2
            k = tuple(w.shape[2:])
            layers.append(Layer(f"conv{d}d", prefix, w.shape[1], w.shape[0], kernel_size=k, stride=(1,) * d,
                                padding=tuple(x // 2 for x in k), dilation=(1,) * d, bias="bias" in g, dims=d))
        elif w.dim() == 1:
            n = w.shape[0]
            if "running_mean" in g:
                prev_conv = next((l for l in reversed(layers) if l.is_weight), None)
                dims = prev_conv.dims if prev_conv is not None and prev_conv.kind != "linear" else 0
                layers.append(Layer("batchnorm", prefix, n, n, dims=dims))
            else:
                layers.append(Layer("layernorm", prefix, n, n))
        else:
            raise UnsupportedLayerError(f"unsupported layer at {prefix!r}: {w.dim()}-d weight {tuple(w.shape)}")
        if prefix != weight_layers[-1] and (w.dim() == 1 or _next_is_weight(groups, prefix)):
            layers += act
    if not weight_layers:
        raise UnsupportedLayerError("state_dict holds no Linear or Conv weight")
    layers = _insert_pooling(layers)
    for i in range(1, len(layers)):
        a, b = layers[i - 1], layers[i]
        if a.kind == "linear" and b.kind in ("conv1d", "conv2d"):
            raise ShapeMismatchError(f"layer {b.name!r} is a convolution after dense layer {a.name!r}")
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
        return nn.LayerNorm(l.out_features, eps=l.eps, elementwise_affine=l.affine)
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
    raise UnsupportedLayerError(f"cannot build layer {l!r}")  # pragma: no cover - Layer validates kinds


def build_module(arch: Architecture) -> nn.Sequential:
    """A flat ``nn.Sequential`` whose child ``i`` is layer ``i`` (parameters uninitialized-random)."""
    return nn.Sequential(*[build_layer(l) for l in arch.layers])


def canonical(arch: Architecture) -> Architecture:
    """The same architecture with layers named by position (the names :func:`build_module` uses)."""
    return Architecture(_name(arch.layers), arch.input_shape)
