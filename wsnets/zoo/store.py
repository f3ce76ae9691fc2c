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
from ..errors import ConfigError, DamagedZooError, DiskFullError, StoreError
from ..io import ARCH_KEY, atomic_write, is_disk_full, remove_stale_temps, safetensors_bytes
from .index import COLUMNS, FORMAT, INDEX, connect_write, meta_rows, read_groups, read_index, read_meta
from .verify import describe_damage, digest, verify

ROWS_KEY = "wsnets.zoo.rows"
__all__ = ["INDEX", "COLUMNS", "ROWS_KEY", "ZooWriter", "insert_rows", "read_rows", "load_tensors", "merge",
           "read_index", "read_meta"]


def _trainer_of(meta: Mapping[str, str]) -> str:
    """The trainer version a zoo's meta table records (zoos of versions before 3 record none)."""
    return meta.get("trainer") or "before 3"


class ZooWriter:
    """Writes groups into a zoo directory; one instance per build process.

    ``trainer`` (a :data:`~wsnets.zoo.trainer.TRAINER_VERSION`) is recorded in the zoo's meta table;
    ``other_trainer`` is set when an existing zoo with committed groups was trained by another one.
    ``plan`` (``{"limit": ..., "shard": ...}``, the build's ``--limit`` and ``--shard``) is recorded
    when the index is created, so that ``zoo info`` can tell a partial or mixed zoo."""

    other_trainer: str | None = None

    def __init__(self, root: str | Path, recipe_name: str, recipe_digest: str, recipe_text: str = "",
                 trainer: str | None = None, *, recipe_json: str = "", plan: Mapping[str, Any] | None = None) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"{self.root}: exists and is not a directory")
        first = {"recipe": recipe_name, "recipe_digest": recipe_digest, "recipe_toml": recipe_text,
                 "recipe_json": recipe_json or None, "format": FORMAT, "trainer": trainer,
                 **{k: ("none" if v is None else v) for k, v in (plan or {}).items()}}
        self.con = connect_write(self.root / INDEX, meta_rows(first))  # checks an existing index before any write
        (self.root / "shards").mkdir(parents=True, exist_ok=True)
        for d in (self.root, self.root / "shards"):  # half-written shards of a killed build
            remove_stale_temps(d)
        with self.con:
            self.con.execute("BEGIN IMMEDIATE")
            got = read_meta(self.con)
            if got and got.get("recipe_digest") != recipe_digest:
                raise ConfigError(f"{self.root} holds a zoo of recipe {got.get('recipe')!r} "
                                  f"(digest {got.get('recipe_digest')}), not this recipe ({recipe_digest}): "
                                  "use another --out")
            if not got:  # an index of an old version killed before its meta rows committed
                self.con.executemany("INSERT INTO meta VALUES (?, ?)", meta_rows(first))
            elif trainer and got.get("trainer") != trainer:
                if self.con.execute("SELECT count(*) FROM groups").fetchone()[0]:
                    # checked by build() when it has groups left to train: extending would mix trainers
                    self.other_trainer = _trainer_of(got)
                else:  # nothing committed yet: the zoo is this trainer's
                    self.con.execute("INSERT OR REPLACE INTO meta VALUES ('trainer', ?)", (trainer,))
            if got and recipe_json and "recipe_json" not in got:  # an older zoo: recorded now (lazily, on write)
                self.con.execute("INSERT OR REPLACE INTO meta VALUES ('recipe_json', ?)", (recipe_json,))
        self.meta = read_meta(self.con)

    def committed_groups(self) -> set[str]:
        return {r[0] for r in self.con.execute("SELECT group_id FROM groups")}

    def groups(self) -> list[dict[str, Any]]:
        return read_groups(self.con)

    def set_meta(self, values: Mapping[str, Any]) -> None:
        with self.con:
            self.con.execute("BEGIN IMMEDIATE")
            self.con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", meta_rows(values))
        self.meta = read_meta(self.con)

    def damaged_groups(self, group_ids: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Committed groups (all, or those in ``group_ids``) whose shard is missing or changed."""
        want = None if group_ids is None else set(group_ids)
        gs = [g for g in self.groups() if want is None or g["group_id"] in want]
        rows = read_rows(self.con, "group_id IN (SELECT group_id FROM groups)") if any(
            not g.get("sha256") for g in gs) else []
        return verify(self.root, gs, rows)["damaged"]

    def record_checksums(self) -> int:
        """Record size and SHA-256 of intact shards of groups committed before wsnets recorded them (a lazy
        migration, on write only; call after :meth:`damaged_groups` has forgotten damaged ones)."""
        from .verify import file_digest
        todo = [g for g in self.groups() if not g.get("sha256")]
        for g in todo:
            path = self.root / g["shard"]
            size, sha = path.stat().st_size, file_digest(path)
            with self.con:
                self.con.execute("BEGIN IMMEDIATE")
                self.con.execute("UPDATE groups SET bytes = ?, sha256 = ? WHERE group_id = ?", (size, sha, g["group_id"]))
        return len(todo)

    def forget_groups(self, group_ids: Sequence[str]) -> None:
        """Remove groups (their rows and records, in one transaction) so that a build retrains them."""
        with self.con:
            self.con.execute("BEGIN IMMEDIATE")
            for g in group_ids:
                self.con.execute("DELETE FROM checkpoints WHERE group_id = ?", (g,))
                self.con.execute("DELETE FROM groups WHERE group_id = ?", (g,))

    def commit_group(self, group_id: str, arch: Architecture, epochs: Sequence[int],
                     params: Sequence[Mapping[str, torch.Tensor]], rows: Sequence[dict[str, Any]],
                     seconds: float = 0.0, device: str = "cpu") -> Path:
        """Write the shard of one group (tensors ``e<epoch>/<key>`` stacked ``[K, ...]``), then commit its
        rows with the shard's size and SHA-256. A full disk raises :class:`DiskFullError`; what was
        committed before stays as it was, and the group is trained again on resume."""
        shard = Path("shards") / f"{group_id}.safetensors"
        tensors = {f"e{e:04d}/{k}": v.detach().contiguous().cpu() for e, p in zip(epochs, params) for k, v in p.items()}
        for r in rows:
            r["shard"], r["group_id"] = str(shard), group_id
        meta = {ARCH_KEY: arch.to_json(), ROWS_KEY: json.dumps(rows, default=float), "wsnets.zoo.group": group_id}
        data = safetensors_bytes(tensors, meta)
        n_models = len({r["model_id"] for r in rows})
        try:
            atomic_write(self.root / shard, lambda tmp: Path(tmp).write_bytes(data))
            insert_rows(self.con, rows, group=(group_id, str(shard), n_models, seconds, device, time.time(),
                                               len(data), digest(data)))
        except (OSError, sqlite3.Error) as e:
            if group_id not in self.committed_groups():  # no row points at it: give its space back
                (self.root / shard).unlink(missing_ok=True)
            raise self._write_error(e, f"committing group {group_id}") from None
        return self.root / shard

    def _write_error(self, e: BaseException, doing: str) -> Exception:
        if is_disk_full(e):
            return DiskFullError(f"{self.root}: no space left while {doing} ({e}); the groups committed before are "
                                 "intact: free space and run the same command again to resume")
        if isinstance(e, sqlite3.Error):
            return StoreError(f"{self.root / INDEX}: could not commit ({e}) while {doing}; the groups committed "
                              "before are intact: run the same command again to resume")
        return e  # other OSErrors (permissions, ...): the CLI reports them in one line

    def close(self) -> None:
        self.con.close()


def insert_rows(con: sqlite3.Connection, rows: Sequence[Mapping[str, Any]], group: tuple | None = None) -> None:
    """Insert checkpoint rows (and the group's record) in ONE transaction; duplicates are ignored."""
    cols = list(COLUMNS)
    sql = f"INSERT OR IGNORE INTO checkpoints ({', '.join(map(_q, cols))}) VALUES ({', '.join('?' * len(cols))})"
    with con:
        con.execute("BEGIN IMMEDIATE")
        con.executemany(sql, [tuple(_sql(r.get(c)) for c in cols) for r in rows])
        if group is not None:  # (group_id, shard, models, seconds, device, finished, bytes, sha256)
            con.execute("INSERT OR REPLACE INTO groups (group_id, shard, models, seconds, device, finished, bytes, "
                        "sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", tuple(group))


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
    """Rows of the index as dicts, ordered by (model_id, epoch); a row whose values are not of their column's
    type (text in a metric, a NULL architecture or shard, a negative position) is a :class:`DamagedZooError`."""
    sql = "SELECT * FROM checkpoints" + (f" WHERE {where}" if where else "") + " ORDER BY model_id, epoch"
    try:
        rows = [dict(r) for r in con.execute(sql, tuple(params))]
    except sqlite3.OperationalError as e:
        raise ConfigError(f"bad row filter {where!r}: {e}") from None
    if rows:
        _check_types(con, where, params)
    return rows


_REQUIRED_TEXT = ("model_id", "arch", "shard", "key")
#: the metrics' possible values (accuracies are fractions, losses cross-entropies): a row outside them is damage
_RANGES: dict[str, tuple[float, float | None]] = {"train_acc": (0, 1), "test_acc": (0, 1), "gen_gap": (-1, 1),
                                                  "train_loss": (0, None), "test_loss": (0, None)}


def _check_types(con: sqlite3.Connection, where: str = "", params: Sequence[Any] = ()) -> None:
    """Every row's values of the type their column declares (numbers or NULL in REAL/INTEGER columns, text in
    the columns a checkpoint is loaded by, a non-negative position), checked in one SQL query."""
    cols = [r[1] for r in con.execute("PRAGMA table_info(checkpoints)")]
    numeric = [c for c in cols if COLUMNS.get(c, "").startswith(("REAL", "INTEGER"))]
    tests = {c: f"typeof(\"{c}\") NOT IN ('integer', 'real', 'null')" for c in numeric}
    tests.update({c: f"typeof(\"{c}\") != 'text'" for c in _REQUIRED_TEXT if c in cols})
    tests.update(idx="typeof(idx) != 'integer' OR idx < 0", epoch="typeof(epoch) != 'integer'")
    for c, (lo, hi) in _RANGES.items():  # NULL (how SQLite stores NaN) compares to nothing: never flagged
        if c in cols:
            tests[c] += f" OR \"{c}\" < {lo}" + (f" OR \"{c}\" > {hi}" if hi is not None else "")
    sql = (f"SELECT * FROM checkpoints WHERE ({' OR '.join(tests.values())})" + (f" AND ({where})" if where else "")
           + " LIMIT 1")
    r = con.execute(sql, tuple(params)).fetchone()
    if r is None:
        return
    r = dict(r)
    def out_of_range(c: str) -> bool:
        lo, hi = _RANGES.get(c, (None, None))
        v = r[c]
        return lo is not None and isinstance(v, (int, float)) and (v < lo or (hi is not None and v > hi))
    bad = next(c for c in ("idx", "epoch", *_REQUIRED_TEXT, *numeric) if c in r and (
        (c in ("idx", "epoch") and not (isinstance(r[c], int) and r[c] >= 0)) or
        (c in _REQUIRED_TEXT and not isinstance(r[c], str)) or (c in numeric and isinstance(r[c], (str, bytes)))
        or out_of_range(c)))
    lo, hi = _RANGES.get(bad, (None, None))
    what = ("a non-negative integer" if bad in ("idx", "epoch") else "text" if bad in _REQUIRED_TEXT else
            f"a number in [{lo}, {hi}]" if lo is not None and hi is not None else
            f"a number >= {lo}" if lo is not None else "a number")
    path = next((f for _, name, f in con.execute("PRAGMA database_list") if name == "main"), "") or "the zoo index"
    raise DamagedZooError(f"{path}: row {r.get('model_id')!r} epoch {r.get('epoch')!r}: column {bad!r} holds {r[bad]!r}, "
                          f"not {what}: the index is damaged (build the zoo again into a new directory)")


_REPAIR = "; 'wsnets zoo info DIR --verify' lists the damage and running the zoo's build again repairs it"


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
            raise DamagedZooError(f"{path}: corrupt or unreadable shard ({str(e).splitlines()[0][:160]}){_REPAIR}") \
                from None
        for i in idxs:
            if not out[i]:
                raise DamagedZooError(f"{path}: no tensors under {rows[i]['key']!r} for {rows[i]['model_id']}{_REPAIR}")
    return out  # type: ignore[return-value]


def merge(out: str | Path, parts: Iterable[str | Path]) -> dict[str, int]:
    """Union zoo directories built as disjoint parts (``--shard i/n``) of one recipe into ``out``.

    Every part is verified first (:mod:`~wsnets.zoo.verify`): a part with a missing or changed shard is
    refused before anything is written, so damage is never copied. Shards are copied (atomically, and
    checked against their recorded checksum) before their rows commit; rows already present are
    skipped, so a merge can be re-run after a crash. Parts of different recipes, trainers or
    ``--limit`` are refused.
    """
    import shutil
    out = Path(out)
    parts = [Path(p) for p in parts]
    if not parts:
        raise ConfigError("zoo merge needs at least one part")
    if any(p.resolve() == out.resolve() for p in parts):
        raise ConfigError(f"zoo merge: the output {out} is also one of the parts")

    def read(con: sqlite3.Connection) -> tuple[dict, list, list]:
        return read_meta(con), read_groups(con), read_rows(con)
    got = [read_index(p / INDEX, read) for p in parts]
    metas = [m for m, _, _ in got]
    digests = {m.get("recipe_digest") for m in metas}
    if len(digests) != 1:
        raise ConfigError(f"cannot merge zoos of different recipes: {sorted(str(d) for d in digests)}")
    trainers = {m.get("trainer") for m in metas}
    if len(trainers) != 1:
        raise ConfigError("cannot merge zoos trained by different wsnets trainer versions: "
                          + ", ".join(f"{p} ({_trainer_of(m)})" for p, m in zip(parts, metas)))
    limits = {m["limit"] for m in metas if "limit" in m}
    if len(limits) > 1:
        raise ConfigError("cannot merge zoos built with different --limit: "
                          + ", ".join(f"{p} ({m.get('limit', '?')})" for p, m in zip(parts, metas)))
    damage = []
    for p, (_, groups, rows) in zip(parts, got):
        report = verify(p, groups, rows)
        if report["damaged"]:
            damage.append(describe_damage(p, report["damaged"], most=2))
        elif report["orphan_rows"]:
            damage.append(f"{p}: {report['orphan_rows']} rows belong to no committed group")
    if damage:
        raise DamagedZooError("zoo merge refused, nothing written: " + "; ".join(damage)
                              + " (rebuild a part with the same 'wsnets zoo build' command to repair it)")
    m0 = metas[0]
    shards = sorted({s for m in metas for s in (m.get("shard") or "").split(",") if s})
    plan = {"limit": next(iter(limits)) if limits else None, "shard": ",".join(shards) or None} if limits or shards else None
    writer = ZooWriter(out, m0.get("recipe", ""), m0["recipe_digest"], m0.get("recipe_toml", ""), m0.get("trainer"),
                       recipe_json=m0.get("recipe_json", ""), plan=plan)
    try:
        if writer.other_trainer:
            raise ConfigError(f"{out} holds groups of trainer version {writer.other_trainer}, the parts "
                              f"{_trainer_of(m0)}: merge into another directory")
        if plan and plan["shard"] and writer.meta.get("shard") != plan["shard"]:
            have_shards = {s for s in (writer.meta.get("shard") or "").split(",") if s}
            writer.set_meta({"shard": ",".join(sorted(have_shards | set(shards)))})
        writer.forget_groups([d["group_id"] for d in writer.damaged_groups()])  # retaken from the parts
        have = writer.committed_groups()
        n_groups = n_rows = 0
        for p, (meta, groups, rows) in zip(parts, got):
            if (p / "bases.safetensors").exists() and not (out / "bases.safetensors").exists():
                atomic_write(out / "bases.safetensors", lambda tmp: shutil.copyfile(p / "bases.safetensors", tmp))
            by_group: dict[str, list] = {}
            for r in rows:
                by_group.setdefault(r["group_id"], []).append(r)
            for g in groups:
                if g["group_id"] in have:
                    continue
                src, dst = p / g["shard"], out / g["shard"]
                data = src.read_bytes()
                sha = digest(data)
                if g.get("sha256") and sha != g["sha256"]:  # changed since verify() read it
                    raise DamagedZooError(f"{src}: changed while merging (SHA-256 differs from its commit)")
                try:
                    atomic_write(dst, lambda tmp: Path(tmp).write_bytes(data))
                    insert_rows(writer.con, by_group.get(g["group_id"], []),
                                group=(g["group_id"], g["shard"], g["models"], g["seconds"], g["device"], time.time(),
                                       len(data), sha))
                except (OSError, sqlite3.Error) as e:
                    raise writer._write_error(e, f"copying group {g['group_id']}") from None
                have.add(g["group_id"])
                n_groups += 1
                n_rows += len(by_group.get(g["group_id"], []))
    finally:
        writer.close()
    return {"groups": n_groups, "rows": n_rows}
