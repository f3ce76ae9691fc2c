"""Reading zoos: ``wsnets.zoo.open(DIR)`` -> :class:`Zoo`, a filterable list of checkpoint records.

>>> zoo = wsnets.zoo.open("zoos/digits-mlp")              # doctest: +SKIP
>>> last = zoo.filter(epoch=12, dataset="digits")          # doctest: +SKIP
>>> last[0]["test_acc"], last[0].load(), last[0].to_module()  # doctest: +SKIP

A directory with ``index.sqlite`` is a wsnets zoo; one with ``weights.npy`` and ``metrics.csv(.gz)``
is read as the public Small CNN Zoo layout (:mod:`wsnets.zoo.cnnzoo`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..arch import Architecture
from ..errors import CheckpointError, ConfigError, DamagedZooError, MissingKeyError, WSNetsError
from ..weights import WeightSpace, stack
from .index import INDEX, connect_write, read_index, read_meta
from .store import load_tensors, read_rows

METRICS = ("train_acc", "test_acc", "train_loss", "test_loss", "gen_gap")


class Record(dict):
    """One checkpoint: its index row (a dict) plus :meth:`load` / :meth:`to_module`.

    Besides the index columns a record has ``family``, the first field of ``arch_desc`` (``mlp``,
    ``cnn1d``, ``cnn2d``, ``resnet``, ``resmlp``, ``transformer``, ``concat``, ``dag``: see
    :meth:`Architecture.describe`), for filters and out-of-distribution splits
    (``ood={"family": ("!=", "resnet")}``: train without residual networks, test on them)."""

    def __init__(self, row: dict[str, Any], zoo: "Zoo") -> None:
        super().__init__(row)
        if "family" not in self and isinstance(self.get("arch_desc"), str):
            self["family"] = self["arch_desc"].split(":", 1)[0]
        self.zoo = zoo

    @property
    def metrics(self) -> dict[str, float]:
        """Recorded metrics: accuracies, losses, gap, and any extra metrics recorded later."""
        out = {k: self[k] for k in METRICS if self.get(k) is not None}
        out.update(self.zoo.extra_metrics(self))
        return out

    def load(self) -> WeightSpace:
        """The checkpoint as a single-network :class:`WeightSpace`."""
        return self.zoo.weightspaces([self])[0]

    def to_module(self) -> nn.Sequential:
        """A plain ``nn.Sequential`` (eval mode) computing this checkpoint's function."""
        return self.load().to_module()


