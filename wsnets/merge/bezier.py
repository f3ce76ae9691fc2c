"""Mode connectivity: a quadratic Bezier curve of networks trained to connect two modes.

Garipov et al. 2018 ("Loss Surfaces, Mode Connectivity, and Fast Ensembling of DNNs",
https://arxiv.org/abs/1802.10026): with the endpoints ``theta_0``, ``theta_1`` fixed, train the
control point ``theta`` of ``phi(t) = (1 - t)^2 theta_0 + 2 t (1 - t) theta + t^2 theta_1`` to
minimize ``E_{t ~ U(0, 1)} L(phi(t))``. The curve's worst point typically has a far lower loss than
the straight line's barrier.

Each step samples ``ts_per_step`` values of ``t`` and evaluates those networks as one batch
(:func:`wsnets.merge.functional.forward`). BatchNorm layers use batch statistics during training (as
in the paper); evaluate the trained curve with :meth:`BezierCurve.metrics`, which recomputes the
statistics at every point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..weights import WeightSpace
from .compat import ModelLike, is_stat, pair
from .functional import forward, has_batchnorm
from .interpolate import Curve, path_metrics


def bernstein(ts: torch.Tensor) -> torch.Tensor:
    """Quadratic Bernstein coefficients ``[T, 3]``: ``(1 - t)^2, 2 t (1 - t), t^2``."""
    return torch.stack([(1 - ts) ** 2, 2 * ts * (1 - ts), ts ** 2], dim=-1)


@dataclass
class BezierCurve:
    """A quadratic Bezier curve in weight space; ``control`` holds ``[theta_0, theta, theta_1]`` (batched, B = 3)."""

    control: WeightSpace

    def points(self, ts: torch.Tensor | Iterable[float]) -> WeightSpace:
        """Networks at parameters ``ts``: a batched WeightSpace ``[T, ...]``."""
        c = self.control
        t = torch.as_tensor(list(ts) if not isinstance(ts, torch.Tensor) else ts, dtype=c.dtype, device=c.device)
        coef = bernstein(t)
        return WeightSpace(c.arch, {k: torch.einsum("tk,k...->t...", coef, v) for k, v in c.params.items()},
                           len(t), check=False)

    @property
    def midpoint(self) -> WeightSpace:
        """The trained control point ``theta``."""
        return self.control[1]

    def metrics(self, x: torch.Tensor, y: torch.Tensor, *, steps: int = 11,
                bn_data: torch.Tensor | Iterable[torch.Tensor] | None = None) -> Curve:
        """Loss/accuracy at ``steps`` evenly spaced ``t`` (BatchNorm statistics recomputed at each point)."""
        ts = torch.linspace(0, 1, steps)
        return path_metrics(self.points(ts), ts, x, y, bn_data=bn_data)


def train_bezier(a: ModelLike, b: ModelLike, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 20,
                 lr: float = 1e-2, batch_size: int = 128, ts_per_step: int = 4, weight_decay: float = 0.0,
                 seed: int = 0, progress: bool = False) -> BezierCurve:
    """Train the control point of a quadratic Bezier curve between ``a`` and ``b`` on ``(x, y)``.

    Parameters
    ----------
    a, b : the two endpoints (kept fixed); one architecture.
    x, y : training inputs ``[N, *input]`` and class labels ``[N]`` (moved to the models' device).
    epochs, lr, batch_size, weight_decay : Adam training of the control point (initialized at the midpoint
        of the line, so the untrained curve is the straight line).
    ts_per_step : ``t ~ U(0, 1)`` samples per minibatch, evaluated as one batch of networks.
    seed : data order and ``t`` samples.

    Returns
    -------
    BezierCurve
    """
    if epochs < 0 or ts_per_step < 1:
        raise ConfigError("train_bezier needs epochs >= 0 and ts_per_step >= 1")
    wa, wb = pair(a, b)
    dev = wa.device
    x, y = x.to(dev), y.to(dev)
    keys = [k for k in wa.params if not is_stat(k)]
    mid = {k: (0.5 * (wa.params[k] + wb.params[k])).detach().clone().requires_grad_(True) for k in keys}
    opt = torch.optim.Adam(list(mid.values()), lr=lr, weight_decay=weight_decay)
    g = torch.Generator(device="cpu").manual_seed(seed)
    bn = "batch" if has_batchnorm(wa) else "running"
    n = len(x)
    for _ in tqdm(range(epochs), desc="bezier", disable=not progress):
        order = torch.randperm(n, generator=g).to(dev)
        for idx in order.split(batch_size):
            if bn == "batch" and len(idx) < 2:
                continue
            coef = bernstein(torch.rand(ts_per_step, generator=g).to(dev, wa.dtype))  # [K, 3]
            params = {}
            for k, v in wa.params.items():
                if k in mid:
                    stackd = torch.stack([v, mid[k], wb.params[k]])
                    params[k] = torch.einsum("tk,k...->t...", coef, stackd)
                else:
                    params[k] = v.unsqueeze(0).expand(ts_per_step, *v.shape)
            logits = forward(WeightSpace(wa.arch, params, ts_per_step, check=False), x[idx], bn=bn, train=True)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[idx].repeat(ts_per_step))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    control = {}
    for k, v in wa.params.items():
        m = mid[k].detach() if k in mid else 0.5 * (v + wb.params[k])
        control[k] = torch.stack([v, m, wb.params[k]])
    return BezierCurve(WeightSpace(wa.arch, control, 3, check=False))
