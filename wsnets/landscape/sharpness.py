"""Sharpness summaries of many checkpoints at once (features for meta-model baselines).

For ``M`` networks of one architecture, batched over networks with ``torch.func.vmap``:

* ``top_eigenvalue``: largest-magnitude Hessian eigenvalue, the extreme Ritz value of ``m`` Lanczos
  steps run for all networks together (one batched HVP per step; fewer products than power
  iteration for the same accuracy);
* ``trace``: Hutchinson estimate of ``tr H`` (Rademacher vectors) and its standard error;
* ``flatness``: mean loss increase ``E_d[L(theta + r d)] - L(theta)`` over ``n_directions``
  filter-normalized Gaussian directions ``d`` (Li et al. 2018) at radius ``r`` (a fraction of each
  filter's norm, so it is comparable across networks of different scale; Keskar et al. 2017 and
  Jiang et al. 2020 use related perturbation sharpness measures).

Losses are mean cross-entropy over the data (batches weighted by size); BatchNorm in eval mode.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp, vmap
from tqdm.auto import tqdm

from ..weights import WeightSpace, stack
from ._functional import Data, FunctionalNet, batches, loss_and_correct
from .directions import random_direction


class _Population:
    """``M`` networks of one architecture as ``f(theta [P], buffers, x)`` vmapped over networks."""

    def __init__(self, models: WeightSpace | Sequence[WeightSpace], data: Data, device=None) -> None:
        ws = models if isinstance(models, WeightSpace) else stack(list(models))
        ws = ws.batched()
        if device is not None:
            ws = ws.to(device)
        self.ws = ws
        self.net = FunctionalNet(ws[0])
        self.thetas = ws.flat()  # [M, P]
        self.buffers = {self.net.module_key[k]: v for k, v in ws.params.items() if k.endswith(("running_mean", "running_var"))}
        self.data = batches(data, self.thetas.device, self.thetas.dtype)
        n = [len(y) for _, y in self.data]
        self.weights = [k / sum(n) for k in n]

    def _logits(self, theta: torch.Tensor, buf: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.net.module, {**self.net.unflatten(theta), **buf}, (x,))

    def losses(self, thetas: torch.Tensor, per_model: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean loss and accuracy ``[M * per_model]`` of ``thetas`` (``per_model`` rows per network)."""
        buf = {k: v.repeat_interleave(per_model, 0) for k, v in self.buffers.items()}
        loss = torch.zeros(thetas.shape[0], dtype=torch.float64, device=thetas.device)
        acc = torch.zeros_like(loss)
        total = sum(len(y) for _, y in self.data)
        for x, y in self.data:
            logits = vmap(self._logits, in_dims=(0, 0, None))(thetas, buf, x)
            l, c = loss_and_correct(logits, y)
            loss += l.double()
            acc += c.double()
        return loss / total, acc / total

    def hvp(self, V: torch.Tensor) -> torch.Tensor:
        """``H_m v_{m,s}`` for ``V [M, S, P]`` -> ``[M, S, P]`` (each network's own Hessian)."""
        out = torch.zeros_like(V)
        for w, (x, y) in zip(self.weights, self.data):
            def one(theta, buf, v):
                f = lambda th: F.cross_entropy(self._logits(th, buf, x), y)  # noqa: E731
                return jvp(grad(f), (theta,), (v,))[1]
            per_model = vmap(one, in_dims=(None, None, 0))  # over the S vectors of one network
            out += w * vmap(per_model)(self.thetas, self.buffers, V)
        return out


@torch.no_grad()
def flatness(models: WeightSpace | Sequence[WeightSpace], data: Data, *, n_directions: int = 10,
             radius: float = 0.5, seed: int = 0, device=None) -> torch.Tensor:
    """Filter-normalized flatness ``E_d[L(theta + r d)] - L(theta)`` per network, ``[M]`` (see module doc)."""
    pop = _Population(models, data, device)
    g = torch.Generator().manual_seed(seed)
    dirs = torch.stack([random_direction(pop.ws, "filter", generator=g).flat() for _ in range(n_directions)], 1)
    base, _ = pop.losses(pop.thetas)
    pert, _ = pop.losses((pop.thetas[:, None] + radius * dirs).flatten(0, 1), per_model=n_directions)
    return pert.view(-1, n_directions).mean(1) - base


class _PerModelOperator:
    """Adapter for :func:`~wsnets.landscape.hessian.lanczos`: row ``m`` of ``V [M, P]`` meets network ``m``'s Hessian."""

    def __init__(self, pop: _Population) -> None:
        self.pop = pop
        self.size = pop.thetas.shape[1]
        self.net = pop.net

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.pop.hvp(V[:, None])[:, 0]


def sharpness(models: WeightSpace | Sequence[WeightSpace], data: Data, *, lanczos_steps: int = 30,
              hutchinson_samples: int = 100, n_directions: int = 10, radius: float = 0.5,
              seed: int = 0, device=None, progress: bool = False) -> list[dict[str, Any]]:
    """Per-network sharpness summary: ``loss``, ``acc``, ``top_eigenvalue``, ``trace``, ``trace_stderr``, ``flatness``.

    Parameters
    ----------
    models : a batched WeightSpace or a list of networks of one architecture (``M`` of them).
    data : ``(X, y)`` or an iterable of batches.
    lanczos_steps : Lanczos steps for the top eigenvalue.
    hutchinson_samples : Rademacher vectors per network for the trace.
    n_directions, radius : see :func:`flatness`.

    Returns
    -------
    One dict per network, in order.
    """
    from .hessian import _tridiag, lanczos
    pop = _Population(models, data, device)
    M, P = pop.thetas.shape
    g = torch.Generator().manual_seed(seed)
    dev, dt = pop.thetas.device, pop.thetas.dtype
    with torch.no_grad():
        loss, acc = pop.losses(pop.thetas)
    v0 = torch.randn(M, P, generator=g, dtype=dt).to(dev)
    alpha, beta, _ = lanczos(_PerModelOperator(pop), lanczos_steps, v0, progress=progress)
    ritz = torch.linalg.eigvalsh(_tridiag(alpha, beta))  # [M, m]
    lam = ritz.gather(1, ritz.abs().argmax(1, keepdim=True))[:, 0]
    samples = []
    chunk = 25
    for s in tqdm(range(0, hutchinson_samples, chunk), disable=not progress, desc="hutchinson"):
        S = min(chunk, hutchinson_samples - s)
        R = (torch.randint(0, 2, (M, S, P), generator=g) * 2 - 1).to(dev, dt)
        samples.append((R * pop.hvp(R)).sum(-1))
    tr = torch.cat(samples, 1).double()
    flat = flatness(pop.ws, pop.data, n_directions=n_directions, radius=radius, seed=seed, device=device)
    return [{"loss": float(loss[m]), "acc": float(acc[m]), "top_eigenvalue": float(lam[m]),
             "trace": float(tr[m].mean()), "trace_stderr": float(tr[m].std() / tr.shape[1] ** 0.5),
             "flatness": float(flat[m]), "flatness_radius": radius} for m in range(M)]
