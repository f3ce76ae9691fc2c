"""Architectures as values: a DAG of operations, in topological order, each a :class:`Layer`.

An :class:`Architecture` is what a checkpoint's weights mean. It is frozen and hashable (zoo rows of
one architecture group by it), prints readably, and round-trips through JSON (it is stored in the
metadata of every safetensors file wsnets writes). :meth:`WeightSpace.to_module` rebuilds a module
computing the same function, and :func:`wsnets.trace.trace` reads one from any traceable module.

Every layer reads the outputs of earlier layers: ``inputs`` holds their indices (``-1`` is the network
input); empty ``inputs`` (the default, omitted from the JSON) means "the previous layer", so a
sequential MLP/CNN is a plain chain and its JSON is exactly what it was before DAGs existed.

The canonical operation vocabulary (what :mod:`wsnets.trace` converts torch code into)
------------------------------------------------------------------------------------
weight layers   ``linear``, ``conv1d``, ``conv2d`` (keys ``weight``, ``bias``)
other weights   ``embedding`` (``weight [V, D]``; ``mode`` ``""`` looks up the input ids,
                ``"positions"`` rows ``0..T-1`` for the ``T`` positions of axis ``dim`` of its input,
                ``"zeros"`` row 0 at each of them), ``mha`` (``nn.MultiheadAttention``, batch first:
                ``in_proj_weight [3D, D]``, ``in_proj_bias``, ``out_proj.weight``, ``out_proj.bias``; kept
                whole because its q/k/v weights are one tensor), ``param`` (a free tensor of ``shape``,
                e.g. a class token or positional table, state-dict key = ``name``)
normalization   ``batchnorm`` (1d or 2d, eval-mode statistics kept), ``layernorm`` and ``rmsnorm`` (over
                the last axis; a layernorm with ``bias=False`` has a weight only), ``groupnorm`` (``heads`` groups of channels, channels-first)
no parameters   ``act`` (relu, gelu, tanh, sigmoid, leaky_relu, elu, silu, softplus, identity),
                ``dropout``, ``maxpool``/``avgpool`` (local, inside a conv stack), ``gap`` (global
                average pooling to 1 or 1x1), ``flatten`` (of the input, or after ``gap``),
                ``add``/``mul`` (element-wise, broadcasting: residual connections, gates),
                ``scale`` (times the constant ``value``), ``concat`` (along axis ``dim``), ``tokens``
                (``[N, C, *S] -> [N, prod S, C]``: a patch embedding's positions become tokens),
                ``mean``/``select`` (mean over, or entry ``index`` of, the token axis ``dim``),
                ``attention`` (inputs q, k, v ``[N, T, heads*d]``: split into ``heads`` heads,
                ``softmax(q k^T / sqrt(d)) v`` per head, heads merged; ``mode="causal"`` masks the future)

Axes ``dim`` count in the full activation ``[N, ...]`` from the end (``-1`` is the last axis), so they
do not depend on the batch size.

Neurons come in *groups*. For a chain, group 0 is the input (features or channels), group ``l`` is the
output of weight layer ``l-1``; the last group is the network's output. Groups strictly between are
hidden and are permuted by the network's symmetries. For a DAG the groups are derived by
:func:`wsnets.symmetry.permutation_spec` (residual adds, norms and attention couple axes).

Examples
--------
>>> arch = mlp(64, [32, 32], 10)
>>> arch.group_sizes
(64, 32, 32, 10)
>>> arch.num_params
3466
>>> Architecture.from_json(arch.to_json()) == arch
True
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
from dataclasses import dataclass, fields, replace
from functools import cached_property
from typing import Any, Iterable, Sequence

from .errors import ConfigError, ShapeMismatchError, SpatialFlattenError, UnsupportedLayerError

WEIGHT_KINDS = ("linear", "conv1d", "conv2d")
NORM_KINDS = ("batchnorm", "layernorm")
FREE_KINDS = ("act", "dropout", "maxpool", "avgpool", "gap", "flatten")
CHAIN_KINDS = WEIGHT_KINDS + NORM_KINDS + FREE_KINDS   # what a sequential chain may hold
DAG_PARAM_KINDS = ("embedding", "mha", "param")
DAG_NORM_KINDS = ("groupnorm", "rmsnorm")
DAG_FREE_KINDS = ("add", "mul", "scale", "concat", "tokens", "mean", "select", "attention")
KINDS = CHAIN_KINDS + DAG_PARAM_KINDS + DAG_NORM_KINDS + DAG_FREE_KINDS
ACTIVATIONS = ("identity", "relu", "gelu", "tanh", "sigmoid", "leaky_relu", "elu", "silu", "softplus")
CONV_DIMS = {"conv1d": 1, "conv2d": 2}


@dataclass(frozen=True)
class Layer:
    """One layer of a sequential network.

    ``name`` is the layer's state-dict prefix (``"net.0"``), empty for parameter-free layers.
    ``in_features``/``out_features`` are features for linear, channels for conv; for norm layers
    both equal the number of normalized features or channels. ``dims`` is the number of spatial
    dimensions (1 or 2) for convs, pools and batchnorm over channels; 0 over plain features.
    """

    kind: str
    name: str = ""
    in_features: int = 0
    out_features: int = 0
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    bias: bool = True
    affine: bool = True
    eps: float = 1e-5
    momentum: float | None = 0.1   # None: cumulative average (as nn.BatchNorm)
    fn: str = ""
    slope: float = 0.01
    p: float = 0.0
    dims: int = 0
    # DAG fields (defaults are omitted from the JSON, so chains serialize as before)
    inputs: tuple[int, ...] = ()   # producer layer indices, -1 = network input; () = the previous layer
    heads: int = 0                 # attention / mha heads, groupnorm groups
    dim: int = 0                   # axis (from the end) of concat, mean, select, positional embedding
    index: int = 0                 # select: which entry
    value: float = 1.0             # scale: the constant factor
    shape: tuple[int, ...] = ()    # param: the tensor's shape
    mode: str = ""                 # embedding: "", "positions", "zeros"; attention: "", "causal"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UnsupportedLayerError(f"unknown layer kind {self.kind!r} at {self.name!r}")
        if self.kind == "act" and self.fn not in ACTIVATIONS:
            raise UnsupportedLayerError(f"unsupported activation {self.fn!r} (supported: {', '.join(ACTIVATIONS)})")
        for f in ("inputs", "shape"):
            object.__setattr__(self, f, tuple(int(v) for v in getattr(self, f)))
        for f in ("kernel_size", "stride", "padding", "dilation"):
            v = getattr(self, f)
            if not isinstance(v, tuple):
                object.__setattr__(self, f, tuple(v) if isinstance(v, (list, tuple)) else (int(v),))
        self._check_values()

    def _check_values(self) -> None:
        """Field types and ranges: a size of 0 or less, a zero stride, a head count that does not divide the
        width, a NaN epsilon, a non-boolean ``bias`` are refused here, where every architecture is made
        (traced, inferred, read from JSON or metadata), instead of failing deep inside a computation."""
        where = f"{self.kind} at {self.name!r}" if self.name else self.kind

        def integer(f: str, v: Any) -> int:
            try:
                if isinstance(v, bool):
                    raise TypeError
                return operator.index(v)  # int, numpy and 0-d torch integers
            except TypeError:
                raise ConfigError(f"{where}: {f} must be an integer, got {type(v).__name__} {v!r}") from None

        for f in ("in_features", "out_features", "heads", "dim", "index"):
            object.__setattr__(self, f, integer(f, getattr(self, f)))
        for f in ("kernel_size", "stride", "padding", "dilation", "shape"):
            object.__setattr__(self, f, tuple(integer(f, v) for v in getattr(self, f)))

        def at_least(f: str, lo: int, values: Iterable[int]) -> None:
            for v in values:
                if v < lo:
                    raise ShapeMismatchError(f"{where}: {f} must be >= {lo}, got {v}")
        sized = self.kind in WEIGHT_KINDS + NORM_KINDS + DAG_NORM_KINDS + ("embedding", "mha")
        at_least("in_features", 1 if self.kind in WEIGHT_KINDS + ("embedding",) else 0, [self.in_features])
        at_least("out_features", 1 if sized else 0, [self.out_features])
        at_least("kernel_size", 1, self.kernel_size)
        at_least("stride", 1, self.stride)
        at_least("dilation", 1, self.dilation)
        at_least("padding", 0, self.padding)
        at_least("shape", 1, self.shape)
        at_least("heads", 1 if self.kind in ("mha", "attention", "groupnorm") else 0, [self.heads])
        if self.kind == "mha" and self.out_features % self.heads:
            raise ShapeMismatchError(f"{where}: {self.out_features} features do not split into {self.heads} heads")
        for f in ("bias", "affine"):
            if not isinstance(getattr(self, f), bool):
                raise ConfigError(f"{where}: {f} must be true or false, got {getattr(self, f)!r}")
        for f in ("eps", "slope", "p", "value") + (("momentum",) if self.momentum is not None else ()):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"{where}: {f} must be a finite number, got {v!r}")
        if self.eps < 0 or not 0 <= self.p <= 1:
            raise ConfigError(f"{where}: eps must be >= 0 and p in [0, 1], got eps={self.eps}, p={self.p}")

    # -- derived facts ---------------------------------------------------------------------------
    @property
    def is_weight(self) -> bool:
        return self.kind in WEIGHT_KINDS

    @property
    def is_norm(self) -> bool:
        return self.kind in NORM_KINDS

    @property
    def has_params(self) -> bool:
        """Whether the layer owns state-dict tensors."""
        return bool(self.param_shapes())

    @property
    def kernel_numel(self) -> int:
        n = 1
        for k in self.kernel_size:
            n *= k
        return n

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """State-dict suffix -> shape of this layer's tensors (buffers included)."""
        if self.is_weight:
            out = {"weight": (self.out_features, self.in_features, *self.kernel_size)}
            if self.bias:
                out["bias"] = (self.out_features,)
            return out
        if self.kind == "batchnorm":
            n = self.out_features
            out = {"weight": (n,), "bias": (n,)} if self.affine else {}
            out.update(running_mean=(n,), running_var=(n,))
            return out
        if self.kind == "layernorm" and self.affine and not self.bias:   # nn.LayerNorm(bias=False)
            return {"weight": (self.out_features,)}
        if self.kind in ("layernorm", "groupnorm"):
            return {"weight": (self.out_features,), "bias": (self.out_features,)} if self.affine else {}
        if self.kind == "rmsnorm":
            return {"weight": (self.out_features,)} if self.affine else {}
        if self.kind == "embedding":
            return {"weight": (self.in_features, self.out_features)}
        if self.kind == "mha":
            d = self.out_features
            out = {"in_proj_weight": (3 * d, d)}
            if self.bias:
                out["in_proj_bias"] = (3 * d,)
            out["out_proj.weight"] = (d, d)
            if self.bias:
                out["out_proj.bias"] = (d,)
            return out
        if self.kind == "param":
            return {"": self.shape}
        return {}

    def key(self, suffix: str) -> str:
        """Full state-dict key of one of this layer's tensors (a ``param`` layer's key is its name)."""
        return f"{self.name}.{suffix}" if suffix else self.name

    def to_dict(self) -> dict[str, Any]:
        """Only the fields that differ from their defaults (compact JSON)."""
        d = {"kind": self.kind}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name != "kind" and v != f.default:
                d[f.name] = list(v) if isinstance(v, tuple) else v
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Layer":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown layer field(s) {sorted(unknown)} in {d}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def __repr__(self) -> str:
        if self.kind == "linear":
            s = f"Linear({self.in_features}, {self.out_features}{'' if self.bias else ', bias=False'})"
        elif self.is_weight:
            s = f"Conv{self.dims}d({self.in_features}, {self.out_features}, k={self.kernel_size}, s={self.stride}, p={self.padding})"
        elif self.kind == "batchnorm":
            s = f"BatchNorm{max(self.dims, 1)}d({self.out_features})"
        elif self.kind == "layernorm":
            s = f"LayerNorm({self.out_features}{'' if self.bias or not self.affine else ', bias=False'})"
        elif self.kind in ("rmsnorm", "groupnorm"):
            s = f"RMSNorm({self.out_features})" if self.kind == "rmsnorm" else \
                f"GroupNorm({self.heads}, {self.out_features})"
        elif self.kind == "embedding":
            s = f"Embedding({self.in_features}, {self.out_features}{', ' + self.mode if self.mode else ''})"
        elif self.kind == "mha":
            s = f"MultiheadAttention({self.out_features}, heads={self.heads})"
        elif self.kind == "param":
            s = f"Param{list(self.shape)}"
        elif self.kind == "attention":
            s = f"attention(heads={self.heads}{', causal' if self.mode == 'causal' else ''})"
        elif self.kind in ("concat", "mean"):
            s = f"{self.kind}(dim={self.dim})"
        elif self.kind == "select":
            s = f"select(dim={self.dim}, {self.index})"
        elif self.kind == "scale":
            s = f"scale({self.value:g})"
        elif self.kind == "act":
            s = self.fn
        elif self.kind == "dropout":
            s = f"Dropout({self.p})"
        elif self.kind in ("maxpool", "avgpool"):
            s = f"{self.kind}{self.dims}d(k={self.kernel_size})"
        else:
            s = self.kind
        if self.inputs:
            s += f"<-{list(self.inputs)}"
        return f"{self.name}:{s}" if self.name else s


