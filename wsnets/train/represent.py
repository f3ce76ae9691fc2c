"""Turn networks into the input an encoder takes, outside the zoo (for :meth:`MetaModel.predict`).

The representation names are those of :class:`wsnets.zoo.ZooDataset`: ``"graph"`` (a
``torch_geometric`` ``Batch`` of neural graphs), ``"tensors"`` (a batched :class:`WeightSpace`),
``"flat"``, ``"stats"`` and ``"esd"`` (``[B, F]`` feature matrices); ``"tensors"`` and ``"flat"`` take
networks whose tensors share shapes (a :class:`~wsnets.weights.MixedBatch` when activations differ).
Conversion is delegated to :func:`wsnets.nn.registry.represent` (what the zoo dataset uses) one
architecture group at a time, so ``stats``/``esd`` rows of networks with different widths but equal depth batch together.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..errors import ArchitectureMismatchError, ConfigError
from ..weights import WeightSpace, stack, stack_shapes

REPRESENTATIONS = ("graph", "tensors", "flat", "stats", "esd")


def _one_shape(nets: Sequence[WeightSpace], what: str) -> None:
    if len({tuple(n.arch.param_shapes.items()) for n in nets}) > 1:
        names = sorted({n.arch.describe() for n in nets})
        raise ArchitectureMismatchError(f"the {what} representation needs networks whose tensors share shapes, "
                                        f"got {', '.join(names)}")


def _features(batched: WeightSpace, representation: str) -> torch.Tensor:
    try:
        from ..nn.registry import represent as nn_represent
    except ImportError:  # wsnets.nn absent: the spine's own features
        nn_represent = None
    if nn_represent is not None:
        return nn_represent(representation, batched)
    if representation == "flat":
        return batched.flat()
    if representation == "stats":
        return batched.stat_features()
    raise ConfigError(f"the {representation!r} representation needs wsnets.nn")


def represent(nets: Sequence[WeightSpace], representation: str) -> Any:
    """The batched input of ``representation`` for single (unbatched) networks ``nets`` (order kept)."""
    nets = list(nets)
    if representation not in REPRESENTATIONS:
        raise ConfigError(f"unknown representation {representation!r} (known: {', '.join(REPRESENTATIONS)})")
    if representation == "graph":
        from ..graph import to_batch
        return to_batch(nets)
    if representation in ("tensors", "flat"):
        _one_shape(nets, representation)
    groups: dict = {}
    for i, n in enumerate(nets):
        groups.setdefault(n.arch, []).append(i)
    if representation == "tensors":
        return stack_shapes(nets)
    parts = {a: _features(stack([nets[i] for i in idx]), representation) for a, idx in groups.items()}
    width = max(p.shape[-1] for p in parts.values())
    # networks of different depths: zero-padded to the longest row, as ZooDataset pads a mixed zoo
    out = torch.zeros(len(nets), width, dtype=next(iter(parts.values())).dtype)
    for a, idx in groups.items():   # one entry per architecture, not per network
        out[torch.tensor(idx), :parts[a].shape[-1]] = parts[a]
    return out
