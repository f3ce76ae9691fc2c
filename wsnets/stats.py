"""Weight statistics of Unterthiner et al. (2020), "Predicting Neural Network Accuracy from Weights".

For every weight layer, of its weights and of its biases: mean, variance and the 0, 25, 50, 75 and
100 percent quantiles (7 numbers each, 14 per layer). Layers without bias contribute zeros for the
bias statistics. Batched networks are handled in one call per layer (no loop over networks).
"""

from __future__ import annotations

import torch

QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)
STAT_NAMES = ("mean", "var", "q0", "q25", "q50", "q75", "q100")


def _stats(t: torch.Tensor) -> torch.Tensor:
    """[B, n] -> [B, 7]."""
    q = torch.quantile(t.double(), torch.tensor(QUANTILES, dtype=torch.float64), dim=1).T
    return torch.cat([t.double().mean(1, keepdim=True), t.double().var(1, unbiased=False, keepdim=True), q], 1).to(t.dtype)


def stat_features(ws) -> torch.Tensor:
    """``[14 * L]`` for one network or ``[B, 14 * L]`` for a batch (L = number of weight layers)."""
    b = ws.batched()
    feats = []
    for l in b.arch.weight_layers:
        w = b.params[f"{l.name}.weight"].flatten(1)
        feats.append(_stats(w))
        bias = b.params.get(f"{l.name}.bias")
        feats.append(_stats(bias) if bias is not None else w.new_zeros(w.shape[0], len(STAT_NAMES)))
    out = torch.cat(feats, dim=1)
    return out if ws.batch_size is not None else out[0]


def stat_feature_names(arch) -> list[str]:
    """Column names matching :func:`stat_features`."""
    return [f"layer{i}.{part}.{s}" for i, _ in enumerate(arch.weight_layers) for part in ("weight", "bias")
            for s in STAT_NAMES]
