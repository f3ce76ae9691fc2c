"""``ZooDataset``: zoo checkpoints as (representation, targets) pairs for training meta-models.

Splits are by model, never by checkpoint: a model's id and ``split_seed`` hash to a number in
[0, 1) that places *all* its checkpoints in train, val or test (``fractions``). An out-of-distribution
split (``ood={"width": ("<=", 32)}``) keeps rows that satisfy every condition for train/val (split by
the same hash, fractions renormalized) and gives the rows that violate any condition as test.

Representations
---------------
``graph``    the network's :class:`~wsnets.WeightSpace` per item; ``collate`` -> a ``torch_geometric``
             ``Batch`` built by :func:`wsnets.to_batch` in one batched conversion (mixed architectures fine)
``tensors``  a single-network :class:`~wsnets.WeightSpace`; ``collate`` -> a batched WeightSpace, or a
             :class:`~wsnets.weights.MixedBatch` when the rows share tensor shapes but not the activation
             (other shapes raise :class:`ArchitectureMismatchError`)
``flat``     all parameters concatenated ``[P]``, zero-padded to the longest network of the dataset
``stats``    Unterthiner et al. (2020) weight statistics ``[14 L]``, zero-padded to the deepest network
``esd``      :func:`wsnets.esd.esd_features` ``[F]``

Targets: any numeric column (``test_acc``, ``gen_gap``, ``train_loss``, ``epoch``...) gives a float;
a text column (``dataset``, ``task``, ``activation``...) gives a class index into :meth:`classes`
(classes are the sorted values of the whole filtered zoo, so every split shares one coding).
"""

from __future__ import annotations

import functools
import hashlib
import math
import operator
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import ArchitectureMismatchError, ConfigError, MissingKeyError
from ..weights import WeightSpace, stack, stack_shapes
from .records import Zoo, open as open_zoo

REPRESENTATIONS = ("graph", "tensors", "flat", "stats", "esd")
SPLITS = ("train", "val", "test", "all")
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt, "==": operator.eq, "!=": operator.ne,
    "in": lambda a, b: a in b, "not in": lambda a, b: a not in b,
}


def _finite(v: Any) -> bool:
    """A numeric target's value that can be learned from: not None, NaN or infinite (a diverged run's
    accuracy in the public Small CNN Zoo may be NaN)."""
    try:
        return v is not None and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def split_of(model_id: str, seed: int, fractions: Sequence[float]) -> str:
    """Which split a model belongs to: a deterministic hash of (seed, model id) against ``fractions``."""
    u = int(hashlib.sha1(f"{seed}:{model_id}".encode()).hexdigest()[:12], 16) / 16 ** 12
    a, b = fractions[0], fractions[0] + fractions[1]
    return "train" if u < a else ("val" if u < b else "test")


@functools.lru_cache(maxsize=1024)
def _feature_width(arch_json: str, representation: str) -> int:
    """Length of the ``flat``/``stats``/``esd`` row of a network of this architecture."""
    from ..arch import Architecture
    ws = WeightSpace.random(Architecture.from_json(arch_json), 1)
    if representation == "flat":
        return int(ws.flat().shape[-1])
    if representation == "stats":
        return int(ws.stat_features().shape[-1])
    from ..esd import esd_features
    return int(esd_features(ws).shape[-1])


