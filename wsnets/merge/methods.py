"""The per-tensor merge methods: linear, SLERP, task arithmetic, TIES, DARE, breadcrumbs, model stock.

Each is a registered function of one slice of one tensor (:class:`~wsnets.merge.engine.Inputs`);
whole-tensor statistics (TIES's top-k, SLERP's angle, model stock's cosines, DARE's L1 rescale) are
exact requests, so a method gives the same numbers on a tensor held in memory and on one streamed in
slices. With a base, ``x.models`` are the fine-tuned models and ``x.delta`` their task vectors
``tau_k = theta_k - theta_base``.

How wsnets and mergekit (0.1.5) differ, and which wsnets follows (each difference is an option, so
mergekit's numbers are one setting away; the tests check both against mergekit):

============================ ===================================== ======================================
                             wsnets (default)                      mergekit
============================ ===================================== ======================================
entries kept at density d    ``ceil(d * n)``, exact (the papers'   ``max(1, int(d * n))`` (floor)
                             "top d%" as a lower bound)
ties at the cutoff           earlier entries first (a stable sort) ``torch.argsort`` order (unstable)
TIES trimming unit           the whole model (``scope="model"``,   each tensor (``scope="tensor"``)
                             Yadav et al.'s global top-k)
TIES elected sign of a 0 sum 0: no entry agrees (the paper's sgn)  +1
DARE rescaling               ``1 / density`` (Yu et al.:           ``rescale="l1"``: match each task
                             ``rescale="density"``)                vector's L1 norm
DARE-TIES merge              disjoint mean (``normalize=True``,    disjoint sum (``normalize=False``)
                             TIES's)
task arithmetic lambda       ``scale=0.4`` (Ilharco et al.'s       ``lambda=1``
                             typical value; choose on validation)
breadcrumbs outliers         ``ceil(gamma * n)`` largest removed   ``int(gamma * n)``
compute dtype                float32 for half-precision inputs     the inputs' (bfloat16 for bfloat16
                             (``dtype=`` to choose; recorded)      inputs) unless ``dtype:`` is set
model stock ``filter_wise``  one ratio per row of the first axis   per vector of the last axis (the same
                                                                   for 2-D weights)
SLERP                        two models, the first at ``t = 0``    the base at ``t = 0`` and one other
============================ ===================================== ======================================

Running statistics (BatchNorm ``running_mean``/``running_var``) are not task vectors: methods with a
base give them the mean of the fine-tuned models' statistics (see :mod:`wsnets.merge.stream`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Sequence

import torch

from ..errors import ConfigError
from .engine import Inputs
from .registry import Density, Fraction01, Interval, Outliers, PerModel, keep_count, register


def _check_weights(opts: dict[str, Any], *, where: str, model_names: Sequence[str] | None = None) -> None:
    w = opts["weight"]
    s = sum(w)
    if opts.get("normalize", False):
        if abs(s) < 1e-8:
            raise ConfigError(f"{where}: weights {list(w)} sum to {s:g}; a normalized average needs a non-zero sum")
    elif abs(s - 1.0) > 1e-6:
        raise ConfigError(f"{where}: weights {list(w)} sum to {s:g}, not 1; an average without normalize needs "
                          "weights summing to 1 (or pass normalize)")


@register(paper="https://arxiv.org/abs/2203.05482", base=False, aliases=("average",), check=_check_weights)
def linear(x: Inputs, *, weight: PerModel[float] = 1.0, normalize: bool = True) -> torch.Tensor:
    """Weighted average ``sum_k w_k theta_k / sum_k w_k`` (Wortsman et al. 2022, model soups).

    Parameters
    ----------
    weight : one weight per model (a scalar broadcasts)
    normalize : divide by the sum of the weights (else the weights must sum to 1)

    The division is folded into the weights (one product over the models), where mergekit sums and then
    divides: the two differ by float32 round-off, which flips the rounding of a bfloat16 output by one
    unit in the last place in a fraction of a percent of entries (``benchmarks/merge_speed.py``).
    """
    w = x.column([v / sum(weight) for v in weight] if normalize else weight)
    return torch.matmul(w.T, x.models, out=x.empty().view(1, -1)).squeeze(0)


@register(paper="https://dl.acm.org/doi/10.1145/325165.325242", base=False, min_models=2, max_models=2)
def slerp(x: Inputs, *, t: Fraction01 = 0.5, dot_threshold: Annotated[float, Interval(0.0, 1.0)] = 0.9995,
          eps: Annotated[float, Interval(0.0)] = 1e-8) -> torch.Tensor:
    """Spherical linear interpolation between two models, per tensor (Shoemake 1985).

    ``sin((1-t) O) / sin O * a + sin(t O) / sin O * b`` with ``O`` the angle between ``a`` and ``b`` as
    whole tensors; where ``|cos O| > dot_threshold`` (nearly collinear or opposite, where the formula
    divides by ~0) it falls back to ``(1-t) a + t b``, as mergekit does.

    Parameters
    ----------
    t : interpolation position: 0 gives the first model, 1 the second
    dot_threshold : above this |cosine| use linear interpolation
    eps : norms below this count as 1 (a zero tensor)
    """
    g = x.gram(x.models)                                   # [[a.a, a.b], [a.b, b.b]]
    na, nb = g[0, 0].sqrt().item(), g[1, 1].sqrt().item()
    na, nb = (na if na > eps else 1.0), (nb if nb > eps else 1.0)
    dot = max(-1.0, min(1.0, g[0, 1].item() / (na * nb)))
    a, b = x.models[0], x.models[1]
    if abs(dot) > dot_threshold:
        ca, cb = 1.0 - t, t
    else:
        theta = torch.tensor(dot, dtype=torch.float64).acos()
        s = theta.sin()
        ca, cb = ((1 - t) * theta).sin().div(s).item(), (t * theta).sin().div(s).item()
    return ca * a + cb * b


def _combine(x: Inputs, d: torch.Tensor, weight: Sequence[float], scale: float, normalize: bool,
             elect: bool) -> torch.Tensor:
    """``base + scale * merge(w_k d_k)``: a sum, or (``elect``) the sum over the models agreeing with the
    elected sign ``sgn(sum_k w_k d_k)``; ``normalize`` divides by the (agreeing) models' weights.
    ``d [K, n]`` is consumed (changed in place)."""
    unit = all(w == 1 for w in weight)
    w = x.column(weight)
    if not unit:
        d.mul_(w)
    if elect:
        sign = d.sum(0).sign_()
        agree = (d * sign) > 0                    # same sign as the elected one (a 0 sum elects no sign)
        d.mul_(agree)
        merged = d.sum(0)
        if normalize:
            if unit:
                div = agree.sum(0, dtype=merged.dtype)
            else:
                div = torch.zeros_like(merged)
                for k, wk in enumerate(weight):
                    div.add_(agree[k].to(merged.dtype), alpha=wk)
            merged.div_(div.masked_fill_(div == 0, 1))
    else:
        merged = d.sum(0)
        if normalize:
            s = float(sum(weight))
            merged.div_(s if abs(s) >= 1e-8 else 1.0)
    return x.base.add_(merged, alpha=scale)


@register(paper="https://arxiv.org/abs/2212.04089", base=True)
def task_arithmetic(x: Inputs, *, weight: PerModel[float] = 1.0, scale: float = 0.4,
                    normalize: bool = False) -> torch.Tensor:
    """``theta_base + scale * sum_k w_k tau_k`` (Ilharco et al. 2023, "Editing Models with Task Arithmetic").

    Parameters
    ----------
    weight : weight of each task vector
    scale : lambda on the summed task vectors; 1 / K with unit weights gives the plain average
    normalize : divide the sum by the sum of the weights
    """
    return _combine(x, x.delta, weight, scale, normalize, elect=False)


@register(paper="https://arxiv.org/abs/2306.01708", base=True, scope="model")
def ties(x: Inputs, *, weight: PerModel[float] = 1.0, density: PerModel[Density] = 0.2, scale: float = 1.0,
         normalize: bool = True) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023): trim, elect sign, disjoint merge.

    Each task vector keeps its ``ceil(density * n)`` largest-magnitude entries (over the whole model by
    default, as the paper's top-k%; per tensor with ``scope="tensor"``, as mergekit), the sign of each
    entry is elected as the sign of the sum of the kept weighted values, and the kept values agreeing
    with it are averaged (``normalize``, the paper's disjoint mean) or summed.

    Parameters
    ----------
    weight : weight of each task vector (before the sign election, as mergekit)
    density : fraction of each task vector's entries kept by magnitude, in (0, 1]
    scale : lambda on the merged task vector
    normalize : disjoint mean (else disjoint sum)
    """
    d = x.delta
    keep = x.top(d.abs(), [keep_count(p, x.numel) for p in density])
    return _combine(x, d.mul_(keep), weight, scale, normalize, elect=True)


