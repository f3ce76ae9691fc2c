"""Baselines every equivariant encoder has to beat.

* :class:`StatFeatures` — per-layer mean, variance and quantiles of weights and biases (Unterthiner
  et al. 2020, "Predicting Neural Network Accuracy from Weights"; :func:`wsnets.stats.stat_features`)
  with an MLP ("StatNN"); :class:`StatGBM` — the same features with scikit-learn's
  ``HistGradientBoosting`` (their strongest baseline).
* :class:`FlatMLP` — an MLP on all parameters concatenated (``WeightSpace.flat()``), optionally trained
  with random hidden-neuron permutations as augmentation (function-preserving, so labels stay valid).
* :class:`ESDFeatures` — heavy-tailed spectral features (:func:`wsnets.esd.esd_features`, imported
  lazily) with a linear or MLP head; :class:`StatGBM` takes ``features="esd"`` too.

The neural encoders take a ``[B, F]`` tensor (their ``representation``) or, for convenience, a
WeightSpace (features computed by :meth:`features`). Inputs are standardized with statistics set by
:meth:`fit_normalization` (identity until called; :func:`wsnets.nn.build_encoder` calls it on its example).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..arch import Architecture
from ..errors import ArchitectureMismatchError, ConfigError, ShapeMismatchError
from ..weights import MixedBatch, WeightSpace
from .common import make_mlp


def esd_features(ws: WeightSpace) -> torch.Tensor:
    """``wsnets.esd.esd_features(ws)`` -> ``[B, F]``, imported lazily (the ESD module is optional)."""
    try:
        from ..esd import esd_features as f
    except ImportError as e:
        raise ConfigError(f"ESD features need wsnets.esd.esd_features, which is not available ({e})") from None
    return f(ws.batched())


class FeatureMLP(nn.Module):
    """Standardize ``[B, F]`` features (non-finite -> 0), then an MLP -> ``[B, out_dim]``.

    Parameters
    ----------
    in_features : F.
    out_dim : embedding size.
    hidden : hidden layer sizes (``()`` gives a linear map).
    dropout : dropout after each hidden layer.
    """

    representation = "flat"

    def __init__(self, in_features: int, out_dim: int = 64, hidden: Sequence[int] = (128,), dropout: float = 0.0) -> None:
        super().__init__()
        self.in_features, self.out_dim = int(in_features), int(out_dim)
        self.register_buffer("mean", torch.zeros(self.in_features))
        self.register_buffer("std", torch.ones(self.in_features))
        self.mlp = make_mlp([self.in_features, *hidden, self.out_dim], dropout=dropout)

    def features(self, ws: WeightSpace) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    @torch.no_grad()
    def fit_normalization(self, x: torch.Tensor | WeightSpace) -> "FeatureMLP":
        """Set the standardization from features ``[B, F]`` (or a batched WeightSpace); returns self."""
        x = self._as_features(x).double()
        x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        self.mean.copy_(x.mean(0).to(self.mean.dtype))
        std = x.std(0, unbiased=False) if x.shape[0] > 1 else torch.ones_like(x[0])
        self.std.copy_(torch.where(std > 1e-12, std, torch.ones_like(std)).to(self.std.dtype))
        return self

    def _as_features(self, x: torch.Tensor | WeightSpace) -> torch.Tensor:
        if isinstance(x, WeightSpace):
            x = self.features(x.batched())
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ShapeMismatchError(f"{type(self).__name__} expects features [B, {self.in_features}], "
                                     f"got {list(x.shape)}")
        return x

    def forward(self, x: torch.Tensor | WeightSpace) -> torch.Tensor:
        x = self._as_features(x).to(self.mean.dtype)
        x = torch.nan_to_num((x - self.mean) / self.std, nan=0.0, posinf=0.0, neginf=0.0)
        return self.mlp(x)


class StatFeatures(FeatureMLP):
    """StatNN: Unterthiner et al. weight statistics (``[B, 14 L]``) -> MLP (``representation = "stats"``)."""

    representation = "stats"

    @classmethod
    def for_arch(cls, arch: Architecture, **kwargs: Any) -> "StatFeatures":
        return cls(14 * len(arch.weight_layers), **kwargs)

    def features(self, ws: WeightSpace) -> torch.Tensor:
        return ws.batched().stat_features()


class ESDFeatures(FeatureMLP):
    """ESD features (:func:`wsnets.esd.esd_features`) -> linear map by default (``representation = "esd"``)."""

    representation = "esd"

    def __init__(self, in_features: int, out_dim: int = 64, hidden: Sequence[int] = (), dropout: float = 0.0) -> None:
        super().__init__(in_features, out_dim, hidden, dropout)

    def features(self, ws: WeightSpace) -> torch.Tensor:
        return esd_features(ws)


class FlatMLP(FeatureMLP):
    """MLP on the flattened parameters of one weight-space shape (``representation = "flat"``).

    It also reads the networks themselves (a batched WeightSpace or a :class:`~wsnets.weights.MixedBatch`;
    ``data.representation = "tensors"`` in a config), which is what random-permutation augmentation needs
    (this class's ``permutation_augment`` or the training loop's ``data.augment_permute``). Networks of one
    shape but different activations are read alike (the activation is not among its inputs).

    Parameters
    ----------
    arch : the architecture (its ``num_params`` is the input size).
    permutation_augment : when True, :meth:`augment` (and ``forward`` on a WeightSpace in training
        mode) applies random hidden-neuron permutations, one per network.
    """

    representation = "flat"

    def __init__(self, arch: Architecture, out_dim: int = 64, hidden: Sequence[int] = (256, 128), dropout: float = 0.0,
                 permutation_augment: bool = False) -> None:
        super().__init__(arch.num_params, out_dim, hidden, dropout)
        self.arch = arch
        self.permutation_augment = permutation_augment

    def augment(self, ws: WeightSpace, generator: torch.Generator | None = None) -> WeightSpace:
        """Random hidden-neuron permutations of every network when ``permutation_augment`` is on."""
        from ..symmetry import random_permute
        self._check(ws)
        return random_permute(ws.batched(), generator=generator) if self.permutation_augment else ws

    def _check(self, ws: WeightSpace) -> None:
        if ws.arch.param_shapes != self.arch.param_shapes:
            raise ArchitectureMismatchError(f"FlatMLP was built for {self.arch.describe()}, got {ws.arch.describe()}")

    def features(self, ws: WeightSpace) -> torch.Tensor:
        self._check(ws)
        return ws.batched().flat()

    def _as_features(self, x: torch.Tensor | WeightSpace | MixedBatch) -> torch.Tensor:
        if isinstance(x, MixedBatch):     # networks of one shape, several activations: the tensors are what it reads
            x = x.ws
        if isinstance(x, WeightSpace):
            self._check(x)
            if self.training:
                x = self.augment(x)
        elif x.dim() != 2 or x.shape[1] != self.in_features:
            raise ArchitectureMismatchError(f"FlatMLP was built for {self.arch.describe()} ({self.in_features} "
                                            f"parameters), got features {list(x.shape)}")
        return super()._as_features(x)


class StatGBM:
    """Gradient-boosted trees on weight statistics (or ESD features): scikit-learn ``HistGradientBoosting``.

    Parameters
    ----------
    task : "regression" (one model per target column) or "classification".
    features : "stats" (Unterthiner et al.) or "esd".
    **params : passed to ``HistGradientBoostingRegressor``/``Classifier`` (e.g. ``max_iter``, ``learning_rate``).

    ``fit(X, y)`` and ``predict(X)`` take a batched WeightSpace, a ``[B, F]`` tensor or an array.
    """

    representation = "stats"

    def __init__(self, task: str = "regression", features: str = "stats", random_state: int = 0, **params: Any) -> None:
        if task not in ("regression", "classification"):
            raise ConfigError(f"StatGBM task must be 'regression' or 'classification', got {task!r}")
        if features not in ("stats", "esd"):
            raise ConfigError(f"StatGBM features must be 'stats' or 'esd', got {features!r}")
        self.task, self.representation = task, features
        self.params = {"random_state": random_state, **params}
        self.models: list[Any] = []

    def _X(self, X: Any) -> np.ndarray:
        if isinstance(X, WeightSpace):
            X = X.batched().stat_features() if self.representation == "stats" else esd_features(X)
        if isinstance(X, torch.Tensor):
            X = X.detach().cpu().double().numpy()
        return np.asarray(X, dtype=np.float64)

    def fit(self, X: Any, y: Any) -> "StatGBM":
        from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
        X = self._X(X)
        y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
        if self.task == "classification":
            self.models = [HistGradientBoostingClassifier(**self.params).fit(X, y.reshape(-1))]
        else:
            y2 = y.reshape(len(y), -1)
            self.models = [HistGradientBoostingRegressor(**self.params).fit(X, y2[:, j]) for j in range(y2.shape[1])]
            self._squeeze = y.ndim == 1
        return self

    def predict(self, X: Any) -> np.ndarray:
        """Regression: ``[B]`` (or ``[B, T]`` if fitted on 2-d targets); classification: labels ``[B]``."""
        if not self.models:
            raise ConfigError("StatGBM.predict() before fit()")
        X = self._X(X)
        if self.task == "classification":
            return self.models[0].predict(X)
        out = np.stack([m.predict(X) for m in self.models], axis=1)
        return out[:, 0] if self._squeeze else out

    def predict_proba(self, X: Any) -> np.ndarray:
        if self.task != "classification":
            raise ConfigError("predict_proba() is for task='classification'")
        return self.models[0].predict_proba(self._X(X))
