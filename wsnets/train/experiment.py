"""A whole training run: splits from the zoo, one model per seed, test metrics, artifact, plots.

``RUN/`` receives ``model.safetensors`` + ``config.json`` + ``normalization.json`` (the first seed's
meta-model, loadable with :meth:`MetaModel.load`), ``seeds/<k>/`` (every seed's meta-model),
``metrics.json`` (per-seed validation/test metrics and mean ± std over seeds), ``log.jsonl`` and,
on the first seed, ``scatter_<target>.png`` / ``confusion_<target>.png`` of the test split.
"""

from __future__ import annotations

import dataclasses
import inspect
import random
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import ConfigError, MissingKeyError, OutputExistsError
from ..io import atomic_write_json
from ..weights import WeightSpace
from .config import TrainConfig
from .distributed import Dist, device_for, setup, teardown
from .logging import RunLogger
from .gbm import GBMMetaModel, features_and_targets, is_gbm
from .loop import evaluate, fit, metrics_from_outputs, normalization, predict_dataset, target_metrics
from .meta_model import MetaModel, MetaModelEnsemble, build_encoder, compact_metrics, is_classification
from .ranges import for_dataset
from .metrics import aggregate, fmt

SPLITS = ("train", "val", "test")
ENSEMBLE_SEED_STRIDE = 1000   # member j of seed s trains from seed s + 1000 j (member 0 is the seed's own run)


def _ood(d: dict) -> dict | None:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()} or None


def open_datasets(cfg: TrainConfig, zoo_dir: str | Path, representation: str) -> dict[str, Any]:
    """``{"train", "val", "test"}`` ZooDatasets of ``zoo_dir``, split by model (see ``wsnets.zoo``)."""
    from ..zoo import ZooDataset
    from ..zoo import open as open_zoo
    zoo = open_zoo(zoo_dir)
    kw = dict(representation=representation, targets=list(cfg.data.targets), split_seed=cfg.data.split_seed,
              fractions=tuple(cfg.data.fractions), ood=_ood(cfg.data.ood), filter=cfg.data.filter or None)
    out = {s: ZooDataset(zoo, split=s, **kw) for s in SPLITS}
    for s, ds in out.items():
        if len(ds) == 0:
            extra = "".join(f", {k}={v}" for k, v in (("filter", cfg.data.filter), ("ood", cfg.data.ood)) if v)
            raise ConfigError(f"{zoo_dir}: no rows in the {s!r} split (fractions={cfg.data.fractions}{extra})")
    _check_targets(out["train"], cfg.data.targets, str(zoo_dir))
    return out


def _check_targets(ds: Any, targets: Sequence[str], where: str) -> None:
    rows = getattr(ds, "rows", None)
    if rows is None or not len(rows):
        return
    row = rows[0] if not hasattr(rows, "iloc") else rows.iloc[0]
    keys = set(row.keys() if hasattr(row, "keys") else [])
    for t in targets:
        if keys and t not in keys:
            raise MissingKeyError(f"{where}: the zoo has no target {t!r} (columns: {', '.join(sorted(keys))})")
        if is_classification(t) and len(ds.classes(t)) < 2:
            raise ConfigError(f"{where}: target {t!r} has fewer than two classes in the training split")


def _example(ds: Any):
    """The training split's networks (encoders read the architecture and fit input normalization)."""
    return ds.weightspaces()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# what a run directory holds (a run is there if one of the first four is); --overwrite removes all of it
RUN_MARKS = ("model.safetensors", "config.json", "metrics.json", "seeds")
RUN_FILES = RUN_MARKS + ("normalization.json", "reference.safetensors", "log.jsonl", "wandb")
RUN_PLOTS = ("scatter_*.png", "confusion_*.png")


