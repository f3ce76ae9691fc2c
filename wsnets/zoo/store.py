"""The zoo store: an SQLite index (one row per checkpoint) plus safetensors shards of weights.

Layout of a zoo directory::

    DIR/index.sqlite            rows (WAL journal: readers see only committed rows)
    DIR/shards/<group>.safetensors   one shard per trained group: tensors "e<epoch>/<param>" [K, ...]
    DIR/bases.safetensors       pre-trained bases of a fine-tuning zoo (if any)

Crash safety: a group's shard is written to a temporary file, fsynced and renamed (atomic) *before*
the transaction that inserts its rows commits. A build killed at any point leaves either no rows of a
group (it is retrained on resume and its shard atomically replaced) or all of them with a complete
shard; a resumed build deletes the temporary files of killed writers. Every shard's metadata holds the architecture JSON (``wsnets.arch``) and its rows
(``wsnets.zoo.rows``), so each checkpoint is self-describing even without the index.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from ..arch import Architecture
from ..errors import CheckpointError, ConfigError
from ..io import ARCH_KEY, atomic_write, remove_stale_temps, write_safetensors

INDEX = "index.sqlite"
ROWS_KEY = "wsnets.zoo.rows"
COLUMNS: dict[str, str] = {
    "model_id": "TEXT NOT NULL", "run": "INTEGER", "seed": "INTEGER", "recipe": "TEXT", "arch": "TEXT",
    "arch_desc": "TEXT", "depth": "INTEGER", "width": "INTEGER", "activation": "TEXT", "num_params": "INTEGER",
    "dataset": "TEXT", "task": "TEXT", "base": "INTEGER", "optimizer": "TEXT", "lr": "REAL", "momentum": "REAL",
    "weight_decay": "REAL", "init_scale": "REAL", "dropout": "REAL", "label_noise": "REAL",
    "train_fraction": "REAL", "grad_clip": "REAL", "batch_size": "INTEGER", "hyperparameters": "TEXT",
    "epoch": "INTEGER NOT NULL", "train_acc": "REAL", "test_acc": "REAL", "train_loss": "REAL", "test_loss": "REAL",
    "gen_gap": "REAL", "diverged": "INTEGER", "group_id": "TEXT", "shard": "TEXT", "key": "TEXT", "idx": "INTEGER",
}


def connect(path: Path, *, create: bool = False) -> sqlite3.Connection:
    """Open a zoo index with WAL journaling and a generous busy timeout (several writers may share it)."""
    if not create and not path.exists():
        raise CheckpointError(f"{path.parent}: not a zoo directory (no {INDEX})")
    con = sqlite3.connect(str(path), timeout=120.0, isolation_level=None)
    con.row_factory = sqlite3.Row
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    if create:
        cols = ", ".join(f'"{c}" {t}' for c, t in COLUMNS.items())
        con.executescript(f"""
            CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
            CREATE TABLE IF NOT EXISTS checkpoints ({cols}, PRIMARY KEY (model_id, epoch));
            CREATE TABLE IF NOT EXISTS groups (group_id TEXT PRIMARY KEY, shard TEXT, models INTEGER,
                                               seconds REAL, device TEXT, finished REAL);
            CREATE TABLE IF NOT EXISTS extra (model_id TEXT, epoch INTEGER, name TEXT, value REAL,
                                              PRIMARY KEY (model_id, epoch, name));
            CREATE INDEX IF NOT EXISTS ck_dataset ON checkpoints (dataset);
            CREATE INDEX IF NOT EXISTS ck_arch ON checkpoints (arch_desc);
        """)
    return con


def _trainer_of(meta: Mapping[str, str]) -> str:
    """The trainer version a zoo's meta table records (zoos of versions before 3 record none)."""
    return meta.get("trainer") or "before 3"


