"""Task arithmetic and TIES merging of models fine-tuned from one base.

* Task vectors (Ilharco et al. 2023, "Editing Models with Task Arithmetic",
  https://arxiv.org/abs/2212.04089): ``tau_t = theta_t - theta_base``; the merge is
  ``theta_base + lambda * sum_t tau_t``.
* TIES (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models",
  https://arxiv.org/abs/2306.01708): **trim** each task vector to its ``density`` fraction of
  largest-magnitude entries (the paper's top-k%, k = 20 by default), **elect** a sign per parameter
  as the sign of the sum of trimmed values (the sign with the larger total mass), take the
  **disjoint mean** over the tasks that agree with the elected sign, and add
  ``lambda * tau_merged`` to the base (paper default ``lambda = 1``).

Both act on parameters; BatchNorm running statistics are not task vectors: the merge takes the mean
of the fine-tuned models' statistics, or recomputes them on ``bn_data``. Both are the registered
methods of :mod:`wsnets.merge.methods` (which also run streamed on checkpoints of any architecture,
:func:`wsnets.merge.merge_checkpoints`) applied to WeightSpaces.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from ..errors import ConfigError
from ..weights import WeightSpace
from .compat import ModelLike, gather
from .engine import select
from .functional import has_batchnorm, recompute_bn
from .registry import keep_count

TA_SCALE = 0.4   # Ilharco et al. pick lambda on validation data; 0.3-0.5 is typical for several tasks
TIES_DENSITY = 0.2
TIES_SCALE = 1.0


def task_vectors(base: ModelLike, models: Sequence[ModelLike] | WeightSpace) -> WeightSpace:
    """``theta_t - theta_base`` for every fine-tuned model: a batched WeightSpace ``[T, ...]``.

    Running statistics are differenced too (they are ignored by the merges below).
    """
    both = gather([base, *models] if not isinstance(models, WeightSpace) else [base, *list(models)])
    b = both[0]
    tv = {k: v[1:] - b.params[k] for k, v in both.params.items()}
    return WeightSpace(b.arch, tv, both.batch_size - 1, check=False)


def _bn(ws: WeightSpace, bn_data: torch.Tensor | Iterable[torch.Tensor] | None) -> WeightSpace:
    return recompute_bn(ws, bn_data) if bn_data is not None and has_batchnorm(ws) else ws


def task_arithmetic(base: ModelLike, models: Sequence[ModelLike] | WeightSpace, *, scale: float = TA_SCALE,
                    bn_data: torch.Tensor | Iterable[torch.Tensor] | None = None) -> WeightSpace:
    """``theta_base + scale * sum_t (theta_t - theta_base)`` (the registered ``task_arithmetic`` method).

    Parameters
    ----------
    base : the shared pre-trained model.
    models : ``T`` models fine-tuned from ``base`` (or a batched WeightSpace).
    scale : lambda; ``1 / T`` gives the plain average of the fine-tuned models.
    bn_data : inputs on which to recompute BatchNorm statistics of the result (else the mean of the
        fine-tuned models' statistics).
    """
    from .stream import merge_spaces
    return _bn(merge_spaces("task_arithmetic", models, base=base, scale=scale), bn_data)


def trim(tv: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``ceil(density * P)`` largest-magnitude entries of each row of ``tv [T, P]``, zero the rest
    (exact count; ties at the cutoff go to the earlier entries)."""
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"TIES density must be in (0, 1], got {density}")
    return tv * select(tv.abs(), [keep_count(density, tv.shape[1])] * tv.shape[0])


def ties_vector(tv: torch.Tensor, density: float = TIES_DENSITY) -> torch.Tensor:
    """TIES merged task vector ``[P]`` from task vectors ``tv [T, P]`` (trim, elect sign, disjoint mean)."""
    from .engine import run_in_memory
    from .registry import get_method
    m = get_method("ties")
    opts = m.resolve({"density": density, "scale": 1.0}, tv.shape[0])
    return run_in_memory(m, opts, tv, torch.zeros(tv.shape[1], dtype=tv.dtype, device=tv.device))


def ties(base: ModelLike, models: Sequence[ModelLike] | WeightSpace, *, density: float = TIES_DENSITY,
         scale: float = TIES_SCALE, bn_data: torch.Tensor | Iterable[torch.Tensor] | None = None) -> WeightSpace:
    """TIES-merging of ``T`` models fine-tuned from ``base`` (the registered ``ties`` method, whole-model scope).

    Parameters
    ----------
    density : fraction of each task vector's entries kept by magnitude (trimming is global over all
        parameters of a model, as in the paper); 1 keeps everything.
    scale : lambda applied to the merged task vector.
    bn_data : inputs on which to recompute BatchNorm statistics of the result (else the mean of the
        fine-tuned models' statistics).

    Examples
    --------
    >>> import wsnets
    >>> from wsnets.merge import ties, task_arithmetic
    >>> base = wsnets.WeightSpace.random(wsnets.mlp(4, [8], 2))
    >>> ft = base.map(lambda t: t + 0.1)
    >>> a, b = ties(base, [ft], density=1.0), task_arithmetic(base, [ft], scale=1.0)
    >>> bool((a.flat() - b.flat()).abs().max() < 1e-6)
    True
    """
    from .stream import merge_spaces
    return _bn(merge_spaces("ties", models, base=base, scope="model", density=density, scale=scale), bn_data)
