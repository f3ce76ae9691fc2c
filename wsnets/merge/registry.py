"""The registry of per-tensor merge methods.

A merge method is one small function ``fn(x, **options) -> Tensor`` registered with
:func:`register`; ``x`` is a :class:`~wsnets.merge.engine.Inputs` (the models' values of one tensor, or
of one slice of it, plus whole-tensor statistics on request). Its options, their types, defaults,
ranges and help come from the signature and the docstring, as in mergekit's registry, so the Python
call, ``wsnets merge METHOD --option``, and a TOML config all read the same definition:

* ``float``, ``int``, ``bool``, ``typing.Literal[...]`` (a choice) options are shared by all models;
* ``PerModel[float]`` takes one value per model (a scalar broadcasts), e.g. weights and densities;
* ``Annotated[float, Interval(0, 1, low_open=True)]`` constrains a value (checked with one-line errors).

>>> from wsnets.merge.registry import get_method
>>> m = get_method("ties")
>>> [o.name for o in m.options]
['weight', 'density', 'scale', 'normalize']
>>> m.options[1].per_model, m.options[1].default
(True, 0.2)
"""

from __future__ import annotations

import inspect
import math
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Annotated, Any, Callable, Literal, Mapping, Sequence

from ..errors import ConfigError


class _PerModelMarker:
    def __repr__(self) -> str:
        return "PerModel"


_PER_MODEL = _PerModelMarker()


class PerModel:
    """Annotation of an option with one value per model (``PerModel[float]``); a scalar broadcasts."""

    def __class_getitem__(cls, tp: Any) -> Any:
        return Annotated[tp, _PER_MODEL]


@dataclass(frozen=True)
class Interval:
    """A value range for an option; ``low_open``/``high_open`` exclude the endpoint."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, v: float) -> bool:
        lo = v > self.low if self.low_open else v >= self.low
        hi = v < self.high if self.high_open else v <= self.high
        return lo and hi

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


Density = Annotated[float, Interval(0.0, 1.0, low_open=True)]     # a fraction kept: (0, 1]
Fraction01 = Annotated[float, Interval(0.0, 1.0)]                    # [0, 1]
Outliers = Annotated[float, Interval(0.0, 1.0, high_open=True)]      # a fraction removed: [0, 1)


@dataclass(frozen=True)
class Option:
    """One option of a merge method, read from the function's signature."""

    name: str
    type: type                       # float, int, bool or str
    default: Any
    per_model: bool = False
    choices: tuple | None = None     # for Literal options
    interval: Interval | None = None
    help: str = ""

    def parse(self, value: Any, where: str, labels: Sequence[str] | None = None) -> Any:
        """``value`` (a Python value or a CLI string) checked and converted; per-model options give a
        scalar or a tuple. ``where`` names the method and source in errors, ``labels`` the models."""
        if self.per_model and isinstance(value, str) and "," in value:
            value = value.split(",")
        if self.per_model and isinstance(value, (list, tuple)):
            return tuple(self._one(v, f"{where} ({labels[i]})" if labels and i < len(labels) else where)
                         for i, v in enumerate(value))
        if isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: option {self.name!r} takes one value, got {len(value)}")
        return self._one(value, where)

    def _one(self, v: Any, where: str) -> Any:
        try:
            if self.type is bool:
                if isinstance(v, str):
                    if v.lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError(v)
                    v = v.lower() in ("true", "1", "yes")
                elif not isinstance(v, bool):
                    raise ValueError(v)
            elif self.type is int:
                if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                    raise ValueError(v)
                v = int(v)
            elif self.type is float:
                if isinstance(v, bool):
                    raise ValueError(v)
                v = float(v)
            else:
                v = str(v)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: option {self.name!r} must be {self.type.__name__}, got {v!r}") from None
        if self.choices is not None and v not in self.choices:
            raise ConfigError(f"{where}: option {self.name!r} must be one of {', '.join(map(str, self.choices))}, "
                              f"got {v!r}")
        if self.type is float and not math.isfinite(v):
            raise ConfigError(f"{where}: option {self.name!r} must be finite, got {v}")
        if self.interval is not None and v not in self.interval:
            raise ConfigError(f"{where}: {self.name} {v:g} is outside {self.interval}")
        return v


