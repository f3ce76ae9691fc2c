"""Weight averaging: a uniform or weighted average of models, and Stochastic Weight Averaging.

SWA (Izmailov et al. 2018, "Averaging Weights Leads to Wider Optima and Better Generalization",
https://arxiv.org/abs/1803.05407) averages the weights visited by SGD late in training under a
cyclic or constant learning rate, then recomputes the BatchNorm statistics of the averaged
weights on the training data (the averaged weights never saw the averaged statistics).
:class:`SWA` updates exactly as ``torch.optim.swa_utils.AveragedModel`` does (a running mean,
``avg += (theta - avg) / (n + 1)``) and :meth:`SWA.result` recomputes statistics as
``torch.optim.swa_utils.update_bn`` does (cumulative average of batch mean and unbiased variance).
"""

from __future__ import annotations

from typing import Iterable, Literal, Sequence

import torch
from torch import nn

from ..errors import ArchitectureMismatchError, ConfigError
from ..weights import WeightSpace
from .compat import ModelLike, first_mismatch, gather
from .functional import has_batchnorm, recompute_bn


def average(models: Sequence[ModelLike] | WeightSpace, weights: Sequence[float] | torch.Tensor | None = None, *,
            bn_data: torch.Tensor | Iterable[torch.Tensor] | None = None) -> WeightSpace:
    """Weighted average of the weights of models that share an architecture (the registered ``linear``
    method; running statistics are averaged with the same weights).

    Parameters
    ----------
    models : WeightSpaces, nn.Modules, state_dicts or checkpoint paths, or one batched WeightSpace.
    weights : ``[K]`` non-negative mixing weights (normalized to sum 1); uniform if None.
    bn_data : inputs ``[N, *input]`` (or an iterable of batches) on which to recompute BatchNorm
        statistics of the average; without it the running statistics are averaged too.

    Returns
    -------
    WeightSpace (a single network).

    Examples
    --------
    >>> import wsnets
    >>> from wsnets.merge import average
    >>> ws = wsnets.WeightSpace.random(wsnets.mlp(4, [8], 2))
    >>> bool((average([ws, ws]).flat() - ws.flat()).abs().max() < 1e-7)
    True
    """
    from .stream import merge_spaces
    batch = gather(models)
    w = (1.0,) * batch.batch_size
    if weights is not None:
        wt = torch.as_tensor(weights, dtype=torch.float64).flatten()
        if wt.numel() != batch.batch_size:
            raise ConfigError(f"{wt.numel()} mixing weights for {batch.batch_size} models")
        if (wt < 0).any() or wt.sum() <= 0:
            raise ConfigError("mixing weights must be non-negative and not all zero")
        w = tuple(wt.tolist())
    avg = merge_spaces("linear", batch, weight=w, normalize=True)
    return recompute_bn(avg, bn_data) if bn_data is not None and has_batchnorm(avg) else avg


def swa_lr(step: int, *, lr_max: float, lr_min: float | None = None, cycle: int = 1,
           schedule: Literal["cyclic", "constant"] = "cyclic") -> float:
    """SWA learning rate at ``step`` (counted from the start of the SWA phase).

    ``"cyclic"``: within each cycle of ``cycle`` steps the rate falls linearly from ``lr_max`` to
    ``lr_min`` (Izmailov et al. eq. 2: ``alpha(i) = (1 - t) lr_max + t lr_min``, ``t = ((i mod c) + 1) / c``);
    snapshots are taken at the end of each cycle, where the rate is lowest. ``"constant"``: ``lr_max``.
    """
    if schedule == "constant":
        return lr_max
    if schedule != "cyclic":
        raise ConfigError(f"unknown SWA schedule {schedule!r} (cyclic or constant)")
    if cycle < 1 or lr_min is None:
        raise ConfigError("a cyclic SWA schedule needs cycle >= 1 and lr_min")
    t = ((step % cycle) + 1) / cycle
    return (1 - t) * lr_max + t * lr_min


def is_snapshot(step: int, cycle: int = 1) -> bool:
    """True at the last step of each cycle (where :func:`swa_lr` reaches ``lr_min``)."""
    return (step + 1) % cycle == 0


class SWA:
    """Running average of weights along a training trajectory.

    Call :meth:`update` with the current model (an ``nn.Module`` or a WeightSpace) at every snapshot,
    then :meth:`result` with training inputs to get the averaged network with recomputed BatchNorm
    statistics.

    Examples
    --------
    >>> import torch, wsnets
    >>> from wsnets.merge import SWA
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> swa = SWA()
    >>> for _ in range(3):
    ...     swa.update(net)
    >>> swa.n_averaged
    3
    """

    def __init__(self) -> None:
        self.n_averaged = 0
        self._avg: WeightSpace | None = None

    def update(self, model: nn.Module | WeightSpace) -> None:
        """Add one snapshot: ``avg += (theta - avg) / (n + 1)`` on every tensor (running statistics too)."""
        if isinstance(model, nn.Module):
            ws = WeightSpace.from_module(model, check_function=False)
        else:
            ws = model
        if ws.batch_size is not None:
            raise ArchitectureMismatchError("SWA.update takes a single network, got a batch")
        if self._avg is None:
            self._avg = ws.detach().clone()
        else:
            why = first_mismatch(self._avg.arch, ws.arch)
            if why:
                raise ArchitectureMismatchError(f"SWA snapshot {self.n_averaged} differs from the first: {why}")
            w = 1.0 / (self.n_averaged + 1)
            with torch.no_grad():
                for k, v in self._avg.params.items():
                    v.lerp_(ws.params[k].detach().to(v.device, v.dtype), w)
        self.n_averaged += 1

    def result(self, bn_data: torch.Tensor | Iterable[torch.Tensor] | None = None, *,
               batch_size: int = 256) -> WeightSpace:
        """The averaged network, with BatchNorm statistics recomputed on ``bn_data`` if given.

        ``bn_data`` is ``[N, *input]`` (split into ``batch_size`` chunks) or an iterable of input
        batches or of ``(input, target)`` pairs (a DataLoader); pass the loader you would give ``update_bn``
        to get its numbers.
        """
        if self._avg is None:
            raise ConfigError("SWA has no snapshots yet; call update() first")
        out = self._avg.clone()
        if bn_data is not None and has_batchnorm(out):
            out = recompute_bn(out, bn_data, batch_size=batch_size)
        return out

