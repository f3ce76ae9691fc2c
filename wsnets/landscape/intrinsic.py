"""Intrinsic dimension: train only in a random ``d``-dimensional subspace, ``theta = theta0 + P z``.

Li, Farkhoor, Liu & Yosinski 2018, "Measuring the Intrinsic Dimension of Objective Landscapes"
(https://arxiv.org/abs/1804.08838). ``d_int90`` is the smallest ``d`` whose subspace-trained model
reaches 90% of the accuracy of the same network trained in all ``D`` parameters.

Projections ``P`` (``[D, d]``, columns of unit norm in expectation) are applied to rows ``z [K, d]``:

* :class:`DenseProjection`: Gaussian entries, columns normalized to unit norm (``O(dD)`` memory).
* :class:`SparseProjection`: very sparse random projection (Li, Hastie & Church 2006), density
  ``1/sqrt(D)`` by default, stored as a torch sparse matrix.
* :class:`FastfoodProjection`: ``P = (1/sqrt(LD)) [H G Pi H B]_{:D, :d}`` with Walsh-Hadamard
  ``H`` (``L = 2^ceil(log2 D)``), random signs ``B``, permutation ``Pi`` and Gaussian diagonal
  ``G`` (Le et al. 2013): ``O(D)`` memory and ``O(D log D)`` time, for large ``D``.

A sweep over ``d`` trains every ``d`` *at once*: one ``z [K, d_max]`` is masked to its first ``d_k``
entries per model (nested subspaces: the first ``d`` columns of one projection), the ``K``
networks run batched under ``vmap``, and Adam's per-coordinate updates keep the models independent.
The full-dimensional baseline trains in the same loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..weights import WeightSpace
from ._functional import FunctionalNet, loss_and_correct


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized fast Walsh-Hadamard transform along the last dim (a power of 2): ``x H``.

    ``log2(L)`` butterfly stages, each one reshape over the whole batch ``[..., L]``.
    """
    L = x.shape[-1]
    if L & (L - 1):
        raise ConfigError(f"Walsh-Hadamard length {L} is not a power of 2")
    lead = x.shape[:-1]
    h = 1
    while h < L:
        y = x.reshape(*lead, L // (2 * h), 2, h)
        x = torch.stack([y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]], dim=-2).reshape(*lead, L)
        h *= 2
    return x


class Projection:
    """A random linear map from ``R^d`` to ``R^D``; ``proj(z [K, d]) -> [K, D]``."""

    D: int
    d: int

    def __call__(self, z: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def matrix(self) -> torch.Tensor:
        """The explicit ``[D, d]`` matrix (for tests and small problems)."""
        return self(torch.eye(self.d, dtype=self.dtype, device=self.device)).T


class DenseProjection(Projection):
    """Gaussian ``[D, d]`` with unit-norm columns."""

    def __init__(self, D: int, d: int, *, generator: torch.Generator | None = None, device=None,
                 dtype: torch.dtype = torch.float32) -> None:
        self.D, self.d, self.device, self.dtype = D, d, device, dtype
        W = torch.randn(d, D, generator=generator, dtype=dtype)
        self.W = (W / W.norm(dim=1, keepdim=True)).to(device)  # rows of W = columns of P

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W


class SparseProjection(Projection):
    """Very sparse ``[D, d]``: each entry nonzero with probability ``density`` (default ``1/sqrt(D)``),
    value ``+-1``, columns normalized to unit norm (a column with no entry gets one)."""

    def __init__(self, D: int, d: int, *, density: float | None = None, generator: torch.Generator | None = None,
                 device=None, dtype: torch.dtype = torch.float32) -> None:
        self.D, self.d, self.device, self.dtype = D, d, device, dtype
        density = density or 1 / math.sqrt(D)
        nnz = max(int(round(density * D * d)), d)
        flat = torch.randperm(D * d, generator=generator)[:nnz]
        rows, cols = flat // d, flat % d
        # guarantee every column has an entry
        missing = torch.ones(d, dtype=torch.bool)
        missing[cols] = False
        extra = torch.nonzero(missing).flatten()
        rows = torch.cat([rows, torch.randint(0, D, (len(extra),), generator=generator)])
        cols = torch.cat([cols, extra])
        vals = (torch.randint(0, 2, (len(rows),), generator=generator) * 2 - 1).to(dtype)
        counts = torch.bincount(cols, minlength=d).to(dtype)
        vals = vals / counts[cols].sqrt()
        self.P = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (D, d), check_invariants=True).coalesce().to(device)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sparse.mm(self.P, z.T).T


class FastfoodProjection(Projection):
    """Fastfood ``[D, d]``: ``(1/sqrt(L D)) (H G Pi H B)[:D, :d]`` (see module docstring)."""

    def __init__(self, D: int, d: int, *, generator: torch.Generator | None = None, device=None,
                 dtype: torch.dtype = torch.float32) -> None:
        self.D, self.d, self.device, self.dtype = D, d, device, dtype
        self.L = 1 << max(0, math.ceil(math.log2(max(D, d))))
        L = self.L
        self.B = (torch.randint(0, 2, (L,), generator=generator) * 2 - 1).to(dtype).to(device)
        self.Pi = torch.randperm(L, generator=generator).to(device)
        self.G = torch.randn(L, generator=generator, dtype=dtype).to(device)
        self.scale = 1.0 / math.sqrt(L * D)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.pad(z, (0, self.L - z.shape[-1])) * self.B
        x = fwht(x)[..., self.Pi] * self.G
        return fwht(x)[..., :self.D] * self.scale


