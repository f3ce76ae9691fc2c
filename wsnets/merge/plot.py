"""Plots of paths between networks: loss and accuracy against the path parameter ``t``."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from .interpolate import Curve


def plot_curves(curves: Mapping[str, Curve], path: str | Path, *, title: str = "Loss and accuracy between two models",
                split: str = "test") -> Path:
    """Two panels (loss, accuracy) with one line per curve; the barrier is in each legend entry.

    Parameters
    ----------
    curves : label -> :class:`~wsnets.merge.interpolate.Curve` (e.g. "straight line", "after alignment",
        "Bezier curve").
    path : PNG file to write (atomically).
    split : name of the evaluation split, for the axis labels.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ..io import atomic_write

    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(10, 4.6))
    for label, c in curves.items():
        line, = ax_l.plot(c.t, c.loss, marker="o", ms=3,
                          label=f"{label}: loss barrier {c.barrier:.3f} nats, accuracy drop {100 * c.acc_barrier:.1f} pts")
        ax_a.plot(c.t, [100 * a for a in c.acc], marker="o", ms=3, color=line.get_color())
    ax_l.set_xlabel("position on path t (0 = model A, 1 = model B)")
    ax_l.set_ylabel(f"{split} cross-entropy loss (nats)")
    ax_a.set_xlabel("position on path t (0 = model A, 1 = model B)")
    ax_a.set_ylabel(f"{split} accuracy (%)")
    ax_l.set_title("loss along the path")
    ax_a.set_title("accuracy along the path")
    for ax in (ax_l, ax_a):
        ax.grid(alpha=0.3)
        ax.set_xlim(0, 1)
    fig.suptitle(title)
    fig.legend(loc="lower center", ncol=1, fontsize=8, frameon=False)  # below both panels: never hides a curve
    fig.tight_layout(rect=(0, 0.03 + 0.045 * len(curves), 1, 1))
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path


def plot_barriers_by_width(widths: list[int], before: list[float], after: list[float], path: str | Path, *,
                           title: str = "Loss barrier between independently trained MLPs") -> Path:
    """Loss barrier before and after weight matching against hidden width (log-2 x axis)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ..io import atomic_write

    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(widths, before, marker="o", label="straight line, no alignment")
    ax.plot(widths, after, marker="s", label="straight line after weight matching")
    ax.set_xscale("log", base=2)
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.set_xlabel("hidden width (neurons per layer)")
    ax.set_ylabel("test loss barrier (nats)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path
