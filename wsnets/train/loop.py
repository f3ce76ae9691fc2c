"""One training loop for every encoder and target.

AdamW with linear warm-up then cosine decay (per step), gradient clipping, bfloat16 autocast on
CUDA, early stopping on the validation loss (or the mean validation τ, ``optim.select``) with the best
weights kept, a tqdm bar with live metrics, several targets at once (sum of standardized MSE and cross-entropy, see
:meth:`MetaModel.loss`). Works in one process or under ``torchrun`` (see :mod:`.distributed`).

Datasets are anything with ``len``, ``ds[i] -> (x, y)`` and ``ds.collate(items) -> (batch, {target:
tensor})`` — :class:`wsnets.zoo.ZooDataset` or a user's own.
"""

from __future__ import annotations

import copy
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch.utils.data import DataLoader, Sampler

from ..errors import ConfigError
from .config import TrainConfig
from .distributed import Dist
from .logging import RunLogger
from .meta_model import MetaModel, is_classification
from .metrics import classification_metrics, regression_metrics


@dataclass
class FitResult:
    """What :func:`fit` returns: best validation loss and epoch, and the per-epoch history."""

    best_val_loss: float
    best_epoch: int
    epochs_run: int
    history: list[dict] = field(default_factory=list)


def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj.to(device) if hasattr(obj, "to") else obj


def target_values(ds: Any, target: str) -> torch.Tensor:
    """All values of one target in a dataset, ``[n]`` (from ``ds.targets`` when offered, else items)."""
    if hasattr(ds, "target_values"):
        return torch.as_tensor(ds.target_values(target), dtype=torch.float64)
    if hasattr(ds, "rows") and hasattr(ds, "target"):       # ZooDataset: from the index, no weights read
        return torch.tensor([float(ds.target(r, target)) for r in ds.rows], dtype=torch.float64)
    loader = DataLoader(ds, batch_size=256, shuffle=False, collate_fn=ds.collate)
    return torch.cat([y[target].double().flatten() for _, y in loader])


def normalization(ds: Any, targets: list[str], transform: str = "standard", n_quantiles: int = 256) -> dict:
    """Mean and std (``ddof=0``, floored at 1e-8) of each regression target on ``ds``; with ``transform =
    "rank"`` also ``n_quantiles`` quantiles (at probabilities ``(i + 0.5) / n``), which make the heads learn
    rank scores (:meth:`MetaModel.normalize`)."""
    out: dict = {}
    for t in targets:
        if not is_classification(t):
            v = target_values(ds, t)
            v = v[~v.isnan()]
            out[t] = {"mean": float(v.mean()), "std": max(float(v.std(unbiased=False)), 1e-8)}
            if transform == "rank":
                p = (torch.arange(n_quantiles, dtype=torch.float64) + 0.5) / n_quantiles
                out[t]["quantiles"] = torch.quantile(v, p).tolist()
    return out


def _schedule(opt: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _loader(ds: Any, *, batch_size: int = 32, sampler: Sampler | None = None,
            batch_sampler: Sampler | None = None) -> DataLoader:
    if batch_sampler is not None:
        return DataLoader(ds, batch_sampler=batch_sampler, collate_fn=ds.collate)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=ds.collate)


@torch.no_grad()
def predict_dataset(model: MetaModel, ds: Any, *, device: torch.device | str = "cpu", batch_size: int = 128,
                    dist: Dist | None = None, amp: bool = False) -> tuple[dict, dict]:
    """Raw outputs (standardized values / logits) and targets of every item of ``ds``, in order.

    Under DDP each rank predicts a shard and the shards are gathered, so every rank returns the same.
    """
    dist = dist or Dist()
    device = torch.device(device)
    sampler = dist.sampler(len(ds), shuffle=False, seed=0)
    idx = torch.tensor(list(iter(sampler)), dtype=torch.long)
    model.eval()
    outs: dict[str, list] = {}
    ys: dict[str, list] = {}
    for x, y in _loader(ds, batch_size=batch_size, sampler=idx.tolist()):
        with _autocast(device, amp):
            o = model(to_device(x, device))
        for t in model.targets:
            outs.setdefault(t, []).append(o[t].float().cpu())
            ys.setdefault(t, []).append(y[t].cpu())
    local = (idx, {t: torch.cat(v) for t, v in outs.items()}, {t: torch.cat(v) for t, v in ys.items()})
    n = len(ds)
    out_all: dict = {}
    y_all: dict = {}
    for i, o, y in dist.gather(local):      # world_size entries
        for t in model.targets:
            if t not in out_all:
                out_all[t] = o[t].new_zeros((n,) + tuple(o[t].shape[1:]))
                y_all[t] = y[t].new_zeros((n,) + tuple(y[t].shape[1:]))
            out_all[t][i] = o[t]
            y_all[t][i] = y[t]
    return out_all, y_all