def _dare(x: Inputs, density: Sequence[float], rescale: str, seed: int) -> torch.Tensor:
    mask = x.bernoulli(density, seed)
    d = x.delta
    if rescale == "l1":
        before, after = x.total(d.abs(), (d * mask).abs_())      # [K] L1 norms of the task vectors, of what is kept
        factor = [float(b / a) if b >= 1e-7 and a >= 1e-7 else 1.0 for b, a in zip(before, after)]
        return d.mul_(mask).mul_(x.column(factor))
    d.mul_(mask)
    return d.div_(x.column(density)) if rescale == "density" else d


@register(paper="https://arxiv.org/abs/2311.03099", base=True)
def dare_ties(x: Inputs, *, weight: PerModel[float] = 1.0, density: PerModel[Density] = 0.5, scale: float = 1.0,
              normalize: bool = True, rescale: Literal["density", "l1", "none"] = "density",
              seed: int = 0) -> torch.Tensor:
    """DARE then TIES's sign election (Yu et al. 2024, "Language Models are Super Mario").

    Each task vector keeps each entry with probability ``density`` (drop and rescale), then the kept
    values are merged as TIES does.

    Parameters
    ----------
    weight : weight of each task vector
    density : probability of keeping each entry, in (0, 1]
    scale : lambda on the merged task vector
    normalize : disjoint mean (else disjoint sum, mergekit's default)
    rescale : density: divide kept values by the density (the paper); l1: match each task vector's L1 norm (mergekit); none
    seed : random seed (the masks of a tensor depend only on seed, tensor name and model index)
    """
    return _combine(x, _dare(x, density, rescale, seed), weight, scale, normalize, elect=True)


