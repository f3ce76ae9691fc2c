"""Batched forward pass of many networks of one architecture: the engine of :mod:`wsnets.merge`.

Interpolation curves, soups, Bezier training and BatchNorm recomputation all evaluate many weight
vectors of one architecture on the same data. :func:`forward` runs a batched
:class:`~wsnets.WeightSpace` (``B`` networks) on a batch of inputs in one computation through
:func:`wsnets.functional.forward` (the zoo trainer's engine): Linear layers as batched matrix
products, convolutions as one grouped convolution (``groups=B``), normalization per network. It
matches ``ws[i].to_module()`` (eval mode) to float rounding, and in ``bn="batch"`` mode it matches
``module.train()`` BatchNorm (normalize by the batch mean and biased variance) and reports the
statistics that ``torch.optim.swa_utils.update_bn`` accumulates.
"""

from __future__ import annotations

from typing import Iterable, Literal

import torch
import torch.nn.functional as F

from ..errors import ConfigError, ShapeMismatchError
from ..functional import forward as _forward
from ..weights import WeightSpace

BNMode = Literal["running", "batch"]


def forward(ws: WeightSpace, x: torch.Tensor, *, per_network: bool = False, bn: BNMode = "running",
            train: bool = False,
            stats: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
            activations: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Outputs of every network of ``ws`` on ``x`` (:func:`wsnets.functional.forward` on a WeightSpace).

    Parameters
    ----------
    ws : WeightSpace, batched (``B`` networks; a single network is treated as ``B = 1``).
    x : ``[N, *input]`` shared by all networks, or ``[B, N, *input]`` (one batch per network) with
        ``per_network=True``.
    bn : ``"running"`` normalizes with the stored running statistics (eval mode); ``"batch"``
        normalizes with the batch's mean and biased variance (train mode), running statistics untouched.
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
    if bn not in ("running", "batch"):
        raise ValueError(f"bn must be 'running' or 'batch', not {bn!r}")
    ws = ws.batched()
    B = ws.batch_size
    if per_network and x.shape[0] != B:
        raise ShapeMismatchError(f"per-network inputs have {x.shape[0]} batches for {B} networks")
    # a shared batch stays [N, ...]: wsnets.functional runs it once up to the first weight layer
    return _forward(ws.arch, ws.params, x.to(ws.dtype), train=train, bn=bn, bn_stats=stats, activations=activations)


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
    batches : an iterable of input batches ``[n, *input]``, or of ``(input, target, ...)`` pairs of which the
        input is used (a DataLoader, as ``update_bn`` takes it), or one tensor ``[N, *input]`` split into
        chunks of ``batch_size``.

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
        for i, xb in enumerate(batches):
            xb = bn_input(xb, i)
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


def bn_input(batch, i: int) -> torch.Tensor:
    """The input of data batch ``i``: the tensor itself, or the first item of an ``(input, target, ...)`` pair
    (as ``torch.optim.swa_utils.update_bn`` reads a DataLoader)."""
    if isinstance(batch, (list, tuple)) and batch:
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise ConfigError(f"bn_data batch {i} is a {type(batch).__name__}; give input tensors or (input, target) "
                          "pairs (a DataLoader)")
    return batch


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
