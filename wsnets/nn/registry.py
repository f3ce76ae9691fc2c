"""Build encoders and heads from config dicts, and turn networks into what an encoder reads.

>>> import wsnets
>>> from wsnets.nn import build_encoder, build_head, represent
>>> nets = wsnets.WeightSpace.random(wsnets.mlp(8, [16], 3), 4)
>>> enc = build_encoder({"name": "hnp", "hidden": 8, "out_dim": 16}, nets)
>>> head = build_head({"name": "regression", "n_targets": 2}, enc.out_dim)
>>> head(enc(represent(enc, nets))).shape
torch.Size([4, 2])

Encoder names: ``graph`` (:class:`NeuralGraphEncoder`), ``transformer`` (:class:`NeuralGraphTransformer`),
``np``/``hnp`` (:class:`NPEncoder`/:class:`HNPEncoder`), ``stats`` (StatNN), ``flat`` (:class:`FlatMLP`),
``esd`` (:class:`ESDFeatures`). Head names: ``regression``, ``classification``. GBM baselines
(not modules): :func:`build_gbm` with ``stat_gbm`` or ``esd_gbm``.
"""

from __future__ import annotations

import inspect
from typing import Any, Iterable, Mapping

from torch import nn

from ..arch import Architecture
from ..errors import ArchitectureMismatchError, ConfigError
from ..weights import MixedBatch, WeightSpace, stack_shapes
from .baselines import ESDFeatures, FlatMLP, StatFeatures, StatGBM, esd_features
from .equivariant import HNPEncoder, NPEncoder
from .graph_encoder import NeuralGraphEncoder
from .heads import ClassificationHead, RegressionHead
from .transformer import NeuralGraphTransformer

ENCODERS: dict[str, type[nn.Module]] = {
    "graph": NeuralGraphEncoder, "transformer": NeuralGraphTransformer, "np": NPEncoder, "hnp": HNPEncoder,
    "stats": StatFeatures, "flat": FlatMLP, "esd": ESDFeatures,
}
HEADS: dict[str, type[nn.Module]] = {"regression": RegressionHead, "classification": ClassificationHead}
_NEEDS_ARCH = ("np", "hnp", "flat")
_NEEDS_FEATURES = ("stats", "esd")


