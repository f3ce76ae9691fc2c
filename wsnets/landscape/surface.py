"""Loss and accuracy along 1D lines and over 2D planes in weight space, many points at once.

A grid point ``c [k]`` is the network ``theta0 + sum_j c_j d_j``. Instead of rebuilding a model per
point (Li et al.'s double loop, kept here as :func:`naive_surface` for tests and benchmarks), a
chunk of ``G`` points is evaluated as one batched computation: the ``G`` parameter vectors are
stacked and the network runs under ``torch.func.vmap`` (``functional_call``), so each layer is one
batched matmul / convolution.

On CPU the full-batch evaluation is compute-bound: stacking points saves little (measured 1.1-1.5x
over the naive loop with 32 points per chunk, and large chunks are *slower* because the stacked
activations leave the cache), so the CPU default is 32 points per chunk; ``chunk_size=1`` runs one
plain forward per point without ``vmap``. Batching pays on GPUs, where a per-point loop is bound by
kernel launches (default 256 there; not measured in this repository yet). The first weight layer is linear in the grid coordinates: ``W(c) x = W0 x + sum_j c_j D_j x``. Its
``k + 1`` outputs are computed once for the whole dataset and every grid point combines them with an
einsum, which removes the first layer's cost from every point (``first_layer_trick=True``).

BatchNorm runs in eval mode with the origin's running statistics at every point (directions never
move running statistics); recompute statistics yourself if you need train-mode surfaces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap
from tqdm.auto import tqdm

from ..errors import ArchitectureMismatchError, ConfigError
from ..io import atomic_write
from ..weights import WeightSpace
from ._functional import Data, FunctionalNet, batches, chunks, loss_and_correct

_PRE_OK = ("flatten", "dropout")  # parameter-free layers that may precede the first weight layer


@dataclass
class Surface:
    """Loss and accuracy on a grid. ``loss``/``acc`` are ``[nx]`` (1D) or ``[nx, ny]`` (2D, ``[i, j]``
    is ``x = xs[i], y = ys[j]``); ``meta`` holds how the grid was made (saved with it)."""

    xs: np.ndarray
    ys: np.ndarray | None
    loss: np.ndarray
    acc: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ndim(self) -> int:
        return 1 if self.ys is None else 2

    def save(self, path: str | Path) -> Path:
        """Atomic ``.npz`` with ``xs``, ``ys``, ``loss``, ``acc`` and ``meta`` (a JSON string)."""
        import json
        path = Path(path)
        arrays = dict(xs=self.xs, loss=self.loss, acc=self.acc, meta=np.array(json.dumps(self.meta, default=str)))
        if self.ys is not None:
            arrays["ys"] = self.ys

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
        atomic_write(path, write)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Surface":
        import json
        with np.load(path, allow_pickle=False) as z:
            return cls(z["xs"], z["ys"] if "ys" in z else None, z["loss"], z["acc"], json.loads(str(z["meta"])))


def _check_dirs(ws: WeightSpace, directions: Sequence[WeightSpace]) -> None:
    for i, d in enumerate(directions):
        if d.arch != ws.arch:
            raise ArchitectureMismatchError(f"direction {i} is {d.arch.describe()}, model is {ws.arch.describe()}")


class _FirstLayer:
    """Pre-computed first-layer outputs for the origin and each direction (see module docstring)."""

    def __init__(self, net: FunctionalNet, dirs: torch.Tensor) -> None:
        layers = net.arch.layers
        self.idx = next(i for i, l in enumerate(layers) if l.is_weight)
        if any(l.kind not in _PRE_OK for l in layers[:self.idx]):
            raise ConfigError("first-layer trick needs only flatten/dropout before the first weight layer")
        self.layer = net.module[self.idx]
        self.rest = net.module[self.idx + 1:]
        name = layers[self.idx].name
        keys = [f"{name}.weight"] + ([f"{name}.bias"] if layers[self.idx].bias else [])
        self.first_keys = {net.module_key[k] for k in keys}
        self.net = net
        self.dirs = dirs

    def precompute(self, x: torch.Tensor) -> torch.Tensor:
        """``[1 + k, N, ...]``: the first layer's output at the origin, then each direction's part."""
        net = self.net
        h = net.module[:self.idx](x) if self.idx else x
        basis = torch.cat([net.theta0[None], self.dirs])  # [1+k, P]
        params = net.unflatten(basis)
        sub = {k.split(".", 1)[1]: v for k, v in params.items() if k in self.first_keys}
        return vmap(lambda p: functional_call(self.layer, p, (h,)))(sub)

    def forward(self, pre: torch.Tensor, coeffs: torch.Tensor, thetas: torch.Tensor) -> torch.Tensor:
        """Logits ``[G, N, C]`` for grid points ``coeffs [G, k]`` with parameters ``thetas [G, P]``."""
        k = pre.shape[0] - 1  # z[g] = pre[0] + sum_j coeffs[g, j] pre[1 + j]
        if coeffs.shape[0] == 1 and coeffs.device.type == "cpu":  # k axpys beat a [1, k] x [k, N*h] GEMM
            z = pre[0].clone()
            for j, c in enumerate(coeffs[0].tolist()):
                z.add_(pre[1 + j], alpha=c)
            z = z[None]
        else:
            z = torch.addmm(pre[0].reshape(1, -1), coeffs, pre[1:].reshape(k, -1)).reshape(-1, *pre.shape[1:])
        params = self.net.unflatten(thetas)
        # the sliced Sequential keeps its children's original names, so the keys still match
        rest = {k: v for k, v in params.items() if k not in self.first_keys}
        if z.shape[0] == 1:  # one point: a plain forward (fastest on CPU, see module docstring)
            return functional_call(self.rest, {**{k: v[0] for k, v in rest.items()}, **self.net.buffers}, (z[0],))[None]
        return vmap(lambda p, zz: functional_call(self.rest, {**p, **self.net.buffers}, (zz,)))(rest, z)


@torch.no_grad()
def evaluate_points(ws: WeightSpace, directions: Sequence[WeightSpace], coeffs: torch.Tensor, data: Data, *,
                    chunk_size: int | None = None, first_layer_trick: bool = True, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy and accuracy at ``G`` points ``theta0 + coeffs @ directions``, batched.

    Parameters
    ----------
    ws : the origin (one network).
    directions : ``k`` WeightSpaces of ``ws``'s architecture.
    coeffs : ``[G, k]`` grid coordinates.
    data : ``(X, y)`` tensors (full batch) or an iterable of ``(x, y)`` batches; the loss is the
        mean over all examples (batches weighted by their size).
    chunk_size : grid points evaluated together under ``vmap`` (memory ~ ``chunk_size * batch * width``).
        Default: 32 on CPU (larger chunks fall out of cache), 256 on GPUs
        (``benchmarks/landscape_speed.py`` compares chunk sizes against the naive loop).
    first_layer_trick : reuse the first layer's outputs across points (exact up to rounding); ignored
        when a layer with parameters precedes the first weight layer.

    Returns
    -------
    loss ``[G]``, acc ``[G]`` (on CPU, float64).
    """
    _check_dirs(ws, directions)
    net = FunctionalNet(ws, device, dtype)
    dirs = torch.stack([d.flat() for d in directions]).to(net.device, net.dtype)  # [k, P]
    coeffs = torch.as_tensor(coeffs, dtype=net.dtype).to(net.device).reshape(-1, len(directions))
    G = coeffs.shape[0]
    data = batches(data, net.device, net.dtype)
    total = sum(len(y) for _, y in data)
    loss = torch.zeros(G, dtype=torch.float64, device=net.device)
    correct = torch.zeros(G, dtype=torch.float64, device=net.device)
    if chunk_size is None:
        chunk_size = 32 if net.device.type == "cpu" else 256
    first = next(i for i, l in enumerate(ws.arch.layers) if l.is_weight)
    eligible = ws.arch.is_chain and all(l.kind in _PRE_OK for l in ws.arch.layers[:first])  # else: plain batched
    # evaluation (a DAG's module is no Sequential to slice at its first layer)
    fl = _FirstLayer(net, dirs) if first_layer_trick and eligible else None
    pres = [fl.precompute(x) for x, _ in data] if fl else None
    bar = tqdm(total=G, disable=not progress, desc="surface", unit="pt")
    for sl in chunks(G, chunk_size):
        thetas = net.theta0 + coeffs[sl] @ dirs
        for bi, (x, y) in enumerate(data):
            if fl:
                logits = fl.forward(pres[bi], coeffs[sl], thetas)
            else:
                logits = net(thetas[0], x)[None] if len(thetas) == 1 else net.batched(thetas, x)
            l, c = loss_and_correct(logits, y)
            loss[sl] += l.double()
            correct[sl] += c.double()
        bar.update(sl.stop - sl.start)
    bar.close()
    return (loss / total).cpu(), (correct / total).cpu()


