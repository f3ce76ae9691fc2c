"""Meta-model training configuration: a TOML file checked against a dataclass schema.

A config has a few strict sections (``[data]``, ``[optim]``, ``[head]``, ``[log]``) and one
free-form section, ``[encoder]``, whose ``name`` selects an encoder from :mod:`wsnets.nn` and whose
other keys are that encoder's arguments (checked by the encoder registry, not here).

Every field can be overridden on the command line: ``--set optim.lr=3e-4`` or ``--optim.lr 3e-4``,
and a field name that is unique across sections may drop its section (``--epochs 5``). Values are
parsed as TOML (``--set data.targets='["test_acc"]'``), falling back to a bare string.

An unknown key or a value of the wrong type raises :class:`~wsnets.errors.ConfigError` with a
one-line message naming the file and the key.

Examples
--------
>>> cfg = from_dict({"encoder": {"name": "flatmlp"}, "optim": {"epochs": 3}})
>>> cfg.optim.epochs, cfg.data.targets
(3, ['test_acc', 'gen_gap'])
>>> apply_overrides(cfg, ["optim.lr=0.01", "epochs=4"]).optim.lr
0.01
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import ConfigError

REGRESSION_TARGETS = ("test_acc", "gen_gap", "train_acc", "test_loss", "train_loss")
CLASSIFICATION_TARGETS = ("dataset", "task")


@dataclass
class DataConfig:
    """Which rows, which targets, how they are split and batched."""

    targets: list[str] = field(default_factory=lambda: ["test_acc", "gen_gap"])
    representation: str = ""          # empty: the encoder's own ``representation`` attribute
    split_seed: int = 0
    fractions: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])
    ood: dict = field(default_factory=dict)      # e.g. {width = ["<=", 32]}
    filter: dict = field(default_factory=dict)   # passed to ZooDataset(filter=...)
    batch_size: int = 32
    augment_permute: bool = False     # random hidden-neuron permutations of each training batch ("tensors" only)
    target_transform: str = "standard"  # heads learn "standard" (standardized) targets or "rank" scores
                                        # (the normal score of a value's rank among the training values)


@dataclass
class OptimConfig:
    """AdamW + cosine schedule with linear warm-up, early stopping on validation loss."""

    lr: float = 1e-3
    weight_decay: float = 1e-4
    epochs: int = 50
    warmup_epochs: int = 1
    patience: int = 10                # epochs without validation improvement before stopping (0: never stop early)
    grad_clip: float = 1.0            # max gradient norm; 0 disables clipping
    ensemble: int = 1                 # meta-models trained from different seeds whose outputs are averaged
    select: str = "loss"              # the kept epoch / early stopping: "loss" (validation loss) or "tau" (the
                                      # mean over targets of validation Kendall τ, accuracy for dataset/task)
    amp: bool = True                  # bfloat16 autocast on CUDA (ignored on CPU)


@dataclass
class HeadConfig:
    """Prediction heads on the encoder's embedding."""

    hidden: int = 64                  # hidden width of each head's MLP; 0: a linear head
    dropout: float = 0.0


@dataclass
class LogConfig:
    """Where progress goes."""

    wandb: bool = False
    project: str = "wsnets"
    progress: bool = True             # tqdm bar with live metrics


@dataclass
class TrainConfig:
    """A whole training run (see module docstring)."""

    name: str = "meta-model"
    seed: int = 0
    encoder: dict = field(default_factory=lambda: {"name": "graph"})
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def encoder_name(self) -> str:
        return str(self.encoder.get("name", ""))


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp in (str, bool, dict):
        return isinstance(value, tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, inner) for v in value)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _build(cls: type, d: Mapping[str, Any], where: str, source: str) -> Any:
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source}: [{where}] must be a table, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        dotted = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"{source}: unknown key {dotted!r} (known: {', '.join(sorted(names))})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, dotted, source)
            continue
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not _type_ok(value, tp):
            raise ConfigError(f"{source}: key {dotted!r} must be {_type_name(tp)}, got {type(value).__name__} "
                              f"{value!r}")
        kwargs[key] = value
    return cls(**kwargs)


def from_dict(d: Mapping[str, Any], source: str = "config") -> TrainConfig:
    """A checked :class:`TrainConfig` from a nested dict (as read from TOML or ``config.json``)."""
    cfg = _build(TrainConfig, d, "", source)
    validate(cfg, source)
    return cfg


