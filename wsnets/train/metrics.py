"""Evaluation metrics for meta-models, in torch, batched (no Python loop over samples).

Regression targets (test accuracy, generalization gap): Kendall's τ-b, Spearman's ρ, R², MAE.
Classification targets (dataset, task): accuracy, macro-F1, confusion matrix. Across seeds:
:func:`mean_std`.

Kendall τ-b compares all ``n(n-1)/2`` pairs at once (``O(n²)`` memory; fine up to ~10⁴ models) and
agrees with :func:`scipy.stats.kendalltau` (variant ``"b"``, ties handled); Spearman's ρ is the
Pearson correlation of average ranks, as in :func:`scipy.stats.spearmanr`.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import torch


def _as_vec(x) -> torch.Tensor:
    return torch.as_tensor(x).detach().flatten().to(torch.float64).cpu()


def kendall_tau(pred, true) -> float:
    """Kendall's τ-b between two vectors ``[n]`` (NaN when either is constant or n < 2)."""
    p, t = _as_vec(pred), _as_vec(true)
    n = p.numel()
    if n < 2:
        return float("nan")
    i, j = torch.triu_indices(n, n, offset=1)
    dp = torch.sign(p[i] - p[j])
    dt = torch.sign(t[i] - t[j])
    s = (dp * dt).sum()
    n_p = (dp != 0).sum().to(torch.float64)   # pairs not tied in pred
    n_t = (dt != 0).sum().to(torch.float64)
    denom = torch.sqrt(n_p * n_t)
    return float(s / denom) if denom > 0 else float("nan")


def rank(x) -> torch.Tensor:
    """Average ranks (1-based, ties share their mean rank) of a vector ``[n]``."""
    v = _as_vec(x)
    n = v.numel()
    order = torch.argsort(v, stable=True)
    sorted_v = v[order]
    new_group = torch.ones(n, dtype=torch.bool)
    new_group[1:] = sorted_v[1:] != sorted_v[:-1]
    gid = torch.cumsum(new_group.long(), 0) - 1                       # group of each sorted position
    pos = torch.arange(1, n + 1, dtype=torch.float64)
    g = int(gid[-1]) + 1 if n else 0
    mean_pos = torch.zeros(g, dtype=torch.float64).index_add_(0, gid, pos) / torch.bincount(gid, minlength=g)
    out = torch.empty(n, dtype=torch.float64)
    out[order] = mean_pos[gid]
    return out


def pearson(a, b) -> float:
    a, b = _as_vec(a), _as_vec(b)
    a, b = a - a.mean(), b - b.mean()
    d = torch.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / d) if d > 0 else float("nan")


def spearman(pred, true) -> float:
    """Spearman's ρ: Pearson correlation of average ranks."""
    return pearson(rank(pred), rank(true))


def r2(pred, true) -> float:
    """Coefficient of determination ``1 - SS_res / SS_tot`` (as :func:`sklearn.metrics.r2_score`)."""
    p, t = _as_vec(pred), _as_vec(true)
    ss_tot = ((t - t.mean()) ** 2).sum()
    ss_res = ((t - p) ** 2).sum()
    return float(1 - ss_res / ss_tot) if ss_tot > 0 else float("nan")


def mae(pred, true) -> float:
    """Mean absolute error."""
    return float((_as_vec(pred) - _as_vec(true)).abs().mean())


def regression_metrics(pred, true) -> dict[str, float]:
    """``{"kendall_tau", "spearman", "r2", "mae"}`` for one regression target."""
    return {"kendall_tau": kendall_tau(pred, true), "spearman": spearman(pred, true),
            "r2": r2(pred, true), "mae": mae(pred, true)}


def confusion_matrix(pred, true, n_classes: int) -> torch.Tensor:
    """``[n_classes, n_classes]`` counts; row = true class, column = predicted class."""
    p = torch.as_tensor(pred).flatten().long().cpu()
    t = torch.as_tensor(true).flatten().long().cpu()
    return torch.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def accuracy(pred, true) -> float:
    p, t = torch.as_tensor(pred).flatten(), torch.as_tensor(true).flatten()
    return float((p == t).double().mean()) if t.numel() else float("nan")


def macro_f1(pred, true, n_classes: int) -> float:
    """Unweighted mean of per-class F1 over classes present in ``true`` or ``pred``
    (as :func:`sklearn.metrics.f1_score` with ``average="macro"``)."""
    cm = confusion_matrix(pred, true, n_classes).double()
    tp = cm.diagonal()
    support = cm.sum(1) + cm.sum(0)          # 2tp + fp + fn
    present = support > 0
    f1 = torch.where(present, 2 * tp / support.clamp_min(1), torch.zeros_like(tp))
    return float(f1[present].mean()) if present.any() else float("nan")


def classification_metrics(logits_or_pred, true, n_classes: int) -> dict:
    """``{"accuracy", "macro_f1", "confusion"}``; accepts logits ``[n, C]`` or labels ``[n]``."""
    x = torch.as_tensor(logits_or_pred)
    pred = x.argmax(-1) if x.dim() == 2 else x
    return {"accuracy": accuracy(pred, true), "macro_f1": macro_f1(pred, true, n_classes),
            "confusion": confusion_matrix(pred, true, n_classes).tolist()}


def mean_std(values: Iterable[float]) -> dict[str, float]:
    """Mean and sample standard deviation (``ddof=1``; 0 for a single value), ignoring NaNs."""
    v = [float(x) for x in values if x is not None and not math.isnan(float(x))]
    if not v:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    t = torch.tensor(v, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(v) > 1 else 0.0, "n": len(v)}


def aggregate(per_seed: Sequence[Mapping[str, Mapping[str, float]]]) -> dict:
    """Mean ± std over seeds of nested ``{target: {metric: value}}`` dicts (scalars only)."""
    out: dict = {}
    if not per_seed:
        return out
    for target, mets in per_seed[0].items():
        if not isinstance(mets, Mapping):
            out[target] = mean_std(s[target] for s in per_seed)
            continue
        out[target] = {}
        for name, v in mets.items():
            if isinstance(v, (int, float)):
                out[target][name] = mean_std(s[target][name] for s in per_seed)
    return out


def fmt(ms: Mapping[str, float], digits: int = 3) -> str:
    """``"0.812 ± 0.011"`` from a :func:`mean_std` dict; ``"0.812 (1 seed)"`` from a single value, whose
    standard deviation is not 0 but unknown."""
    if ms.get("n", 0) == 0:
        return "n/a"
    if ms["n"] == 1:
        return f"{ms['mean']:.{digits}f} (1 seed)"
    return f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"
