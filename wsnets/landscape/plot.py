"""Pictures of landscapes: contour with labelled levels, 3D surface, 1D curve, Hessian spectral
density, intrinsic-dimension sweep. Each function writes a PNG (atomically) and returns its path."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..io import atomic_write
from .hessian import SpectralDensity
from .intrinsic import IntrinsicResult
from .surface import Surface


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=130, bbox_inches="tight", format=path.suffix.lstrip(".") or "png"))
    _plt().close(fig)
    return path


def _subtitle(s: Surface) -> str:
    m = s.meta
    bits = [m.get("architecture", ""), m.get("dataset", ""), m.get("directions", "")]
    return ", ".join(b for b in bits if b)


def contour(s: Surface, path: str | Path, *, levels: int = 15, log: bool = True, title: str | None = None) -> Path:
    """Filled contour of the 2D loss with labelled level lines; the model sits at the origin (marked)."""
    plt = _plt()
    if s.ndim != 2:
        raise ValueError("contour() needs a 2D surface")
    X, Y = np.meshgrid(s.xs, s.ys, indexing="ij")
    Z = np.log10(s.loss) if log else s.loss
    fig, ax = plt.subplots(figsize=(6, 5))
    lv = np.linspace(Z.min(), Z.max(), levels)
    cf = ax.contourf(X, Y, Z, levels=lv, cmap="viridis")
    cs = ax.contour(X, Y, Z, levels=lv[::2], colors="white", linewidths=0.7, linestyles="solid")
    ax.clabel(cs, fmt=(lambda v: f"{10 ** v:.2g}") if log else "%.2g", fontsize=7)
    ax.plot([0], [0], marker="*", color="red", markersize=12, linestyle="none", label="model (origin)")
    cb = fig.colorbar(cf, ax=ax, format=(lambda v, _: f"{10 ** v:.2g}") if log else None)
    cb.set_label("loss (cross-entropy, nats; log colour scale)" if log else "loss (cross-entropy, nats)")
    ax.set_xlabel("direction 1 coordinate α (filter-normalized units)")
    ax.set_ylabel("direction 2 coordinate β (filter-normalized units)")
    ax.set_title(title or f"Loss surface\n{_subtitle(s)}", fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


def surface3d(s: Surface, path: str | Path, *, log: bool = True, title: str | None = None) -> Path:
    """3D surface of the 2D loss."""
    plt = _plt()
    X, Y = np.meshgrid(s.xs, s.ys, indexing="ij")
    Z = np.log10(s.loss) if log else s.loss
    fig = plt.figure(figsize=(7, 5.5))
    ax = fig.add_subplot(projection="3d")
    surf = ax.plot_surface(X, Y, Z, cmap="viridis", linewidth=0, antialiased=True)
    from matplotlib.ticker import FuncFormatter, MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.yaxis.set_major_locator(MaxNLocator(5))
    ax.set_xlabel("α (filter-normalized units)")
    ax.set_ylabel("β (filter-normalized units)")
    ax.set_zlabel("loss (nats, log scale)" if log else "loss (nats)")
    if log:
        ax.zaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{10 ** v:.2g}"))
    fig.colorbar(surf, ax=ax, shrink=0.6, pad=0.12, label="loss (nats)",
                 format=FuncFormatter(lambda v, _: f"{10 ** v:.2g}") if log else None)
    ax.set_title(title or f"Loss surface (3D)\n{_subtitle(s)}", fontsize=10)
    return _save(fig, path)


def curve(s: Surface, path: str | Path, *, title: str | None = None) -> Path:
    """1D loss (left axis, log scale) and accuracy (right axis) along a direction."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    l1 = ax.semilogy(s.xs, s.loss, color="C0", label="loss")
    ax.set_xlabel("coordinate α along the direction (filter-normalized units)")
    ax.set_ylabel("loss (cross-entropy, nats, log scale)", color="C0")
    ax2 = ax.twinx()
    l2 = ax2.plot(s.xs, 100 * s.acc, color="C1", linestyle="--", label="accuracy")
    ax2.set_ylabel("accuracy (%)", color="C1")
    ax2.set_ylim(0, 100)
    l3 = [ax.axvline(0, color="gray", linewidth=0.8, label="model (α = 0)")]
    ax.legend(l1 + l2 + l3, [l.get_label() for l in l1 + l2 + l3], loc="upper center", bbox_to_anchor=(0.5, -0.16),
              ncol=3, fontsize=8, frameon=False)
    ax.set_title(title or f"Loss along a direction\n{_subtitle(s)}", fontsize=10)
    return _save(fig, path)


def spectral_density(d: SpectralDensity, path: str | Path, *, sigma: float | None = None,
                     exact: np.ndarray | None = None, title: str = "Hessian spectral density (SLQ)") -> Path:
    """Smoothed SLQ density on a log-density axis, with the Ritz nodes as ticks (and exact eigenvalues if given)."""
    plt = _plt()
    nodes, w = d.flat()
    lo, hi = float(nodes.min()), float(nodes.max())
    span = max(hi - lo, 1e-12)
    sigma = sigma or span / 200
    grid = np.linspace(lo - 0.05 * span, hi + 0.05 * span, 2000)
    dens = d.density(grid, sigma)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.semilogy(grid, np.maximum(dens, 1e-12), label=f"SLQ density (Gaussian σ={sigma:.2g})")
    ax.set_ylim(max(dens.max() * 1e-7, 1e-12), dens.max() * 3)
    ax.plot(nodes[w > 1e-8], np.full((w > 1e-8).sum(), ax.get_ylim()[0] * 2), "|", color="C1",
            label="Ritz values (quadrature nodes)")
    if exact is not None:
        ax.plot(exact, np.full(len(exact), ax.get_ylim()[0] * 6), "|", color="C2", label="exact eigenvalues")
    ax.set_xlabel("eigenvalue of the loss Hessian (nats / parameter unit²)")
    ax.set_ylabel("density (log scale)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def intrinsic_curve(results: IntrinsicResult | Sequence[IntrinsicResult], path: str | Path, *,
                    labels: Sequence[str] | None = None, title: str = "Intrinsic dimension sweep") -> Path:
    """Test accuracy vs subspace dimension d (log axis), the full model's accuracy, the 90% threshold and d_int90."""
    plt = _plt()
    results = [results] if isinstance(results, IntrinsicResult) else list(results)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, r in enumerate(results):
        c = f"C{i}"
        name = labels[i] if labels else f"{r.meta.get('architecture', '')} ({r.projection})"
        ax.semilogx(r.dims, 100 * np.asarray(r.test_acc), "o-", color=c, label=f"{name}: subspace, test")
        ax.axhline(100 * r.full_test_acc, color=c, linestyle="--", linewidth=1,
                   label=f"full model, D={r.num_params:,}: {100 * r.full_test_acc:.1f}%")
        ax.axhline(100 * r.threshold, color=c, linestyle=":", linewidth=1, label=f"90% of full: {100 * r.threshold:.1f}%")
        if r.d_int90 is not None:
            ax.axvline(r.d_int90, color=c, linestyle="-.", linewidth=1, label=f"d_int90 = {r.d_int90}")
    ax.set_xlabel("subspace dimension d (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)  # outside: never hides the curves
    return _save(fig, path)
