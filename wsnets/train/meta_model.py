"""The meta-model: an encoder of networks, one head per target, and target normalization.

A trained meta-model is a directory ``RUN`` holding

* ``model.safetensors`` — encoder and head weights (metadata ``wsnets.metamodel`` = format version),
* ``config.json`` — the training config, targets, class names, representation, an example
  architecture (to rebuild fixed-architecture encoders) and the input feature size,
* ``normalization.json`` — mean and standard deviation of each regression target on the training
  split (heads predict standardized values; :meth:`MetaModel.predict` returns real units).

:meth:`MetaModel.load` reads the three files back; :meth:`MetaModel.predict` takes checkpoint paths,
``nn.Module``\\ s, state_dicts or WeightSpaces.

Examples
--------
>>> mm = MetaModel.load("runs/graph")                         # doctest: +SKIP
>>> mm.predict(["model.safetensors"])[0]["test_acc"]          # doctest: +SKIP
0.91
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..arch import Architecture
from ..errors import CheckpointError, ConfigError, MissingKeyError, WSNetsError
from ..io import atomic_write_json, read_safetensors, write_safetensors
from ..weights import WeightSpace
from .config import CLASSIFICATION_TARGETS, TrainConfig, from_dict
from .represent import represent

FORMAT = "wsnets.metamodel/1"
FILES = ("model.safetensors", "config.json", "normalization.json")

# name -> factory(encoder_config: dict, example: WeightSpace) -> nn.Module, for encoders outside wsnets.nn
_ENCODERS: dict[str, Callable[[dict, WeightSpace], nn.Module]] = {}


def register_encoder(name: str, factory: Callable[[dict, WeightSpace], nn.Module]) -> None:
    """Make an encoder outside :mod:`wsnets.nn` buildable by name (``[encoder] name = ...``)."""
    _ENCODERS[name] = factory


def build_encoder(cfg: Mapping[str, Any], example: WeightSpace) -> nn.Module:
    """An encoder from its config section: registered here first, else :mod:`wsnets.nn`'s registry."""
    name = str(cfg.get("name", ""))
    if name == "nfn-hnp" and name not in _ENCODERS:
        from .nfn_reference import build
        register_encoder(name, build)
    if name in _ENCODERS:
        return _ENCODERS[name](dict(cfg), example)
    try:
        from ..nn.registry import build_encoder as nn_build  # type: ignore[import-not-found]
    except ImportError as e:
        raise ConfigError(f"encoder {name!r}: wsnets.nn is not available ({e})") from None
    from .config import check_encoder_values
    check_encoder_values(cfg, "[encoder]")
    try:
        return nn_build(dict(cfg), example)
    except (ValueError, TypeError, RuntimeError) as e:  # an option torch or the encoder refuses
        opts = ", ".join(f"{k}={v!r}" for k, v in cfg.items() if k != "name")
        raise ConfigError(f"encoder {name!r} cannot be built with {opts or 'its defaults'} "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def is_classification(target: str) -> bool:
    return target in CLASSIFICATION_TARGETS


def _head(in_dim: int, out: int, hidden: int, dropout: float) -> nn.Module:
    if hidden <= 0:
        return nn.Linear(in_dim, out)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out))


# bounded regression targets: predictions are clipped to these ranges (the raw value is kept beside)
BOUNDS: dict[str, tuple[float, float]] = {"test_acc": (0.0, 1.0), "train_acc": (0.0, 1.0), "gen_gap": (-1.0, 1.0),
                                          "test_loss": (0.0, math.inf), "train_loss": (0.0, math.inf)}


def load_networks(checkpoints: Sequence[Any] | Any, notes: list[str | None] | None = None) -> list[WeightSpace]:
    """Single-network WeightSpaces from paths, nn.Modules, state_dicts or (batched) WeightSpaces, in
    float32 or float64 (half-precision weights are cast to float32; ``notes`` receives, per network,
    what was cast or None)."""
    from ..io import compute_dtype, load
    if isinstance(checkpoints, (str, Path, WeightSpace, nn.Module, Mapping)):
        checkpoints = [checkpoints]
    nets: list[WeightSpace] = []
    for c in checkpoints:
        ws, cast = compute_dtype(canonicalize(load(c)), dtypes=(torch.float32,))  # the meta-model computes in float32
        more = list(ws) if ws.batch_size is not None else [ws]
        nets.extend(more)
        if notes is not None:
            notes.extend([cast] * len(more))
    return nets


