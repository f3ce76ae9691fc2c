"""Gradient-boosted-tree meta-models (StatNN-GBM, ESD-GBM) with the same artifact and API as MetaModel.

One ``wsnets.nn`` GBM (scikit-learn ``HistGradientBoosting``) per target, fitted on the training
split's ``[N, F]`` features. Trees cannot go into safetensors and pickles are refused, so the
artifact stores the training features and targets (``model.safetensors``) with the GBM options and
seed (``config.json``); :meth:`GBMMetaModel.load` refits, which is deterministic for a fixed
``random_state`` (checked by the tests: loaded predictions equal the trained ones).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..arch import Architecture
from ..errors import ConfigError
from ..io import atomic_write_json, read_safetensors, write_safetensors
from .config import TrainConfig, from_dict
from .meta_model import FORMAT, Predictor, is_classification, load_range, range_meta, read_run, save_range

GBM_ENCODERS = ("stat_gbm", "esd_gbm")


def is_gbm(cfg: TrainConfig) -> bool:
    return cfg.encoder_name in GBM_ENCODERS


class GBMMetaModel(Predictor):
    """Per-target GBMs on ``stats`` or ``esd`` features.

    Parameters
    ----------
    cfg : training config; ``[encoder]`` is ``{"name": "stat_gbm" | "esd_gbm", **HistGradientBoosting options}``.
    targets, classes : as for :class:`MetaModel`.
    seed : ``random_state`` of every GBM.
    """

    def __init__(self, cfg: TrainConfig, targets: Sequence[str], *, classes: Mapping[str, Sequence[str]] | None = None,
                 seed: int = 0) -> None:
        if not is_gbm(cfg):
            raise ConfigError(f"encoder {cfg.encoder_name!r} is not a GBM ({', '.join(GBM_ENCODERS)})")
        self.cfg, self.targets, self.seed = cfg, list(targets), seed
        self.classes = {t: [str(c) for c in v] for t, v in (classes or {}).items()}
        self.representation = "stats" if cfg.encoder_name == "stat_gbm" else "esd"
        self.models: dict[str, Any] = {}
        self.X: torch.Tensor | None = None
        self.y: dict[str, torch.Tensor] = {}
        self.feature_dim: int | None = None
        self.example_arch: Architecture | None = None
        self.config: dict = cfg.to_dict()

    def fit(self, X: torch.Tensor, y: Mapping[str, torch.Tensor]) -> "GBMMetaModel":
        """Fit one GBM per target on features ``X [N, F]`` and targets ``{t: [N]}``."""
        from ..nn.registry import build_gbm
        self.X = torch.as_tensor(X).double().cpu()
        self.y = {t: torch.as_tensor(y[t]).cpu() for t in self.targets}
        self.feature_dim = int(self.X.shape[1])
        opts = {k: v for k, v in self.cfg.encoder.items() if k != "name"}
        for t in self.targets:
            task = "classification" if is_classification(t) else "regression"
            try:
                gbm = build_gbm({"name": self.cfg.encoder_name, "task": task, "random_state": self.seed, **opts})
                self.models[t] = gbm.fit(self.X, self.y[t])
            except TypeError as e:   # an option HistGradientBoosting does not know
                raise ConfigError(f"[encoder] {self.cfg.encoder_name}: {e}") from None
        return self

    def predict_features(self, x: Any) -> dict[str, torch.Tensor]:
        """``{target: [B] value | [B, C] probabilities}`` for features ``x [B, F]``."""
        if not self.models:
            raise ConfigError("GBMMetaModel.predict before fit")
        X = torch.as_tensor(x).double().cpu()
        out = {}
        for t, m in self.models.items():
            if is_classification(t):
                proba = torch.as_tensor(m.predict_proba(X))
                full = torch.zeros(len(X), len(self.classes[t]), dtype=torch.float64)
                seen = torch.as_tensor(np.asarray(m.models[0].classes_), dtype=torch.long)
                full[:, seen] = proba          # classes absent from training keep probability 0
                out[t] = full
            else:
                out[t] = torch.as_tensor(m.predict(X), dtype=torch.float64)
        return out

    def save(self, run: str | Path) -> Path:
        run = Path(run)
        run.mkdir(parents=True, exist_ok=True)
        tensors = {"X_train": self.X, **{f"y.{t}": v for t, v in self.y.items()}}
        write_safetensors(run / "model.safetensors", tensors, {"wsnets.metamodel": FORMAT})
        save_range(self, run)
        atomic_write_json(run / "config.json", {
            "format": FORMAT, "kind": "gbm", "config": self.config, "targets": self.targets, "classes": self.classes,
            "representation": self.representation, "feature_dim": self.feature_dim, "seed": self.seed,
            "example_arch": self.example_arch.to_json() if self.example_arch is not None else None,
            **range_meta(self)})
        atomic_write_json(run / "normalization.json", {})   # trees predict raw targets
        return run

    @classmethod
    def load(cls, run: str | Path) -> "GBMMetaModel":
        """Refit from the stored training features (deterministic; see module docstring)."""
        run = Path(run)
        meta, _ = read_run(run)
        cfg = from_dict(meta["config"], str(run / "config.json"))
        mm = cls(cfg, meta["targets"], classes=meta.get("classes"), seed=int(meta.get("seed", 0)))
        mm.config = meta["config"]
        mm.example_arch = Architecture.from_json(meta["example_arch"]) if meta.get("example_arch") else None
        tensors, _ = read_safetensors(run / "model.safetensors")
        missing = [k for k in ["X_train", *(f"y.{t}" for t in mm.targets)] if k not in tensors]
        if missing:
            from ..errors import MissingKeyError
            raise MissingKeyError(f"{run / 'model.safetensors'}: missing tensor {missing[0]!r}")
        load_range(mm, run, meta)
        return mm.fit(tensors["X_train"], {t: tensors[f"y.{t}"] for t in mm.targets})

    def reference_features(self, x: Any) -> torch.Tensor:
        """The GBMs read the features themselves."""
        return torch.as_tensor(x).double().cpu()

    def to(self, *args: Any, **kwargs: Any) -> "GBMMetaModel":  # CPU only; keeps the MetaModel API
        return self

    def eval(self) -> "GBMMetaModel":
        return self


def features_and_targets(ds: Any, targets: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """All ``[N, F]`` features and ``{target: [N]}`` of a dataset (one pass in batches of 256)."""
    from torch.utils.data import DataLoader
    xs, ys = [], {t: [] for t in targets}
    for x, y in DataLoader(ds, batch_size=256, shuffle=False, collate_fn=ds.collate):
        xs.append(torch.as_tensor(x).double())
        for t in targets:
            ys[t].append(y[t])
    return torch.cat(xs), {t: torch.cat(v) for t, v in ys.items()}