@dataclass(frozen=True)
class Architecture:
    """Layers in topological order plus the input shape (without batch dimension), if known.

    A *chain* (every layer reads the previous one, chain kinds only) is today's sequential MLP/CNN; any
    other architecture is a DAG and needs ``input_shape`` (its shapes are inferred and checked).
    """

    layers: tuple[Layer, ...]
    input_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        if self.input_shape is not None:
            try:
                shape = tuple(operator.index(s) for s in self.input_shape if not isinstance(s, bool))
            except TypeError:
                shape = ()
            if not shape or len(shape) != len(self.input_shape) or min(shape) < 1:
                raise ShapeMismatchError(f"input_shape must be positive integers, got {self.input_shape!r}")
            object.__setattr__(self, "input_shape", shape)
        self.validate()

    # -- structure -------------------------------------------------------------------------------
    @cached_property
    def is_chain(self) -> bool:
        """A sequential network: each layer reads the previous one and only chain kinds occur."""
        return all(not l.inputs and l.kind in CHAIN_KINDS for l in self.layers)

    @cached_property
    def inputs(self) -> tuple[tuple[int, ...], ...]:
        """For each layer, the indices of the layers it reads (``-1``: the network input)."""
        return tuple(l.inputs if l.inputs else (i - 1,) for i, l in enumerate(self.layers))

    @cached_property
    def consumers(self) -> tuple[tuple[int, ...], ...]:
        """For each layer, the layers that read its output (the last layer is the network output)."""
        out: list[list[int]] = [[] for _ in self.layers]
        for i, ins in enumerate(self.inputs):
            for j in ins:
                if j >= 0:
                    out[j].append(i)
        return tuple(map(tuple, out))

    @cached_property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        """Per-sample output shape of every layer (DAGs; inferred from ``input_shape``)."""
        if self.input_shape is None:
            raise ShapeMismatchError("architecture has no input_shape: shapes are unknown")
        return _infer_shapes(self)

    @cached_property
    def weight_layers(self) -> tuple[Layer, ...]:
        return tuple(l for l in self.layers if l.is_weight)

    @cached_property
    def group_sizes(self) -> tuple[int, ...]:
        """Neurons per group: input, each hidden layer, output (a DAG: its permutation spec's groups)."""
        if not self.is_chain:
            from .symmetry import permutation_spec
            return permutation_spec(self).group_sizes
        w = self.weight_layers
        return (w[0].in_features,) + tuple(l.out_features for l in w)

    @property
    def num_groups(self) -> int:
        return len(self.group_sizes)

    @property
    def in_features(self) -> int:
        return self.group_sizes[0]

    @property
    def out_features(self) -> int:
        return self.group_sizes[-1]

    @cached_property
    def layer_group(self) -> tuple[int, ...]:
        """For each layer of a chain, the neuron group its output lives in (0 before the first weight layer)."""
        if not self.is_chain:
            raise UnsupportedLayerError("layer_group is defined for sequential chains; use permutation_spec()")
        g, out = 0, []
        for l in self.layers:
            if l.is_weight:
                g += 1
            out.append(g)
        return tuple(out)

    @cached_property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Full state-dict key -> shape, in layer order."""
        return {l.key(k): s for l in self.layers for k, s in l.param_shapes().items()}

    @property
    def num_params(self) -> int:
        """Number of scalars in the parameters (running statistics excluded)."""
        n = 0
        for key, shape in self.param_shapes.items():
            if not key.endswith(("running_mean", "running_var")):
                p = 1
                for s in shape:
                    p *= s
                n += p
        return n

    @property
    def max_kernel_numel(self) -> int:
        return max((l.kernel_numel for l in self.weight_layers), default=1)

    @property
    def is_conv(self) -> bool:
        return any(l.kind in CONV_DIMS for l in self.layers)

    @cached_property
    def activation(self) -> str:
        """The hidden activation if the network uses one kind, ``"mixed"`` or ``"identity"`` otherwise."""
        acts = {l.fn for l in self.layers if l.kind == "act"}
        return acts.pop() if len(acts) == 1 else ("identity" if not acts else "mixed")

    def describe(self) -> str:
        """Short architecture string used as a key in zoo tables, e.g. ``mlp:64-32-32-10:relu``.

        A DAG: ``family:input->output:<weight layers>w:<digest of the JSON>``, e.g.
        ``resnet:3x8x8->10:9w:1f2e3d4c`` (families: transformer, resnet, resmlp, concat, dag)."""
        if not self.is_chain:
            kinds = {l.kind for l in self.layers}
            fam = ("transformer" if kinds & {"attention", "mha"} else "resnet" if "add" in kinds and self.is_conv
                   else "resmlp" if "add" in kinds else "concat" if "concat" in kinds else "dag")
            n_w = sum(1 for l in self.layers if l.is_weight or l.kind in ("embedding", "mha"))
            digest = hashlib.sha1(self.to_json().encode()).hexdigest()[:8]
            shape = "x".join(map(str, self.input_shape or ()))
            return f"{fam}:{shape}->{'x'.join(map(str, self.shapes[-1][1:]))}:{n_w}w:{digest}"
        kind = "cnn%dd" % max(l.dims for l in self.weight_layers) if self.is_conv else "mlp"
        extras = "".join(sorted({"+bn" if l.kind == "batchnorm" else "+ln" for l in self.layers if l.is_norm}))
        return f"{kind}:{'-'.join(map(str, self.group_sizes))}:{self.activation}{extras}"

    # -- checks ----------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise a clear error if the layers do not chain into a network with a neural graph."""
        if not self.is_chain:
            self._validate_dag()
            return
        if not self.weight_layers:
            raise UnsupportedLayerError("architecture has no Linear or Conv layer")
        prev: Layer | None = None  # last layer that fixed the feature count
        width: int | None = None
        spatial: int = 0  # number of spatial dims of the current activation (0 = plain features)
        if self.input_shape is not None:
            width, spatial = self.input_shape[0], len(self.input_shape) - 1
        seen_weight = False
        def at(l: Layer | None) -> str:
            return "the input" if l is None else (f"{l.kind} at {l.name!r}" if l.name else l.kind)

        for l in self.layers:
            where = at(l)
            if l.kind == "flatten":
                if spatial and seen_weight:
                    raise SpatialFlattenError(
                        f"flatten over spatial positions after {at(prev)}: add global average pooling before "
                        "it (a flattened feature map has no neuron-level graph)")
                if not seen_weight and self.input_shape is not None:
                    n = 1
                    for s in self.input_shape:
                        n *= s
                    width, spatial = n, 0
                elif not seen_weight:
                    width, spatial = None, 0
                continue
            if l.kind == "gap":
                if not spatial and seen_weight:
                    raise ShapeMismatchError(f"global pooling after {at(prev)}, which has no spatial dimensions")
                spatial = 0
                continue
            if l.kind in ("maxpool", "avgpool") and seen_weight and not spatial:
                raise ShapeMismatchError(f"{where} after {at(prev)}, which has no spatial dimensions")
            if l.is_weight:
                if l.kind in CONV_DIMS:
                    if seen_weight and not spatial:
                        raise UnsupportedLayerError(f"{where} after {at(prev)}: convolution after a dense layer")
                    spatial = CONV_DIMS[l.kind]
                elif spatial and seen_weight:
                    raise SpatialFlattenError(
                        f"{where} reads a {spatial}-d feature map from {at(prev)}: add global average pooling "
                        "(and flatten) before it")
                if width is not None and l.in_features != width:
                    raise ShapeMismatchError(
                        f"{where} expects {l.in_features} inputs but {at(prev)} gives {width}")
                width, prev, seen_weight = l.out_features, l, True
                continue
            if l.is_norm:
                if width is not None and l.out_features != width:
                    raise ShapeMismatchError(
                        f"{where} normalizes {l.out_features} features but {at(prev)} gives {width}")
        # nothing after the last weight layer may carry parameters
        last = max(i for i, l in enumerate(self.layers) if l.is_weight)
        for l in self.layers[last + 1:]:
            if l.is_norm:
                raise UnsupportedLayerError(f"{l.kind} at {l.name!r} after the output layer")

    def _validate_dag(self) -> None:
        if not self.layers:
            raise UnsupportedLayerError("architecture has no layers")
        if self.input_shape is None:
            raise ShapeMismatchError("a non-sequential architecture needs input_shape (e.g. trace it with one)")
        for i, ins in enumerate(self.inputs):
            if not ins and self.layers[i].kind != "param":
                raise ShapeMismatchError(f"{_at(self.layers[i], i)} reads nothing")
            for j in ins:
                if not -1 <= j < i:
                    raise ShapeMismatchError(f"{_at(self.layers[i], i)} reads layer {j}, which is not before it")
        self.shapes  # infers and checks every shape

    # -- serialization ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"layers": [l.to_dict() for l in self.layers],
                "input_shape": list(self.input_shape) if self.input_shape else None}

    def to_json(self) -> str:
        return self._json

    @cached_property
    def _json(self) -> str:  # computed once: zoo builds write it into thousands of index rows
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Architecture":
        if not isinstance(d, dict) or not isinstance(d.get("layers"), list) or \
                not all(isinstance(x, dict) for x in d["layers"]):
            raise ConfigError("an architecture description is a JSON object whose 'layers' is a list of objects")
        try:
            layers = [Layer.from_dict(x) for x in d["layers"]]
        except KeyError as e:
            raise ConfigError(f"architecture description lacks key {e}") from None
        return cls(tuple(layers), tuple(d["input_shape"]) if d.get("input_shape") else None)

    @classmethod
    def from_json(cls, s: str) -> "Architecture":
        try:
            return cls.from_dict(json.loads(s))
        except json.JSONDecodeError as e:
            raise ConfigError(f"architecture metadata is not valid JSON: {e}") from None

    def __repr__(self) -> str:
        inner = ", ".join(map(repr, self.layers))
        return f"Architecture([{inner}], input_shape={self.input_shape})"

    def __hash__(self) -> int:
        return hash((self.layers, self.input_shape))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Architecture) and self.layers == other.layers and self.input_shape == other.input_shape