class Zoo:
    """A list of checkpoint records from one zoo directory; :meth:`filter` returns sub-zoos."""

    def __init__(self, root: Path, rows: Sequence[dict[str, Any]], loader: Callable[[Sequence[dict]], list[dict]],
                 *, meta: dict[str, str] | None = None, extra: dict[tuple[str, int], dict[str, float]] | None = None,
                 writable: bool = False) -> None:
        self.root = Path(root)
        self._loader = loader
        self._extra = extra if extra is not None else {}
        self._writable = writable
        self.meta = meta or {}
        self.rows: list[Record] = [r if isinstance(r, Record) and r.zoo is self else Record(dict(r), self) for r in rows]
        self._arch_cache: dict[str, Architecture] = {}

    # -- selection ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Record:
        return self.rows[i]

    def __iter__(self) -> Iterator[Record]:
        return iter(self.rows)

    def filter(self, fn: Callable[[Record], bool] | None = None, **equals: Any) -> "Zoo":
        """Rows where every ``column == value`` (a list/tuple/set value means "one of") and ``fn(row)``.

        >>> zoo.filter(epoch=12, width=[8, 16], fn=lambda r: r["test_acc"] > 0.5)  # doctest: +SKIP
        """
        for k in equals:
            if self.rows and k not in self.rows[0]:
                raise MissingKeyError(f"zoo {self.root} has no column {k!r} (columns: {', '.join(self.rows[0])})")

        def ok(r: Record) -> bool:
            for k, v in equals.items():
                if isinstance(v, (list, tuple, set, frozenset)):
                    if r.get(k) not in v:
                        return False
                elif r.get(k) != v:
                    return False
            return fn is None or bool(fn(r))
        sub = Zoo(self.root, [], self._loader, meta=self.meta, extra=self._extra, writable=self._writable)
        sub.rows = [r for r in self.rows if ok(r)]
        sub._arch_cache = self._arch_cache
        return sub

    def column(self, name: str) -> list[Any]:
        if self.rows and name not in self.rows[0]:
            raise MissingKeyError(f"zoo {self.root} has no column {name!r}")
        return [r.get(name) for r in self.rows]

    @property
    def epochs(self) -> list[int]:
        return sorted({r["epoch"] for r in self.rows})

    def last_epoch(self) -> "Zoo":
        """The final checkpoint of every model."""
        last: dict[str, int] = {}
        for r in self.rows:
            last[r["model_id"]] = max(last.get(r["model_id"], -1), r["epoch"])
        return self.filter(lambda r: r["epoch"] == last[r["model_id"]])

    # -- weights -----------------------------------------------------------------------------------
    def arch_of(self, row: dict[str, Any]) -> Architecture:
        s = row["arch"]
        if s not in self._arch_cache:
            from ..io import arch_from_metadata
            try:
                self._arch_cache[s] = arch_from_metadata(s) if isinstance(s, str) else Architecture.from_json(s)
            except (WSNetsError, TypeError) as e:  # the index's architecture column, checked as file metadata is
                raise DamagedZooError(f"{self.root}: row {row.get('model_id')!r} epoch {row.get('epoch')!r}: "
                                      f"{str(e).replace(repr('wsnets.arch'), 'column arch')}") from None
        return self._arch_cache[s]

    def weightspaces(self, rows: Sequence[dict[str, Any]] | None = None) -> list[WeightSpace]:
        """Single-network WeightSpaces of ``rows`` (default: all rows of this zoo; one row dict: a list of one)."""
        rows = self.rows if rows is None else [rows] if isinstance(rows, Mapping) else rows
        return [WeightSpace(self.arch_of(r), t) for r, t in zip(rows, self._loader(rows))]

    def load(self, rows: Sequence[dict[str, Any]] | None = None) -> WeightSpace:
        """A batched WeightSpace of ``rows`` (default all; they must share an architecture); of one row dict,
        that checkpoint's single-network WeightSpace."""
        if isinstance(rows, Mapping):
            return self.weightspaces(rows)[0]
        return stack(self.weightspaces(rows))

    # -- extra metrics -----------------------------------------------------------------------------
    def record(self, row: dict[str, Any], name: str, value: float) -> None:
        """Store an extra metric for a checkpoint (e.g. a robustness score) in the index (the only write
        a :class:`Zoo` makes; opening and reading never write)."""
        if not self._writable:
            raise ConfigError(f"{self.root}: this zoo is read-only (not a wsnets zoo directory)")
        con = connect_write(self.root / INDEX, [])
        try:
            with con:
                con.execute("BEGIN IMMEDIATE")
                con.execute("INSERT OR REPLACE INTO extra VALUES (?, ?, ?, ?)",
                            (row["model_id"], int(row["epoch"]), str(name), float(value)))
        finally:
            con.close()
        self._extra.setdefault((row["model_id"], int(row["epoch"])), {})[str(name)] = float(value)

    def extra_metrics(self, row: dict[str, Any]) -> dict[str, float]:
        return dict(self._extra.get((row["model_id"], int(row["epoch"])), {}))

    def to_pandas(self):
        """The rows as a pandas DataFrame (one row per checkpoint, the index's columns plus any extra metrics
        recorded with :meth:`record`)."""
        import pandas as pd
        return pd.DataFrame([{**r, **self.extra_metrics(r)} for r in self.rows])

    def __repr__(self) -> str:
        return f"Zoo({str(self.root)!r}, rows={len(self)}, models={len({r['model_id'] for r in self.rows})})"


def open(path: str | Path, where: str = "", params: Sequence[Any] = ()) -> Zoo:  # noqa: A001 - mirrors builtins.open
    """Open a zoo directory (wsnets store or Small CNN Zoo layout); ``where`` is an optional SQL filter."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: no such zoo directory")
    if (root / INDEX).exists() or not (root / "weights.npy").exists() and (root / "shards").is_dir():
        def read(con) -> tuple[dict, list, dict]:
            extra: dict[tuple[str, int], dict[str, float]] = {}
            has_extra = con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'extra'").fetchone()
            for m, e, n, v in con.execute("SELECT model_id, epoch, name, value FROM extra") if has_extra else ():
                extra.setdefault((m, int(e)), {})[n] = v
            return read_meta(con), read_rows(con, where, params), extra
        meta, rows, extra = read_index(root / INDEX, read)  # read-only: never writes (see wsnets.zoo.index)
        return Zoo(root, rows, lambda rs: load_tensors(root, rs), meta=meta, extra=extra, writable=True)
    if (root / "weights.npy").exists():
        from .cnnzoo import open_cnn_zoo
        return open_cnn_zoo(root)
    raise CheckpointError(f"{root}: not a zoo (neither {INDEX} nor the Small CNN Zoo's weights.npy)")


def hyperparameters(row: dict[str, Any]) -> dict[str, Any]:
    """A row's hyperparameters as a dict (decoded from the JSON column)."""
    h = row.get("hyperparameters")
    return json.loads(h) if isinstance(h, str) else dict(h or {})
