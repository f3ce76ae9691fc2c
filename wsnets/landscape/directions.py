"""Directions in weight space for landscape slices.

* :func:`random_direction`: a Gaussian direction, normalized per *filter* (Li et al. 2018,
  "Visualizing the Loss Landscape of Neural Nets", https://arxiv.org/abs/1712.09913), per *layer*,
  or not at all. A filter is one output neuron / output channel: row ``i`` of a ``[out, in, *k]``
  weight. By default biases and normalization parameters get a zero direction (Li et al.'s
  ``ignore='biasbn'``); with ``include_bias`` / ``include_norm`` they get a Gaussian direction
  normalized as a whole to the norm of the tensor. Running statistics never move.
* :func:`interpolation_directions`: the line or plane through two or three models.
* :func:`pca_directions`: the top principal components of a training trajectory
  (checkpoints minus the final model), as in Li et al. Sec. 7.

Every direction is a :class:`~wsnets.WeightSpace` of the model's architecture (zeros in running
statistics), so it can be saved, inspected and added to any other network of that architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import ArchitectureMismatchError, ConfigError
from ..weights import WeightSpace
from ._functional import flat_to_weightspace, is_stat, stack_flat

NORMS = ("filter", "layer", "none")


def _norm_over(t: torch.Tensor, lead: int, per_filter: bool) -> torch.Tensor:
    """Norms over everything after the batch dims (and the filter dim if ``per_filter``), keepdim."""
    start = lead + (1 if per_filter else 0)
    dims = tuple(range(start, t.dim()))
    return torch.linalg.vector_norm(t, dim=dims, keepdim=True) if dims else t.abs()


def normalize_direction(direction: WeightSpace, ws: WeightSpace, norm: str = "filter", *,
                        include_bias: bool = False, include_norm: bool = False,
                        eps: float = 1e-10) -> WeightSpace:
    """Rescale ``direction`` like ``ws`` (both single networks, or both batched with the same ``B``).

    Parameters
    ----------
    direction, ws : WeightSpace of one architecture.
    norm : ``"filter"`` (each output filter of a weight ``[out, in, *k]`` gets the norm of the
        matching filter of ``ws``), ``"layer"`` (each weight tensor gets the norm of ``ws``'s tensor)
        or ``"none"`` (unchanged).
    include_bias, include_norm : keep (and normalize per tensor) the direction in biases and in
        normalization weights/biases; otherwise they are zero. Running statistics are always zero.

    Returns
    -------
    WeightSpace with the same batch layout as ``ws``.
    """
    if norm not in NORMS:
        raise ConfigError(f"unknown direction normalization {norm!r} (choose from {', '.join(NORMS)})")
    if direction.arch != ws.arch:
        raise ArchitectureMismatchError(
            f"direction is {direction.arch.describe()}, model is {ws.arch.describe()}")
    lead = 0 if ws.batch_size is None else 1
    out = {}
    for l in ws.arch.layers:
        for k in l.param_shapes():
            key = l.key(k)
            d, w = direction.params[key], ws.params[key].to(direction.params[key].dtype)
            weight = (l.is_weight and k == "weight") or (l.kind in ("embedding", "mha", "param") and "bias" not in k)
            bias = (l.is_weight or l.kind == "mha") and "bias" in k
            norm_param = l.kind in ("batchnorm", "layernorm", "rmsnorm", "groupnorm")
            keep = weight or (bias and include_bias) or (norm_param and not is_stat(key) and include_norm)
            if not keep or is_stat(key):
                out[key] = torch.zeros_like(d)
            elif norm == "none":
                out[key] = d.clone()
            else:
                per_filter = norm == "filter" and weight and d.dim() > 1 + lead
                out[key] = d * (_norm_over(w, lead, per_filter) / (_norm_over(d, lead, per_filter) + eps))
    return WeightSpace(ws.arch, out, ws.batch_size, check=False)


def random_direction(ws: WeightSpace, norm: str = "filter", *, include_bias: bool = False,
                     include_norm: bool = False, generator: torch.Generator | None = None) -> WeightSpace:
    """A Gaussian random direction normalized like ``ws`` (see :func:`normalize_direction`).

    Examples
    --------
    >>> import wsnets
    >>> ws = wsnets.WeightSpace.random(wsnets.mlp(4, [8], 2))
    >>> d = random_direction(ws)
    >>> bool(torch.allclose(d.weight(0).norm(dim=1), ws.weight(0).norm(dim=1)))
    True
    """
    raw = ws.map(lambda t: torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device))
    return normalize_direction(raw, ws, norm, include_bias=include_bias, include_norm=include_norm)


def random_directions(ws: WeightSpace, n: int = 2, norm: str = "filter", **kwargs) -> list[WeightSpace]:
    """``n`` independent :func:`random_direction` s (Li et al.'s 2D plots use two)."""
    return [random_direction(ws, norm, **kwargs) for _ in range(n)]


@dataclass
class Plane:
    """An origin and one or two directions, with the coordinates of known models in that frame.

    ``coords`` is ``[M, k]``: model ``m`` lies at ``origin + sum_j coords[m, j] * directions[j]``
    (exactly for interpolation planes; the least-squares projection for PCA directions).
    """

    origin: WeightSpace
    directions: list[WeightSpace]
    coords: torch.Tensor
    explained_variance: torch.Tensor | None = None


def interpolation_directions(models: Sequence[WeightSpace], orthogonalize: bool = True) -> Plane:
    """The line through two models or the plane through three (origin = ``models[0]``).

    With three models and ``orthogonalize``, the second direction is ``m2 - m0`` minus its
    projection on ``m1 - m0`` (Garipov et al. 2018), so the axes are perpendicular; ``coords`` says
    where each model lands (``m1`` at ``(1, 0)``).
    """
    if len(models) not in (2, 3):
        raise ConfigError(f"interpolation directions need 2 or 3 models, got {len(models)}")
    for i, m in enumerate(models[1:], 1):
        if m.arch != models[0].arch:
            raise ArchitectureMismatchError(
                f"model {i} is {m.arch.describe()}, model 0 is {models[0].arch.describe()}")
    flat = stack_flat(list(models))
    u = flat[1] - flat[0]
    dirs = [u]
    if len(models) == 3:
        v = flat[2] - flat[0]
        if orthogonalize:
            v = v - (v @ u) / (u @ u) * u
        dirs.append(v)
    D = torch.stack(dirs)  # [k, P]
    coords = torch.linalg.lstsq(D.T, (flat - flat[0]).T).solution.T  # [M, k]
    return Plane(models[0], [flat_to_weightspace(models[0], d) for d in dirs], coords)


def pca_directions(trajectory: Sequence[WeightSpace] | WeightSpace, n: int = 2,
                   final: WeightSpace | None = None) -> Plane:
    """Top-``n`` principal directions of ``theta_t - theta_final`` over a trajectory (Li et al. Sec. 7).

    Parameters
    ----------
    trajectory : ``T`` checkpoints (a batched WeightSpace or a list); the last is the final model
        unless ``final`` is given.
    n : number of directions.

    Returns
    -------
    Plane with origin = final model, unit-norm directions, ``coords [T, n]`` (projections of the
    checkpoints), and the fraction of variance each direction explains.
    """
    flat = stack_flat(trajectory)
    if flat.shape[0] < 2:
        raise ConfigError("a PCA of a trajectory needs at least 2 checkpoints")
    origin = final if final is not None else (trajectory[-1] if not isinstance(trajectory, WeightSpace)
                                              else trajectory[flat.shape[0] - 1])
    M = flat - origin.flat()
    _, S, Vh = torch.linalg.svd(M, full_matrices=False)
    n = min(n, Vh.shape[0])
    dirs = Vh[:n]
    coords = M @ dirs.T
    ev = (S ** 2) / (S ** 2).sum()
    return Plane(origin, [flat_to_weightspace(origin, d) for d in dirs], coords, ev[:n])