def _at(l: Layer, i: int) -> str:
    return f"{l.kind} at {l.name!r}" if l.name else f"{l.kind} (layer {i})"


def _conv_out(size: int, k: int, s: int, p: int, d: int = 1) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _infer_shapes(arch: Architecture) -> tuple[tuple[int, ...], ...]:
    """Full output shape ``(N, ...)`` of every layer (``N = 2`` stands for any batch size), checked."""
    x0 = (2, *arch.input_shape)
    out: list[tuple[int, ...]] = []
    for i, (l, ins) in enumerate(zip(arch.layers, arch.inputs)):
        xs = [x0 if j < 0 else out[j] for j in ins]
        where = _at(l, i)
        x = xs[0] if xs else ()
        k = l.kind

        def need(cond: bool, what: str) -> None:
            if not cond:
                raise ShapeMismatchError(f"{where} {what} (input shape {list(x[1:])})")
        if k == "linear":
            need(len(x) >= 2 and x[-1] == l.in_features, f"expects {l.in_features} features on the last axis")
            y = (*x[:-1], l.out_features)
        elif k in ("conv1d", "conv2d"):
            d = CONV_DIMS[k]
            need(len(x) == d + 2 and x[1] == l.in_features, f"expects [N, {l.in_features}, {d} spatial axes]")
            sp = tuple(_conv_out(n, kk, s, p, dl) for n, kk, s, p, dl in
                       zip(x[2:], l.kernel_size, l.stride or (1,) * d, l.padding or (0,) * d, l.dilation or (1,) * d))
            need(all(n > 0 for n in sp), "leaves no spatial positions")
            y = (x[0], l.out_features, *sp)
        elif k == "embedding":
            if l.mode:
                need(-len(x) < l.dim < 0, f"has no token axis {l.dim}")
                y = (x[0], x[l.dim], l.out_features)
                need(l.mode == "zeros" or y[1] <= l.in_features, f"needs {y[1]} positions, has {l.in_features}")
            else:
                y = (*x, l.out_features)
        elif k == "mha":
            need(len(x) == 3 and x[-1] == l.out_features and len(xs) in (1, 3), "expects [N, T, embed_dim]")
            y = x
        elif k == "param":
            y = l.shape
        elif k == "batchnorm":
            need(len(x) >= 2 and x[1] == l.out_features, f"normalizes {l.out_features} channels on axis 1")
            y = x
        elif k in ("layernorm", "rmsnorm"):
            need(x[-1] == l.out_features, f"normalizes {l.out_features} features on the last axis")
            y = x
        elif k == "groupnorm":
            need(len(x) >= 2 and x[1] == l.out_features and l.out_features % max(l.heads, 1) == 0,
                 f"normalizes {l.out_features} channels in {l.heads} groups on axis 1")
            y = x
        elif k in ("act", "dropout", "scale"):
            y = x
        elif k in ("add", "mul"):
            try:
                import torch
                y = tuple(torch.broadcast_shapes(*xs))
            except RuntimeError:
                raise ShapeMismatchError(f"{where}: shapes {[list(s) for s in xs]} do not broadcast") from None
        elif k == "concat":
            r = len(x)
            need(all(len(s) == r for s in xs) and -r <= l.dim < 0, f"concatenates along axis {l.dim}")
            a = r + l.dim
            try:
                import torch
                rest = tuple(torch.broadcast_shapes(*[s[:a] + (1,) + s[a + 1:] for s in xs]))
            except RuntimeError:
                raise ShapeMismatchError(f"{where} concatenates shapes {[list(s) for s in xs]}") from None
            y = (*rest[:a], sum(s[a] for s in xs), *rest[a + 1:])
        elif k == "tokens":
            need(len(x) >= 3, "turns [N, C, *S] into tokens")
            y = (x[0], math.prod(x[2:]), x[1])
        elif k in ("mean", "select"):
            need(len(x) >= 3 and -len(x) < l.dim < 0, f"reduces axis {l.dim}")
            a = len(x) + l.dim
            if k == "select":
                need(-x[a] <= l.index < x[a], f"selects entry {l.index}")
            y = x[:a] + x[a + 1:]
        elif k == "attention":
            need(len(xs) == 3 and all(len(s) == 3 for s in xs), "takes q, k, v of shape [N, T, heads*d]")
            q, kk, v = xs
            need(q[2] == kk[2] and kk[1] == v[1] and q[2] % l.heads == 0 and v[2] % l.heads == 0,
                 f"gets q {list(q[1:])}, k {list(kk[1:])}, v {list(v[1:])} for {l.heads} heads")
            y = (q[0], q[1], v[2])
        elif k == "gap":
            need(len(x) >= 3, "pools a map without spatial axes")
            y = (*x[:2], *(1,) * (len(x) - 2))
        elif k == "flatten":
            before_weights = all(arch.layers[j].kind in FREE_KINDS for j in range(i))
            if not before_weights and len(x) > 2 and math.prod(x[2:]) > 1:
                raise SpatialFlattenError(f"{where}: flatten over spatial positions {list(x[2:])}: add global "
                                          "average pooling before it (a flattened feature map has no neuron-level graph)")
            y = (x[0], math.prod(x[1:]))
        elif k in ("maxpool", "avgpool"):
            d = l.dims
            need(len(x) == d + 2, f"pools {d} spatial axes")
            st = l.stride or l.kernel_size
            y = (*x[:2], *(_conv_out(n, kk, s, p) for n, kk, s, p in
                           zip(x[2:], l.kernel_size, st, l.padding or (0,) * d)))
        else:  # pragma: no cover - Layer validates kinds
            raise UnsupportedLayerError(f"{where}: no shape rule")
        out.append(tuple(int(v) for v in y))
    return tuple(out)


