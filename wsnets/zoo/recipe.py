"""Zoo recipes: a TOML file that names datasets, architectures, hyperparameter distributions, epochs,
checkpoint epochs, population size and seed. The same recipe and seed give the same zoo.

A recipe expands into one :class:`RunSpec` per model (``population`` of them). Every model draws its
architecture and hyperparameters from its own random stream (seeded by the recipe seed and the
model's index), so model ``i`` is the same whatever ``--limit`` or ``--shard`` builds it.

Distributions (any hyperparameter or architecture field)
--------------------------------------------------------
``x = 3``                          fixed value
``x = [8, 16, 32]``                uniform choice
``x = {log_uniform = [1e-4, 1]}``  log-uniform on the interval
``x = {uniform = [0, 0.5]}``       uniform on the interval
``x = {log_uniform = [1e-6, 1e-2], zero = 0.3}``   exactly 0 with probability 0.3

Optional hyperparameters (absent from a recipe, a model has none of them, and its zoo is what it was
before they existed): ``init`` (:data:`INIT_KINDS`: ``uniform`` = PyTorch's default, or Keras'
``normal`` / ``truncated_normal`` with standard deviation ``init_std``, ``he_normal``,
``glorot_normal``, ``orthogonal``; biases start at 0 except with ``uniform``), ``init_std`` and
``l2`` (a penalty ``l2 * sum(w**2)`` over the weight tensors, biases excluded, added to the loss as
Keras' ``kernel_regularizer=l2(l2)`` does: its gradient ``2 * l2 * w`` goes through the optimizer, unlike
``weight_decay``). ``optimizer`` is ``sgd`` (momentum, L2 ``weight_decay``), ``adam`` (AdamW: decoupled
``weight_decay``; with ``weight_decay = 0`` it is Adam) or ``rmsprop`` (``torch.optim.RMSprop`` with
Keras' defaults ``alpha = 0.9``, ``eps = 1e-7``). ``grad_clip = 0`` turns gradient clipping off.

Training options (top level)
----------------------------
``steps_per_epoch = "full"`` (default): every model takes ``ceil(n_train / batch_size)`` steps per
epoch, whatever its train fraction (one compute budget for all); ``"subset"``: an epoch is one pass over
the model's own training subset, ``floor(n_subset / batch_size)`` steps (at least 1), as Keras trains
with ``drop_remainder=True`` batches (models of one dataset and train fraction train together).
``engine = "auto"`` (default: the hand-written MLP engine where it applies, the DAG engine for
residual networks and transformers, else autograd), ``"cnn"``: the hand-written engine for conv stacks
-> global average pooling -> linear layers (:mod:`wsnets.zoo.cnn_engine`, ~3x faster than autograd
through grouped convolutions on CPU), or ``"dag"``: the batched interpreter of any traced architecture
with convolution feature maps kept as ``[B, K*C, H, W]`` (:mod:`wsnets.zoo.dag_engine`).
Architecture ``kind = "cnn"`` takes its convolutions' dimension from each dataset (Conv1d on
``[C, L]`` inputs, Conv2d on ``[C, H, W]``); ``padding`` is a number, ``"valid"`` (0) or ``"same"``
(``kernel_size // 2``, the default).

Traced architecture families (:mod:`wsnets.models`, traced by :func:`wsnets.trace.trace`
into DAG architectures): ``kind = "wild-cnn"`` (``depth`` blocks of ``width`` channels, ``kernel_size``,
``residual`` blocks with identity and 1x1 projection shortcuts or plain convs, ``batchnorm``,
``activation``, ``downsample`` = none / stride / maxpool at the second block)
and ``kind = "vit"`` (pre-LN transformer: ``patch`` size, ``width`` = embedding dim, ``heads``,
``depth`` blocks, ``mlp_ratio``, ``activation`` relu / gelu, ``pool`` = cls / mean). Models of one
architecture train together, so a heterogeneous zoo draws from a pool: ``architectures = N`` draws
``N`` architectures (each from its own random stream) and every model picks one of them uniformly.

Example (the start of ``zoo/digits-mlp.toml``)::

    name = "digits-mlp"
    seed = 0
    population = 1000
    datasets = ["digits"]
    epochs = 15
    checkpoints = [1, 5, 15]
    batch_size = 128
    [architecture]
    kind = "mlp"
    depth = [1, 2, 3, 4]
    width = [8, 16, 32, 64]
    activation = ["relu", "tanh", "gelu"]
    [hyperparameters]
    optimizer = ["sgd", "adam"]
    lr = {log_uniform = [5e-4, 0.5]}
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import random
import tomllib
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..arch import Architecture, cnn, mlp
from ..errors import ConfigError, RecipeError
from . import datasets

HYPER_DEFAULTS: dict[str, Any] = {
    "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0, "init_scale": 1.0, "dropout": 0.0,
    "label_noise": 0.0, "train_fraction": 1.0, "grad_clip": 5.0,
}
#: Hyperparameters a model has only where its recipe names them (so that older zoos stay what they were).
OPTIONAL_HYPER: dict[str, Any] = {"init": "uniform", "init_std": 0.05, "l2": 0.0}
#: Weight initializations (``init``): PyTorch's default and Keras' initializers of the Small CNN Zoo.
INIT_KINDS = ("uniform", "normal", "truncated_normal", "he_normal", "glorot_normal", "orthogonal")
OPTIMIZERS = ("sgd", "adam", "rmsprop")
_TOP_KEYS = {"name", "seed", "population", "datasets", "epochs", "checkpoints", "batch_size", "group_size",
             "description", "architecture", "hyperparameters", "pretrain", "engine", "steps_per_epoch",
             "architectures"}
_ARCH_KEYS = {"kind", "depth", "width", "activation", "channels", "kernel_size", "hidden", "batchnorm", "layernorm",
              "stride", "padding", "residual", "downsample", "patch", "heads", "mlp_ratio", "pool"}
_ENGINES = ("auto", "cnn", "dag")


@dataclass(frozen=True)
class RunSpec:
    """One model of a zoo: its identity, architecture, dataset and hyperparameters."""

    index: int
    model_id: str
    seed: int
    arch: Architecture
    dataset: str
    hp: dict[str, Any]
    base: int = -1
    width: int = 0
    depth: int = 0
    fields: tuple[tuple[str, Any], ...] = ()  # the architecture draw, sorted (see :func:`family_module`)

    @property
    def structure(self) -> str:
        """Models with equal structure train together (architecture JSON)."""
        return self.arch.to_json()


@dataclass
class Recipe:
    """A parsed recipe (see the module docstring for the format)."""

    name: str
    seed: int
    population: int
    datasets: list[str]
    epochs: int
    checkpoints: list[int]
    batch_size: int
    group_size: int
    architecture: dict[str, Any]
    hyperparameters: dict[str, Any]
    pretrain: dict[str, Any] | None = None
    description: str = ""
    source: str = ""
    raw: dict[str, Any] = field(default_factory=dict)
    engine: str = "auto"
    steps_per_epoch: str = "full"
    architectures: int = 0

    @property
    def digest(self) -> str:
        """Hash of the recipe's content: a zoo directory is tied to one recipe."""
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def runs(self, limit: int | None = None) -> list[RunSpec]:
        """The first ``limit`` (default all) models of the population, each drawn from its own stream."""
        n = self.population if limit is None else min(limit, self.population)
        return [self._run(i) for i in range(n)]

    def _run(self, i: int) -> RunSpec:
        rng = random.Random(f"{self.name}:{self.seed}:{i}")
        if self.architectures:  # one of a pool of architecture draws, each from its own stream
            arng = random.Random(f"{self.name}:{self.seed}:arch{rng.randrange(self.architectures)}")
        else:
            arng = rng
        a = {k: _draw(v, arng, f"architecture.{k}") for k, v in sorted(self.architecture.items())}
        hp = dict(HYPER_DEFAULTS)
        hp.update({k: _draw(v, rng, f"hyperparameters.{k}") for k, v in sorted(self.hyperparameters.items())})
        dataset = self.datasets[rng.randrange(len(self.datasets))]
        arch, width, depth = _shared_arch(json.dumps(a, sort_keys=True), dataset)
        base = rng.randrange(int(self.pretrain.get("bases", 1))) if self.pretrain else -1
        seed = zlib.crc32(f"{self.seed}:{i}".encode())
        return RunSpec(i, f"{self.name}-{i:06d}", seed, arch, dataset, hp, base, width, depth, tuple(sorted(a.items())))

    def bucket(self, r: RunSpec) -> str:
        """Models in one bucket may train as one group: equal architecture and, with
        ``steps_per_epoch = "subset"``, the same dataset and train fraction (the same steps per epoch)."""
        if self.steps_per_epoch == "subset":
            return f"{r.structure}|{r.dataset}|{r.hp['train_fraction']!r}"
        return r.structure

    def steps(self, runs: "Sequence[RunSpec]") -> int | None:
        """Optimizer steps per epoch of a group (``None`` = the trainer's default, one pass over the
        largest training split)."""
        if self.steps_per_epoch != "subset":
            return None
        n = {max(1, min(round(r.hp["train_fraction"] * datasets.info(r.dataset)["n_train"]),
                        datasets.info(r.dataset)["n_train"])) for r in runs}
        if len(n) != 1:
            raise ConfigError(f"recipe {self.source}: one group holds training subsets of sizes {sorted(n)}")
        return max(1, n.pop() // self.batch_size)

    def base_arch(self) -> Architecture:
        """The architecture of a fine-tuning zoo (fixed: every model starts from a shared base)."""
        a = {k: _draw(v, random.Random(0), k) for k, v in self.architecture.items()}
        return build_arch(a, self.datasets[0])[0]


@functools.lru_cache(maxsize=4096)
def _shared_arch(fields: str, dataset: str) -> tuple[Architecture, int, int]:
    """:func:`build_arch` once per distinct draw (``fields`` as sorted JSON): architectures are immutable,
    and planning 1000 runs otherwise spends most of its time building and validating them."""
    return build_arch(json.loads(fields), dataset)


def build_arch(a: dict[str, Any], dataset: str) -> tuple[Architecture, int, int]:
    """An architecture from drawn fields; returns ``(arch, width, depth)`` (width = widest hidden layer)."""
    inf = datasets.info(dataset)
    shape, classes = inf["input_shape"], inf["num_classes"]
    kind = a.get("kind", "mlp")
    act = a.get("activation", "relu")
    if kind == "cnn":  # the convolutions' dimension follows the dataset
        kind = {2: "cnn1d", 3: "cnn2d"}.get(len(shape), "cnn")
        if kind == "cnn":
            raise ConfigError(f"architecture kind 'cnn' needs [C, L] or [C, H, W] inputs; dataset {dataset!r} "
                              f"has shape {shape}")
    if kind == "mlp":
        depth, width = int(a.get("depth", 2)), int(a.get("width", 32))
        hidden = [width] * depth
        n_in = math.prod(shape)
        arch = mlp(n_in, hidden, classes, act, batchnorm=bool(a.get("batchnorm", False)),
                   layernorm=bool(a.get("layernorm", False)), input_shape=shape if len(shape) > 1 else None)
        if len(shape) == 1:
            arch = Architecture(arch.layers, shape)
        return arch, width, depth
    if kind in ("cnn1d", "cnn2d"):
        dims = 1 if kind == "cnn1d" else 2
        if len(shape) != dims + 1:
            raise ConfigError(f"architecture kind {kind!r} needs {dims}-d inputs; dataset {dataset!r} has shape {shape}")
        depth, width = int(a.get("depth", 2)), int(a.get("width", 16))
        channels = [width] * depth
        k = int(a.get("kernel_size", 3))
        arch = cnn(shape[0], channels, classes, act, kernel_size=k, dims=dims,
                   stride=int(a.get("stride", 1)), padding=_padding(a.get("padding"), k),
                   batchnorm=bool(a.get("batchnorm", False)),
                   hidden=[int(h) for h in a.get("hidden", [])], input_shape=shape)
        return arch, width, depth
    if kind in ("wild-cnn", "vit"):
        return _traced_arch(kind, a, shape, classes, dataset)
    raise ConfigError(f"unknown architecture kind {kind!r} (use mlp, cnn, cnn1d, cnn2d, wild-cnn, vit)")


def family_module(a: dict[str, Any] | RunSpec, dataset: str | None = None):
    """A freshly initialized ``nn.Module`` of a ``wild-cnn`` or ``vit`` draw (fields ``a``, or a
    :class:`RunSpec` of such a recipe): :class:`~wsnets.models.families.WildCNN` or
    :class:`~wsnets.models.ViT` for the dataset's input shape and classes. Its
    ``state_dict`` keys are the zoo checkpoint's, so ``module.load_state_dict(record.load().state_dict(),
    strict=False)`` rebuilds a stored model as the class it was drawn as."""
    from ..models import ViT
    from ..models.families import WildCNN
    if isinstance(a, RunSpec):
        a, dataset = dict(a.fields), a.dataset
    inf = datasets.info(dataset)
    shape, classes = inf["input_shape"], inf["num_classes"]
    kind = a.get("kind")
    if kind not in ("wild-cnn", "vit"):
        raise ConfigError(f"architecture kind {kind!r} is not a traced family (wild-cnn, vit)")
    if len(shape) != 3 or (kind == "vit" and shape[1] != shape[2]):
        raise ConfigError(f"architecture kind {kind!r} needs [C, H, W]{' square' if kind == 'vit' else ''} image "
                          f"inputs; dataset {dataset!r} has shape {shape}")
    depth, width = int(a.get("depth", 3)), int(a.get("width", 8 if kind == "wild-cnn" else 16))
    if kind == "wild-cnn":
        return WildCNN(shape[0], classes, depth, width, int(a.get("kernel_size", 3)), bool(a.get("residual", False)),
                       bool(a.get("batchnorm", False)), str(a.get("activation", "relu")),
                       str(a.get("downsample", "none")))
    return ViT(shape[1], int(a.get("patch", 4)), shape[0], width, int(a.get("heads", 2)), depth,
               int(a.get("mlp_ratio", 2)) * width, classes, str(a.get("activation", "gelu")), str(a.get("pool", "cls")))


def _traced_arch(kind: str, a: dict[str, Any], shape: tuple[int, ...], classes: int,
                 dataset: str) -> tuple[Architecture, int, int]:
    """``wild-cnn`` and ``vit`` draws: the module of :mod:`wsnets.models.families` traced on the dataset's
    input (a DAG for residual networks and transformers, a chain for plain CNNs)."""
    from ..trace import trace
    module = family_module(a, dataset)
    depth, width = int(a.get("depth", 3)), int(a.get("width", 8 if kind == "wild-cnn" else 16))
    import warnings
    import torch
    # tracing runs each layer once on 2 samples: with one thread and without oneDNN's per-shape set-up
    # it takes ~30 ms per network, against ~1 s with 2 threads on a busy 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():  # mkldnn.flags() warns about Intel GPUs' TF32 on any machine
            warnings.simplefilter("ignore")
            with torch.backends.mkldnn.flags(enabled=False):
                return trace(module, tuple(shape)), width, depth
    finally:
        torch.set_num_threads(threads)


def _padding(p: Any, k: int) -> int | None:
    """A convolution's padding from a recipe: None (``cnn``'s default, ``k // 2``), a number, "valid", "same"."""
    if p is None or p == "same":
        return None if p is None else k // 2
    if p == "valid":
        return 0
    if isinstance(p, int) and not isinstance(p, bool) and p >= 0:
        return p
    raise ConfigError(f"architecture.padding must be a non-negative number, 'valid' or 'same', got {p!r}")

def _draw(spec: Any, rng: random.Random, where: str) -> Any:
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"{where}: empty choice list")
        return spec[rng.randrange(len(spec))]
    if isinstance(spec, dict):
        zero = float(spec.get("zero", 0.0))
        kinds = [k for k in ("uniform", "log_uniform", "choice") if k in spec]
        unknown = set(spec) - {"uniform", "log_uniform", "choice", "zero"}
        if len(kinds) != 1 or unknown:
            raise ConfigError(f"{where}: a distribution needs exactly one of uniform, log_uniform, choice "
                              f"(optional zero); got {sorted(spec)}")
        u, z = rng.random(), rng.random()
        if kinds[0] == "choice":
            v = _draw(list(spec["choice"]), rng, where)
        else:
            lo, hi = _interval(spec[kinds[0]], where)
            if kinds[0] == "uniform":
                v = lo + (hi - lo) * u
            else:
                if lo <= 0:
                    raise ConfigError(f"{where}: log_uniform needs positive bounds, got {lo}")
                v = math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * u)
        return 0.0 if z < zero else v
    return spec