def metrics_from_outputs(model: MetaModel, out: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor]) -> dict:
    """``{"loss": ..., target: {metric: value}}`` for full-dataset outputs of :func:`predict_dataset`."""
    loss, parts = model.loss(out, y)
    return {"loss": float(loss), "loss_parts": parts, **target_metrics(model, model.outputs(out), y)}


def target_metrics(model: Any, real: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor]) -> dict:
    """``{target: metrics}`` from real-unit predictions / class probabilities and true targets."""
    res = {}
    for t in model.targets:
        if is_classification(t):
            res[t] = classification_metrics(real[t], y[t], len(model.classes[t]))
        else:
            res[t] = regression_metrics(real[t], y[t])
    return res


def evaluate(model: MetaModel, ds: Any, **kw: Any) -> dict:
    """Loss and metrics of ``model`` on all of ``ds`` (see :func:`metrics_from_outputs`)."""
    out, y = predict_dataset(model, ds, **kw)
    return metrics_from_outputs(model, out, y)


def _summary(m: Mapping) -> dict:
    s = {"loss": m["loss"]}
    for t, v in m.items():
        if isinstance(v, Mapping) and "kendall_tau" in v:
            s[f"{t}_tau"] = v["kendall_tau"]
        elif isinstance(v, Mapping) and "accuracy" in v:
            s[f"{t}_acc"] = v["accuracy"]
    return s


def _mean_score(m: Mapping) -> float:
    """Mean over targets of Kendall τ (regression) or accuracy (classification): ``optim.select = "tau"``."""
    v = [x["kendall_tau"] if "kendall_tau" in x else x["accuracy"] for x in m.values()
         if isinstance(x, Mapping) and ("kendall_tau" in x or "accuracy" in x)]
    return float(sum(v) / len(v)) if v else 0.0


