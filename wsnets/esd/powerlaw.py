"""Continuous power-law fits of eigenvalue tails, batched over layers and over all xmin candidates.

For eigenvalues ``x_1 <= ... <= x_n`` above ``thresh`` (WeightWatcher's ``EVALS_THRESH = 1e-5``),
every ``x_i`` but the largest is a candidate ``λmin``. For each candidate, with tail size
``n_i = n - i``:

* ``α_i = 1 + n_i / Σ_{j>=i} ln(x_j / x_i)`` (continuous MLE; Clauset, Shalizi & Newman 2009),
* ``D_i = max_{j>=i} | 1 - (x_j/x_i)^(1-α_i) - (j-i)/n_i |`` (Kolmogorov–Smirnov distance between
  the fitted CDF and the empirical CDF, exactly as WeightWatcher's ``WWFit`` writes it), and
  ``D_i = 1`` where ``α_i <= 1``,
* ``σ_i = (α_i - 1) / sqrt(n_i)``.

``λmin`` is the candidate of smallest ``D`` (first on ties). With fewer than 20 eigenvalues the
small-sample rule of WeightWatcher 0.7.7 applies: bias-corrected ``α_i = 1 + (n_i - 1) / Σ ln``, and
only candidates with ``n_i >= 8``, a positive log-sum and ``α_i > 1`` compete (``D = 1`` for the
others); if none qualifies the whole sample is the tail. (WeightWatcher also computes an objective
``J = D - 0.868/sqrt(n_i)`` there, but ``WWFit.__init__`` then re-selects by minimum ``D``; we match
that effective behaviour. In the no-candidate fallback WeightWatcher reports ``σ = -1/sqrt(n)``, a
bug; we report ``(α - 1)/sqrt(n)``.)

All candidates of all rows are evaluated at once in float64 (``[rows, candidates, n]`` blocks,
chunked to bound memory): no Python loop over candidates or layers. A row with fewer than two
eigenvalues above ``thresh`` cannot be fitted: its results are NaN and its status says why.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EVALS_THRESH = 1e-5
SMALL_N_CUTOFF = 20
SMALL_N_KMIN = 8
SMALL_N_KS_WEIGHT = 0.868
_CHUNK_ELEMENTS = 1 << 17  # block size of the KS computation (fits in L2 cache)


@dataclass
class PowerLawFit:
    """Results of :func:`fit_powerlaw`, one entry per row (``[B]`` tensors, float64 or int64).

    ``alpha``, ``xmin``, ``xmax``, ``D``, ``sigma`` are NaN and ``n_tail`` is 0 where ``ok`` is False.
    ``n_tail`` = number of eigenvalues ``>= xmin`` (WeightWatcher's ``num_pl_spikes``).
    """

    alpha: torch.Tensor
    xmin: torch.Tensor
    xmax: torch.Tensor
    D: torch.Tensor
    sigma: torch.Tensor
    n_tail: torch.Tensor
    ok: torch.Tensor
    n_fit: torch.Tensor  # eigenvalues above thresh (the sample that was fitted)

    def status(self, i: int) -> str:
        """``"success"`` or ``"failed: <reason>"`` for row ``i``."""
        return self.statuses()[i]

    def statuses(self) -> list[str]:
        """:meth:`status` of every row."""
        return ["success" if ok else f"failed: {n} eigenvalue(s) above {EVALS_THRESH:g}, need at least 2"
                for ok, n in zip(self.ok.tolist(), self.n_fit.tolist())]


def _ks_distances(logx: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """KS distance for every (row, candidate): ``[B, n]`` sorted log-data, ``[B, C]`` alphas -> ``[B, C]``.

    Candidate ``c`` is data index ``c``; only ``j >= c`` enters its maximum. Work is done in blocks of
    candidates (columns ``j >= c0`` of the block only), sized to stay in cache; ops are in place.
    """
    B, n = logx.shape
    C = alpha.shape[1]
    out = torch.empty(B, C, dtype=logx.dtype, device=logx.device)
    j = torch.arange(n, device=logx.device, dtype=logx.dtype)
    rows = max(1, _CHUNK_ELEMENTS // max(1, C * n))
    cand = C if rows > 1 else max(1, min(C, _CHUNK_ELEMENTS // n))
    for b0 in range(0, B, rows):  # blocks bound memory; every block is one vectorized computation
        lb = logx[b0:b0 + rows]
        for c0 in range(0, C, cand):
            c1 = min(C, c0 + cand)
            c = torch.arange(c0, c1, device=logx.device, dtype=logx.dtype)
            t = lb[:, None, c0:] - lb[:, c0:c1, None]  # ln(x_j / x_c), [b, c, n - c0]
            t.mul_((1.0 - alpha[b0:b0 + rows, c0:c1])[:, :, None]).exp_()  # (x_j / x_c)^(1 - α)
            emp = (j[None, c0:] - c[:, None]) / (n - c)[:, None]  # empirical CDF (j - c) / n_c, [c, n - c0]
            t.add_(emp - 1.0).abs_()  # |1 - fit - emp| with fit = 1 - t
            t.masked_fill_(emp < 0, 0.0)  # j < c
            out[b0:b0 + rows, c0:c1] = t.amax(-1)
    return out


def fit_powerlaw(evals: torch.Tensor, *, thresh: float = EVALS_THRESH) -> PowerLawFit:
    """Fit a power law to each row of ``evals``.

    Parameters
    ----------
    evals : ``[B, n]`` or ``[n]`` eigenvalues, each row sorted ascending (unsorted rows are sorted).
    thresh : eigenvalues ``<= thresh`` are dropped before fitting (WeightWatcher's ``EVALS_THRESH``).

    Returns
    -------
    :class:`PowerLawFit` with ``[B]`` tensors (float64).

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> x = (1 - torch.rand(4000, generator=g, dtype=torch.float64)) ** (-1 / 1.5)  # α = 2.5
    >>> abs(float(fit_powerlaw(x).alpha[0]) - 2.5) < 0.1
    True
    """
    x = evals.to(torch.float64)
    if x.dim() == 1:
        x = x[None]
    x = x.sort(dim=1).values
    B, n = x.shape
    dev = x.device
    nan = torch.full((B,), float("nan"), dtype=x.dtype, device=dev)
    if n < 2:
        start = (x <= thresh).sum(1)
        return PowerLawFit(nan, nan.clone(), nan.clone(), nan.clone(), nan.clone(),
                           torch.zeros(B, dtype=torch.long, device=dev), torch.zeros(B, dtype=torch.bool, device=dev),
                           n - start)
    start = (x <= thresh).sum(1)  # first index above threshold, [B]
    n_fit = n - start
    ok = n_fit >= 2
    small = n_fit < SMALL_N_CUTOFF

    C = n - 1
    cand = torch.arange(C, device=dev)
    ntail = (n - cand).to(x.dtype)  # [C]
    logx = x.clamp_min(torch.finfo(x.dtype).tiny).log()
    suffix = logx.flip(1).cumsum(1).flip(1)  # Σ_{j>=i} log x_j, [B, n]
    denom = suffix[:, :C] - ntail * logx[:, :C]  # Σ ln(x_j / x_i), [B, C]
    valid = cand[None, :] >= start[:, None]

    a_std = 1.0 + ntail / denom
    a_small = 1.0 + (ntail - 1.0) / denom
    alpha = torch.where(small[:, None], a_small, a_std)
    raw_D = _ks_distances(logx, alpha)

    # standard rule: D where α > 1 else 1; argmin over valid candidates
    D_std = torch.where(a_std > 1, raw_D, torch.ones_like(raw_D))
    D_std = torch.where(a_std.isnan(), torch.ones_like(raw_D), D_std)
    i_std = D_std.masked_fill(~valid, float("inf")).argmin(1)
    # small-sample rule: bias-corrected α on qualifying candidates, D = 1 elsewhere, argmin D
    qual = valid & (ntail >= SMALL_N_KMIN) & (denom > 1e-12) & (a_small > 1)
    any_q = qual.any(1)
    D_small = torch.where(qual, raw_D, torch.ones_like(raw_D))
    i_small = torch.where(any_q, D_small.argmin(1), start.clamp_max(C - 1))  # fallback: whole sample

    i = torch.where(small, i_small, i_std)
    r = torch.arange(B, device=dev)
    a = alpha[r, i]
    D = torch.where(small & any_q, D_small[r, i], torch.where(small, raw_D[r, i], D_std[r, i]))
    sig = (a - 1.0) / ntail[i].sqrt()
    # small-sample fallback with a degenerate tail (all values equal): no fit
    ok = ok & ~(small & ~any_q & (denom[r, i] <= 1e-12))
    xmin = x[r, i]
    n_tail = (x >= xmin[:, None]).sum(1)
    ok = ok & ~a.isnan()
    keep = lambda t: torch.where(ok, t, nan)  # noqa: E731
    return PowerLawFit(keep(a), keep(xmin), keep(x[:, -1]), keep(D), keep(sig),
                       torch.where(ok, n_tail, torch.zeros_like(n_tail)), ok, n_fit)


def fit_powerlaw_ragged(rows: list[torch.Tensor], *, thresh: float = EVALS_THRESH) -> PowerLawFit:
    """:func:`fit_powerlaw` for rows of different lengths: rows of one length are fitted in one batch."""
    B = len(rows)
    out = {k: torch.full((B,), float("nan"), dtype=torch.float64) for k in ("alpha", "xmin", "xmax", "D", "sigma")}
    n_tail = torch.zeros(B, dtype=torch.long)
    ok = torch.zeros(B, dtype=torch.bool)
    n_fit = torch.zeros(B, dtype=torch.long)
    by_len: dict[int, list[int]] = {}
    for k, r in enumerate(rows):
        by_len.setdefault(int(r.numel()), []).append(k)
    for length, idx in by_len.items():
        f = fit_powerlaw(torch.stack([rows[k].reshape(-1).to(torch.float64).cpu() for k in idx]), thresh=thresh)
        t = torch.tensor(idx)
        for k in out:
            out[k][t] = getattr(f, k).cpu()
        n_tail[t], ok[t], n_fit[t] = f.n_tail.cpu(), f.ok.cpu(), f.n_fit.cpu()
    return PowerLawFit(out["alpha"], out["xmin"], out["xmax"], out["D"], out["sigma"], n_tail, ok, n_fit)