def _grid_meta(ws: WeightSpace, extra: dict[str, Any] | None) -> dict[str, Any]:
    meta = {"arch": ws.arch.to_json(), "architecture": ws.arch.describe()}
    meta.update(extra or {})
    return meta


def surface_1d(ws: WeightSpace, direction: WeightSpace, data: Data, xs: Sequence[float] | np.ndarray, *,
               meta: dict[str, Any] | None = None, **kwargs) -> Surface:
    """Loss/accuracy along ``theta0 + x * direction`` for each ``x`` in ``xs`` (``[nx]``)."""
    xs_t = torch.as_tensor(np.asarray(xs, dtype=np.float64))
    loss, acc = evaluate_points(ws, [direction], xs_t[:, None], data, **kwargs)
    return Surface(xs_t.numpy(), None, loss.numpy(), acc.numpy(), _grid_meta(ws, meta))


def surface_2d(ws: WeightSpace, d1: WeightSpace, d2: WeightSpace, data: Data, xs: Sequence[float] | np.ndarray,
               ys: Sequence[float] | np.ndarray, *, meta: dict[str, Any] | None = None, **kwargs) -> Surface:
    """Loss/accuracy over the plane ``theta0 + x d1 + y d2``; arrays are ``[nx, ny]`` (``[i, j]`` = ``xs[i], ys[j]``).

    Examples
    --------
    >>> import torch, wsnets
    >>> from wsnets.landscape import random_directions, surface_2d
    >>> ws = wsnets.WeightSpace.random(wsnets.mlp(4, [8], 3))
    >>> X, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    >>> d1, d2 = random_directions(ws, 2)
    >>> s = surface_2d(ws, d1, d2, (X, y), [-1, 0, 1], [-1, 0, 1])
    >>> s.loss.shape
    (3, 3)
    """
    xs_a, ys_a = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    gx, gy = np.meshgrid(xs_a, ys_a, indexing="ij")
    coeffs = torch.as_tensor(np.stack([gx.ravel(), gy.ravel()], 1))
    loss, acc = evaluate_points(ws, [d1, d2], coeffs, data, **kwargs)
    shape = (len(xs_a), len(ys_a))
    return Surface(xs_a, ys_a, loss.numpy().reshape(shape), acc.numpy().reshape(shape), _grid_meta(ws, meta))