@torch.no_grad()
def recalibrate_batchnorm(model: torch.nn.Module, ds: Any, *, device: torch.device | str = "cpu", amp: bool = False,
                          batch_size: int = 128) -> bool:
    """Set the running statistics of every BatchNorm in ``model`` to the average of its batch means and
    variances over one in-order pass of ``ds`` with the current weights (everything else in eval
    mode), as SWA does after averaging. Running averages during training lag behind the changing
    encoder, and where the batch-to-batch spread is small that lag alone ruins evaluation. Every DDP rank passes over the
    whole dataset, so all ranks get the same statistics. Returns False (and does nothing) without
    BatchNorm."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return False
    was = model.training
    model.eval()
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None   # cumulative average of the batch statistics over the pass
        m.train()
    device = torch.device(device)
    for x, _ in _loader(ds, batch_size=batch_size):
        with _autocast(device, amp):
            model(to_device(x, device))
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    model.train(was)
    return True


def _augmenter(cfg: TrainConfig):
    """The training-batch transform of ``data.augment_permute``: independent random hidden-neuron permutations of
    every network of a ``tensors`` batch (the same functions, so the targets stay valid); else the identity."""
    if not cfg.data.augment_permute:
        return lambda x: x
    from ..symmetry import random_permute
    from ..weights import MixedBatch, WeightSpace
    gen = torch.Generator().manual_seed(cfg.seed)

    def permuted(x: Any) -> Any:
        if isinstance(x, MixedBatch):
            return MixedBatch(random_permute(x.ws, generator=gen), x.kinds, x.index)
        if isinstance(x, WeightSpace):
            return random_permute(x.batched(), generator=gen)
        raise ConfigError(f"data.augment_permute permutes networks of the 'tensors' representation, got a batch of "
                          f"{type(x).__name__} (set data.representation = \"tensors\")")
    return permuted


def fit(model: MetaModel, train_ds: Any, val_ds: Any, cfg: TrainConfig, *, device: torch.device | str = "cpu",
        dist: Dist | None = None, logger: RunLogger | None = None,
        batch_sampler: Sampler | None = None) -> FitResult:
    """Train ``model`` in place; on return it holds the weights of the best validation epoch.

    Parameters
    ----------
    model : MetaModel (not DDP-wrapped; wrapping happens here when ``dist`` is enabled).
    train_ds, val_ds : datasets (see module docstring); ``val_ds`` may be None (no early stopping).
    cfg : TrainConfig — ``optim`` and ``data.batch_size`` are used.
    batch_sampler : replaces the default shuffling (used to replay a DDP run's order in one process).
    """
    dist = dist or Dist()
    logger = logger or RunLogger(console=False, active=False)
    device = torch.device(device)
    if len(train_ds) == 0:
        raise ConfigError("the training split is empty")
    model.to(device)
    net = dist.wrap(model, device)
    o = cfg.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    sampler = None if batch_sampler is not None else dist.sampler(len(train_ds), shuffle=True, seed=cfg.seed)
    loader = _loader(train_ds, batch_size=cfg.data.batch_size, sampler=sampler, batch_sampler=batch_sampler)
    steps_per_epoch = len(loader)
    sched = _schedule(opt, o.warmup_epochs * steps_per_epoch, o.epochs * steps_per_epoch)
    amp = o.amp and device.type == "cuda"
    augment = _augmenter(cfg)
    best, best_epoch, bad, history = math.inf, -1, 0, []
    best_state = copy.deepcopy(model.state_dict())
    from tqdm.auto import tqdm
    bar = tqdm(range(o.epochs), desc=cfg.name, disable=not (dist.is_main and cfg.log.progress), leave=False)
    epoch = -1
    for epoch in bar:
        for s in (sampler, batch_sampler):
            if hasattr(s, "set_epoch"):
                s.set_epoch(epoch)
        net.train()
        total, count = 0.0, 0
        for x, y in loader:
            x, y = to_device(augment(x), device), to_device(y, device)
            with _autocast(device, amp):
                out = net(x)
            loss, _ = model.loss(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if o.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            opt.step()
            sched.step()
            total += float(loss.detach())
            count += 1
        rec: dict = {"epoch": epoch, "train_loss": total / max(1, count), "lr": sched.get_last_lr()[0]}
        recalibrate_batchnorm(model, train_ds, device=device, amp=amp, batch_size=max(64, cfg.data.batch_size))
        if val_ds is not None and len(val_ds):
            vm = evaluate(model, val_ds, device=device, dist=dist, amp=amp, batch_size=max(64, cfg.data.batch_size))
            rec["val"] = _summary(vm)
            val_loss = dist.all_same(vm["loss"] if o.select == "loss" else -_mean_score(vm))
        else:
            val_loss = rec["train_loss"]
        history.append(rec)
        logger.log("epoch", step=epoch, **rec)
        bar.set_postfix({"train loss": f"{rec['train_loss']:.3f}",  # validation metrics say so (not test_*)
                         **{f"val {k}": f"{v:.3f}" for k, v in rec.get("val", {}).items()}})
        if val_loss < best - 1e-9:
            best, best_epoch, bad = val_loss, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad += 1
            if o.patience > 0 and bad >= o.patience:
                logger.info(f"early stop at epoch {epoch}: no validation improvement for {bad} epochs")
                break
    bar.close()
    model.load_state_dict(best_state)
    return FitResult(best_val_loss=best, best_epoch=best_epoch, epochs_run=epoch + 1, history=history)
