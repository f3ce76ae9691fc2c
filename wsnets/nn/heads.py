"""Heads that turn an embedding ``[B, d]`` into targets.

:class:`RegressionHead` predicts real targets (test accuracy, generalization gap) and owns their
normalization: :meth:`~RegressionHead.fit_targets` stores per-target mean and std, the network
predicts standardized values, :meth:`~RegressionHead.forward` returns them in the targets' units and
:meth:`~RegressionHead.loss` compares in standardized units (so targets of different scales weigh
alike). The statistics are buffers, saved with the ``state_dict``.

:class:`ClassificationHead` predicts a class (dataset, task) as logits.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ShapeMismatchError
from .common import make_mlp


class RegressionHead(nn.Module):
    """``[B, in_dim] -> [B, n_targets]`` in target units, with target normalization.

    Parameters
    ----------
    in_dim : embedding size.
    n_targets : number of real targets.
    hidden : hidden layer sizes of the MLP (``()`` = linear).
    dropout : dropout in the MLP.
    """

    def __init__(self, in_dim: int, n_targets: int = 1, hidden: Sequence[int] = (64,), dropout: float = 0.0) -> None:
        super().__init__()
        self.in_dim, self.n_targets = in_dim, n_targets
        self.mlp = make_mlp([in_dim, *hidden, n_targets], dropout=dropout)
        self.register_buffer("y_mean", torch.zeros(n_targets))
        self.register_buffer("y_std", torch.ones(n_targets))

    def _y2(self, y: torch.Tensor) -> torch.Tensor:
        y = y.reshape(len(y), -1)
        if y.shape[1] != self.n_targets:
            raise ShapeMismatchError(f"RegressionHead has {self.n_targets} target(s), got targets {list(y.shape)}")
        return y

    @torch.no_grad()
    def fit_targets(self, y: torch.Tensor) -> "RegressionHead":
        """Store mean and std of training targets ``[B]`` or ``[B, T]`` (NaN ignored); returns self."""
        y = self._y2(y).double()
        ok = ~torch.isnan(y)
        n = ok.sum(0).clamp(min=1)
        mean = torch.where(ok, y, 0).sum(0) / n
        var = torch.where(ok, (y - mean) ** 2, 0).sum(0) / n
        std = var.sqrt()
        self.y_mean.copy_(mean.to(self.y_mean.dtype))
        self.y_std.copy_(torch.where(std > 1e-12, std, torch.ones_like(std)).to(self.y_std.dtype))
        return self

    def normalize(self, y: torch.Tensor) -> torch.Tensor:
        return (self._y2(y) - self.y_mean) / self.y_std

    def denormalize(self, yn: torch.Tensor) -> torch.Tensor:
        return yn * self.y_std + self.y_mean

    def forward_normalized(self, z: torch.Tensor) -> torch.Tensor:
        """Predictions in standardized units ``[B, T]``."""
        return self.mlp(z)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Predictions in target units ``[B, T]``."""
        return self.denormalize(self.mlp(z))

    def loss(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean squared error in standardized units (NaN targets ignored)."""
        yn = self.normalize(y.to(z.dtype))
        pred = self.mlp(z)
        ok = ~torch.isnan(yn)
        return ((pred - torch.nan_to_num(yn)) ** 2 * ok).sum() / ok.sum().clamp(min=1)


class ClassificationHead(nn.Module):
    """``[B, in_dim] -> [B, n_classes]`` logits.

    Parameters
    ----------
    in_dim : embedding size.
    n_classes : number of classes.
    hidden : hidden layer sizes (``()`` = linear).
    dropout : dropout in the MLP.
    label_smoothing : passed to the cross-entropy of :meth:`loss`.
    """

    def __init__(self, in_dim: int, n_classes: int, hidden: Sequence[int] = (64,), dropout: float = 0.0,
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.in_dim, self.n_classes, self.label_smoothing = in_dim, n_classes, label_smoothing
        self.mlp = make_mlp([in_dim, *hidden, n_classes], dropout=dropout)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.mlp(z)

    def loss(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy with integer labels ``[B]``."""
        y = y.reshape(-1).long()
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.n_classes):
            raise ShapeMismatchError(f"labels must be in [0, {self.n_classes}), got range "
                                     f"[{int(y.min())}, {int(y.max())}]")
        return F.cross_entropy(self.mlp(z), y, label_smoothing=self.label_smoothing)

    @torch.no_grad()
    def predict(self, z: torch.Tensor) -> torch.Tensor:
        """Most likely class ``[B]``."""
        return self.mlp(z).argmax(dim=1)
