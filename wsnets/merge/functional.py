"""Batched forward pass of many networks of one architecture: the engine of :mod:`wsnets.merge`.

Interpolation curves, soups, Bezier training and BatchNorm recomputation all evaluate many weight
vectors of one architecture on the same data. :func:`forward` runs a batched
:class:`~wsnets.WeightSpace` (``B`` networks) on a batch of inputs in one computation: Linear
layers as one ``einsum``, convolutions as one grouped convolution (``groups=B``), normalization
per network. It matches ``ws[i].to_module()`` (eval mode) to float rounding, and in
``bn="batch"`` mode it matches ``module.train()`` BatchNorm (normalize by the batch mean and biased
variance) and reports the statistics that ``torch.optim.swa_utils.update_bn`` accumulates.
"""

from __future__ import annotations

from typing import Iterable, Literal

import torch
import torch.nn.functional as F

from ..arch import Layer
from ..errors import ShapeMismatchError, UnsupportedLayerError
from ..weights import WeightSpace

BNMode = Literal["running", "batch"]

_ACTS = {"identity": lambda h, l: h, "relu": lambda h, l: F.relu(h), "gelu": lambda h, l: F.gelu(h),
         "tanh": lambda h, l: torch.tanh(h), "sigmoid": lambda h, l: torch.sigmoid(h),
         "leaky_relu": lambda h, l: F.leaky_relu(h, l.slope), "elu": lambda h, l: F.elu(h),
         "silu": lambda h, l: F.silu(h), "softplus": lambda h, l: F.softplus(h)}