def _split(config: Mapping[str, Any], kind: str, table: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    if not isinstance(config, Mapping) or "name" not in config:
        raise ConfigError(f"{kind} config needs a 'name' (one of {', '.join(table)})")
    name = config["name"]
    if name not in table:
        raise ConfigError(f"unknown {kind} {name!r} (known: {', '.join(table)})")
    return name, {k: v for k, v in config.items() if k != "name"}


def _check_kwargs(cls: type, kwargs: Mapping[str, Any], name: str, skip: tuple[str, ...]) -> None:
    params = inspect.signature(cls.__init__).parameters
    allowed = [p for p in params if p not in ("self", *skip) and params[p].kind is not inspect.Parameter.VAR_KEYWORD]
    bad = sorted(set(kwargs) - set(allowed))
    if bad:
        raise ConfigError(f"unknown option(s) {bad} for {name!r} (allowed: {', '.join(allowed)})")


def _first_arch(example: Any, single: bool = True) -> Architecture | None:
    """The architecture of an example; with ``single``, a list of several architectures raises."""
    if isinstance(example, Architecture):
        return example
    if isinstance(example, WeightSpace):
        return example.arch
    if isinstance(example, MixedBatch):
        return example.arch
    if isinstance(example, (list, tuple)) and example and isinstance(example[0], WeightSpace):
        shapes = {tuple(w.arch.param_shapes.items()) for w in example}
        if single and len(shapes) > 1:
            archs = sorted({w.arch.describe() for w in example})
            raise ArchitectureMismatchError("a fixed-architecture encoder needs examples whose tensors share shapes, "
                                            "got " + ", ".join(archs))
        return example[0].arch
    return None


def build_encoder(config: Mapping[str, Any], example: Any = None) -> nn.Module:
    """An encoder from ``{"name": ..., **options}``.

    ``example`` supplies what the config cannot: the architecture (an ``Architecture``, a WeightSpace
    or a list of them) for ``np``/``hnp``/``flat``; for ``stats``/``esd``/``flat`` a batched
    WeightSpace (or list) also fits the input standardization. Unknown names/options raise ConfigError.
    """
    name, kw = _split(config, "encoder", ENCODERS)
    cls = ENCODERS[name]
    if name in _NEEDS_ARCH:
        _check_kwargs(cls, kw, name, ("arch",))
        arch = _first_arch(example)
        if arch is None:
            raise ConfigError(f"encoder {name!r} is built for one architecture: pass an example Architecture or WeightSpace")
        enc = cls(arch, **kw)
    elif name in _NEEDS_FEATURES:
        _check_kwargs(cls, kw, name, ())
        kw.pop("in_features", None)
        derived = _feature_count(name, example)
        given = config.get("in_features")
        if given is not None and (isinstance(given, bool) or not isinstance(given, int) or given < 1):
            raise ConfigError(f"encoder {name!r}: 'in_features' must be a positive integer, got {given!r}")
        if given is not None and derived is not None and given != derived:
            raise ConfigError(f"encoder {name!r}: in_features={given} but the example networks give {derived} features")
        n = given if given is not None else derived
        if n is None:
            raise ConfigError(f"encoder {name!r} needs 'in_features' or an example WeightSpace")
        enc = cls(n, **kw)
    else:
        _check_kwargs(cls, kw, name, ())
        enc = cls(**kw)
    if name in ("stats", "esd", "flat") and isinstance(example, (WeightSpace, list, tuple)) and _batch_size(example) > 1:
        enc.fit_normalization(represent(enc, example))
    return enc


def _feature_count(name: str, example: Any) -> int | None:
    """How many ``stats``/``esd`` features the example networks have (None without an example)."""
    arch = _first_arch(example, single=False)
    if name == "stats" and arch is not None:
        return 14 * len(arch.weight_layers)
    if name == "esd" and arch is not None:
        from ..esd import esd_feature_names
        return len(esd_feature_names(arch))
    if isinstance(example, (WeightSpace, list, tuple)):
        return int(represent(name, example).shape[1])
    return None


def _batch_size(example: Any) -> int:
    if isinstance(example, WeightSpace):
        return example.batch_size or 1
    return len(example)


def build_head(config: Mapping[str, Any], in_dim: int) -> nn.Module:
    """A head from ``{"name": "regression", "n_targets": 2}`` or ``{"name": "classification", "n_classes": 5}``."""
    name, kw = _split(config, "head", HEADS)
    _check_kwargs(HEADS[name], kw, name, ("in_dim",))
    if name == "classification" and "n_classes" not in kw:
        raise ConfigError("classification head needs 'n_classes'")
    return HEADS[name](in_dim, **kw)


def build_gbm(config: Mapping[str, Any]) -> StatGBM:
    """``{"name": "stat_gbm" | "esd_gbm", "task": "regression", **HistGradientBoosting options}``."""
    name, kw = _split(config, "GBM", {"stat_gbm": StatGBM, "esd_gbm": StatGBM})
    return StatGBM(features="stats" if name == "stat_gbm" else "esd", **kw)


def represent(encoder: nn.Module | str, networks: WeightSpace | Iterable[WeightSpace]) -> Any:
    """Turn networks (a batched WeightSpace or a list of single ones) into the encoder's input.

    ``encoder`` is an encoder (its ``representation``) or a representation name: ``graph`` ->
    ``torch_geometric`` Batch; ``tensors`` -> batched WeightSpace (a :class:`~wsnets.weights.MixedBatch`
    when the networks share tensor shapes but not activations); ``flat``/``stats``/``esd`` -> ``[B, F]``.
    """
    rep = encoder if isinstance(encoder, str) else getattr(encoder, "representation", None)
    rep = {"np": "tensors", "hnp": "tensors", "transformer": "graph"}.get(rep, rep)
    if rep == "graph":
        from ..graph import to_batch
        return to_batch(networks)
    if isinstance(networks, (WeightSpace, MixedBatch)):
        mixed = networks if isinstance(networks, MixedBatch) else networks.batched()
    else:
        mixed = stack_shapes(list(networks))
    if rep == "tensors":
        return mixed
    ws = mixed.ws if isinstance(mixed, MixedBatch) else mixed
    if rep == "flat":
        return ws.flat()
    if rep == "stats":
        return ws.stat_features()
    if rep == "esd":
        return esd_features(ws)
    raise ConfigError(f"unknown representation {rep!r} (graph, tensors, flat, stats, esd)")