@register(paper="https://arxiv.org/abs/2311.03099", base=True)
def dare_linear(x: Inputs, *, weight: PerModel[float] = 1.0, density: PerModel[Density] = 0.5, scale: float = 1.0,
                normalize: bool = False, rescale: Literal["density", "l1", "none"] = "density",
                seed: int = 0) -> torch.Tensor:
    """DARE then task arithmetic (Yu et al. 2024): drop and rescale each task vector, then sum.

    Parameters
    ----------
    weight : weight of each task vector
    density : probability of keeping each entry, in (0, 1]
    scale : lambda on the summed task vectors
    normalize : divide by the sum of the weights
    rescale : density: divide kept values by the density (the paper); l1: match each task vector's L1 norm (mergekit); none
    seed : random seed (the masks of a tensor depend only on seed, tensor name and model index)
    """
    return _combine(x, _dare(x, density, rescale, seed), weight, scale, normalize, elect=False)


def _breadcrumbs(x: Inputs, density: Sequence[float], gamma: Sequence[float]) -> torch.Tensor:
    d = x.delta
    n = x.numel
    keep = [keep_count(p, n) for p in density]
    top = [min(keep_count(g, n), n - k) for g, k in zip(gamma, keep)]
    lo = [n - k - t for k, t in zip(keep, top)]               # smallest entries dropped
    below, upto = x.bottom(d.abs(), lo, [a + k for a, k in zip(lo, keep)])
    return d.mul_(upto.logical_and_(below.logical_not_()))


