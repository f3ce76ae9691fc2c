"""Loss and accuracy along paths between two networks, and the loss barrier.

The straight line ``theta(t) = (1 - t) theta_A + t theta_B`` is evaluated at all ``t`` at once (the
points form one batched WeightSpace). BatchNorm statistics of an interpolated network are not the
interpolation of the endpoints' statistics, so for models with BatchNorm they are recomputed at
every point on training inputs (``bn_data``), as Ainsworth et al. 2023 and Garipov et al. 2018 do;
LayerNorm-only and normalization-free models need no data.

Loss barrier (Frankle et al. 2020; Ainsworth et al. 2023):
``B = max_t L(theta(t)) - [(1 - t) L(theta_A) + t L(theta_B)]``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

import torch

from ..errors import ConfigError
from ..weights import WeightSpace
from .compat import ModelLike, pair
from .functional import evaluate, has_batchnorm, recompute_bn


@dataclass
class Curve:
    """Metrics along a path; each list has one entry per ``t``.

    ``loss`` is mean cross-entropy (nats), ``acc`` accuracy in [0, 1]; ``barrier`` the loss barrier
    and ``acc_barrier`` the largest drop of accuracy below the line between the endpoints' accuracies.
    """

    t: list[float]
    loss: list[float]
    acc: list[float]
    barrier: float
    acc_barrier: float

    def to_dict(self) -> dict:
        return asdict(self)


def interpolate(a: ModelLike, b: ModelLike, ts: torch.Tensor | Iterable[float]) -> WeightSpace:
    """Points ``(1 - t) a + t b`` on the line, one per ``t``: a batched WeightSpace ``[T, ...]``.

    Every tensor is interpolated (running statistics too; recompute them with
    :func:`wsnets.merge.functional.recompute_bn`).
    """
    wa, wb = pair(a, b)
    t = torch.as_tensor(list(ts) if not isinstance(ts, torch.Tensor) else ts, dtype=wa.dtype, device=wa.device)
    params = {k: torch.lerp(wa.params[k].unsqueeze(0).expand(len(t), *wa.params[k].shape),
                            wb.params[k].unsqueeze(0).expand(len(t), *wb.params[k].shape),
                            t.reshape(-1, *([1] * wa.params[k].dim())))
              for k in wa.params}
    return WeightSpace(wa.arch, params, len(t), check=False)


def barrier(values: torch.Tensor | list[float], ts: torch.Tensor | list[float]) -> float:
    """``max_t v(t) - [(1 - t) v(0) + t v(1)]`` for values sampled at ``ts`` (first and last are the endpoints).

    Zero when the curve never rises above the chord between its endpoints (the chord itself counts,
    so the barrier is never negative).
    """
    v = torch.as_tensor(values, dtype=torch.float64)
    t = torch.as_tensor(ts, dtype=torch.float64)
    t = (t - t[0]) / (t[-1] - t[0])
    chord = v[0] + t * (v[-1] - v[0])  # exact when v(0) == v(1)
    return float((v - chord).max().clamp(min=0))


def path_metrics(points: WeightSpace, ts: torch.Tensor | list[float], x: torch.Tensor, y: torch.Tensor, *,
                 bn_data: torch.Tensor | Iterable[torch.Tensor] | None = None, batch_size: int = 1024) -> Curve:
    """Loss and accuracy of each network of ``points`` (``[T]`` networks at parameters ``ts``) on ``(x, y)``.

    BatchNorm statistics are recomputed on ``bn_data`` for every point (required when the
    architecture has BatchNorm).
    """
    if has_batchnorm(points):
        if bn_data is None:
            raise ConfigError(f"{points.arch.describe()} has BatchNorm: pass bn_data (training inputs) to "
                              "recompute its statistics along the path")
        points = recompute_bn(points, bn_data, batch_size=batch_size)
    loss, acc = evaluate(points, x, y, batch_size=batch_size)
    ts = [float(t) for t in ts]
    return Curve(ts, loss.tolist(), acc.tolist(), barrier(loss, ts), barrier(-acc, ts))


def interpolation_curve(a: ModelLike, b: ModelLike, x: torch.Tensor, y: torch.Tensor, *, steps: int = 11,
                        bn_data: torch.Tensor | Iterable[torch.Tensor] | None = None,
                        batch_size: int = 1024) -> Curve:
    """Loss/accuracy at ``steps`` evenly spaced points of the line from ``a`` to ``b``, and the barrier.

    Parameters
    ----------
    x, y : evaluation inputs ``[N, *input]`` and class labels ``[N]``.
    steps : number of points including both endpoints.
    bn_data : training inputs ``[M, *input]`` for recomputing BatchNorm statistics at every point.

    Examples
    --------
    >>> import torch, wsnets
    >>> from wsnets.merge import interpolation_curve
    >>> ws = wsnets.WeightSpace.random(wsnets.mlp(4, [8], 3))
    >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    >>> interpolation_curve(ws, ws, x, y, steps=5).barrier
    0.0
    """
    if steps < 2:
        raise ConfigError("an interpolation curve needs steps >= 2")
    ts = torch.linspace(0, 1, steps)
    return path_metrics(interpolate(a, b, ts), ts, x, y, bn_data=bn_data, batch_size=batch_size)


def loss_barrier(a: ModelLike, b: ModelLike, x: torch.Tensor, y: torch.Tensor, *, steps: int = 11,
                 bn_data: torch.Tensor | Iterable[torch.Tensor] | None = None) -> float:
    """The loss barrier on the straight line between ``a`` and ``b`` (see :func:`interpolation_curve`)."""
    return interpolation_curve(a, b, x, y, steps=steps, bn_data=bn_data).barrier
