"""The WeightSpace: a network's weights together with what they mean.

A :class:`WeightSpace` pairs an :class:`~wsnets.arch.Architecture` with its tensors, keyed by the
state-dict names of the original model (``"net.0.weight"``). It may hold one network, or a batch of
``B`` networks of the same architecture with every tensor stacked along a leading dimension
(``ws.batch_size == B``); :func:`stack` and indexing move between the two.

Every representation starts here: :meth:`to_graph` (neural graph), :meth:`tensors` (per-layer
``[B, out, in, *k]`` for equivariant layers), :meth:`flat` (a vector), :meth:`stat_features`
(Unterthiner et al. 2020), and :mod:`wsnets.esd`.
"""

from __future__ import annotations

import math
import operator
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .arch import Architecture, Layer
from .errors import (ArchitectureMismatchError, ConfigError, MissingKeyError, NonFiniteWeightsError, ShapeMismatchError,
                     TensorFormatError)

MAX_WEIGHT = 1e18
"""The largest weight magnitude :meth:`WeightSpace.check_finite` accepts: a product of two weights beyond it
overflows float32 (max 3.4e38), so such a network's outputs are inf or NaN (real networks' weights are < 1e3)."""
_CHECKED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _batch_size(b: Any) -> int | None:
    """``None`` (one network) or a positive integer (a batch), else :class:`ConfigError`."""
    if b is None:
        return None
    try:
        n = operator.index(b) if not isinstance(b, bool) else None
    except TypeError:
        n = None
    if n is None or n < 1:
        raise ConfigError(f"batch_size must be None (one network) or a positive integer, got {b!r}")
    return n