def check_out(out: Path, overwrite: bool = False, remove: bool = True) -> None:
    """Refuse to write a run into ``out`` if it holds one (:class:`OutputExistsError`) unless ``overwrite``;
    with ``overwrite`` (and ``remove``) the old run's files are deleted first, so runs never mix (a 1-seed
    run over a 3-seed one would keep seeds/1 and seeds/2). Files wsnets does not write are left alone."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a directory")
    found = [n for n in RUN_MARKS if (out / n).exists()]
    if not found:
        return
    if not overwrite:
        raise OutputExistsError(f"{out} holds a meta-model run ({', '.join(found)}): pass --overwrite to replace it, "
                                "or write to another --out")
    if remove:
        import shutil
        for p in [out / n for n in RUN_FILES] + [q for g in RUN_PLOTS for q in out.glob(g)]:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()


def run_training(cfg: TrainConfig, *, zoo: str | Path | None = None, out: str | Path, seeds: int = 1,
                 device: str = "cpu", wandb: bool = False, datasets: dict[str, Any] | None = None,
                 example: Any = None, plots: bool = True, overwrite: bool = False) -> dict:
    """Train ``seeds`` meta-models (seeds ``cfg.seed + k``) and write ``RUN`` (see module docstring).

    ``datasets``/``example`` replace the zoo (datasets already split; used by tests and custom data).
    ``out`` holding a run is refused unless ``overwrite`` (which replaces it: see :func:`check_out`).
    Returns the content of ``metrics.json``.
    """
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    out = Path(out)
    check_out(out, overwrite, remove=False)  # refused before any work; removed below, after the data loaded
    dist = setup(device)
    dev = device_for(dist, device)
    try:
        if datasets is None:
            if zoo is None:
                raise ConfigError("run_training() needs a zoo directory or datasets")
            representation = cfg.data.representation or _encoder_representation(cfg, zoo)
            datasets = open_datasets(cfg, zoo, representation)
        example = example if example is not None else _example(datasets["train"])
        cfg = dataclasses.replace(cfg, encoder=_with_edge_dim(dict(cfg.encoder), datasets["train"]))
        if not is_gbm(cfg):  # a bad [encoder] fails here, before any output; the random state is left as it was
            with torch.random.fork_rng(devices=[]):
                _encoder(cfg, datasets["train"], example)
        if dist.is_main:
            check_out(out, overwrite)
        dist.barrier()
        logger = RunLogger(out / "log.jsonl", wandb=wandb or cfg.log.wandb, project=cfg.log.project,
                           name=f"{cfg.name}", config=cfg.to_dict(), wandb_dir=out, active=dist.is_main)
        sizes = {s: len(datasets[s]) for s in SPLITS}  # checkpoints (several per model when epochs are not filtered)
        models = {s: len({r["model_id"] for r in datasets[s].rows}) for s in SPLITS} \
            if all(hasattr(datasets[s], "rows") for s in SPLITS) else None
        logger.info(f"{cfg.name}: {cfg.encoder_name} on {sizes['train']}/{sizes['val']}/{sizes['test']} "
                    f"train/val/test checkpoints, targets {', '.join(cfg.data.targets)}, {seeds} seed(s), "
                    f"{dist.world_size} process(es) on {dev}"
                    + (f"; {left} checkpoint(s) without a finite {'/'.join(cfg.data.targets)} value left out"
                       if (left := sum(getattr(datasets[s], "left_out", 0) for s in SPLITS)) else ""))
        classes = {t: list(datasets["train"].classes(t)) for t in cfg.data.targets if is_classification(t)}
        norm = normalization(datasets["train"], list(cfg.data.targets), cfg.data.target_transform)
        per_seed = []
        for k in range(seeds):  # a handful of seeds, each a full training run
            s = cfg.seed + k
            _seed_everything(s)
            mm, info, val, test, real, y = _train_seed(cfg, s, datasets, example, classes, norm, dev, dist, logger)
            per_seed.append({"seed": s, **info, "val": val, "test": test})
            logger.log("test", step=k, seed=s, **test)
            if dist.is_main:  # what predict shows beside its answers: the range trained on, the test metrics
                mm.test_metrics = compact_metrics(test)
                mm.trained_on = for_dataset(mm, datasets["train"], dev)
                mm.to("cpu").save(out / "seeds" / str(k))
                if k == 0:
                    mm.save(out)
                    if plots:
                        _plots(mm, real, y, test, out)
            logger.info(f"seed {s}: " + ", ".join(_line(t, test[t]) for t in cfg.data.targets))
        result = {"name": cfg.name, "encoder": cfg.encoder_name, "zoo": str(zoo) if zoo else None,
                  "sizes": sizes, "models": models, "world_size": dist.world_size, "seeds": per_seed,
                  "test": aggregate([p["test"] for p in per_seed]), "config": cfg.to_dict()}
        if dist.is_main:
            atomic_write_json(out / "metrics.json", result)
            logger.info("test (mean ± std over seeds): " + "; ".join(
                f"{t} " + ", ".join(f"{m} {fmt(v)}" for m, v in ms.items() if m in ("kendall_tau", "r2", "accuracy"))
                for t, ms in result["test"].items() if t not in ("loss", "loss_parts")))
        logger.close()
        dist.barrier()
        return result
    finally:
        teardown(dist)


def _train_seed(cfg: TrainConfig, s: int, datasets: dict, example: Any, classes: dict, norm: dict,
                dev: torch.device, dist: Dist, logger: RunLogger) -> tuple:
    """One seed: (model, info, val metrics, test metrics, real-unit test predictions, test targets)."""
    targets = list(cfg.data.targets)
    if is_gbm(cfg):
        mm = GBMMetaModel(cfg, targets, classes=classes, seed=s)
        mm.example_arch = _one(example).arch
        mm.fit(*features_and_targets(datasets["train"], targets))
        (xv, yv), (xt, yt) = (features_and_targets(datasets[p], targets) for p in ("val", "test"))
        real = mm.predict_features(xt)
        return mm, {}, target_metrics(mm, mm.predict_features(xv), yv), target_metrics(mm, real, yt), real, yt
    enc_cfg = dict(cfg.encoder)
    members, results = [], []
    for j in range(cfg.optim.ensemble):   # a few members, each a full training run from its own seed
        sj = s + ENSEMBLE_SEED_STRIDE * j
        _seed_everything(sj)
        encoder, example = _encoder(cfg, datasets["train"], example)
        rep = cfg.data.representation or getattr(encoder, "representation", "graph")
        mm = MetaModel(encoder, targets, classes=classes, normalization=norm, representation=rep,
                       head_hidden=cfg.head.hidden, head_dropout=cfg.head.dropout)
        mm.config, mm.example_arch = cfg.to_dict() | {"seed": s, "encoder": enc_cfg}, _one(example).arch
        results.append(fit(mm, datasets["train"], datasets["val"], _with_seed(cfg, sj), device=dev, dist=dist,
                           logger=logger))
        members.append(mm)
    mm = members[0] if len(members) == 1 else MetaModelEnsemble(members)
    res = results[0]
    o, y = predict_dataset(mm, datasets["test"], device=dev, dist=dist)
    test = metrics_from_outputs(mm, o, y)
    val = evaluate(mm, datasets["val"], device=dev, dist=dist)
    x0 = datasets["test"].collate([datasets["test"][0]])[0]
    mm.feature_dim = int(x0.shape[-1]) if isinstance(x0, torch.Tensor) else None
    info = {"best_epoch": res.best_epoch, "epochs_run": res.epochs_run}
    if len(results) > 1:
        info = {"best_epoch": [r.best_epoch for r in results], "epochs_run": [r.epochs_run for r in results]}
    return mm, info, val, test, mm.outputs(o), y


def _with_edge_dim(enc_cfg: dict, train_ds: Any) -> dict:
    """A graph encoder's config with ``edge_dim`` (the largest kernel it reads) set, where the config leaves it
    out, to the zoo's largest kernel (every split), so a zoo of 5x5 kernels needs no ``--set encoder.edge_dim=25``;
    the value is recorded in the run's config, which is what a saved meta-model is rebuilt from."""
    from ..nn.registry import ENCODERS
    cls = ENCODERS.get(enc_cfg.get("name"))
    if cls is None or "edge_dim" in enc_cfg or not hasattr(train_ds, "max_kernel_numel") or \
            "edge_dim" not in inspect.signature(cls).parameters:
        return enc_cfg
    default = inspect.signature(cls).parameters["edge_dim"].default
    return enc_cfg | {"edge_dim": max(train_ds.max_kernel_numel(), default)}


