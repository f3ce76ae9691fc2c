"""Permutation alignment: relabel the hidden neurons of one network to match another's.

Two networks trained apart compute with their neurons in different orders; averaging them directly
mixes unrelated neurons. Git Re-Basin (Ainsworth et al. 2023, https://arxiv.org/abs/2209.04836)
finds hidden-neuron permutations of model B that bring it close to model A, after which the
straight line between them often has a small loss barrier.

* :func:`weight_matching` maximizes ``sum_key <W_A[key], P(W_B)[key]>`` by coordinate descent over
  the hidden groups: for one group, with the others fixed, the best permutation is a linear
  assignment (``scipy.optimize.linear_sum_assignment``) on the summed inner products of every tensor
  axis that group permutes.
* :func:`activation_matching` matches neurons by the correlation of their activations on a data
  batch (one linear assignment per hidden group).

Both read :func:`wsnets.symmetry.permutation_spec` only (its ``group_members()``), so MLPs, CNNs
and BatchNorm/LayerNorm parameters and statistics need no special cases. The permuted model
computes exactly the same function as the original.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..errors import ConfigError
from ..symmetry import permutation_spec, permute
from ..weights import WeightSpace
from .compat import ModelLike, pair
from .functional import forward

Perms = dict[int, torch.Tensor]


def _permuted(t: torch.Tensor, axes: tuple[int | None, ...], perms: Perms, skip_axis: int) -> torch.Tensor:
    for a, g in enumerate(axes):
        if a != skip_axis and g in perms:
            t = t.index_select(a, perms[g])
    return t


def _lap(cost: torch.Tensor) -> torch.Tensor:
    """Column assigned to each row maximizing the total of ``cost [n, n]``."""
    _, col = linear_sum_assignment(cost.detach().cpu().double().numpy(), maximize=True)
    return torch.as_tensor(col, dtype=torch.long)


def weight_matching(a: ModelLike, b: ModelLike, *, max_iter: int = 100, seed: int = 0,
                    init: Perms | None = None) -> tuple[WeightSpace, Perms]:
    """Permute the hidden neurons of ``b`` to match ``a`` by weight matching.

    Parameters
    ----------
    a, b : two networks of one architecture (WeightSpace, nn.Module, state_dict or path).
    max_iter : maximum sweeps over the hidden groups (stops when a sweep improves nothing).
    seed : order in which groups are visited in each sweep.
    init : starting permutations (group -> ``[n]``), identity if None.

    Returns
    -------
    (b_aligned, perms) : ``b_aligned = wsnets.permute(b, perms)``; ``perms`` maps each hidden group
        to a ``[n]`` long tensor (new neuron ``i`` is old neuron ``perms[g][i]`` of ``b``).

    Examples
    --------
    >>> import wsnets
    >>> from wsnets.merge import weight_matching
    >>> a = wsnets.WeightSpace.random(wsnets.mlp(4, [8, 8], 2))
    >>> b = wsnets.random_permute(a)
    >>> b2, perms = weight_matching(a, b)
    >>> bool((b2.flat() - a.flat()).abs().max() == 0)
    True
    """
    wa, wb = pair(a, b)
    spec = permutation_spec(wa.arch)
    axes = dict(spec.axes)
    members = spec.group_members()
    hidden = list(spec.hidden)
    dev = wa.device
    perms: Perms = {g: torch.arange(spec.group_sizes[g], device=dev) for g in hidden}
    if init:
        perms.update({g: p.to(dev) for g, p in init.items()})
    pa = {k: v.double() for k, v in wa.params.items()}
    pb = {k: v.double() for k, v in wb.params.items()}
    rng = np.random.default_rng(seed)
    for _ in range(max_iter):
        progress = False
        for g in rng.permutation(hidden):
            g = int(g)
            n = spec.group_sizes[g]
            cost = torch.zeros(n, n, dtype=torch.float64, device=dev)
            for key, axis in members[g]:
                ta = pa[key].movedim(axis, 0).reshape(n, -1)
                tb = _permuted(pb[key], axes[key], perms, axis).movedim(axis, 0).reshape(n, -1)
                cost += ta @ tb.T
            new = _lap(cost).to(dev)
            rows = torch.arange(n, device=dev)
            old_score, new_score = cost[rows, perms[g]].sum(), cost[rows, new].sum()
            if new_score > old_score + 1e-12 * max(1.0, abs(float(old_score))):
                perms[g] = new
                progress = True
        if not progress:
            break
    return permute(wb, perms), perms


def _flat_channels(h: torch.Tensor) -> torch.Tensor:
    """``[1, N, C, *S]`` -> ``[N * S, C]`` (every position of every example is an observation)."""
    h = h[0]
    return h.movedim(1, -1).reshape(-1, h.shape[1])


def activation_matching(a: ModelLike, b: ModelLike, x: torch.Tensor, *, eps: float = 1e-8) -> tuple[WeightSpace, Perms]:
    """Permute ``b``'s hidden neurons to maximize the correlation of its activations with ``a``'s on ``x``.

    Parameters
    ----------
    x : a data batch ``[N, *input]``; activations are taken after each hidden group's nonlinearity
        (before global pooling), every spatial position counting as one observation.

    Returns
    -------
    (b_aligned, perms) as :func:`weight_matching`.
    """
    wa, wb = pair(a, b)
    acts_a: dict[int, torch.Tensor] = {}
    acts_b: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        forward(wa, x.to(wa.device), activations=acts_a)
        forward(wb, x.to(wb.device), activations=acts_b)
    perms: Perms = {}
    for g in permutation_spec(wa.arch).hidden:
        ha, hb = _flat_channels(acts_a[g]).double(), _flat_channels(acts_b[g]).double()
        za = (ha - ha.mean(0)) / (ha.std(0) + eps)
        zb = (hb - hb.mean(0)) / (hb.std(0) + eps)
        corr = za.T @ zb / max(ha.shape[0] - 1, 1)
        perms[g] = _lap(corr).to(wb.device)
    return permute(wb, perms), perms


def align(a: ModelLike, b: ModelLike, *, method: Literal["weight", "activation"] = "weight",
          data: torch.Tensor | None = None, **kwargs) -> tuple[WeightSpace, Perms]:
    """Align ``b`` to ``a`` by ``"weight"`` matching or ``"activation"`` matching (needs ``data``)."""
    if method == "weight":
        return weight_matching(a, b, **kwargs)
    if method == "activation":
        if data is None:
            raise ConfigError("activation matching needs a data batch (data=)")
        return activation_matching(a, b, data, **kwargs)
    raise ConfigError(f"unknown alignment method {method!r} (weight or activation)")


def matching_objective(a: WeightSpace, b: WeightSpace) -> float:
    """``sum_key <a[key], b[key]>`` over the tensors hidden permutations act on (what weight matching maximizes)."""
    spec = permutation_spec(a.arch)
    keys = {k for g in spec.hidden for k, _ in spec.group_members()[g]}
    return float(sum((a.params[k].double() * b.params[k].double()).sum() for k in keys))