class WeightSpace:
    """Weights of one network, or of ``B`` networks of one architecture stacked on dim 0.

    Parameters
    ----------
    arch : Architecture
    params : mapping of state-dict key -> tensor, shaped as ``arch.param_shapes`` (with a leading
        ``B`` when ``batch_size`` is given). Missing keys or wrong shapes raise.
    batch_size : int or None
    """

    __slots__ = ("arch", "params", "batch_size")

    def __init__(self, arch: Architecture, params: Mapping[str, torch.Tensor], batch_size: int | None = None,
                 *, check: bool = True) -> None:
        self.arch = arch
        self.batch_size = _batch_size(batch_size)
        self.params = dict(params)
        if check:
            self._check_shapes()
            self.params = {k: self.params[k] for k in arch.param_shapes}  # canonical (layer) order

    def _check_shapes(self) -> None:
        lead = () if self.batch_size is None else (self.batch_size,)
        for key, shape in self.arch.param_shapes.items():
            if key not in self.params:
                raise MissingKeyError(f"missing tensor {key!r} for {self.arch.describe()}")
            if not isinstance(self.params[key], torch.Tensor):
                raise TensorFormatError(f"entry {key!r} is a {type(self.params[key]).__name__}, not a tensor")
            got = tuple(self.params[key].shape)
            if got != lead + shape:
                raise ShapeMismatchError(f"tensor {key!r} has shape {got}, expected {lead + shape}")
        extra = set(self.params) - set(self.arch.param_shapes)
        if extra:
            raise ShapeMismatchError(f"unexpected tensor(s) {sorted(extra)[:3]} for {self.arch.describe()}")

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_module(cls, module: nn.Module, input_shape: tuple[int, ...] | None = None, *,
                    check_function: bool = True) -> "WeightSpace":
        """Read an ``nn.Module``: traced into its architecture (:func:`wsnets.trace.trace`), which is checked
        to compute the module's function on an example input (``check_function``); tensors the
        architecture does not use (a constant ``position_ids`` buffer, say) are left out."""
        from .trace import trace
        arch = trace(module, input_shape, check=check_function)
        sd = module.state_dict()
        return cls(arch, {k: sd[k].detach().clone() for k in arch.param_shapes})

    @classmethod
    def random(cls, arch: Architecture, batch_size: int | None = None, *, generator: torch.Generator | None = None,
               scale: float = 1.0) -> "WeightSpace":
        """PyTorch default initialization (times ``scale``); BatchNorm statistics randomized too so tests see them."""
        B = 1 if batch_size is None else _batch_size(batch_size)
        params = {}
        for l in arch.layers:
            for k, shape in l.param_shapes().items():
                key = l.key(k)
                if l.is_weight or (l.kind == "mha" and k.endswith("weight")):
                    fan_in = (l.in_features if l.is_weight else l.out_features) * l.kernel_numel
                    bound = scale / fan_in ** 0.5
                    t = (torch.rand((B, *shape), generator=generator) * 2 - 1) * bound
                elif k == "running_var" or (k == "weight" and l.is_norm):
                    t = 0.5 + torch.rand((B, *shape), generator=generator)
                else:
                    t = 0.1 * torch.randn((B, *shape), generator=generator)
                params[key] = t if batch_size is not None else t[0]
        return cls(arch, params, batch_size)

    # -- batch handling --------------------------------------------------------------------------
    def __len__(self) -> int:
        if self.batch_size is None:
            raise TypeError("unbatched WeightSpace has no len(); use stack() to batch")
        return self.batch_size

    def __getitem__(self, i: int | slice | torch.Tensor) -> "WeightSpace":
        if self.batch_size is None:
            raise TypeError("unbatched WeightSpace cannot be indexed")
        if isinstance(i, int):
            return WeightSpace(self.arch, {k: v[i] for k, v in self.params.items()}, None, check=False)
        params = {k: v[i] for k, v in self.params.items()}
        return WeightSpace(self.arch, params, next(iter(params.values())).shape[0], check=False)

    def __iter__(self) -> Iterator["WeightSpace"]:
        for i in range(len(self)):
            yield self[i]

    def batched(self) -> "WeightSpace":
        """This WeightSpace with a batch dimension (``B = 1`` if it had none)."""
        if self.batch_size is not None:
            return self
        return WeightSpace(self.arch, {k: v.unsqueeze(0) for k, v in self.params.items()}, 1, check=False)

    # -- tensors ---------------------------------------------------------------------------------
    @property
    def layers(self) -> tuple[Layer, ...]:
        return self.arch.layers

    def weight(self, layer: Layer | int) -> torch.Tensor:
        """Weight tensor of a layer, or of the ``i``-th weight layer if given an int."""
        l = self.arch.weight_layers[layer] if isinstance(layer, int) else layer
        return self.params[f"{l.name}.weight"]

    def bias(self, layer: Layer | int) -> torch.Tensor | None:
        """Bias of a layer (None if it has none)."""
        l = self.arch.weight_layers[layer] if isinstance(layer, int) else layer
        return self.params.get(f"{l.name}.bias")

    def tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """NFN-style per-layer tensors: weights ``[B, out, in, *k]`` and biases ``[B, out]``.

        Always batched (``B = 1`` for a single network); a missing bias is zeros. Normalization
        parameters are not included: fold BatchNorm first (:meth:`fold_batchnorm`) if they matter.
        """
        ws = self.batched()
        weights, biases = [], []
        for l in self.arch.weight_layers:
            w = ws.params[f"{l.name}.weight"]
            b = ws.params.get(f"{l.name}.bias")
            weights.append(w)
            biases.append(b if b is not None else w.new_zeros(w.shape[:2]))
        return weights, biases

    def flat(self) -> torch.Tensor:
        """All parameters (not running statistics) concatenated in layer order: ``[P]`` or ``[B, P]``."""
        lead = 0 if self.batch_size is None else 1
        parts = [v.flatten(lead) for k, v in self.params.items() if not k.endswith(("running_mean", "running_var"))]
        return torch.cat(parts, dim=lead)

    def stat_features(self) -> torch.Tensor:
        """Unterthiner et al. (2020) statistics; see :func:`wsnets.stats.stat_features`."""
        from .stats import stat_features
        return stat_features(self)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors under their original keys (a plain dict; batched tensors keep dim 0)."""
        return dict(self.params)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "WeightSpace":
        return WeightSpace(self.arch, {k: fn(v) for k, v in self.params.items()}, self.batch_size, check=False)

    def to(self, *args: Any, **kwargs: Any) -> "WeightSpace":
        return self.map(lambda t: t.to(*args, **kwargs))

    def detach(self) -> "WeightSpace":
        return self.map(torch.Tensor.detach)

    def clone(self) -> "WeightSpace":
        return self.map(torch.Tensor.clone)

    @property
    def num_params(self) -> int:
        return self.arch.num_params

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.params.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def check_finite(self, source: str = "") -> "WeightSpace":
        """Raise :class:`NonFiniteWeightsError` naming the first tensor with NaN or Inf, or with a value beyond
        :data:`MAX_WEIGHT` in magnitude (finite, but its products overflow float32: every loss, prediction or
        spectrum computed from it would be inf or NaN)."""
        for k, v in self.params.items():
            if not v.is_floating_point() or not v.numel() or v.dtype not in _CHECKED:
                continue
            top = float(v.abs().amax())  # one pass: NaN or Inf show here too
            where = f" in {source}" if source else ""
            if not math.isfinite(top):
                bad = "NaN" if torch.isnan(v).any() else "Inf"
                raise NonFiniteWeightsError(f"{bad} in tensor {k!r}{where} (pass allow_nonfinite=True to load anyway)")
            if top > MAX_WEIGHT:
                raise NonFiniteWeightsError(
                    f"tensor {k!r}{where} holds a weight of magnitude {top:.3g}, beyond {MAX_WEIGHT:g}: its products "
                    "overflow float32, so losses, predictions and spectra would be inf or NaN (pass "
                    "allow_nonfinite=True to load anyway)")
        return self

    # -- conversions -----------------------------------------------------------------------------
    def to_module(self) -> nn.Module:
        """A runnable module (eval mode) holding these weights: for a chain an ``nn.Sequential`` whose child
        ``i`` is layer ``i``; for a DAG a :class:`~wsnets.convert.DagModule` with the original keys."""
        if self.batch_size is not None:
            raise TypeError("to_module() needs a single network; index the batch first (ws[i])")
        from .convert import build_module
        module = build_module(self.arch)
        if not self.arch.is_chain:
            missing, unexpected = module.load_state_dict(self.params, strict=False)
            assert not unexpected and all(m.endswith("num_batches_tracked") for m in missing), (missing, unexpected)
            return module.to(self.dtype).eval()
        sd = {}
        for i, l in enumerate(self.arch.layers):
            for k in l.param_shapes():
                sd[f"{i}.{k}"] = self.params[f"{l.name}.{k}"]
        missing, unexpected = module.load_state_dict(sd, strict=False)
        assert not unexpected and all(m.endswith("num_batches_tracked") for m in missing), (missing, unexpected)
        return module.to(self.dtype).eval()

    def to_graph(self, **kwargs: Any):
        """Neural graph (a ``torch_geometric.data.Data``); see :func:`wsnets.graph.to_graph`."""
        from .graph import to_graph
        return to_graph(self, **kwargs)

    def fold_batchnorm(self) -> "WeightSpace":
        """Fold eval-mode BatchNorm into the preceding Linear/Conv; see :func:`wsnets.symmetry.fold_batchnorm`."""
        from .symmetry import fold_batchnorm
        return fold_batchnorm(self)

    def permute(self, perms: Sequence[torch.Tensor]) -> "WeightSpace":
        """Apply hidden-neuron permutations; see :func:`wsnets.symmetry.permute`."""
        from .symmetry import permute
        return permute(self, perms)

    def save(self, path: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
        """Write a self-describing safetensors file (atomic); see :func:`wsnets.io.save`."""
        from .io import save
        return save(self, path, metadata)

    def __repr__(self) -> str:
        b = "" if self.batch_size is None else f", batch_size={self.batch_size}"
        return f"WeightSpace({self.arch.describe()}, params={self.num_params}{b})"


def stack(spaces: Sequence[WeightSpace]) -> WeightSpace:
    """Stack single networks of one architecture into a batched WeightSpace."""
    if not spaces:
        raise ValueError("stack() needs at least one WeightSpace")
    arch = spaces[0].arch
    for i, s in enumerate(spaces):
        if s.arch != arch:
            raise ArchitectureMismatchError(
                f"network {i} is {s.arch.describe()}, network 0 is {arch.describe()}: cannot stack")
        if s.batch_size is not None:
            raise TypeError("stack() takes unbatched WeightSpaces")
    return WeightSpace(arch, {k: torch.stack([s.params[k] for s in spaces]) for k in spaces[0].params},
                       len(spaces), check=False)


class MixedBatch:
    """Networks whose tensors share names and shapes but whose architectures differ elsewhere (the
    activation function, as in the Small CNN Zoo's relu/tanh mix) batched together.

    ``ws`` holds the stacked tensors under network 0's architecture (use it for shapes and tensors
    only); network ``i`` has architecture ``kinds[index[i]]``. Fixed-architecture encoders read it and
    take each network's activations as a feature (:func:`activation_codes`). Made by :func:`stack_shapes`.
    """

    __slots__ = ("ws", "kinds", "index")

    def __init__(self, ws: WeightSpace, kinds: Sequence[Architecture], index: torch.Tensor) -> None:
        if index.shape != (ws.batch_size,):
            raise ShapeMismatchError(f"MixedBatch of {ws.batch_size} networks got an index of shape {tuple(index.shape)}")
        self.ws, self.kinds, self.index = ws, tuple(kinds), index

    @property
    def arch(self) -> Architecture:
        return self.ws.arch

    @property
    def batch_size(self) -> int:
        return int(self.index.numel())

    def __len__(self) -> int:
        return self.batch_size

    def groups(self) -> list[tuple[Architecture, torch.Tensor]]:
        """``(architecture, indices of its networks)`` for each architecture present."""
        return [(a, (self.index == k).nonzero().flatten()) for k, a in enumerate(self.kinds)]

    def to(self, *args: Any, **kwargs: Any) -> "MixedBatch":
        return MixedBatch(self.ws.to(*args, **kwargs), self.kinds, self.index)

    def __repr__(self) -> str:
        return f"MixedBatch({len(self)} networks: {', '.join(a.describe() for a in self.kinds)})"


def stack_shapes(spaces: Sequence[WeightSpace]) -> WeightSpace | MixedBatch:
    """Stack single networks whose tensors share names and shapes: a batched WeightSpace when they
    share one architecture, else a :class:`MixedBatch` (e.g. relu and tanh networks of one shape)."""
    if not spaces:
        raise ValueError("stack_shapes() needs at least one WeightSpace")
    arch = spaces[0].arch
    kinds: dict[Architecture, int] = {}
    index = [kinds.setdefault(s.arch, len(kinds)) for s in spaces]   # hashing, no tensor work
    if len(kinds) == 1:
        return stack(spaces)
    shapes = arch.param_shapes
    for a in kinds:
        if a.param_shapes != shapes:
            raise ArchitectureMismatchError(f"{a.describe()} and {arch.describe()} cannot be stacked: their tensors "
                                            "differ in names or shapes")
    if any(s.batch_size is not None for s in spaces):
        raise TypeError("stack_shapes() takes unbatched WeightSpaces")
    ws = WeightSpace(arch, {k: torch.stack([s.params[k] for s in spaces]) for k in shapes}, len(spaces), check=False)
    return MixedBatch(ws, list(kinds), torch.tensor(index, dtype=torch.long))


def activation_codes(x: WeightSpace | MixedBatch) -> torch.Tensor:
    """``[B, L]`` long: for each network and weight layer, the index in :data:`wsnets.arch.ACTIVATIONS` of
    the activation applied to that layer's outputs (0, identity, when none is, as for the output layer)."""
    from .arch import ACTIVATIONS

    def code(a: Architecture) -> list[int]:
        c = [0] * len(a.weight_layers)
        for l, g in zip(a.layers, a.layer_group):
            if l.kind == "act" and 0 < g <= len(c):
                c[g - 1] = ACTIVATIONS.index(l.fn)
        return c
    if isinstance(x, MixedBatch):
        return torch.tensor([code(a) for a in x.kinds], dtype=torch.long)[x.index]
    B = x.batch_size if x.batch_size is not None else 1
    return torch.tensor(code(x.arch), dtype=torch.long).expand(B, -1)