@register(paper="https://arxiv.org/abs/2312.06795", base=True)
def breadcrumbs(x: Inputs, *, weight: PerModel[float] = 1.0, density: PerModel[Density] = 0.1,
                gamma: PerModel[Outliers] = 0.01, scale: float = 1.0,
                normalize: bool = False) -> torch.Tensor:
    """Model breadcrumbs (Davari & Belilovsky 2023): drop each task vector's largest outliers and its
    smallest entries, then sum.

    Each task vector loses its ``ceil(gamma * n)`` largest-magnitude entries and keeps the next
    ``ceil(density * n)`` (fewer outliers go when both do not fit).

    Parameters
    ----------
    weight : weight of each task vector
    density : fraction of each task vector's entries kept, in (0, 1]
    gamma : fraction of largest-magnitude entries removed as outliers, in [0, 1)
    scale : lambda on the summed task vectors
    normalize : divide by the sum of the weights
    """
    return _combine(x, _breadcrumbs(x, density, gamma), weight, scale, normalize, elect=False)


@register(paper="https://arxiv.org/abs/2312.06795", base=True)
def breadcrumbs_ties(x: Inputs, *, weight: PerModel[float] = 1.0, density: PerModel[Density] = 0.1,
                     gamma: PerModel[Outliers] = 0.01,
                     scale: float = 1.0, normalize: bool = False) -> torch.Tensor:
    """Model breadcrumbs' masks with TIES's sign election (as mergekit's ``breadcrumbs_ties``).

    Parameters
    ----------
    weight : weight of each task vector
    density : fraction of each task vector's entries kept, in (0, 1]
    gamma : fraction of largest-magnitude entries removed as outliers, in [0, 1)
    scale : lambda on the merged task vector
    normalize : disjoint mean (else disjoint sum)
    """
    return _combine(x, _breadcrumbs(x, density, gamma), weight, scale, normalize, elect=True)


@register(paper="https://arxiv.org/abs/2403.19522", base=True, min_models=2)
def model_stock(x: Inputs, *, filter_wise: bool = False) -> torch.Tensor:
    """Model stock (Jang et al. 2024): move from the base toward the fine-tuned models' average by
    ``t = K cos / (1 + (K - 1) cos)``, ``cos`` the mean pairwise cosine of their task vectors.

    Cosines of each tensor (or, ``filter_wise``, of each row of its first axis); where
    ``1 + (K - 1) cos`` vanishes the base is kept.

    Parameters
    ----------
    filter_wise : one ratio per row (output filter) instead of per tensor
    """
    d = x.delta
    K = x.K
    g = x.gram(d, rows=filter_wise)                         # [(rows,) K, K]
    norms = torch.diagonal(g, dim1=-2, dim2=-1).sqrt()
    iu = torch.triu_indices(K, K, 1)
    cos = g[..., iu[0], iu[1]] / (norms[..., iu[0]] * norms[..., iu[1]]).clamp(min=1e-6)
    cos = cos.clamp(-1, 1).mean(-1)                         # [(rows)]
    den = 1 + (K - 1) * cos
    t = torch.where(den.abs() < 1e-6, torch.zeros_like(cos), K * cos / torch.where(den.abs() < 1e-6, 1.0, den))
    step = d.mean(0)                                        # average - base
    if filter_wise:
        return x.base.addcmul_(x.expand_rows(t).to(step.dtype), step)
    return x.base.add_(step, alpha=t.item())