def _interval(v: Any, where: str) -> tuple[float, float]:
    if not (isinstance(v, list) and len(v) == 2 and all(isinstance(t, (int, float)) for t in v) and v[0] <= v[1]):
        raise ConfigError(f"{where}: interval must be [low, high] numbers, got {v!r}")
    return float(v[0]), float(v[1])


def load_recipe(path: str | Path) -> Recipe:
    """Parse and validate a recipe file, given by path or by name (``"digits-mlp"``: the recipes shipped in
    ``zoo/``, see :mod:`wsnets.resources`)."""
    from ..resources import find
    p = find("recipe", path)
    from ..io import read_toml
    return parse_recipe(read_toml(p, "recipe"), str(p))


# value checks: (test, what it must be); a distribution is checked on every value it can take
_NAME = ("name", lambda v: isinstance(v, str) and bool(v) and all(c.isalnum() or c in "._-+" for c in v),
         "a non-empty string of letters, digits and . _ - + (it names the zoo's files)")
_INT = {"population": 1, "epochs": 1, "batch_size": 1, "group_size": 1, "bases": 1, "seed": None}
_ARCH_INT = {"depth": 0, "width": 1, "kernel_size": 1, "stride": 1}
_HYPER_RANGE: dict[str, tuple[float, float, bool, bool]] = {  # (low, high, low included, high included)
    "lr": (0.0, math.inf, False, False), "momentum": (0.0, 1.0, True, False),
    "weight_decay": (0.0, math.inf, True, False), "init_scale": (0.0, math.inf, False, False),
    "dropout": (0.0, 1.0, True, False), "label_noise": (0.0, 1.0, True, True),
    "train_fraction": (0.0, 1.0, False, True), "grad_clip": (0.0, math.inf, True, False),
    "init_std": (0.0, math.inf, False, False), "l2": (0.0, math.inf, True, False),
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _support(spec: Any) -> list[Any]:
    """The values a field's distribution can take, as far as they are listed (fixed value, choices, and the
    bounds of an interval)."""
    if isinstance(spec, list):
        return [x for v in spec for x in _support(v)]
    if isinstance(spec, dict):
        if "choice" in spec:
            return _support(list(spec["choice"])) + ([0.0] if spec.get("zero") else [])
        for k in ("uniform", "log_uniform"):
            if k in spec and isinstance(spec[k], list):
                return list(spec[k]) + ([0.0] if spec.get("zero") else [])
        return []
    return [spec]


def _check_int(value: Any, least: int | None, what: str) -> None:
    for v in _support(value):
        if not _is_int(v) or (least is not None and v < least):
            need = "an integer" + (f" >= {least}" if least is not None else "")
            raise RecipeError(f"{what} must be {need}, got {v!r}")


def _check_range(value: Any, name: str, what: str) -> None:
    lo, hi, lo_in, hi_in = _HYPER_RANGE[name]
    for v in _support(value):
        ok = _is_num(v) and (v >= lo if lo_in else v > lo) and (v <= hi if hi_in else v < hi)
        if not ok:
            if hi == math.inf:
                need = "a number >= 0" if lo_in else "a positive number"
            else:
                need = "a number in " + ("[" if lo_in else "(") + f"{lo:g}, {hi:g}" + ("]" if hi_in else ")")
            raise RecipeError(f"{what} must be {need}, got {v!r}")


def check_values(raw: dict[str, Any], source: str = "<dict>") -> None:
    """Types, signs and ranges of a recipe's values, each failure a :class:`RecipeError` naming the recipe
    and key (``epochs = "ten"``, a negative batch size or width, a learning rate <= 0, a train fraction
    outside (0, 1], ...)."""
    r = f"recipe {source}: key"
    test, need = _NAME[1], _NAME[2]
    if "name" in raw and not test(raw["name"]):
        raise RecipeError(f"{r} 'name' must be {need}, got {raw['name']!r}")
    for k, least in _INT.items():
        if k in raw:
            _check_int(raw[k], least, f"{r} {k!r}")
    ds = raw.get("datasets")
    if ds is not None and not (isinstance(ds, str) or (isinstance(ds, list) and ds and all(isinstance(d, str) for d in ds))):
        raise RecipeError(f"{r} 'datasets' must be a dataset name or a non-empty list of names, got {ds!r}")
    ck = raw.get("checkpoints")
    if ck is not None and not (isinstance(ck, list) and ck and all(_is_int(c) and c >= 0 for c in ck)):
        raise RecipeError(f"{r} 'checkpoints' must be a non-empty list of epochs (integers >= 0), got {ck!r}")
    if "description" in raw and not isinstance(raw["description"], str):
        raise RecipeError(f"{r} 'description' must be a string")
    for section in ("architecture", "hyperparameters", "pretrain"):
        if section in raw and not isinstance(raw[section], dict):
            raise RecipeError(f"recipe {source}: [{section}] must be a table, got {type(raw[section]).__name__}")
    for k, v in raw.get("architecture", {}).items():
        what = f"{r} 'architecture.{k}'"
        if k in _ARCH_INT:
            _check_int(v, _ARCH_INT[k], what)
        elif k == "hidden":
            for h in _support(v) if not (isinstance(v, list) and all(_is_int(x) for x in v)) else v:
                if not _is_int(h) or h < 1:
                    raise RecipeError(f"{what} must be a list of integers >= 1, got {v!r}")
        elif k in ("batchnorm", "layernorm"):
            if not all(isinstance(x, bool) for x in _support(v)):
                raise RecipeError(f"{what} must be true or false, got {v!r}")
        elif k == "padding":
            if not all(x in ("same", "valid") or (_is_int(x) and x >= 0) for x in _support(v)):
                raise RecipeError(f"{what} must be 'same', 'valid' or an integer >= 0, got {v!r}")
        elif k in ("kind", "activation"):
            if not all(isinstance(x, str) for x in _support(v)):
                raise RecipeError(f"{what} must be a name (string), got {v!r}")
    for section in ("hyperparameters", "pretrain"):
        for k, v in raw.get(section, {}).items():
            what = f"{r} '{section}.{k}'"
            if k in _HYPER_RANGE:
                _check_range(v, k, what)
            elif k == "optimizer" and not all(isinstance(x, str) for x in _support(v)):
                raise RecipeError(f"{what} must be an optimizer name (string), got {v!r}")
            elif section == "pretrain" and k in _INT:
                _check_int(v, _INT[k], what)
            elif section == "pretrain" and k == "dataset" and not isinstance(v, str):
                raise RecipeError(f"{what} must be a dataset name, got {v!r}")


def parse_recipe(raw: dict[str, Any], source: str = "<dict>") -> Recipe:
    """Validate a recipe given as a dict (the parsed TOML); bad values raise :class:`RecipeError`."""
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {source}: a table of keys, not a {type(raw).__name__}")
    check_values(raw, source)
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"recipe {source}: unknown key(s) {sorted(unknown)} (known: {sorted(_TOP_KEYS)})")
    for k in ("name", "population", "datasets", "epochs"):
        if k not in raw:
            raise ConfigError(f"recipe {source}: missing required key {k!r}")
    ds = raw["datasets"] if isinstance(raw["datasets"], list) else [raw["datasets"]]
    shapes = {(datasets.info(d)["input_shape"], datasets.info(d)["num_classes"]) for d in ds}
    arch = dict(raw.get("architecture", {}))
    bad = set(arch) - _ARCH_KEYS
    if bad:
        raise ConfigError(f"recipe {source}: unknown architecture key(s) {sorted(bad)}")
    hyper = dict(raw.get("hyperparameters", {}))
    known = set(HYPER_DEFAULTS) | set(OPTIONAL_HYPER)
    bad = set(hyper) - known
    if bad:
        raise ConfigError(f"recipe {source}: unknown hyperparameter(s) {sorted(bad)} (known: {sorted(known)})")
    for key, allowed in (("optimizer", OPTIMIZERS), ("init", INIT_KINDS)):
        values = _choices(hyper.get(key, HYPER_DEFAULTS.get(key, OPTIONAL_HYPER.get(key))))
        if not set(values) <= set(allowed):
            raise ConfigError(f"recipe {source}: hyperparameters.{key} {sorted(set(values) - set(allowed))} "
                              f"unknown (use {', '.join(allowed)})")
    engine = str(raw.get("engine", "auto"))
    if engine not in _ENGINES:
        raise ConfigError(f"recipe {source}: engine {engine!r} unknown (use {', '.join(_ENGINES)})")
    spe = str(raw.get("steps_per_epoch", "full"))
    if spe not in ("full", "subset"):
        raise ConfigError(f"recipe {source}: steps_per_epoch {spe!r} unknown (use full or subset)")
    epochs = int(raw["epochs"])
    ckpts = sorted({int(c) for c in raw.get("checkpoints", [epochs])})
    if epochs < 1 or not ckpts or ckpts[0] < 0 or ckpts[-1] > epochs:
        raise ConfigError(f"recipe {source}: checkpoints {ckpts} must lie in 0..epochs={epochs}")
    pre = raw.get("pretrain")
    if pre is not None:
        if len(shapes) != 1:
            raise ConfigError(f"recipe {source}: a fine-tuning zoo needs datasets of one input shape and class count")
        if any(isinstance(v, (list, dict)) for v in arch.values()):
            raise ConfigError(f"recipe {source}: a fine-tuning zoo has one fixed architecture (no choices)")
        pre = dict(pre)
        if "dataset" not in pre:
            raise ConfigError(f"recipe {source}: [pretrain] needs a dataset")
        datasets.info(pre["dataset"])
    pool = raw.get("architectures", 0)
    if not isinstance(pool, int) or isinstance(pool, bool) or pool < 0:
        raise ConfigError(f"recipe {source}: architectures must be a non-negative number of architecture draws, "
                          f"got {pool!r}")
    if pool and pre is not None:
        raise ConfigError(f"recipe {source}: a fine-tuning zoo has one fixed architecture (no architectures pool)")
    population = int(raw["population"])
    if population < 1:
        raise ConfigError(f"recipe {source}: population must be positive, got {population}")
    return Recipe(name=str(raw["name"]), seed=int(raw.get("seed", 0)), population=population, datasets=list(ds),
                  epochs=epochs, checkpoints=ckpts, batch_size=int(raw.get("batch_size", 64)),
                  group_size=int(raw.get("group_size", 512)), architecture=arch, hyperparameters=hyper,
                  pretrain=pre, description=str(raw.get("description", "")), source=source, raw=raw,
                  engine=engine, steps_per_epoch=spe, architectures=pool)


def _choices(spec: Any) -> list[Any]:
    """The values a categorical field can take (a fixed value, a list, or ``{choice = [...]}``)."""
    if isinstance(spec, dict):
        return list(spec.get("choice", []))
    return list(spec) if isinstance(spec, list) else [spec]