def canonicalize(ws: WeightSpace) -> WeightSpace:
    """Layers named by position (``"0"``, ``"2"``, as :func:`wsnets.mlp` names them) and, for an MLP
    loaded without one, ``input_shape = (in_features,)`` — so a checkpoint from a user's own
    ``nn.Sequential`` or state_dict has the same :class:`Architecture` as the zoo's networks."""
    from ..convert import canonical
    arch = canonical(ws.arch)
    first = next((l for l in arch.layers if l.kind not in ("flatten", "dropout")), None)
    if arch.input_shape is None and first is not None and first.kind == "linear":
        arch = Architecture(arch.layers, (int(first.in_features),))
    if arch == ws.arch:
        return ws
    rename = {old.name: new.name for old, new in zip(ws.arch.layers, arch.layers)}
    params = {}
    for key, v in ws.params.items():   # a few keys per layer, not per neuron
        prefix, _, suffix = key.rpartition(".")
        params[f"{rename.get(prefix, prefix)}.{suffix}"] = v
    return WeightSpace(arch, params, ws.batch_size)


class Predictor:
    """``predict(checkpoints)`` for anything with ``targets``, ``classes``, ``representation`` and
    ``predict_features(x) -> {target: [B] value | [B, C] probabilities}``; ``trained_on`` (a
    :class:`~wsnets.train.ranges.TrainingRange`, None for runs saved before wsnets recorded it) and
    ``test_metrics`` (the meta-model's own test-split metrics) when known."""

    targets: list[str]
    classes: dict[str, list[str]]
    representation: str
    feature_dim: int | None
    example_arch: Architecture | None
    trained_on: Any = None
    test_metrics: dict | None = None

    def predict(self, checkpoints: Sequence[Any] | Any, *, batch_size: int = 64):
        """Predictions for checkpoints (paths, nn.Modules, state_dicts or WeightSpaces) as a pandas
        DataFrame, one row per network (see :meth:`predict_records` for the columns)."""
        import pandas as pd
        return pd.DataFrame(self.predict_records(checkpoints, batch_size=batch_size))

    @torch.no_grad()
    def predict_records(self, checkpoints: Sequence[Any] | Any, *, batch_size: int = 64) -> list[dict]:
        """One dict per network: each regression target's value in real units, clipped to its range
        (:data:`BOUNDS`; the model's raw value as ``"<target>_unclipped"``), for
        ``dataset``/``task`` the predicted class name and ``"<target>_probs"`` ``{class: probability}``;
        ``in_range`` (True, False, or None when the meta-model records no training range) with
        ``range_reasons``, ``distance``/``threshold`` (see :mod:`wsnets.train.ranges`); ``cast`` when the
        weights were cast to another precision. Every row has the same keys (None where a value was not
        computed; see :meth:`_complete`)."""
        notes: list[str | None] = []
        nets = load_networks(checkpoints, notes)
        results: list[dict | None] = [None] * len(nets)
        ok = list(range(len(nets)))
        if self.representation in ("stats", "esd") and self.feature_dim is not None:
            from ..zoo.dataset import _feature_width
            for i, w in enumerate(nets):  # a deeper network than any trained on has more features than the heads read
                n = _feature_width(w.arch.to_json(), self.representation)
                if n > self.feature_dim:
                    results[i] = self._unreadable(f"its {self.representation} features have {n} entries, the "
                                                  f"meta-model reads {self.feature_dim} (deeper than every network "
                                                  "it was trained on)")
            ok = [i for i in ok if results[i] is None]
        cap = self._edge_capacity() if self.representation == "graph" else None
        for i in ok if cap is not None else ():
            n = nets[i].arch.max_kernel_numel
            if n > cap:  # the graph encoder's edge features hold kernels of up to `cap` taps
                results[i] = self._unreadable(f"its largest kernel has {n} taps, the meta-model's graph encoder "
                                              f"reads kernels of at most {cap} (larger than every kernel it was "
                                              "trained on)")
        ok = [i for i in ok if results[i] is None]
        if self.representation in ("tensors", "flat") and self.example_arch is not None:
            # a fixed-architecture meta-model reads networks shaped as its training networks; in a batch that
            # mixes architectures the others get a row saying so (a batch of only others is refused below)
            want = tuple(self.example_arch.param_shapes.values())
            other = [i for i in ok if tuple(nets[i].arch.param_shapes.values()) != want]
            if other and len(other) < len(ok):
                for i in other:
                    results[i] = self._unreadable(f"architecture {nets[i].arch.describe()}: this fixed-architecture "
                                                  f"meta-model reads only networks shaped as "
                                                  f"{self.example_arch.describe()}")
                ok = [i for i in ok if results[i] is None]
        for s in range(0, len(ok), batch_size):
            idx = ok[s:s + batch_size]
            chunk = [nets[i] for i in idx]
            x = represent(chunk, self.representation)
            self._check_features(x)
            x = self._pad(x)
            rows = self._rows(self.predict_features(x))
            for i, r, check in zip(idx, rows, self._check_range(chunk, x)):
                r.update(check)
                results[i] = r
        for r, cast in zip(results, notes):
            self._clip(r)
            r["cast"] = cast or None
            self._complete(r)
        return results  # type: ignore[return-value]

    def _complete(self, r: dict) -> None:
        """Every row has the same keys, whatever happened to its network: ``<target>_unclipped`` (the raw
        value of a bounded target, equal to it unless clipped), ``<target>_probs``, ``distance``,
        ``threshold`` (and ``base_distance``/``base_threshold`` for fine-tunes) None where not computed."""
        for t in self.targets:
            if is_classification(t):
                r.setdefault(f"{t}_probs", None)
            elif t in BOUNDS:
                r.setdefault(f"{t}_unclipped", r.get(t))
        keys = ["in_range", "range_reasons", "distance", "threshold", "cast"]
        if self.trained_on is not None and getattr(self.trained_on, "bases", None) is not None:
            keys += ["base_distance", "base_threshold"]
        for k in keys:
            r.setdefault(k, [] if k == "range_reasons" else None)

    def _edge_capacity(self) -> int | None:
        """The largest kernel (taps) a graph encoder reads; None if unknown or not a graph encoder."""
        members = getattr(self, "members", None)
        encs = [m.encoder for m in members] if members is not None else [getattr(self, "encoder", None)]
        caps = [getattr(getattr(e, "featurizer", None), "edge_dim", None) for e in encs]
        return min(caps) if caps and None not in caps else None

    def _unreadable(self, why: str) -> dict:
        """The row of a network the meta-model cannot read: no prediction, out of range, and why."""
        r: dict[str, Any] = {t: (None if is_classification(t) else math.nan) for t in self.targets}
        return {**r, "in_range": False, "range_reasons": [why]}

    def reference_features(self, x: Any) -> torch.Tensor | None:
        """What the heads read for an already represented batch (for the range check); None if unknown."""
        return None

    def _check_range(self, nets: Sequence[WeightSpace], x: Any) -> list[dict]:
        if self.trained_on is None:
            return [{"in_range": None, "range_reasons": ["the meta-model records no training range (saved by an "
                                                         "older wsnets): unknown"]} for _ in nets]
        z = self.reference_features(x) if self.trained_on.reference is not None else None
        out = []
        for c in self.trained_on.check(nets, z):
            c["range_reasons"] = c.pop("reasons")
            out.append(c)
        return out

    def _clip(self, r: dict) -> None:
        for t in self.targets:
            if t in BOUNDS and isinstance(r.get(t), float) and not math.isnan(r[t]):  # NaN: no prediction
                lo, hi = BOUNDS[t]
                v = r[t]
                if not lo <= v <= hi:
                    r[f"{t}_unclipped"] = v
                    r[t] = min(max(v, lo), hi)

    def _check_features(self, x: Any) -> None:
        from ..errors import ArchitectureMismatchError
        if self.feature_dim is not None and isinstance(x, torch.Tensor) and x.shape[-1] != self.feature_dim:
            if self.representation in ("stats", "esd") and x.shape[-1] < self.feature_dim:
                return  # a shallower network: zero-padded like the zoo pads (see _pad)
            raise ArchitectureMismatchError(
                f"the {self.representation} features have {x.shape[-1]} entries but this meta-model was trained on "
                f"{self.feature_dim} (architecture {self.example_arch.describe() if self.example_arch else '?'})")

    def _pad(self, x: Any) -> Any:
        """Zero-pad ``[B, F]`` stats/ESD rows to the training width (ZooDataset pads mixed depths so)."""
        if isinstance(x, torch.Tensor) and self.feature_dim is not None and x.shape[-1] < self.feature_dim:
            return torch.nn.functional.pad(x, (0, self.feature_dim - x.shape[-1]))
        return x

    def _rows(self, out: Mapping[str, torch.Tensor]) -> list[dict]:
        n = next(iter(out.values())).shape[0]
        rows: list[dict] = [{} for _ in range(n)]
        for t, v in out.items():
            v = torch.as_tensor(v).cpu()
            if is_classification(t):
                for r, k, p in zip(rows, v.argmax(-1).tolist(), v.tolist()):
                    r[t] = self.classes[t][k]
                    r[f"{t}_probs"] = dict(zip(self.classes[t], p))
            else:
                for r, val in zip(rows, v.tolist()):
                    r[t] = val
        return rows

    def describe(self) -> dict[str, Any]:
        """What the meta-model is: targets, its own test metrics and the range it was trained on."""
        return {"targets": list(self.targets), "representation": self.representation,
                "encoder": (getattr(self, "config", None) or {}).get("encoder", {}).get("name"),
                "test_metrics": self.test_metrics,
                "trained_on": self.trained_on.to_json() if self.trained_on is not None else None}