PROJECTIONS = {"dense": DenseProjection, "sparse": SparseProjection, "fastfood": FastfoodProjection}


def make_projection(kind: str, D: int, d: int, **kwargs) -> Projection:
    if kind not in PROJECTIONS:
        raise ConfigError(f"unknown projection {kind!r} (choose from {', '.join(PROJECTIONS)})")
    return PROJECTIONS[kind](D, d, **kwargs)


@dataclass
class IntrinsicResult:
    """A sweep: test accuracy per subspace dimension, the full model's, and ``d_int90``."""

    dims: list[int]
    test_acc: list[float]
    train_acc: list[float]
    full_test_acc: float
    full_train_acc: float
    num_params: int
    projection: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def threshold(self) -> float:
        return 0.9 * self.full_test_acc

    @property
    def d_int90(self) -> int | None:
        return d_int90(self.dims, self.test_acc, self.full_test_acc)

    def to_dict(self) -> dict[str, Any]:
        return {"dims": self.dims, "test_acc": self.test_acc, "train_acc": self.train_acc,
                "full_test_acc": self.full_test_acc, "full_train_acc": self.full_train_acc,
                "threshold": self.threshold, "d_int90": self.d_int90, "num_params": self.num_params,
                "projection": self.projection, **self.meta}


def d_int90(dims: Sequence[int], acc: Sequence[float], full_acc: float, fraction: float = 0.9) -> int | None:
    """Smallest ``d`` in the sweep whose accuracy reaches ``fraction * full_acc`` (None if none does)."""
    ok = [d for d, a in sorted(zip(dims, acc)) if a >= fraction * full_acc]
    return int(ok[0]) if ok else None


def _accuracy(net: FunctionalNet, thetas: torch.Tensor, X: torch.Tensor, y: torch.Tensor,
              batch: int = 4096) -> torch.Tensor:
    correct = torch.zeros(thetas.shape[0], device=thetas.device)
    for s in range(0, len(y), batch):
        _, c = loss_and_correct(net.batched(thetas, X[s:s + batch]), y[s:s + batch])
        correct += c
    return correct / len(y)


def intrinsic_dimension(ws: WeightSpace, train: tuple[torch.Tensor, torch.Tensor],
                        test: tuple[torch.Tensor, torch.Tensor], dims: Sequence[int], *,
                        projection: str = "dense", steps: int = 1000, batch_size: int = 128, lr: float = 1e-2,
                        full_lr: float = 1e-3, seed: int = 0, device: str | torch.device | None = None,
                        progress: bool = False) -> IntrinsicResult:
    """Train ``ws``'s architecture from ``theta0 = ws`` in subspaces of each dimension in ``dims``.

    Parameters
    ----------
    ws : initialization ``theta0`` (typically a fresh random network).
    train, test : ``(X, y)`` tensors.
    dims : subspace dimensions to sweep (each ``< D``); all train together (see module docstring).
    projection : ``"dense"``, ``"sparse"`` or ``"fastfood"``.
    steps, batch_size : minibatch Adam steps on shuffled training data (same order for every model).
    lr, full_lr : Adam learning rates of ``z`` and of the full-dimensional baseline.

    Returns
    -------
    IntrinsicResult with train/test accuracy per ``d`` and of the full model, and ``d_int90``.
    """
    net = FunctionalNet(ws, device)
    dev, dt = net.device, net.dtype
    D = net.num_params
    dims = sorted(int(d) for d in dims)
    if not dims or dims[0] < 1 or dims[-1] >= D:
        raise ConfigError(f"subspace dimensions must lie in [1, {D - 1}] for {ws.arch.describe()}, got {dims}")
    g = torch.Generator().manual_seed(seed)
    proj = make_projection(projection, D, dims[-1], generator=g, device=dev, dtype=dt)
    K = len(dims)
    mask = (torch.arange(dims[-1], device=dev)[None] < torch.tensor(dims, device=dev)[:, None]).to(dt)  # [K, dmax]
    z = torch.zeros(K, dims[-1], device=dev, dtype=dt, requires_grad=True)
    full = net.theta0.clone().requires_grad_(True)
    opt = torch.optim.Adam([{"params": [z], "lr": lr}, {"params": [full], "lr": full_lr}])
    Xtr, ytr = (t.to(dev) for t in train)
    Xtr = Xtr.to(dt)
    n = len(ytr)
    perm = torch.randperm(n, generator=g)
    pos = 0
    for _ in tqdm(range(steps), disable=not progress, desc=f"intrinsic dim ({projection})", unit="step"):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos:pos + batch_size].to(dev)
        pos += batch_size
        thetas = torch.cat([net.theta0 + proj(z * mask), full[None]])  # [K+1, D]
        loss, _ = loss_and_correct(net.batched(thetas, Xtr[idx]), ytr[idx])
        opt.zero_grad()
        (loss.sum() / len(idx)).backward()  # sum of per-model mean losses: independent gradients
        opt.step()
    with torch.no_grad():
        thetas = torch.cat([net.theta0 + proj(z * mask), full[None]])
        tr = _accuracy(net, thetas, Xtr, ytr).tolist()
        te = _accuracy(net, thetas, test[0].to(dev, dt), test[1].to(dev)).tolist()
    return IntrinsicResult(dims, te[:K], tr[:K], te[K], tr[K], D, projection,
                           {"architecture": ws.arch.describe(), "steps": steps, "batch_size": batch_size,
                            "lr": lr, "full_lr": full_lr, "seed": seed})