@dataclass(frozen=True)
class Method:
    """A registered merge method (see the module docstring)."""

    name: str
    fn: Callable[..., Any]
    summary: str
    paper: str
    base: bool                       # takes a base model; the other models are its fine-tunes
    min_models: int                  # models besides the base
    max_models: int | None
    scope: str                       # default unit of whole-tensor statistics: "tensor" or "model"
    options: tuple[Option, ...]
    aliases: tuple[str, ...] = ()
    check: Callable[..., None] | None = field(default=None, repr=False)

    def option(self, name: str) -> Option:
        for o in self.options:
            if o.name == name:
                return o
        raise ConfigError(f"{self.name}: unknown option {name!r} (options: {', '.join(o.name for o in self.options)})")

    def resolve(self, values: Mapping[str, Any], n_models: int, *, where: str = "",
                model_names: Sequence[str] | None = None) -> dict[str, Any]:
        """Options for ``n_models`` models: defaults filled in, values checked, per-model options as
        tuples of length ``n_models``. Raises :class:`ConfigError` naming the option and model."""
        where = where or self.name
        out = {}
        for k in values:
            self.option(k)
        for o in self.options:
            v = o.parse(values[o.name], where, model_names) if o.name in values else o.default
            if o.per_model:
                v = tuple(v) if isinstance(v, tuple) else (v,) * n_models
                if len(v) != n_models:
                    raise ConfigError(f"{where}: {len(v)} values of {o.name!r} for {n_models} models")
            out[o.name] = v
        if self.check is not None:
            self.check(out, where=where, model_names=model_names)
        return out


_REGISTRY: dict[str, Method] = {}
_ALIASES: dict[str, str] = {}


def _options(fn: Callable[..., Any]) -> tuple[Option, ...]:
    hints = typing.get_type_hints(fn, include_extras=True)
    helps = _doc_params(fn.__doc__ or "")
    opts = []
    for p in list(inspect.signature(fn).parameters.values())[1:]:
        if p.kind is not inspect.Parameter.KEYWORD_ONLY:
            raise TypeError(f"merge method {fn.__name__}: option {p.name!r} must be keyword-only")
        if p.default is inspect.Parameter.empty:
            raise TypeError(f"merge method {fn.__name__}: option {p.name!r} needs a default")
        tp, meta = hints[p.name], ()
        if typing.get_origin(tp) is Annotated:
            tp, *meta = typing.get_args(tp)
        choices = None
        if typing.get_origin(tp) is Literal:
            choices = typing.get_args(tp)
            tp = type(choices[0])
        if tp not in (float, int, bool, str):
            raise TypeError(f"merge method {fn.__name__}: option {p.name!r} has unsupported type {tp}")
        interval = next((m for m in meta if isinstance(m, Interval)), None)
        opts.append(Option(p.name, tp, p.default, _PER_MODEL in meta, choices, interval, helps.get(p.name, "")))
    return tuple(opts)


def _doc_params(doc: str) -> dict[str, str]:
    """``name : text`` entries of a numpydoc "Parameters" section (continuation lines joined)."""
    out: dict[str, str] = {}
    lines = inspect.cleandoc(doc).splitlines()
    try:
        i = lines.index("Parameters") + 2
    except ValueError:
        return out
    name = None
    for line in lines[i:]:
        if not line.strip() or (line.strip() and set(line.strip()) == {"-"}):
            break
        if not line.startswith(" ") and " : " in line:
            name, text = line.split(" : ", 1)
            out[name.strip()] = text.strip()
        elif name is not None:
            out[name] += " " + line.strip()
    return out


def register(*, paper: str, base: bool, min_models: int = 1, max_models: int | None = None, scope: str = "tensor",
             aliases: Sequence[str] = (), check: Callable[..., None] | None = None):
    """Decorator registering ``fn(x, *, option=default, ...)`` under its function name."""
    def deco(fn):
        name = fn.__name__
        if name in _REGISTRY or name in _ALIASES:
            raise ValueError(f"merge method {name!r} is already registered")
        summary = inspect.cleandoc(fn.__doc__ or "").split("\n\n")[0].replace("\n", " ")
        _REGISTRY[name] = Method(name, fn, summary, paper, base, min_models, max_models, scope, _options(fn),
                                 tuple(aliases), check)
        for a in aliases:
            _ALIASES[a] = name
        return fn
    return deco


def get_method(name: str | Method) -> Method:
    """The method registered as ``name`` (hyphens and underscores alike; aliases accepted)."""
    if isinstance(name, Method):
        return name
    _load_builtin()
    key = name.replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise ConfigError(f"unknown merge method {name!r} (methods: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[key]


def list_methods() -> dict[str, Method]:
    """All registered methods by name."""
    _load_builtin()
    return dict(_REGISTRY)


def _load_builtin() -> None:
    import importlib
    importlib.import_module(".methods", __package__)  # registers the built-in methods


def keep_count(fraction: float, n: int) -> int:
    """``ceil(fraction * n)`` in exact arithmetic, ``fraction`` read as the decimal it prints as.

    ``0.2 * 22_713_216 = 4,542,643.2`` keeps 4,542,644 entries (float32 arithmetic rounds the product to
    4,542,643.0 and keeps one too few; float64 products can land a hair above an integer, as
    ``0.07 * 100 = 7.000000000000001``, and keep one too many).

    >>> keep_count(0.2, 22_713_216), keep_count(0.07, 100), keep_count(1.0, 5)
    (4542644, 7, 5)
    """
    return min(n, math.ceil(Fraction(repr(float(fraction))) * n))
