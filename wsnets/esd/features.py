"""Fixed-length ESD feature vectors for meta-model baselines (``representation="esd"``).

For each weight layer of the architecture, in order, :data:`LAYER_FEATURES`; then the model-level
means over layers (:data:`SUMMARY_FEATURES`, WeightWatcher's summary metrics). Everything is batched:
one eigenvalue call and one power-law fit per layer for the whole zoo batch.

Undefined values (a failed fit, a layer with fewer than ``min_evals`` eigenvalues, a network with
NaN/Inf weights in that layer) are replaced by
``fill`` (0 by default) and flagged by the ``fit_ok`` feature, so linear heads see finite inputs;
pass ``fill=None`` to keep NaN (for gradient-boosted heads that handle missing values).

Examples
--------
>>> import wsnets
>>> ws = wsnets.WeightSpace.random(wsnets.mlp(64, [32, 32], 10), batch_size=4)
>>> esd_features(ws).shape == (4, len(esd_feature_names(ws.arch)))
True
"""

from __future__ import annotations

import torch

from .eigen import check_device, layer_spectrum
from .metrics import norm_metrics
from .powerlaw import fit_powerlaw

LAYER_FEATURES = ("alpha", "alpha_weighted", "log_norm", "log_spectral_norm", "log_alpha_norm", "stable_rank",
                  "entropy", "D", "log_xmin", "tail_fraction", "fit_ok")
SUMMARY_FEATURES = ("mean_alpha", "mean_alpha_weighted", "mean_log_norm", "mean_log_spectral_norm",
                    "mean_log_alpha_norm", "mean_stable_rank")
DEFAULT_MIN_EVALS = 8


def esd_feature_names(arch) -> list[str]:
    """Names matching the columns of :func:`esd_features` for networks of ``arch``."""
    names = [f"layer{i}.{f}" for i, _ in enumerate(arch.weight_layers) for f in LAYER_FEATURES]
    return names + [f"model.{f}" for f in SUMMARY_FEATURES]


def esd_features(ws, *, fill: float | None = 0.0, min_evals: int = DEFAULT_MIN_EVALS, conv2d_norm: bool = True,
                 method: str = "gram", device: str | torch.device | None = None) -> torch.Tensor:
    """ESD features of one network (``[F]``) or a batch (``[B, F]``), float32 on the CPU.

    Parameters
    ----------
    ws : :class:`~wsnets.WeightSpace` (batched or not).
    fill : value for undefined entries (None keeps NaN).
    min_evals : layers with fewer eigenvalues get no power-law fit (as WeightWatcher skips them).
    device : where to compute the eigenvalues and fits (``"cuda"`` works).
    """
    device = check_device(device)
    b = ws.batched()
    per_layer, summary = [], {k: [] for k in SUMMARY_FEATURES}
    for layer in b.arch.weight_layers:
        w = b.params[f"{layer.name}.weight"]
        finite = torch.isfinite(w.flatten(1)).all(1)
        w = torch.where(finite.view(-1, *[1] * (w.dim() - 1)), w, torch.zeros_like(w))  # NaN nets: no features
        spec = layer_spectrum(w, w.dim() - 1, conv2d_norm=conv2d_norm, method=method, device=device)
        ev = spec.evals
        fit = fit_powerlaw(ev)
        ok = fit.ok & (ev.shape[1] >= min_evals) & finite.to(ev.device)
        nan = torch.full_like(fit.alpha, float("nan"))
        alpha = torch.where(ok, fit.alpha, nan)
        m = norm_metrics(ev, alpha, spec.layout.N, spec.layout.M, method=method)
        m = {k: torch.where(finite.to(v.device), v.double(), nan) for k, v in m.items()}
        cols = {
            "alpha": alpha, "alpha_weighted": m["alpha_weighted"], "log_norm": m["log_norm"],
            "log_spectral_norm": m["log_spectral_norm"], "log_alpha_norm": m["log_alpha_norm"],
            "stable_rank": m["stable_rank"], "entropy": m["entropy"], "D": torch.where(ok, fit.D, nan),
            "log_xmin": torch.where(ok, fit.xmin, nan).log10(),
            "tail_fraction": torch.where(ok, fit.n_tail.to(ev.dtype) / ev.shape[1], nan), "fit_ok": ok.to(ev.dtype),
        }
        per_layer.append(torch.stack([cols[f] for f in LAYER_FEATURES], 1))
        for k in SUMMARY_FEATURES:
            summary[k].append(cols[k[len("mean_"):]])
    means = [torch.stack(summary[k], 1).nanmean(1) for k in SUMMARY_FEATURES]
    out = torch.cat(per_layer + [torch.stack(means, 1)], 1).float().cpu()
    if fill is not None:
        out = torch.nan_to_num(out, nan=fill, posinf=fill, neginf=fill)
    return out if ws.batch_size is not None else out[0]