class ZooDataset(torch.utils.data.Dataset):
    """Checkpoints of a zoo with their targets; see the module docstring.

    Parameters
    ----------
    zoo : a :class:`Zoo` or a zoo directory.
    representation : one of ``graph``, ``tensors``, ``flat``, ``stats``, ``esd``.
    targets : column names; numeric -> float, text -> class index.
    split : ``train``, ``val``, ``test`` or ``all``.
    split_seed, fractions : model-level split (train, val, test fractions summing to 1).
    ood : ``{column: (op, value)}`` with op in ``<= < >= > == != in "not in"``.
    filter : ``{column: value or list}`` or a callable on rows, applied before splitting.
    """

    def __init__(self, zoo: Zoo | str | Path, representation: str = "graph",
                 targets: Sequence[str] = ("test_acc",), split: str = "train", split_seed: int = 0,
                 fractions: Sequence[float] = (0.7, 0.15, 0.15), ood: dict[str, tuple[str, Any]] | None = None,
                 filter: dict[str, Any] | Callable[[dict], bool] | None = None) -> None:  # noqa: A002
        if representation not in REPRESENTATIONS:
            raise ConfigError(f"unknown representation {representation!r} (use {', '.join(REPRESENTATIONS)})")
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r} (use {', '.join(SPLITS)})")
        if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
            raise ConfigError(f"fractions must be three non-negative numbers summing to 1, got {tuple(fractions)}")
        zoo = open_zoo(zoo) if not isinstance(zoo, Zoo) else zoo
        if filter is not None:
            zoo = zoo.filter(filter) if callable(filter) else zoo.filter(**filter)
        self.zoo, self.representation, self.split = zoo, representation, split
        self.targets = list(targets)
        all_rows = list(zoo.rows)
        for t in self.targets:
            if all_rows and t not in all_rows[0]:
                raise MissingKeyError(f"target {t!r} is not a zoo column (columns: {', '.join(all_rows[0])})")
        self._classes = {t: sorted({str(r[t]) for r in all_rows}) for t in self.targets
                         if all_rows and isinstance(all_rows[0][t], str)}
        rows = self._select(all_rows, split, split_seed, tuple(fractions), ood)
        numeric = [t for t in self.targets if t not in self._classes]
        self.rows = [r for r in rows if all(_finite(r[t]) for t in numeric)]
        self.left_out = len(rows) - len(self.rows)  # checkpoints without a finite value of a numeric target
        self._ws: list[WeightSpace] | None = None
        self._feats: torch.Tensor | None = None

    @staticmethod
    def _select(rows: list[dict], split: str, seed: int, fr: tuple[float, ...], ood: dict | None) -> list[dict]:
        if split == "all":
            return rows
        if not ood:
            return [r for r in rows if split_of(r["model_id"], seed, fr) == split]
        conds = []
        for col, spec in ood.items():
            if not (isinstance(spec, (tuple, list)) and len(spec) == 2 and spec[0] in _OPS):
                raise ConfigError(f"ood[{col!r}] must be (op, value) with op in {list(_OPS)}, got {spec!r}")
            if rows and col not in rows[0]:
                raise MissingKeyError(f"ood column {col!r} is not a zoo column")
            conds.append((col, _OPS[spec[0]], spec[1]))
        ind = [all(op(r[c], v) for c, op, v in conds) for r in rows]
        if split == "test":
            return [r for r, i in zip(rows, ind) if not i]
        s = fr[0] + fr[1]
        fr2 = (fr[0] / s, fr[1] / s, 0.0) if s > 0 else (1.0, 0.0, 0.0)
        return [r for r, i in zip(rows, ind) if i and split_of(r["model_id"], seed, fr2) == split]

    # -- data ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    def classes(self, target: str) -> list[str]:
        """Class names of a categorical target (index i = class i)."""
        if target not in self._classes:
            raise ConfigError(f"target {target!r} is not categorical (categorical: {sorted(self._classes)})")
        return self._classes[target]

    def weightspaces(self) -> list[WeightSpace]:
        """Single-network WeightSpaces of all rows (loaded once, each shard read once)."""
        if self._ws is None:
            self._ws = self.zoo.weightspaces(self.rows)
        return self._ws

    def target(self, row: dict, t: str) -> float | int:
        if t in self._classes:
            return self._classes[t].index(str(row[t]))
        v = row[t]
        return float("nan") if v is None else float(v)

    def __getitem__(self, i: int) -> tuple[Any, dict[str, float | int]]:
        row = self.rows[i]
        y = {t: self.target(row, t) for t in self.targets}
        rep = self.representation
        if rep in ("flat", "stats", "esd"):
            return self.features()[i], y
        return self.weightspaces()[i], y

    def features(self) -> torch.Tensor:
        """``[len, F]`` vector features of every row (flat / stats / esd), zero-padded to one width."""
        if self._feats is None:
            if self.representation not in ("flat", "stats", "esd"):
                raise ConfigError(f"representation {self.representation!r} has no vector features")
            feats = [torch.zeros(0)] * len(self)
            by_arch: dict[Any, list[int]] = {}
            for i, ws in enumerate(self.weightspaces()):
                by_arch.setdefault(ws.arch, []).append(i)
            for idx in by_arch.values():
                b = stack([self.weightspaces()[i] for i in idx])
                if self.representation == "flat":
                    f = b.flat()
                elif self.representation == "stats":
                    f = b.stat_features()
                else:
                    from ..esd import esd_features
                    f = esd_features(b)
                for j, i in enumerate(idx):
                    feats[i] = f[j].float()
            width = max([len(f) for f in feats] + [self._zoo_width()])  # one width for every split of the zoo
            self._feats = torch.stack([torch.nn.functional.pad(f, (0, width - len(f))) for f in feats]) \
                if feats else torch.zeros(0, 0)
        return self._feats

    def _zoo_width(self) -> int:
        """The longest feature row among the filtered zoo's architectures (all splits), so that train, val
        and test share one width (a split without the deepest networks would otherwise be narrower)."""
        return max((_feature_width(a, self.representation) for a in {r["arch"] for r in self.zoo.rows}), default=0)

    def max_kernel_numel(self) -> int:
        """The largest kernel (taps) among the filtered zoo's architectures (any split): the ``edge_dim`` a
        graph encoder needs to read every network of the zoo, out-of-distribution test splits included."""
        from ..arch import Architecture
        return max((Architecture.from_json(a).max_kernel_numel for a in {r["arch"] for r in self.zoo.rows}), default=1)

    def widest_arch(self):
        """The filtered zoo's architecture (any split) with the longest ``stats``/``esd``/``flat`` row: the
        width every split's rows are padded to (an out-of-distribution test split may hold deeper networks
        than training)."""
        from ..arch import Architecture
        archs = sorted({r["arch"] for r in self.zoo.rows})
        return Architecture.from_json(max(archs, key=lambda a: _feature_width(a, self.representation)))

    def collate(self, items: Sequence[tuple[Any, dict]]) -> tuple[Any, dict[str, torch.Tensor]]:
        """Batch items: ``(batched_x, {target: [B] tensor})`` (float, or long for class targets)."""
        xs = [x for x, _ in items]
        y = {t: torch.tensor([it[1][t] for it in items], dtype=torch.long if t in self._classes else torch.float32)
             for t in self.targets}
        rep = self.representation
        if rep == "graph":
            from ..graph import to_batch
            return to_batch(xs), y
        if rep == "tensors":
            shapes = {tuple(x.arch.param_shapes.items()) for x in xs}
            if len(shapes) > 1:
                archs = sorted({x.arch.describe() for x in xs})
                raise ArchitectureMismatchError(
                    f"representation 'tensors' needs networks whose tensors share shapes, got {len(archs)} "
                    f"architectures: {archs[:3]}; filter the zoo (e.g. filter={{'arch_desc': ...}})")
            return stack_shapes(xs), y
        return torch.stack(xs), y

    def loader(self, batch_size: int = 64, shuffle: bool = False, **kw: Any) -> torch.utils.data.DataLoader:
        """A ``DataLoader`` using :meth:`collate`."""
        return torch.utils.data.DataLoader(self, batch_size=batch_size, shuffle=shuffle, collate_fn=self.collate, **kw)

    def __repr__(self) -> str:
        return (f"ZooDataset({self.zoo.root}, representation={self.representation!r}, split={self.split!r}, "
                f"rows={len(self)}, targets={self.targets})")
