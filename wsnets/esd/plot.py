"""Plots: each layer's ESD on log-log axes with the fitted power-law tail and λmin marked (and the
Marchenko–Pastur bulk with ``mp_fit``), and α per layer across depth."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_write


def _figure():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    return path


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:80]


def mp_density(lam: np.ndarray, row: dict[str, Any]) -> np.ndarray:
    """The fitted Marchenko–Pastur density in the original eigenvalue scale (0 outside the bulk)."""
    Q, s, w2 = row["Q"], row["sigma_mp"], row["W_scale"] ** 2
    x = lam * w2
    with np.errstate(all="ignore"):
        if Q == 1:  # quarter circle on singular values ν = sqrt(x): ρ_x(x) = ρ_ν(√x) / (2√x)
            nu = np.sqrt(x)
            dens = np.nan_to_num(np.sqrt(4 - nu ** 2) / (np.pi * s * s) / (2 * nu))
        else:
            b, a = (s * (1 + 1 / np.sqrt(Q))) ** 2, (s * (1 - 1 / np.sqrt(Q))) ** 2
            dens = np.nan_to_num(Q / (2 * np.pi * s * s * x) * np.sqrt((b - x) * (x - a)))
    return np.clip(dens, 0, None) * w2


def plot_layer(evals: np.ndarray, row: dict[str, Any], path: str | Path, *, title: str = "", mp_fit: bool = False) -> Path:
    """Log-log histogram (density) of one layer's eigenvalues with the power-law fit and λmin."""
    plt = _figure()
    ev = np.asarray(evals, dtype=np.float64)
    ev = ev[ev > 1e-12]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    if ev.size >= 2 and ev.max() > ev.min():
        bins = np.logspace(np.log10(ev.min()), np.log10(ev.max()), min(60, max(10, ev.size // 4)))
        ax.hist(ev, bins=bins, density=True, color="tab:blue", alpha=0.6, label=f"ESD ({ev.size} eigenvalues)")
    ok = row.get("status") == "success"
    if ok:
        a, xmin, frac = row["alpha"], row["xmin"], row["num_pl_spikes"] / max(1, ev.size)
        x = np.logspace(np.log10(xmin), np.log10(ev.max()), 100)
        ax.plot(x, frac * (a - 1) / xmin * (x / xmin) ** (-a), "r--", lw=2,
                label=f"power law α={a:.2f} (tail of {row['num_pl_spikes']}, D={row['D']:.3f})")
        ax.axvline(xmin, color="red", lw=1, label=f"λmin = {xmin:.3g}")
    if mp_fit and isinstance(row.get("sigma_mp"), float) and math.isfinite(row["sigma_mp"]):
        x = np.logspace(np.log10(max(ev.min(), 1e-12)), np.log10(ev.max()), 400)
        d = mp_density(x, row)
        if (d > 0).any():
            ax.plot(x[d > 0], d[d > 0], color="tab:orange", lw=2,
                    label=f"MP bulk σ={row['sigma_mp']:.2f}, spikes={row['num_spikes']}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    conv = " of each kernel slice, x1/2 (conv2d_norm)" if row.get("layer_type") == "CONV2D" else ""
    ax.set_xlabel(f"eigenvalue λ = σ(W)²{conv} (no 1/N normalization)")
    ax.set_ylabel("density (1/λ)")
    status = "" if ok else f"  [{row.get('status')}]"
    ax.set_title(f"{title}\nlayer {row['layer_id']}: {row['name']} ({row['N']}x{row['M']}, rf={row['rf']}){status}",
                 fontsize=9)
    ax.legend(fontsize=8, loc="lower left")
    out = _save(fig, Path(path))
    plt.close(fig)
    return out


def plot_alpha(rows: list[dict[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """α per layer across depth; failed/skipped layers marked on the axis, 2 ≤ α ≤ 6 band shaded."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(rows) + 3), 4))
    ids = list(range(len(rows)))
    alpha = [r.get("alpha", float("nan")) if r.get("status") == "success" else float("nan") for r in rows]
    ax.axhspan(2, 6, color="tab:green", alpha=0.12, label="2 ≤ α ≤ 6 (well-trained range, WeightWatcher)")
    ax.plot(ids, alpha, "o-", color="tab:blue", label="α (power-law exponent)")
    bad = [i for i, a in zip(ids, alpha) if not math.isfinite(a)]
    if bad:
        ax.plot(bad, [0] * len(bad), "x", color="tab:red", label="no fit (skipped/failed)")
    ax.set_xticks(ids)
    if len(ids) <= 60:
        ax.set_xticklabels([f"{r['layer_id']}: {r['name']}" + (f"[{r['slice_id']}]" if "slice_id" in r else "")
                            for r in rows], rotation=90, fontsize=7)
    ax.set_xlabel("layer (id: key, in checkpoint order)")
    ax.set_ylabel("α (dimensionless)")
    ax.set_title(f"{title}\npower-law exponent per layer", fontsize=9)
    ax.set_ylim(bottom=-0.3)
    ax.legend(fontsize=8)
    out = _save(fig, Path(path))
    plt.close(fig)
    return out


def plot_all(res, directory: str | Path, *, title: str = "", mp_fit: bool = False, prefix: str = "",
             main: str | Path | None = None) -> list[Path]:
    """One ESD plot per analyzed layer (``<prefix>esd_<id>_<name>.png``) and the alpha-per-layer plot
    (``main``, default ``<prefix>alpha_per_layer.png``), in ``directory``."""
    d = Path(directory)
    out = []
    for i, ev in sorted(res.evals.items()):
        row = res.rows[i]
        tag = f"m{row['model']}_" if "model" in row else ""
        sl = f"_s{row['slice_id']}" if "slice_id" in row else ""
        out.append(plot_layer(ev.numpy(), row, d / f"{prefix}esd_{tag}{row['layer_id']:03d}_{_safe(row['name'])}{sl}.png",
                              title=title, mp_fit=mp_fit))
    out.append(plot_alpha([r for r in res.rows if r.get("model", 0) == 0],
                          Path(main) if main is not None else d / f"{prefix}alpha_per_layer.png", title=title))
    return out