# -- builders ------------------------------------------------------------------------------------
def _act(fn: str) -> list[Layer]:
    return [] if fn == "identity" else [Layer("act", fn=fn)]


def mlp(in_features: int, hidden: Sequence[int], out_features: int, activation: str = "relu", *,
        batchnorm: bool = False, layernorm: bool = False, dropout: float = 0.0,
        input_shape: Sequence[int] | None = None) -> Architecture:
    """A sequential MLP ``in -> hidden... -> out``; layers named ``"0"``, ``"1"``, ... like ``nn.Sequential``.

    ``input_shape`` (e.g. ``(1, 8, 8)``) adds a leading flatten of image inputs.
    """
    layers: list[Layer] = []
    if input_shape is not None and len(input_shape) > 1:
        layers.append(Layer("flatten"))
    sizes = [in_features, *hidden, out_features]
    for i in range(len(sizes) - 1):
        layers.append(Layer("linear", in_features=sizes[i], out_features=sizes[i + 1]))
        if i < len(sizes) - 2:
            if batchnorm:
                layers.append(Layer("batchnorm", in_features=sizes[i + 1], out_features=sizes[i + 1]))
            if layernorm:
                layers.append(Layer("layernorm", in_features=sizes[i + 1], out_features=sizes[i + 1]))
            layers += _act(activation)
            if dropout > 0:
                layers.append(Layer("dropout", p=float(dropout)))
    return Architecture(_name(layers), tuple(input_shape) if input_shape is not None else (in_features,))


