"""Per-layer ESD metrics with WeightWatcher 0.7.7's names and definitions.

From eigenvalues ``λ`` (one ESD per row, see :mod:`wsnets.esd.eigen`) and a power-law fit:

=====================  ==========================================================================
``norm``               ``Σ λ`` (squared Frobenius norm)
``log_norm``           ``log10 Σ λ``
``spectral_norm``      ``λmax`` (squared largest singular value)
``log_spectral_norm``  ``log10 λmax``
``alpha_weighted``     ``α · log10 λmax``
``log_alpha_norm``     ``log10 Σ λ^α``
``stable_rank``        ``Σ λ / λmax``
``matrix_rank``        number of singular values above ``σmax · N · eps``
``entropy``            ``-Σ p ln p / ln(rank)`` with ``p = λ/Σλ + 1e-10`` (rank + 1e-10)
=====================  ==========================================================================

With ``mp_fit``: the ESD is rescaled to unit mean (``W_scale² = n / Σ λ``), a Marchenko–Pastur
density (quarter circle on singular values when ``Q = N/M = 1``) is fitted to a linear-kernel KDE
(bandwidth 0.1) over a grid of ``σ`` followed by a Nelder–Mead polish, exactly as WeightWatcher's
``fit_density_with_range``; ``num_spikes`` counts eigenvalues above the bulk edge plus the
Tracy–Widom margin, ``mp_softrank = λ+ / λmax``. With ``randomize``: each slice's entries are
shuffled, ``rand_distance`` is the Jensen–Shannon distance between the sorted original and
randomized eigenvalue vectors (each treated as a distribution, as WeightWatcher does), and
``num_traps`` is the number of MP spikes of the randomized ESD (correlation traps).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .eigen import matrix_eigenvalues, numerical_rank, slices
from .powerlaw import PowerLawFit

EPSILON = 1e-10
WEAK_RANK_LOSS_TOLERANCE = 1e-6
OVER_TRAINED_THRESH = 2.0
UNDER_TRAINED_THRESH = 6.0
KDE_BANDWIDTH = 0.1
KDE_GRID = 1000
KDE_DENSITY_THRESH = 0.01


def norm_metrics(evals: torch.Tensor, alpha: torch.Tensor, N: int, M: int, *, method: str = "gram") -> dict[str, torch.Tensor]:
    """Norm-based metrics of ``B`` ESDs of equal length in one pass.

    Parameters
    ----------
    evals : ``[B, n]`` float64 ascending. alpha : ``[B]`` (NaN where the fit failed).
    N, M : the layer's slice sizes (``N`` enters the rank tolerance).

    Returns
    -------
    dict of ``[B]`` tensors: norm, log_norm, spectral_norm, log_spectral_norm, alpha_weighted,
    log_alpha_norm, stable_rank, matrix_rank, entropy, weak_rank_loss, lambda_max.
    """
    norm = evals.sum(1)
    lmax = evals[:, -1]
    log_lmax = lmax.log10()
    rank = numerical_rank(evals, N, method=method, M=M)
    p = evals / norm[:, None] + EPSILON
    entropy = -(p * p.log()).sum(1) / (rank.to(evals.dtype) + EPSILON).log()
    return {
        "norm": norm, "log_norm": norm.log10(), "spectral_norm": lmax, "log_spectral_norm": log_lmax,
        "alpha_weighted": alpha * log_lmax,
        "log_alpha_norm": evals.pow(alpha[:, None]).sum(1).log10(),
        "stable_rank": norm / lmax, "matrix_rank": rank, "entropy": entropy,
        "weak_rank_loss": (evals < WEAK_RANK_LOSS_TOLERANCE).sum(1), "lambda_max": lmax,
    }


def training_warning(alpha: float) -> str:
    """WeightWatcher's ``warning`` column: over-trained below α = 2, under-trained above 6."""
    if not math.isfinite(alpha):
        return ""
    return "over-trained" if alpha < OVER_TRAINED_THRESH else ("under-trained" if alpha > UNDER_TRAINED_THRESH else "")


