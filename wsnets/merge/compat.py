"""Gathering the models to merge: load each, check they share one architecture, stack them.

Every merge method starts here, so models that do not fit together fail the same way: one
:class:`~wsnets.errors.ArchitectureMismatchError` naming the first mismatch (layer, key or shape).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from ..arch import Architecture
from ..errors import ArchitectureMismatchError
from ..weights import WeightSpace, stack

ModelLike = Any  # WeightSpace, nn.Module, state_dict or checkpoint path (anything wsnets.load takes)


def as_weightspace(obj: ModelLike) -> WeightSpace:
    """``obj`` as a single-network WeightSpace (see :func:`wsnets.load`)."""
    if isinstance(obj, WeightSpace):
        return obj
    from ..io import load
    return load(obj)


def first_mismatch(a: Architecture, b: Architecture) -> str:
    """A one-line description of the first difference between two architectures ('' if equal)."""
    sa, sb = a.param_shapes, b.param_shapes
    for ka, kb in zip(sa, sb):
        if ka != kb:
            return f"key {kb!r} where {ka!r} was expected"
        if sa[ka] != sb[kb]:
            return f"{ka!r} has shape {tuple(sb[kb])}, expected {tuple(sa[ka])}"
    if len(sa) != len(sb):
        if len(sa) > len(sb):
            return f"missing key {list(sa)[len(sb)]!r}"
        return f"unexpected key {list(sb)[len(sa)]!r}"
    for la, lb in zip(a.layers, b.layers):
        if la != lb:
            return f"layer {la!r} differs: {lb!r}"
    if len(a.layers) != len(b.layers):
        return f"{len(b.layers)} layers, expected {len(a.layers)}"
    if a.input_shape != b.input_shape and None not in (a.input_shape, b.input_shape):
        return f"input shape {b.input_shape}, expected {a.input_shape}"
    return ""


def _label(obj: ModelLike, i: int, names: Sequence[str] | None) -> str:
    if names is not None:
        return str(names[i])
    if isinstance(obj, (str, os.PathLike)):
        return str(obj)
    return f"model {i}"


def gather(models: Sequence[ModelLike] | WeightSpace, names: Sequence[str] | None = None) -> WeightSpace:
    """Load ``models`` and stack them into one batched WeightSpace ``[K, ...]`` on the first model's device.

    A batched WeightSpace is returned as is. Raises :class:`ArchitectureMismatchError` naming the
    first model, and the first layer or key, that differs from model 0. Networks whose architectures
    differ only in their recorded input shape (one unknown) are accepted.
    """
    if isinstance(models, WeightSpace):
        return models.batched()
    models = list(models)
    if not models:
        raise ArchitectureMismatchError("no models to merge")
    spaces = [as_weightspace(m) for m in models]
    ref = spaces[0]
    for i, s in enumerate(spaces[1:], 1):
        if s.batch_size is not None:
            raise ArchitectureMismatchError(f"{_label(models[i], i, names)} is a batch of {s.batch_size} networks; "
                                            "pass single networks")
        why = first_mismatch(ref.arch, s.arch)
        if why:
            raise ArchitectureMismatchError(
                f"{_label(models[i], i, names)} does not match {_label(models[0], 0, names)} "
                f"({ref.arch.describe()}): {why}")
    dev, dtype = ref.device, ref.dtype
    spaces = [WeightSpace(ref.arch, {k: v.to(dev, dtype) for k, v in s.params.items()}, check=False) for s in spaces]
    return stack(spaces)


def pair(a: ModelLike, b: ModelLike, names: Sequence[str] | None = None) -> tuple[WeightSpace, WeightSpace]:
    """Two single networks of one architecture (checked as :func:`gather` does)."""
    both = gather([a, b], names)
    return both[0], both[1]


def is_stat(key: str) -> bool:
    """True for BatchNorm running statistics (buffers, not parameters)."""
    return key.endswith(("running_mean", "running_var"))


def weighted_mean(batch: WeightSpace, weights: torch.Tensor | None = None) -> WeightSpace:
    """``sum_k w_k theta_k`` over the batch (uniform ``1/K`` if ``weights`` is None): a single network."""
    K = batch.batch_size
    w = torch.full((K,), 1.0 / K) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    w = w.to(batch.device)
    out = {k: torch.einsum("k,k...->...", w.to(v.dtype), v) for k, v in batch.params.items()}
    return WeightSpace(batch.arch, out, check=False)