def cnn(in_channels: int, channels: Sequence[int], out_features: int, activation: str = "relu", *,
        kernel_size: int | Sequence[int] = 3, dims: int = 2, stride: int | Sequence[int] = 1,
        padding: int | None = None, batchnorm: bool = False, dropout: float = 0.0,
        hidden: Sequence[int] = (), input_shape: Sequence[int] | None = None) -> Architecture:
    """Conv stack -> global average pooling -> flatten -> linear head(s).

    ``kernel_size``/``stride`` may be per conv layer. Padding defaults to ``k // 2`` ("same" for odd k).
    """
    n = len(channels)
    ks = list(kernel_size) if isinstance(kernel_size, (list, tuple)) else [kernel_size] * n
    ss = list(stride) if isinstance(stride, (list, tuple)) else [stride] * n
    kind = {1: "conv1d", 2: "conv2d"}[dims]
    layers: list[Layer] = []
    c = in_channels
    for i, co in enumerate(channels):
        k = ks[i]
        pad = k // 2 if padding is None else padding
        layers.append(Layer(kind, in_features=c, out_features=co, kernel_size=(k,) * dims, stride=(ss[i],) * dims,
                            padding=(pad,) * dims, dilation=(1,) * dims, dims=dims))
        if batchnorm:
            layers.append(Layer("batchnorm", in_features=co, out_features=co, dims=dims))
        layers += _act(activation)
        c = co
    layers += [Layer("gap", dims=dims), Layer("flatten")]
    sizes = [c, *hidden, out_features]
    for i in range(len(sizes) - 1):
        if dropout > 0:
            layers.append(Layer("dropout", p=float(dropout)))
        layers.append(Layer("linear", in_features=sizes[i], out_features=sizes[i + 1]))
        if i < len(sizes) - 2:
            layers += _act(activation)
    return Architecture(_name(layers), tuple(input_shape) if input_shape is not None else None)


def _name(layers: Iterable[Layer]) -> tuple[Layer, ...]:
    """Name layers by position, as ``nn.Sequential`` does; parameter-free layers keep their index too."""
    return tuple(replace(l, name=str(i)) if (l.is_weight or l.is_norm) else l for i, l in enumerate(layers))
