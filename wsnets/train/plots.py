"""Figures of a meta-model's test predictions: predicted-vs-true scatter and confusion matrix (PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..io import atomic_write
from .metrics import kendall_tau, r2

UNITS = {"test_acc": "fraction correct", "train_acc": "fraction correct",
         "gen_gap": "train acc − test acc", "test_loss": "cross-entropy, nats", "train_loss": "cross-entropy, nats"}
LABELS = {"test_acc": "test accuracy", "train_acc": "train accuracy", "gen_gap": "generalization gap",
          "test_loss": "test loss", "train_loss": "train loss"}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def scatter(pred, true, target: str, path: str | Path, *, title: str = "") -> Path:
    """Predicted vs. true values of one regression target, with the y = x line, τ and R² in the legend."""
    plt = _plt()
    p = torch.as_tensor(pred).double().flatten().numpy()
    t = torch.as_tensor(true).double().flatten().numpy()
    label, unit = LABELS.get(target, target), UNITS.get(target, "")
    fig, ax = plt.subplots(figsize=(4.8, 4.4), dpi=120)
    ax.scatter(t, p, s=12, alpha=0.6, label=f"test checkpoints (n={len(t)})\nKendall τ={kendall_tau(p, t):.3f}, "
                                            f"R²={r2(p, t):.3f}")
    lo, hi = float(min(t.min(), p.min())), float(max(t.max(), p.max()))
    pad = 0.03 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=1, label="y = x (perfect prediction)")
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    u = f" ({unit})" if unit else ""
    ax.set_xlabel(f"true {label}{u}")
    ax.set_ylabel(f"predicted {label}{u}")
    ax.set_title(title or f"Meta-model: predicted vs. true {label}", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def confusion(cm, classes: Sequence[str], target: str, path: str | Path, *, title: str = "") -> Path:
    """Confusion matrix (rows: true class, columns: predicted), counts in cells, row-normalized colour."""
    plt = _plt()
    cm = torch.as_tensor(cm).double()
    frac = cm / cm.sum(1, keepdim=True).clamp_min(1)
    n = cm.shape[0]
    size = max(3.8, 0.45 * n + 2.5)
    fig, ax = plt.subplots(figsize=(size + 0.8, size), dpi=120)
    im = ax.imshow(frac.numpy(), vmin=0, vmax=1, cmap="Blues")
    fig.colorbar(im, ax=ax, label="fraction of true class")
    if n <= 30:
        for i in range(n):          # n ≤ 30 cells per row: text labels, not a hot path
            for j in range(n):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if frac[i, j] > 0.5 else "black")
    names = [str(c) for c in classes]
    ax.set_xticks(range(n), names, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(n), names, fontsize=7)
    ax.set_xlabel(f"predicted {target}")
    ax.set_ylabel(f"true {target}")
    acc = float(cm.diagonal().sum() / cm.sum().clamp_min(1))
    ax.set_title(title or f"Meta-model {target} confusion (accuracy {acc:.3f}, n={int(cm.sum())})", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    plt = _plt()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path