@torch.no_grad()
def naive_surface(ws: WeightSpace, directions: Sequence[WeightSpace], coeffs: torch.Tensor, data: Data, *,
                  device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: one model per grid point, weights overwritten in place (Li et al.'s ``plot_surface`` loop).

    Same arguments and returns as :func:`evaluate_points`; slow on purpose (used by tests and
    ``benchmarks/landscape_speed.py``).
    """
    _check_dirs(ws, directions)
    net = FunctionalNet(ws, device)
    module = net.module
    named = dict(module.named_parameters())
    dirs = [net.unflatten(d.flat().to(net.device, net.dtype)) for d in directions]
    origin = net.unflatten(net.theta0)
    data = batches(data, net.device, net.dtype)
    total = sum(len(y) for _, y in data)
    coeffs = torch.as_tensor(coeffs).reshape(-1, len(directions)).tolist()
    losses, accs = [], []
    for c in coeffs:  # the naive loop: set weights, evaluate the whole dataset
        for k, p in named.items():
            p.copy_(origin[k] + sum(cj * d[k] for cj, d in zip(c, dirs)))
        l = n = 0.0
        for x, y in data:
            out = module(x)
            l += F.cross_entropy(out, y, reduction="sum").item()
            n += (out.argmax(1) == y).sum().item()
        losses.append(l / total)
        accs.append(n / total)
    return torch.tensor(losses, dtype=torch.float64), torch.tensor(accs, dtype=torch.float64)