def compact_metrics(test: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """The headline test metrics per target (τ, R², MAE; accuracy, macro-F1) as plain numbers."""
    out = {}
    for t, ms in test.items():
        if not isinstance(ms, Mapping):
            continue
        keep = {}
        for k in ("kendall_tau", "r2", "mae", "accuracy", "macro_f1"):
            v = ms.get(k)
            v = v.get("mean") if isinstance(v, Mapping) else v
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                keep[k] = float(v)
        if keep:
            out[t] = keep
    return out


def range_meta(mm: Any) -> dict[str, Any]:
    """The ``config.json`` entries of a meta-model's training range and own test metrics (if known)."""
    out: dict[str, Any] = {}
    if getattr(mm, "trained_on", None) is not None:
        out["trained_on"] = mm.trained_on.to_json()
    if getattr(mm, "test_metrics", None):
        out["test_metrics"] = mm.test_metrics
    return out


def save_range(mm: Any, run: Path) -> None:
    from .ranges import FILE
    if getattr(mm, "trained_on", None) is not None:
        mm.trained_on.save(run)
    elif (run / FILE).exists():
        (run / FILE).unlink()


def load_range(mm: Any, run: Path, meta: Mapping[str, Any]) -> None:
    from .ranges import TrainingRange
    mm.trained_on = TrainingRange.load(run, dict(meta))
    tm = meta.get("test_metrics")
    mm.test_metrics = tm if isinstance(tm, dict) else None


def read_run(run: str | Path) -> tuple[dict, dict]:
    """``config.json`` and ``normalization.json`` of a run directory, after checking all files exist."""
    run = Path(run)
    if not run.is_dir():
        raise CheckpointError(f"{run}: meta-model directory does not exist")
    for f in FILES:
        if not (run / f).is_file():
            raise MissingKeyError(f"{run}: meta-model directory is missing {f} (needs {', '.join(FILES)})")
    meta, norm = {}, {}
    for name in ("config.json", "normalization.json"):
        try:
            obj = json.loads((run / name).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise CheckpointError(f"{run / name}: corrupt JSON in meta-model directory ({e})") from None
        if not isinstance(obj, dict):
            raise CheckpointError(f"{run / name}: a JSON {type(obj).__name__}, not an object: not a wsnets meta-model file")
        meta, norm = (obj, norm) if name == "config.json" else (meta, obj)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{run / 'config.json'}: not a wsnets meta-model (format {meta.get('format')!r})")
    if meta.get("kind", "nn") not in ("nn", "gbm"):
        raise CheckpointError(f"{run / 'config.json'}: meta-model kind {meta.get('kind')!r} unknown (nn or gbm)")
    for key, kind in (("targets", list), ("representation", str), ("config", dict)):
        if key in meta and not isinstance(meta[key], kind):
            raise CheckpointError(f"{run / 'config.json'}: {key!r} must be a {kind.__name__}, got {meta[key]!r}")
    for t, v in norm.items():
        ok = isinstance(v, dict) and all(isinstance(v.get(k), (int, float)) and not isinstance(v.get(k), bool)
                                         for k in ("mean", "std"))
        if not ok or not v["std"] > 0:
            raise CheckpointError(f"{run / 'normalization.json'}: entry {t!r} must be {{\"mean\": number, \"std\": "
                                  f"positive number}}, got {v!r}")
        q = v.get("quantiles")
        if q is not None and not (isinstance(q, list) and len(q) >= 2 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in q) and q == sorted(q)):
            raise CheckpointError(f"{run / 'normalization.json'}: entry {t!r}: 'quantiles' must be a sorted list "
                                  f"of at least two numbers")
    return meta, norm


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of ``(xp, fp)`` at ``x`` (``xp`` non-decreasing; clamped at the ends)."""
    i = torch.searchsorted(xp, x.contiguous()).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    w = ((x - x0) / (x1 - x0).clamp(min=torch.finfo(x.dtype).tiny)).clamp(0, 1)
    return f0 + w * (f1 - f0)


def _grid(q: torch.Tensor) -> torch.Tensor:
    """Cumulative probabilities of ``K`` quantiles: ``(i + 0.5) / K``."""
    return (torch.arange(len(q), dtype=q.dtype, device=q.device) + 0.5) / len(q)


def rank_score(y: torch.Tensor, quantiles: torch.Tensor) -> torch.Tensor:
    """``Φ⁻¹(F(y))``, ``F`` the empirical CDF given by ``quantiles`` (interpolated, within ``(0, 1)``)."""
    p = _interp(y, quantiles, _grid(quantiles))
    return torch.special.ndtri(p)


def rank_value(z: torch.Tensor, quantiles: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`rank_score`: ``F⁻¹(Φ(z))``."""
    return _interp(torch.special.ndtr(z), _grid(quantiles), quantiles)


# Encoder parameters added after runs were saved without them; each, when zero, gives back the model as it was
# before it existed, so those runs load and predict as before: NeuralGraphTransformer's input/output position codes
# (io_code), edge values (value_fwd, value_bwd, value_dir) and local-attention factors (neighbour).
_ZERO_IS_OLD = frozenset({"io_code", "value_fwd", "value_bwd", "value_dir", "neighbour"})


class MetaModel(Predictor, nn.Module):
    """Encoder + heads + normalization.

    Parameters
    ----------
    encoder : nn.Module with ``forward(batch) -> [B, d]`` and ``out_dim``.
    targets : target names, regression (``test_acc``, ``gen_gap``, ...) and/or ``dataset``/``task``.
    classes : class names of each classification target.
    normalization : ``{target: {"mean": m, "std": s}}`` for regression targets (plus ``"quantiles"``:
        sorted training values, for heads trained on rank scores; see :meth:`normalize`).
    representation : the input the encoder takes (``"graph"``, ``"tensors"``, ...).
    head_hidden, head_dropout : head MLP width (0: linear) and dropout.
    """

    def __init__(self, encoder: nn.Module, targets: Sequence[str], *, classes: Mapping[str, Sequence[str]] | None = None,
                 normalization: Mapping[str, Mapping[str, float]] | None = None, representation: str = "graph",
                 head_hidden: int = 64, head_dropout: float = 0.0) -> None:
        super().__init__()
        self.encoder = encoder
        self.targets = list(targets)
        self.classes = {t: [str(c) for c in v] for t, v in (classes or {}).items()}
        self.representation = representation
        self.normalization = {t: {"mean": float(v["mean"]), "std": float(v["std"]),
                                  **({"quantiles": [float(q) for q in v["quantiles"]]} if "quantiles" in v else {})}
                              for t, v in (normalization or {}).items()}
        d = int(getattr(encoder, "out_dim"))
        heads = {}
        for t in self.targets:
            if is_classification(t):
                if t not in self.classes:
                    raise ConfigError(f"classification target {t!r} needs its class names")
                heads[t] = _head(d, len(self.classes[t]), head_hidden, head_dropout)
            else:
                heads[t] = _head(d, 1, head_hidden, head_dropout)
                self.normalization.setdefault(t, {"mean": 0.0, "std": 1.0})
        self.heads = nn.ModuleDict(heads)
        self.config: dict = {}          # training config, recorded by save()
        self.example_arch: Architecture | None = None
        self.feature_dim: int | None = None

    # -- forward, loss, outputs ------------------------------------------------------------------
    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        """``{target: [B] standardized value | [B, C] logits}``."""
        z = self.encoder(batch)
        return {t: (h(z) if is_classification(t) else h(z).squeeze(-1)) for t, h in self.heads.items()}

    def normalize(self, target: str, y: torch.Tensor) -> torch.Tensor:
        """What a head is trained to output: the standardized value, or with ``quantiles`` in the target's
        normalization (``data.target_transform = "rank"``), the normal score of its rank among the
        training values, ``Φ⁻¹(F(y))``, so every stretch of the ranking weighs alike in the loss."""
        n = self.normalization[target]
        if "quantiles" in n:
            return rank_score(y, torch.as_tensor(n["quantiles"], dtype=y.dtype, device=y.device))
        return (y - n["mean"]) / n["std"]

    def denormalize(self, target: str, y: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`normalize` (monotone, so it keeps the ranking of the outputs)."""
        n = self.normalization[target]
        if "quantiles" in n:
            return rank_value(y, torch.as_tensor(n["quantiles"], dtype=y.dtype, device=y.device))
        return y * n["std"] + n["mean"]

    def loss(self, out: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """Sum over targets of MSE (standardized regression) and cross-entropy (classification)."""
        parts = {}
        for t in self.targets:
            o = out[t].float()
            if is_classification(t):
                parts[t] = nn.functional.cross_entropy(o, y[t].long())
            else:
                parts[t] = nn.functional.mse_loss(o, self.normalize(t, y[t].to(o.dtype)))
        return sum(parts.values()), {t: float(v.detach()) for t, v in parts.items()}

    def outputs(self, out: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Real-unit predictions ``[B]`` for regression and class probabilities ``[B, C]``."""
        return {t: (out[t].float().softmax(-1) if is_classification(t) else self.denormalize(t, out[t].float()))
                for t in self.targets}

    # -- artifact --------------------------------------------------------------------------------
    def save(self, run: str | Path) -> Path:
        """Write ``model.safetensors``, ``config.json`` and ``normalization.json`` into ``run`` (atomic)."""
        run = Path(run)
        run.mkdir(parents=True, exist_ok=True)
        write_safetensors(run / "model.safetensors", self.state_dict(), {"wsnets.metamodel": FORMAT})
        save_range(self, run)
        atomic_write_json(run / "config.json", {
            "format": FORMAT, "kind": "nn", "config": self.config, "targets": self.targets, "classes": self.classes,
            "representation": self.representation, "feature_dim": self.feature_dim,
            "example_arch": self.example_arch.to_json() if self.example_arch is not None else None,
            **range_meta(self)})
        atomic_write_json(run / "normalization.json", self.normalization)
        return run

    @classmethod
    def load(cls, run: str | Path, *, device: str | torch.device = "cpu") -> "MetaModel":
        """Rebuild a saved meta-model (see module docstring); a missing or bad file raises one line."""
        run = Path(run)
        meta, norm = read_run(run)
        if meta.get("kind") == "gbm":
            from .gbm import GBMMetaModel
            return GBMMetaModel.load(run)  # type: ignore[return-value]
        cfg: TrainConfig = from_dict(meta["config"], str(run / "config.json"))
        try:
            arch = Architecture.from_json(meta["example_arch"]) if meta.get("example_arch") else None
        except (WSNetsError, TypeError) as e:
            raise CheckpointError(f"{run / 'config.json'}: 'example_arch' is not an architecture ({e})") from None
        example = WeightSpace.random(arch) if arch is not None else None
        members = [MetaModel(build_encoder(cfg.encoder, example), meta["targets"], classes=meta.get("classes"),
                             normalization=norm, representation=meta["representation"], head_hidden=cfg.head.hidden,
                             head_dropout=cfg.head.dropout) for _ in range(cfg.optim.ensemble)]
        mm = members[0] if len(members) == 1 else MetaModelEnsemble(members)
        mm.config, mm.example_arch, mm.feature_dim = meta["config"], arch, meta.get("feature_dim")
        tensors, _ = read_safetensors(run / "model.safetensors")
        state = mm.state_dict()
        missing = set(state) - set(tensors)
        for k in [k for k in missing if _ZERO_IS_OLD & set(k.split("."))]:
            tensors[k] = torch.zeros_like(state[k])   # a run saved before this parameter existed: zero = its model
            missing.discard(k)
        if missing:
            raise MissingKeyError(f"{run / 'model.safetensors'}: missing tensor {sorted(missing)[0]!r}")
        mm.load_state_dict(tensors, strict=True)
        load_range(mm, run, meta)
        return mm.to(device).eval()

    @torch.no_grad()
    def reference_features(self, x: Any) -> torch.Tensor:
        """The encoder's embedding ``[B, d]`` of an already represented batch (what the heads read)."""
        self.eval()
        device = next(self.parameters()).device
        return self.encoder(x.to(device)).float().cpu()

    @torch.no_grad()
    def predict_features(self, x: Any) -> dict[str, torch.Tensor]:
        """Real-unit outputs for an already represented batch ``x``."""
        self.eval()
        device = next(self.parameters()).device
        return self.outputs(self(x.to(device)))


class MetaModelEnsemble(MetaModel):
    """Meta-models of one config trained from different seeds (``optim.ensemble``), as one meta-model: the
    outputs are averaged (standardized values; for classes, the log of the mean probability). Saved and
    loaded like a :class:`MetaModel` (its tensors are the members', ``members.<j>.*``)."""

    def __init__(self, members: Sequence[MetaModel]) -> None:
        nn.Module.__init__(self)
        first = members[0]
        self.members = nn.ModuleList(members)
        self.targets, self.classes, self.representation = first.targets, first.classes, first.representation
        self.normalization = first.normalization
        self.config, self.example_arch, self.feature_dim = first.config, first.example_arch, first.feature_dim

    @property
    def encoder(self) -> Callable[[Any], torch.Tensor]:
        """The members' embeddings side by side ``[B, K d]`` (what the range check compares)."""
        return lambda batch: torch.cat([m.encoder(batch) for m in self.members], dim=1)

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        outs = [m(batch) for m in self.members]
        avg = {}
        for t in self.targets:
            o = torch.stack([x[t].float() for x in outs])
            avg[t] = (o.log_softmax(-1).logsumexp(0) - torch.log(torch.tensor(float(len(outs))))
                      if is_classification(t) else o.mean(0))
        return avg
