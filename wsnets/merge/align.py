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

Both read :func:`wsnets.symmetry.permutation_spec` only (its ``slices()``), so MLPs, CNNs, residual
networks (one group per residual stream), concatenations (block axes) and BatchNorm/LayerNorm
parameters and statistics need no special cases. Attention's head-structured groups are matched as
the spec allows: for every pair of heads the best permutation inside them is a linear assignment,
and the head permutation, shared by q/k and v/o of one attention, is a linear assignment on the
summed head-pair scores. The permuted model computes exactly the same function as the original.
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


def _permuted(t: torch.Tensor, axes: tuple[int | None, ...], perms: Perms, skip_axis: int, spec=None) -> torch.Tensor:
    for a, g in enumerate(axes):
        if a == skip_axis or g is None:
            continue
        p = spec.full_perm(g, perms) if spec is not None else perms.get(g)
        if p is not None:
            t = t.index_select(a, p)
    return t


def _cost(spec, g: int, pa, pb, axes, perms: Perms, n: int, dev) -> torch.Tensor:
    """``[n, n]``: summed inner products of ``a``'s and (otherwise permuted) ``b``'s slices of group ``g``."""
    cost = torch.zeros(n, n, dtype=torch.float64, device=dev)
    for key, axis, off in spec.slices()[g]:
        ta = pa[key].narrow(axis, off, n).movedim(axis, 0).reshape(n, -1)
        tb = _permuted(pb[key], axes[key], perms, axis, spec).narrow(axis, off, n).movedim(axis, 0).reshape(n, -1)
        cost += ta @ tb.T
    return cost


def _head_lap(costs: list[torch.Tensor], H: int) -> list[torch.Tensor]:
    """Best head-structured permutations for groups sharing one head permutation: per group and head pair
    a linear assignment inside the heads, then one on the summed head-pair scores."""
    total = torch.zeros(H, H, dtype=torch.float64)
    inner = []
    for cost in costs:   # tied groups may differ in head width (values wider than queries/keys)
        d = cost.shape[0] // H
        blocks = cost.reshape(H, d, H, d).permute(0, 2, 1, 3).cpu().numpy()   # [h_a, h_b, d, d]
        sig = np.zeros((H, H, d), dtype=np.int64)
        for h in range(H):
            for k in range(H):
                r, c = linear_sum_assignment(blocks[h, k], maximize=True)
                sig[h, k] = c
                total[h, k] += float(blocks[h, k][r, c].sum())
        inner.append(sig)
    _, pi = linear_sum_assignment(total.numpy(), maximize=True)
    out = []
    for sig in inner:
        d = sig.shape[2]
        out.append(torch.as_tensor(np.concatenate([pi[h] * d + sig[h, pi[h]] for h in range(H)]), dtype=torch.long))
    return out


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
    hidden = list(spec.hidden)
    heads = spec.head_structure
    ties: dict[int, list[int]] = {}
    for g in hidden:
        if g in heads:
            ties.setdefault(heads[g][1], []).append(g)
    units = [[g] for g in hidden if g not in heads] + list(ties.values())   # groups optimized together
    dev = wa.device
    perms: Perms = {g: torch.arange(spec.group_sizes[g], device=dev) for g in hidden}
    if init:
        perms.update({g: p.to(dev) for g, p in init.items()})
    pa = {k: v.double() for k, v in wa.params.items()}
    pb = {k: v.double() for k, v in wb.params.items()}
    rng = np.random.default_rng(seed)
    for _ in range(max_iter):
        progress = False
        for u in rng.permutation(len(units)):
            unit = units[int(u)]
            n = spec.group_sizes[unit[0]]
            costs = [_cost(spec, g, pa, pb, axes, perms, spec.group_sizes[g], dev) for g in unit]
            if unit[0] in heads:
                news = [p.to(dev) for p in _head_lap(costs, heads[unit[0]][0])]
            else:
                news = [_lap(costs[0]).to(dev)]
            rows = [torch.arange(c.shape[0], device=dev) for c in costs]
            old_score = sum(c[r, perms[g]].sum() for c, r, g in zip(costs, rows, unit))
            new_score = sum(c[r, p].sum() for c, r, p in zip(costs, rows, news))
            if new_score > old_score + 1e-12 * max(1.0, abs(float(old_score))):
                for g, p in zip(unit, news):
                    perms[g] = p
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
    spec = permutation_spec(wa.arch)
    for g in spec.hidden:
        if g in spec.head_structure or g not in acts_a:
            continue   # head-structured groups (attention) are left to weight matching
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
    slices = spec.slices()
    keys = {k for g in spec.hidden for k, _, _ in slices.get(g, [])}
    return float(sum((a.params[k].double() * b.params[k].double()).sum() for k in keys))