def validate(cfg: TrainConfig, source: str = "config") -> None:
    """Value checks beyond types (ranges, known target names)."""
    if not cfg.encoder_name:
        raise ConfigError(f"{source}: [encoder] needs a 'name'")
    if not cfg.data.targets:
        raise ConfigError(f"{source}: data.targets is empty")
    known = REGRESSION_TARGETS + CLASSIFICATION_TARGETS
    for t in cfg.data.targets:
        if t not in known:
            raise ConfigError(f"{source}: unknown target {t!r} in data.targets (known: {', '.join(known)})")
    fr = cfg.data.fractions
    if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1) > 1e-6:
        raise ConfigError(f"{source}: data.fractions must be three non-negative numbers summing to 1 "
                          f"(train, val, test), got {fr}")
    for name, v in (("data.batch_size", cfg.data.batch_size), ("optim.epochs", cfg.optim.epochs),
                    ("optim.ensemble", cfg.optim.ensemble)):
        if v < 1:
            raise ConfigError(f"{source}: {name} must be >= 1, got {v}")
    for name, v in (("optim.warmup_epochs", cfg.optim.warmup_epochs), ("head.hidden", cfg.head.hidden),
                    ("optim.patience", cfg.optim.patience),
                    ("optim.weight_decay", cfg.optim.weight_decay), ("optim.grad_clip", cfg.optim.grad_clip)):
        if not v >= 0:  # also NaN
            raise ConfigError(f"{source}: {name} must be >= 0, got {v}")
    if not (cfg.optim.lr > 0 and math.isfinite(cfg.optim.lr)):
        raise ConfigError(f"{source}: optim.lr must be > 0, got {cfg.optim.lr}")
    if cfg.data.target_transform not in ("standard", "rank"):
        raise ConfigError(f"{source}: data.target_transform must be 'standard' or 'rank', got {cfg.data.target_transform!r}")
    if cfg.optim.select not in ("loss", "tau"):
        raise ConfigError(f"{source}: optim.select must be 'loss' or 'tau', got {cfg.optim.select!r}")
    if not 0 <= cfg.head.dropout < 1:
        raise ConfigError(f"{source}: head.dropout must be in [0, 1), got {cfg.head.dropout}")
    check_encoder_values(cfg.encoder, source)


_WIDTHS = ("hidden", "out_dim", "dim", "width", "heads")


def check_encoder_values(enc: Mapping[str, Any], source: str = "config") -> None:
    """Signs and ranges of the free-form ``[encoder]`` options that every encoder shares by convention:
    sizes and counts (integers) are >= 0 (widths, ``hidden``/``out_dim``/``dim``/``width``/``heads``,
    >= 1), numbers are finite, a ``*dropout*`` is in [0, 1). Options are
    otherwise checked by the encoder registry (names) and by building the encoder (see
    :func:`wsnets.train.meta_model.build_encoder`)."""
    for k, v in enc.items():
        what = f"{source}: encoder.{k}"
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if not math.isfinite(v):
            raise ConfigError(f"{what} must be a finite number, got {v}")
        if "dropout" in k and not 0 <= v < 1:
            raise ConfigError(f"{what} must be in [0, 1), got {v}")
        if isinstance(v, int) and v < 0 and k != "seed":
            raise ConfigError(f"{what} must be >= 0, got {v}")
        if k in _WIDTHS and v < 1:  # a width of 0 builds and trains, predicting NaN: refused like a negative one
            raise ConfigError(f"{what} is a width and must be >= 1, got {v}")


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a TOML config, given by path or by name (``"graph"``: the configs shipped in ``train/``, see
    :mod:`wsnets.resources`), and apply ``key=value`` overrides."""
    from ..io import read_toml
    from ..resources import find
    path = find("config", path)
    cfg = from_dict(read_toml(path, "config"), str(path))
    return apply_overrides(cfg, overrides, str(path))


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _resolve(cfg_dict: dict, key: str, source: str) -> list[str]:
    parts = key.split(".")
    if parts[0] in cfg_dict:
        return parts
    # a field name unique across sections may drop its section
    hits = [s for s, sub in cfg_dict.items() if isinstance(sub, dict) and s != "encoder" and parts[0] in sub]
    if len(hits) == 1:
        return [hits[0]] + parts
    if len(hits) > 1:
        raise ConfigError(f"{source}: override {key!r} is ambiguous (in {', '.join(hits)}); write e.g. "
                          f"{hits[0]}.{key}")
    raise ConfigError(f"{source}: unknown key {key!r} in override")


def apply_overrides(cfg: TrainConfig, overrides: Sequence[str], source: str = "command line") -> TrainConfig:
    """A new config with ``section.key=value`` (or unique ``key=value``) overrides applied."""
    d = cfg.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: override {item!r} must look like key=value")
        key, text = item.split("=", 1)
        parts = _resolve(d, key.strip(), "command line")
        node = d
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"command line: unknown key {key!r} in override")
            node = node[p]
        node[parts[-1]] = _parse_value(text.strip())
    return from_dict(d, f"{source} (with overrides)" if overrides else source)


def split_cli_overrides(extra: Sequence[str]) -> list[str]:
    """Turn leftover ``--key value`` / ``--key=value`` arguments into ``key=value`` overrides."""
    out, i = [], 0
    extra = list(extra)
    while i < len(extra):
        a = extra[i]
        if not a.startswith("--") or len(a) <= 2:
            raise ConfigError(f"command line: unexpected argument {a!r}")
        key = a[2:]
        if "=" in key:
            k, v = key.split("=", 1)
            out.append(f"{k.replace('-', '_')}={v}")
            i += 1
            continue
        key = key.replace("-", "_")
        if i + 1 >= len(extra) or extra[i + 1].startswith("--"):
            out.append(f"{key}=true")   # bare flag
            i += 1
        else:
            out.append(f"{key}={extra[i + 1]}")
            i += 2
    return out