def _encoder(cfg: TrainConfig, train_ds: Any, example: Any) -> tuple[Any, Any]:
    """The configured encoder (input normalization fitted for stats/ESD features) and the example it was
    built for."""
    enc_cfg = dict(cfg.encoder)
    feats = train_ds.features() if getattr(train_ds, "representation", None) in ("stats", "esd") and \
        hasattr(train_ds, "features") else None
    if feats is None:
        return build_encoder(enc_cfg, example), example
    nets = example if isinstance(example, (list, tuple)) else [example]
    example = max(nets, key=lambda w: len(w.arch.weight_layers))  # rows zero-padded to the deepest network
    encoder = build_encoder(enc_cfg, example)
    if getattr(encoder, "in_features", feats.shape[1]) != feats.shape[1] and hasattr(train_ds, "widest_arch"):
        # rows are padded to the zoo's widest network, which an out-of-distribution split may keep out of training
        example = WeightSpace.random(train_ds.widest_arch())
        encoder = build_encoder(enc_cfg, example)
    if getattr(encoder, "in_features", feats.shape[1]) != feats.shape[1]:
        raise ConfigError(f"encoder {cfg.encoder_name!r} takes {encoder.in_features} features, the zoo gives "
                          f"{feats.shape[1]}")
    encoder.fit_normalization(feats)
    return encoder, example


