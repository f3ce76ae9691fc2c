"""Model soups: averages of models fine-tuned from one base (Wortsman et al. 2022, "Model soups:
averaging weights of multiple fine-tuned models improves accuracy without increasing inference time",
https://arxiv.org/abs/2203.05482).

* Uniform soup: the plain average of all ingredients.
* Greedy soup: ingredients sorted by held-out accuracy (best first, an ingredient scored NaN last); each
  is added only if the soup's held-out accuracy does not drop (a NaN score is a drop). It starts from
  the best ingredient and never accepts a loss, so on its held-out set it is never worse than the best
  ingredient.

The held-out score comes from a callable ``evaluate(ws) -> float`` (higher is better) supplied by
the caller, or from a dataset name of :mod:`wsnets.zoo.datasets`: then the score is accuracy on a
validation split (the last ``val_fraction`` of the dataset's training split, or its test split).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from ..errors import ConfigError
from ..weights import WeightSpace
from .compat import ModelLike, gather, weighted_mean
from .functional import evaluate as _evaluate, has_batchnorm, recompute_bn

Evaluator = Callable[[WeightSpace], float]


@dataclass
class SoupResult:
    """A soup and how it was made.

    ``ingredients``: indices (into the given models) in the soup, in the order they were added;
    ``scores``: held-out score of every given model; ``score``: the soup's held-out score;
    ``history``: one entry per candidate tried: (index, candidate soup score, accepted).
    """

    model: WeightSpace
    ingredients: list[int]
    scores: list[float]
    score: float
    history: list[tuple[int, float, bool]] = field(default_factory=list)


def model_inputs(name: str, x: torch.Tensor, shape: Sequence[int] | None) -> torch.Tensor:
    """Dataset ``name``'s inputs ``x [N, ...]`` reshaped to a model's ``input_shape`` (digits' 64 features
    and digits-img's 1x8x8 are one dataset); a :class:`ConfigError` when the sizes differ."""
    if shape is None or tuple(x.shape[1:]) == tuple(shape):
        return x
    if math.prod(shape) != x[0].numel():
        raise ConfigError(f"dataset {name!r} has inputs {tuple(x.shape[1:])}, the model expects {tuple(shape)}")
    return x.reshape(len(x), *shape)


def dataset_evaluator(name: str, *, split: str = "val", val_fraction: float = 0.2,
                      device: str | torch.device = "cpu",
                      input_shape: Sequence[int] | None = None) -> tuple[Evaluator, torch.Tensor]:
    """Accuracy on a split of a :mod:`wsnets.zoo.datasets` dataset, and that dataset's training inputs.

    ``split`` is ``"val"`` (last ``val_fraction`` of the training split: hold it out when fine-tuning)
    or ``"test"``. The evaluator accepts a single or batched WeightSpace (a float, or a list for a
    batch). The second return value (training inputs before the validation part) serves as
    ``bn_data``. With ``input_shape`` (a model's) the inputs are reshaped to it (:func:`model_inputs`).
    """
    from ..zoo import datasets
    x, y, xt, yt = datasets.load(name)
    x, xt = model_inputs(name, x, input_shape), model_inputs(name, xt, input_shape)
    n_val = int(round(len(x) * val_fraction))
    if split == "val":
        if not 0 < n_val < len(x):
            raise ConfigError(f"val_fraction={val_fraction} leaves no validation or training data")
        xe, ye, xtrain = x[-n_val:], y[-n_val:], x[:-n_val]
    elif split == "test":
        xe, ye, xtrain = xt, yt, x
    else:
        raise ConfigError(f"unknown split {split!r} (val or test)")
    xe, ye = xe.to(device), ye.to(device)

    def evaluate(ws: WeightSpace):
        acc = _evaluate(ws, xe, ye)[1]
        return float(acc) if ws.batch_size is None else acc.tolist()
    evaluate.batched = True  # type: ignore[attr-defined]
    return evaluate, xtrain.to(device)


def _resolve(evaluate: Evaluator | str, batch: WeightSpace) -> tuple[Evaluator, torch.Tensor | None]:
    if isinstance(evaluate, str):
        return dataset_evaluator(evaluate, device=batch.device, input_shape=batch.arch.input_shape)
    if not callable(evaluate):
        raise ConfigError("evaluate must be a callable ws -> score or a dataset name")
    return evaluate, None


def _scores(evaluate: Evaluator, batch: WeightSpace) -> list[float]:
    if getattr(evaluate, "batched", False):
        return [float(s) for s in evaluate(batch)]
    return [float(evaluate(m)) for m in batch]  # a caller's function scores one network at a time


def _mix(batch: WeightSpace, members: list[int], bn_data) -> WeightSpace:
    soup = weighted_mean(batch[torch.tensor(members)])
    return recompute_bn(soup, bn_data) if bn_data is not None and has_batchnorm(soup) else soup


def uniform_soup(models: Sequence[ModelLike] | WeightSpace, *,
                 bn_data: torch.Tensor | Iterable[torch.Tensor] | None = None) -> WeightSpace:
    """The average of all ingredients (BatchNorm statistics recomputed on ``bn_data`` if given)."""
    batch = gather(models)
    return _mix(batch, list(range(batch.batch_size)), bn_data)


def greedy_soup(models: Sequence[ModelLike] | WeightSpace, evaluate: Evaluator | str, *,
                bn_data: torch.Tensor | Iterable[torch.Tensor] | None = None) -> SoupResult:
    """Greedy soup (Wortsman et al. 2022, Recipe 1).

    Parameters
    ----------
    models : the ingredients (one architecture), or a batched WeightSpace.
    evaluate : ``ws -> held-out score`` (higher is better), or a dataset name (validation accuracy).
    bn_data : inputs for recomputing BatchNorm statistics of each candidate soup (with a dataset name
        and no ``bn_data``, that dataset's training inputs are used).

    Returns
    -------
    SoupResult whose ``score >= max(scores)``.

    Examples
    --------
    >>> import wsnets
    >>> from wsnets.merge import greedy_soup
    >>> ms = [wsnets.WeightSpace.random(wsnets.mlp(4, [8], 2)) for _ in range(3)]
    >>> r = greedy_soup(ms, lambda ws: -float(ws.flat().norm()))
    >>> r.score >= max(r.scores)
    True
    """
    batch = gather(models)
    evaluate, data_bn = _resolve(evaluate, batch)
    bn_data = bn_data if bn_data is not None else data_bn
    if bn_data is not None and not isinstance(bn_data, torch.Tensor) and iter(bn_data) is bn_data:
        bn_data = list(bn_data)        # a one-shot iterator (a generator) serves every candidate soup
    scores = _scores(evaluate, batch)
    if all(math.isnan(s) for s in scores):
        raise ConfigError(f"every ingredient scored NaN on the held-out set ({len(scores)} models); "
                          "check the models and the evaluation function")
    # best first, ties in the given order; NaN (a diverged ingredient) last: it compares false with
    # everything, so a plain sort would leave the order arbitrary and a NaN soup could never be beaten
    order = sorted(range(len(scores)), key=lambda i: (math.isnan(scores[i]), -scores[i]))
    members = [order[0]]
    soup, best = batch[order[0]], scores[order[0]]
    if bn_data is not None and has_batchnorm(soup):
        # the best ingredient with statistics recomputed as every candidate soup's will be: keep the better
        rec = _mix(batch, members, bn_data)
        s = float(_scores(evaluate, rec.batched())[0])
        if s >= best:
            soup, best = rec, s
    history = []
    for i in order[1:]:
        cand = _mix(batch, members + [i], bn_data)
        s = float(_scores(evaluate, cand.batched())[0])
        ok = s >= best
        history.append((i, s, ok))
        if ok:
            members.append(i)
            soup, best = cand, s
    return SoupResult(soup, members, scores, best, history)