class ZooWriter:
    """Writes groups into a zoo directory; one instance per build process.

    ``trainer`` (a :data:`~wsnets.zoo.trainer.TRAINER_VERSION`) is recorded in the zoo's meta table;
    ``other_trainer`` is set when an existing zoo with committed groups was trained by another one."""

    other_trainer: str | None = None

    def __init__(self, root: str | Path, recipe_name: str, recipe_digest: str, recipe_text: str = "",
                 trainer: str | None = None) -> None:
        self.root = Path(root)
        (self.root / "shards").mkdir(parents=True, exist_ok=True)
        for d in (self.root, self.root / "shards"):  # half-written shards of a killed build
            remove_stale_temps(d)
        self.con = connect(self.root / INDEX, create=True)
        with self.con:
            self.con.execute("BEGIN IMMEDIATE")
            got = dict(self.con.execute("SELECT key, value FROM meta").fetchall())
            if got and got.get("recipe_digest") != recipe_digest:
                raise ConfigError(f"{self.root} holds a zoo of recipe {got.get('recipe')!r} "
                                  f"(digest {got.get('recipe_digest')}), not this recipe ({recipe_digest}): "
                                  "use another --out")
            if not got:
                self.con.executemany("INSERT INTO meta VALUES (?, ?)", [
                    ("recipe", recipe_name), ("recipe_digest", recipe_digest), ("recipe_toml", recipe_text),
                    ("format", "wsnets-zoo-1")] + ([("trainer", trainer)] if trainer else []))
            elif trainer and got.get("trainer") != trainer:
                if self.con.execute("SELECT count(*) FROM groups").fetchone()[0]:
                    # checked by build() when it has groups left to train: extending would mix trainers
                    self.other_trainer = _trainer_of(got)
                else:  # nothing committed yet: the zoo is this trainer's
                    self.con.execute("INSERT OR REPLACE INTO meta VALUES ('trainer', ?)", (trainer,))

    def committed_groups(self) -> set[str]:
        return {r[0] for r in self.con.execute("SELECT group_id FROM groups")}

    def commit_group(self, group_id: str, arch: Architecture, epochs: Sequence[int],
                     params: Sequence[Mapping[str, torch.Tensor]], rows: Sequence[dict[str, Any]],
                     seconds: float = 0.0, device: str = "cpu") -> Path:
        """Write the shard of one group (tensors ``e<epoch>/<key>`` stacked ``[K, ...]``), then commit its rows."""
        shard = Path("shards") / f"{group_id}.safetensors"
        tensors = {f"e{e:04d}/{k}": v.detach().contiguous().cpu() for e, p in zip(epochs, params) for k, v in p.items()}
        for r in rows:
            r["shard"], r["group_id"] = str(shard), group_id
        meta = {ARCH_KEY: arch.to_json(), ROWS_KEY: json.dumps(rows, default=float), "wsnets.zoo.group": group_id}
        write_safetensors(self.root / shard, tensors, meta)
        insert_rows(self.con, rows, group=(group_id, str(shard), len({r["model_id"] for r in rows}), seconds, device))
        return self.root / shard

    def close(self) -> None:
        self.con.close()


def insert_rows(con: sqlite3.Connection, rows: Sequence[Mapping[str, Any]], group: tuple | None = None) -> None:
    """Insert checkpoint rows (and the group's record) in ONE transaction; duplicates are ignored."""
    cols = list(COLUMNS)
    sql = f"INSERT OR IGNORE INTO checkpoints ({', '.join(map(_q, cols))}) VALUES ({', '.join('?' * len(cols))})"
    with con:
        con.execute("BEGIN IMMEDIATE")
        con.executemany(sql, [tuple(_sql(r.get(c)) for c in cols) for r in rows])
        if group is not None:
            con.execute("INSERT OR REPLACE INTO groups VALUES (?, ?, ?, ?, ?, ?)", (*group, time.time()))


_PLAIN = frozenset((int, float, str, bytes))


def _q(c: str) -> str:
    return f'"{c}"'


def _sql(v: Any) -> Any:
    if v is None or type(v) in _PLAIN:  # most values: no conversion (a build commits ~100 of them per row)
        return v
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    if isinstance(v, torch.Tensor):
        return v.item()
    return v