def _per_channel(t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``[B, C]`` -> broadcastable against ``h`` of shape ``[B, N, C, *S]``."""
    return t.reshape(t.shape[0], 1, t.shape[1], *([1] * (h.dim() - 3)))


def _conv(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, l: Layer) -> torch.Tensor:
    """Grouped convolution of ``B`` networks at once: ``h [B, N, C, *S]``, ``w [B, O, C, *k]``."""
    B, N = h.shape[:2]
    x = h.transpose(0, 1).reshape(N, B * h.shape[2], *h.shape[3:])
    conv = F.conv1d if l.kind == "conv1d" else F.conv2d
    y = conv(x, w.reshape(B * w.shape[1], *w.shape[2:]), None if b is None else b.reshape(-1),
             stride=l.stride, padding=l.padding, dilation=l.dilation, groups=B)
    return y.reshape(N, B, w.shape[1], *y.shape[2:]).transpose(0, 1)


def _pool(h: torch.Tensor, l: Layer) -> torch.Tensor:
    B, N = h.shape[:2]
    x = h.reshape(B * N, *h.shape[2:])
    fn = {("maxpool", 1): F.max_pool1d, ("maxpool", 2): F.max_pool2d,
          ("avgpool", 1): F.avg_pool1d, ("avgpool", 2): F.avg_pool2d}[(l.kind, x.dim() - 2)]
    y = fn(x, l.kernel_size, stride=l.stride or l.kernel_size, padding=l.padding)
    return y.reshape(B, N, *y.shape[1:])


def forward(ws: WeightSpace, x: torch.Tensor, *, per_network: bool = False, bn: BNMode = "running",
            train: bool = False,
            stats: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
            activations: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Outputs of every network of ``ws`` on ``x``.

    Parameters
    ----------
    ws : WeightSpace, batched (``B`` networks; a single network is treated as ``B = 1``).
    x : ``[N, *input]`` shared by all networks, or ``[B, N, *input]`` (one batch per network) with
        ``per_network=True``.
    bn : ``"running"`` normalizes with the stored running statistics (eval mode); ``"batch"``
        normalizes with the batch's mean and biased variance (train mode).
    train : apply dropout (as ``module.train()``).
    stats : if a dict is given with ``bn="batch"``, it receives BatchNorm name ->
        (batch mean ``[B, C]``, unbiased batch variance ``[B, C]``), as ``nn.BatchNorm`` uses them
        to update its running statistics.
    activations : if a dict is given, it receives hidden group ``g`` -> the group's output right
        before the next weight layer, ``[B, N, C, *S]`` (after activation, before global pooling).

    Returns
    -------
    torch.Tensor ``[B, N, out]`` (logits).
    """
    ws = ws.batched()
    B = ws.batch_size
    if per_network and x.shape[0] != B:
        raise ShapeMismatchError(f"per-network inputs have {x.shape[0]} batches for {B} networks")
    h = (x if per_network else x.unsqueeze(0).expand(B, *x.shape)).to(ws.dtype)
    p = ws.params
    groups = ws.arch.layer_group
    last_group = ws.arch.num_groups - 1
    for l, g in zip(ws.arch.layers, groups):
        if l.kind == "linear":
            if h.dim() != 3:
                raise ShapeMismatchError(f"linear at {l.name!r} got a {h.dim() - 2}-d feature map; flatten first")
            h = torch.einsum("bni,boi->bno", h, p[f"{l.name}.weight"])
            if l.bias:
                h = h + p[f"{l.name}.bias"].unsqueeze(1)
        elif l.kind in ("conv1d", "conv2d"):
            h = _conv(h, p[f"{l.name}.weight"], p.get(f"{l.name}.bias") if l.bias else None, l)
        elif l.kind == "batchnorm":
            h = _batchnorm(h, p, l, bn, stats)
        elif l.kind == "layernorm":
            if h.dim() != 3:
                raise UnsupportedLayerError(f"layernorm at {l.name!r} over a feature map is not supported")
            h = F.layer_norm(h, (h.shape[-1],), eps=l.eps)
            if l.affine:
                h = h * p[f"{l.name}.weight"].unsqueeze(1) + p[f"{l.name}.bias"].unsqueeze(1)
        elif l.kind == "act":
            h = _ACTS[l.fn](h, l)
        elif l.kind == "dropout":
            h = F.dropout(h, l.p, training=train) if l.p > 0 else h
        elif l.kind in ("maxpool", "avgpool"):
            h = _pool(h, l)
        elif l.kind == "gap":
            h = h.flatten(3).mean(-1, keepdim=True).reshape(*h.shape[:3], *([1] * (h.dim() - 3)))
        elif l.kind == "flatten":
            h = h.flatten(2)
        if activations is not None and 0 < g < last_group and l.kind not in ("gap", "flatten", "dropout"):
            activations[g] = h
    return h


def _batchnorm(h: torch.Tensor, p: dict[str, torch.Tensor], l: Layer, bn: BNMode,
               stats: dict[str, tuple[torch.Tensor, torch.Tensor]] | None) -> torch.Tensor:
    if bn == "running":
        mean, var = p[f"{l.name}.running_mean"], p[f"{l.name}.running_var"]
        h = (h - _per_channel(mean, h)) * _per_channel((var + l.eps).rsqrt(), h)
    elif bn == "batch":
        dims = [1] + list(range(3, h.dim()))
        n = h.numel() // (h.shape[0] * h.shape[2])
        if n < 2:
            raise ShapeMismatchError(f"batchnorm at {l.name!r} needs more than one value per channel in a batch")
        var, mean = torch.var_mean(h, dim=dims, correction=0)
        if stats is not None:
            stats[l.name] = (mean.detach(), var.detach() * n / (n - 1))
        h = (h - _per_channel(mean, h)) * _per_channel((var + l.eps).rsqrt(), h)
    else:
        raise ValueError(f"bn must be 'running' or 'batch', not {bn!r}")
    if l.affine:
        h = h * _per_channel(p[f"{l.name}.weight"], h) + _per_channel(p[f"{l.name}.bias"], h)
    return h


def has_batchnorm(ws: WeightSpace) -> bool:
    return any(l.kind == "batchnorm" for l in ws.arch.layers)


def recompute_bn(ws: WeightSpace, batches: Iterable[torch.Tensor] | torch.Tensor, *,
                 batch_size: int = 256) -> WeightSpace:
    """Reset and recompute every BatchNorm's running statistics on data, for all ``B`` networks at once.

    Equal to ``torch.optim.swa_utils.update_bn`` on each network: running mean/var become the
    cumulative average over data batches of the batch mean and *unbiased* batch variance, computed
    with the network in train mode (each BatchNorm normalizes by its batch statistics).

    Parameters
    ----------
    ws : WeightSpace (single or batched).
    batches : an iterable of input batches ``[n, *input]`` (e.g. a DataLoader's inputs), or one tensor
        ``[N, *input]`` split into chunks of ``batch_size``.

    Returns
    -------
    WeightSpace with the same batch layout and updated ``running_mean``/``running_var``.
    """
    if not has_batchnorm(ws):
        return ws
    if isinstance(batches, torch.Tensor):
        batches = batches.split(batch_size)
    sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    count = 0
    with torch.no_grad():
        for xb in batches:
            stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            forward(ws, xb.to(ws.device), bn="batch", stats=stats)
            count += 1
            for k, (m, v) in stats.items():  # cumulative moving average, as momentum=None does
                if k not in sums:
                    sums[k] = (m, v)
                else:
                    om, ov = sums[k]
                    sums[k] = (om + (m - om) / count, ov + (v - ov) / count)
    if count == 0:
        raise ShapeMismatchError("recompute_bn got no data batches")
    params = dict(ws.params)
    single = ws.batch_size is None
    for name, (m, v) in sums.items():
        params[f"{name}.running_mean"] = m[0] if single else m
        params[f"{name}.running_var"] = v[0] if single else v
    return WeightSpace(ws.arch, params, ws.batch_size, check=False)


def evaluate(ws: WeightSpace, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1024,
             bn: BNMode = "running") -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy loss and accuracy of every network on ``(x, y)``: two tensors ``[B]`` (``[]`` if single).

    ``y`` holds class indices ``[N]``. Evaluated in chunks of ``batch_size`` examples.
    """
    wb = ws.batched()
    loss = torch.zeros(wb.batch_size, device=ws.device, dtype=torch.float64)
    correct = torch.zeros(wb.batch_size, device=ws.device, dtype=torch.float64)
    with torch.no_grad():
        for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
            xb, yb = xb.to(ws.device), yb.to(ws.device)
            logits = forward(wb, xb, bn=bn)  # [B, n, C]
            ce = F.cross_entropy(logits.transpose(1, 2), yb.unsqueeze(0).expand(wb.batch_size, -1), reduction="none")
            loss += ce.sum(1).double()
            correct += (logits.argmax(-1) == yb).sum(1).double()
    loss, acc = loss / len(y), correct / len(y)
    return (loss[0], acc[0]) if ws.batch_size is None else (loss, acc)
