"""Hessian of the training loss in weight space, through Hessian-vector products only.

``H = sum_b (n_b / N) H_b`` over the batches of a dataloader (mean cross-entropy per batch, so the
weighting gives the Hessian of the mean loss over all ``N`` examples). BatchNorm runs in eval mode.
HVPs use ``torch.func`` forward-over-reverse (``jvp(grad(f))``), batched over several vectors with
``vmap``; ``backend="autograd"`` (or an automatic fallback when ``torch.func`` cannot trace the
model) uses double backward instead.

* :func:`top_eigenvalues`: power iteration with deflation, or Lanczos with full reorthogonalization.
* :func:`hutchinson_trace`: ``E[v^T H v]`` with Rademacher ``v`` (Hutchinson 1989).
* :func:`slq_density`: stochastic Lanczos quadrature (Ghorbani et al. 2019, Lin et al. 2016).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp, vmap
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..weights import WeightSpace
from ._functional import Data, FunctionalNet, batches

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class HessianOperator:
    """The loss Hessian ``[P, P]`` of one network on a dataset, as a matrix-free linear operator.

    Parameters
    ----------
    ws : WeightSpace (one network); ``P`` = its trainable parameters (running statistics excluded).
    data : ``(X, y)`` or an iterable of ``(x, y)`` batches (e.g. a DataLoader).
    loss_fn : ``(logits, y) -> scalar`` mean loss (default cross-entropy).
    backend : ``"func"`` (default; falls back to ``"autograd"`` if tracing fails) or ``"autograd"``.
    device, dtype : computation device and precision (float64 for exact comparisons).
    """

    def __init__(self, ws: WeightSpace, data: Data, loss_fn: LossFn = F.cross_entropy, *, backend: str = "func",
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        if backend not in ("func", "autograd"):
            raise ConfigError(f"unknown HVP backend {backend!r} (choose func or autograd)")
        self.net = FunctionalNet(ws, device, dtype)
        self.data = batches(data, self.net.device, self.net.dtype)
        n = [len(y) for _, y in self.data]
        self.weights = [k / sum(n) for k in n]
        self.loss_fn = loss_fn
        self.backend = backend
        self.n_products = 0

    @property
    def size(self) -> int:
        return self.net.num_params

    @property
    def theta(self) -> torch.Tensor:
        return self.net.theta0

    def loss(self, theta: torch.Tensor | None = None) -> torch.Tensor:
        """Mean loss over the dataset at ``theta`` (default: the network's own parameters)."""
        theta = self.theta if theta is None else theta
        return sum(w * self.loss_fn(self.net(theta, x), y) for w, (x, y) in zip(self.weights, self.data))

    def _hvp_func(self, V: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(V)
        for w, (x, y) in zip(self.weights, self.data):
            f = lambda th: self.loss_fn(self.net(th, x), y)  # noqa: E731
            hv = lambda v: jvp(grad(f), (self.theta,), (v,))[1]  # noqa: E731
            out += w * (hv(V[0])[None] if V.shape[0] == 1 else vmap(hv)(V))
        return out

    def _hvp_autograd(self, V: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(V)
        theta = self.theta.detach().requires_grad_(True)
        for w, (x, y) in zip(self.weights, self.data):
            g = torch.autograd.grad(self.loss_fn(self.net(theta, x), y), theta, create_graph=True)[0]
            for i in range(V.shape[0]):  # one double-backward per vector (fallback path only)
                out[i] += w * torch.autograd.grad(g, theta, V[i], retain_graph=i < V.shape[0] - 1)[0]
        return out

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``H V`` for ``V [k, P]`` (rows are vectors) -> ``[k, P]``."""
        V = V.to(self.net.device, self.net.dtype)
        self.n_products += V.shape[0]
        if self.backend == "func":
            try:
                return self._hvp_func(V)
            except (RuntimeError, NotImplementedError):
                self.backend = "autograd"
        return self._hvp_autograd(V)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` for ``v [P]``."""
        return self.matmat(v[None])[0]

    def dense(self, chunk: int = 64) -> torch.Tensor:
        """The full Hessian ``[P, P]`` from ``P`` HVPs (small models only)."""
        eye = torch.eye(self.size, dtype=self.net.dtype, device=self.net.device)
        return torch.cat([self.matmat(eye[i:i + chunk]) for i in range(0, self.size, chunk)])


def _gen(seed: int | None, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(0 if seed is None else seed)
    return g


def power_iteration(op: HessianOperator, k: int = 1, *, max_iter: int = 1000, tol: float = 1e-6,
                    seed: int | None = 0, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` eigenpairs (largest magnitude) by power iteration, deflating found vectors.

    Returns eigenvalues ``[k]`` (as found, largest magnitude first) and eigenvectors ``[k, P]``.
    Stops an eigenpair when the Rayleigh quotient changes by less than ``tol`` (relative).
    """
    g = _gen(seed, op.net.device)
    vals, vecs = [], []
    for _ in tqdm(range(k), disable=not progress, desc="power iteration"):
        v = torch.randn(op.size, generator=g, device=op.net.device, dtype=op.net.dtype)
        lam = None
        for _ in range(max_iter):
            if vecs:
                Q = torch.stack(vecs)
                v = v - Q.T @ (Q @ v)
            v = v / v.norm()
            hv = op.matvec(v)
            if vecs:
                hv = hv - Q.T @ (Q @ hv)
            new = float(v @ hv)
            v = hv
            if lam is not None and abs(new - lam) <= tol * (abs(lam) + 1e-12):
                lam = new
                break
            lam = new
        vals.append(lam)
        vecs.append(v / v.norm())
    return torch.tensor(vals, dtype=op.net.dtype), torch.stack(vecs)


def lanczos(op: HessianOperator, m: int, v0: torch.Tensor | None = None, *, seed: int | None = 0,
            reorthogonalize: bool = True, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``m`` Lanczos steps from each of ``V`` start vectors at once (one batched HVP per step).

    Parameters
    ----------
    v0 : ``[P]`` or ``[V, P]`` start vectors (default: one Gaussian vector).

    Returns
    -------
    alpha ``[V, m']``, beta ``[V, m'-1]`` (the tridiagonal matrices) and the bases ``Q [V, m', P]``
    (without a leading ``V`` when ``v0`` is ``[P]``). Full reorthogonalization keeps each basis
    orthogonal in floating point; ``m' = min(m, P)``. A run that finds an invariant subspace early
    continues with ``beta = 0`` and zero vectors (its extra Ritz values are 0 with weight 0).
    """
    m = min(m, op.size)
    if v0 is None:
        v0 = torch.randn(op.size, generator=_gen(seed, op.net.device), device=op.net.device, dtype=op.net.dtype)
    single = v0.dim() == 1
    q = v0.reshape(-1, op.size).to(op.net.device, op.net.dtype)
    q = q / q.norm(dim=1, keepdim=True)
    Q, alpha, beta = [q], [], []
    for j in tqdm(range(m), disable=not progress, desc="lanczos", unit="step"):
        w = op.matmat(Q[j])
        a = (w * Q[j]).sum(1)
        w = w - a[:, None] * Q[j] - (beta[-1][:, None] * Q[j - 1] if j > 0 else 0)
        if reorthogonalize:
            B = torch.stack(Q, 1)  # [V, j+1, P]
            w = w - torch.einsum("vjp,vj->vp", B, torch.einsum("vjp,vp->vj", B, w))
        alpha.append(a)
        if j == m - 1:
            break
        b = w.norm(dim=1)
        ok = b > 1e-10 * (a.abs() + 1)
        beta.append(torch.where(ok, b, torch.zeros_like(b)))
        Q.append(torch.where(ok[:, None], w / b.clamp_min(1e-300)[:, None], torch.zeros_like(w)))
    A = torch.stack(alpha, 1)
    Bt = torch.stack(beta, 1) if beta else A.new_zeros(A.shape[0], 0)
    Qs = torch.stack(Q, 1)
    return (A[0], Bt[0], Qs[0]) if single else (A, Bt, Qs)


def _tridiag(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``[..., m, m]`` symmetric tridiagonal matrices from ``alpha [..., m]``, ``beta [..., m-1]``."""
    return torch.diag_embed(alpha) + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)


def top_eigenvalues(op: HessianOperator, k: int = 5, *, method: str = "lanczos", m: int | None = None,
                    seed: int | None = 0, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` Hessian eigenvalues (descending) and eigenvectors ``[k, P]``.

    ``method="lanczos"``: Ritz pairs of ``m`` (default ``max(4k, 40)``) Lanczos steps, algebraically
    largest. ``method="power"``: :func:`power_iteration` (largest magnitude), sorted descending.
    """
    if method == "power":
        vals, vecs = power_iteration(op, k, seed=seed, **kwargs)
    elif method == "lanczos":
        alpha, beta, Q = lanczos(op, m or max(4 * k, 40), seed=seed)
        ev, U = torch.linalg.eigh(_tridiag(alpha, beta))
        vals, vecs = ev.flip(0)[:k], (U.flip(1)[:, :k].T @ Q)
    else:
        raise ConfigError(f"unknown eigenvalue method {method!r} (choose lanczos or power)")
    order = torch.argsort(vals, descending=True)
    return vals[order], vecs[order]


def hutchinson_trace(op: HessianOperator, n_samples: int = 1000, *, batch: int = 50, seed: int | None = 0,
                     progress: bool = False) -> tuple[float, float]:
    """Hutchinson estimate of ``tr H`` with Rademacher vectors; returns ``(mean, standard error)``."""
    g = _gen(seed, op.net.device)
    samples = []
    for s in tqdm(range(0, n_samples, batch), disable=not progress, desc="hutchinson"):
        b = min(batch, n_samples - s)
        V = torch.randint(0, 2, (b, op.size), generator=g, device=op.net.device).to(op.net.dtype) * 2 - 1
        samples.append((V * op.matmat(V)).sum(1))
    x = torch.cat(samples).double()
    return float(x.mean()), float(x.std() / len(x) ** 0.5) if len(x) > 1 else float("nan")  # 1 sample: no spread


@dataclass
class SpectralDensity:
    """SLQ quadrature: ``nodes [V, m]`` (Ritz values) and ``weights [V, m]`` (each row sums to 1)."""

    nodes: torch.Tensor
    weights: torch.Tensor

    def density(self, grid: np.ndarray | torch.Tensor, sigma: float) -> np.ndarray:
        """Gaussian-smoothed density on ``grid`` (``[n]``): ``mean_v sum_i w_vi N(t; node_vi, sigma^2)``."""
        t = torch.as_tensor(np.asarray(grid), dtype=torch.float64)
        z = (t[:, None, None] - self.nodes.double().cpu()[None]) / sigma
        k = torch.exp(-0.5 * z ** 2) / (sigma * (2 * np.pi) ** 0.5)
        return (k * self.weights.double().cpu()[None]).sum(-1).mean(-1).numpy()

    def flat(self) -> tuple[np.ndarray, np.ndarray]:
        """All nodes and their weights (weights sum to 1) as a discrete spectral measure."""
        return self.nodes.double().cpu().flatten().numpy(), (self.weights.double().cpu() / len(self.nodes)).flatten().numpy()


def slq_density(op: HessianOperator, n_vectors: int = 10, m: int = 50, *, seed: int | None = 0,
                progress: bool = False) -> SpectralDensity:
    """Stochastic Lanczos quadrature: ``n_vectors`` Lanczos runs of ``m`` steps, run together.

    For each run, the eigenvalues ``theta_i`` of the tridiagonal matrix are quadrature nodes and the
    squared first components of its eigenvectors ``tau_i^2`` their weights (they sum to 1).
    """
    g = _gen(seed, op.net.device)
    v0 = torch.randn(n_vectors, op.size, generator=g, device=op.net.device, dtype=op.net.dtype)
    alpha, beta, _ = lanczos(op, m, v0, progress=progress)
    ev, U = torch.linalg.eigh(_tridiag(alpha, beta))
    return SpectralDensity(ev, U[:, 0, :] ** 2)