def _one(example: Any):
    """A single network of an example (a WeightSpace, batched or not, or a list of them)."""
    if isinstance(example, (list, tuple)):
        example = example[0]
    return example[0] if getattr(example, "batch_size", None) is not None else example


def _with_seed(cfg: TrainConfig, seed: int) -> TrainConfig:
    import dataclasses
    return dataclasses.replace(cfg, seed=seed)


def _line(t: str, m: dict) -> str:
    if "kendall_tau" in m:
        return f"{t} τ={m['kendall_tau']:.3f} R²={m['r2']:.3f}"
    return f"{t} acc={m['accuracy']:.3f} F1={m['macro_f1']:.3f}"


def _plots(mm: Any, real: dict, y: dict, test: dict, out: Path) -> None:
    from .plots import confusion, scatter
    for t in mm.targets:
        if is_classification(t):
            confusion(test[t]["confusion"], mm.classes[t], t, out / f"confusion_{t}.png")
        else:
            scatter(real[t], y[t], t, out / f"scatter_{t}.png",
                    title=f"{mm.config.get('name', 'meta-model')}: {t} on held-out test models' checkpoints")


def _encoder_representation(cfg: TrainConfig, zoo: str | Path) -> str:
    """The input the configured encoder takes (its class's ``representation`` in wsnets.nn)."""
    name = cfg.encoder_name
    if name in ("stat_gbm", "esd_gbm"):
        return "stats" if name == "stat_gbm" else "esd"
    if name == "nfn-hnp":
        return "tensors"
    try:
        from ..nn.registry import ENCODERS
    except ImportError as e:
        raise ConfigError(f"encoder {name!r}: wsnets.nn is not available ({e})") from None
    if name not in ENCODERS:
        raise ConfigError(f"unknown encoder {name!r} (known: {', '.join(list(ENCODERS) + ['stat_gbm', 'esd_gbm'])})")
    rep = getattr(ENCODERS[name], "representation", None)
    if not isinstance(rep, str):
        raise ConfigError(f"encoder {name!r} does not say its representation: set data.representation")
    return {"np": "tensors", "hnp": "tensors", "transformer": "graph"}.get(rep, rep)