def read_rows(con: sqlite3.Connection, where: str = "", params: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """Rows of the index as dicts, ordered by (model_id, epoch)."""
    sql = "SELECT * FROM checkpoints" + (f" WHERE {where}" if where else "") + " ORDER BY model_id, epoch"
    try:
        return [dict(r) for r in con.execute(sql, tuple(params))]
    except sqlite3.OperationalError as e:
        raise ConfigError(f"bad row filter {where!r}: {e}") from None


def load_tensors(root: Path, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, torch.Tensor]]:
    """The state dicts of ``rows`` (each a plain dict key -> tensor), reading each shard once."""
    from safetensors import safe_open
    out: list[dict[str, torch.Tensor] | None] = [None] * len(rows)
    by_shard: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_shard.setdefault(r["shard"], []).append(i)
    for shard, idxs in by_shard.items():
        path = root / shard
        try:
            with safe_open(str(path), framework="pt") as f:
                names = list(f.keys())
                for i in idxs:
                    prefix = f"{rows[i]['key']}/"
                    out[i] = {n[len(prefix):]: f.get_slice(n)[int(rows[i]["idx"])] for n in names if n.startswith(prefix)}
        except (OSError, RuntimeError, Exception) as e:  # safetensors raises its own error type
            if isinstance(e, KeyError):
                raise
            raise CheckpointError(f"{path}: corrupt or unreadable shard ({str(e).splitlines()[0][:160]})") from None
        for i in idxs:
            if not out[i]:
                raise CheckpointError(f"{path}: no tensors under {rows[i]['key']!r} for {rows[i]['model_id']}")
    return out  # type: ignore[return-value]


def merge(out: str | Path, parts: Iterable[str | Path]) -> dict[str, int]:
    """Union zoo directories built as disjoint parts (``--shard i/n``) of one recipe into ``out``.

    Shards are copied (atomically) before their rows commit; rows already present are skipped, so a
    merge can be re-run after a crash. Parts of different recipes are refused.
    """
    import shutil
    out = Path(out)
    parts = [Path(p) for p in parts]
    if not parts:
        raise ConfigError("zoo merge needs at least one part")
    metas = []
    for p in parts:
        con = connect(p / INDEX)
        metas.append(dict(con.execute("SELECT key, value FROM meta").fetchall()))
        con.close()
    digests = {m.get("recipe_digest") for m in metas}
    if len(digests) != 1:
        raise ConfigError(f"cannot merge zoos of different recipes: {sorted(str(d) for d in digests)}")
    trainers = {m.get("trainer") for m in metas}
    if len(trainers) != 1:
        raise ConfigError("cannot merge zoos trained by different wsnets trainer versions: "
                          + ", ".join(f"{p} ({_trainer_of(m)})" for p, m in zip(parts, metas)))
    m0 = metas[0]
    writer = ZooWriter(out, m0.get("recipe", ""), m0["recipe_digest"], m0.get("recipe_toml", ""), m0.get("trainer"))
    if writer.other_trainer:
        raise ConfigError(f"{out} holds groups of trainer version {writer.other_trainer}, the parts "
                          f"{_trainer_of(m0)}: merge into another directory")
    have = writer.committed_groups()
    n_groups = n_rows = 0
    for p in parts:
        con = connect(p / INDEX)
        if (p / "bases.safetensors").exists() and not (out / "bases.safetensors").exists():
            atomic_write(out / "bases.safetensors", lambda tmp: shutil.copyfile(p / "bases.safetensors", tmp))
        for g in con.execute("SELECT * FROM groups").fetchall():
            if g["group_id"] in have:
                continue
            src, dst = p / g["shard"], out / g["shard"]
            atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))
            rows = read_rows(con, "group_id = ?", (g["group_id"],))
            insert_rows(writer.con, rows, group=(g["group_id"], g["shard"], g["models"], g["seconds"], g["device"]))
            have.add(g["group_id"])
            n_groups += 1
            n_rows += len(rows)
        con.close()
    writer.close()
    return {"groups": n_groups, "rows": n_rows}