# -- Marchenko-Pastur fit -------------------------------------------------------------------------
def _linear_kde(data: np.ndarray, grid: np.ndarray, bw: float) -> np.ndarray:
    """Density of a linear (triangular) kernel, as ``sklearn.neighbors.KernelDensity(kernel='linear')``."""
    out = np.empty_like(grid)
    step = max(1, (1 << 22) // max(1, data.size))
    for s in range(0, grid.size, step):  # memory chunks of the evaluation grid
        u = np.abs(grid[s:s + step, None] - data[None, :]) / bw
        out[s:s + step] = np.clip(1.0 - u, 0.0, None).sum(1)
    return out / (data.size * bw)


def _mp_residuals(sigmas: np.ndarray, xde: np.ndarray, yde: np.ndarray, Q: float) -> np.ndarray:
    """Sum of squared residuals of MP (or quarter-circle) densities for each sigma: ``[G] -> [G]``."""
    s = np.asarray(sigmas, dtype=np.float64).reshape(-1, 1)
    with np.errstate(all="ignore"):
        if Q == 1:
            ymp = np.nan_to_num((1 / (np.pi * s * s)) * np.sqrt(4 - xde[None] ** 2))
            resid = ymp - yde[None]
        else:
            y = 1 / Q
            b = np.power(s * (1 + np.sqrt(1 / Q)), 2)
            a = np.power(s * (1 - np.sqrt(1 / Q)), 2)
            ymp = np.nan_to_num((1 / (2 * np.pi * s * s * xde[None] * y)) * np.sqrt((b - xde[None]) * (xde[None] - a)))
            peak = xde[np.argmax(yde)] if yde.size else 0.0
            invalid = (b < peak) | (b > (xde.max() if xde.size else 0.0)) | (a > peak)  # [G, 1]
            resid = np.where(invalid, 1000.0, ymp - yde[None])
        return np.sum(resid ** 2, axis=1)  # points of density < 0.01 contribute 0, as in WeightWatcher


def fit_mp(evals: np.ndarray, N: int, M: int) -> dict[str, float]:
    """WeightWatcher's automatic Marchenko–Pastur fit of one ESD.

    Parameters
    ----------
    evals : ``[n]`` eigenvalues (any order). N, M : slice sizes (``Q = N / M``).

    Returns
    -------
    dict with num_spikes, sigma_mp, mp_softrank, bulk_min, bulk_max (in the original eigenvalue
    scale) and W_scale.
    """
    from scipy import optimize
    ev = np.sort(np.asarray(evals, dtype=np.float64))
    Q = N / M
    w_scale = np.sqrt(ev.size) / np.sqrt(ev.sum())
    x = w_scale * w_scale * ev
    lmax = float(x.max())
    to_fit = np.sqrt(x) if Q == 1 else x
    xde = np.linspace(0, to_fit.max() + 0.5, KDE_GRID)
    yde = _linear_kde(to_fit, xde, KDE_BANDWIDTH)
    good = yde > KDE_DENSITY_THRESH
    xde, yde = xde[good], yde[good]
    scale = math.sqrt(lmax / (1 + 1 / math.sqrt(Q)) ** 2)  # calc_sigma(Q, evals)
    grid = np.mgrid[slice(0.05 * scale, 2.0 * scale, 0.01 * scale)]
    J = _mp_residuals(grid, xde, yde, Q)
    s0 = grid[int(np.argmin(J))]
    s1 = float(optimize.fmin(lambda p: float(_mp_residuals(p, xde, yde, Q)[0]), s0, disp=False)[0])
    bulk_max = (s1 * (1 + 1 / np.sqrt(Q))) ** 2
    bulk_min = (s1 * (1 - 1 / np.sqrt(Q))) ** 2
    tw = 1 / np.sqrt(Q) * np.power(bulk_max, 2 / 3) * np.power(M, -2 / 3)
    num_spikes = int((x > bulk_max + np.sqrt(tw)).sum())
    return {"num_spikes": num_spikes, "sigma_mp": s1, "mp_softrank": bulk_max / lmax,
            "W_scale": float(w_scale), "bulk_max": bulk_max / w_scale ** 2, "bulk_min": bulk_min / w_scale ** 2}


# -- randomization --------------------------------------------------------------------------------
def randomized_eigenvalues(w: torch.Tensor, ndim: int, *, replicas: int = 1, scale: float = 1.0, method: str = "gram",
                           generator: torch.Generator | None = None, pool: bool = True) -> torch.Tensor:
    """Eigenvalues after shuffling the entries of every slice independently.

    Parameters
    ----------
    w : ``[B, out, in, *k]`` weight tensors of one shape. ndim : dimensionality of one tensor.
    replicas : independent shuffles pooled per layer. scale : eigenvalue scale (0.5 for Conv2d).

    Returns
    -------
    ``[B, replicas * rf * M]`` float64 ascending (all shuffles of all slices in one batched call), or
    with ``pool=False`` ``[B * rf, replicas * M]`` (one row per slice).
    """
    mats = slices(w, ndim).to(torch.float64)  # [B, rf, N, M]
    B, rf, n, m = mats.shape
    flat = mats.reshape(B, 1, rf, n * m).expand(B, replicas, rf, n * m)
    keys = torch.rand(flat.shape, generator=generator, dtype=torch.float64).to(flat.device)
    shuffled = flat.gather(-1, keys.argsort(-1)).reshape(B, replicas * rf, n, m)
    ev = matrix_eigenvalues(shuffled, method=method) * scale  # [B, replicas * rf, M]
    if not pool:
        ev = ev.reshape(B, replicas, rf, m).transpose(1, 2).reshape(B * rf, replicas * m)
    return ev.flatten(1).sort(1).values


def jensen_shannon_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``[B, n], [B, n] -> [B]``: as ``scipy.stats.entropy``-based JS distance (rows normalized to sum 1)."""
    p = p / p.sum(1, keepdim=True)
    q = q / q.sum(1, keepdim=True)
    m = (p + q) / 2

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(a > 0, a * (a / b).log(), torch.zeros_like(a)).sum(1)
    return ((kl(p, m) + kl(q, m)) / 2).sqrt()


def fit_columns(fit: PowerLawFit) -> dict[str, list]:
    """A fit as WeightWatcher columns, one list entry per row (NaN where the fit failed)."""
    alpha = fit.alpha.tolist()
    return {"alpha": alpha, "xmin": fit.xmin.tolist(), "xmax": fit.xmax.tolist(), "D": fit.D.tolist(),
            "sigma": fit.sigma.tolist(), "num_pl_spikes": fit.n_tail.tolist(),
            "status": fit.statuses(), "warning": [training_warning(a) for a in alpha]}
