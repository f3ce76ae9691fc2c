"""Opening a zoo's SQLite index: read-only for readers, created atomically for writers.

* **Readers never write.** :func:`connect_read` checks the file's first bytes before SQLite sees it (an
  empty file, garbage or another application's database is refused untouched, with one line), then opens
  it read-only (``mode=ro``). When no writer has the index open (no ``-wal`` file), the index is read as
  an immutable snapshot, so a reader creates no ``-wal``/``-shm`` files either (and works on read-only
  media); the snapshot is checked afterwards and read again with SQLite's locking if a writer started
  meanwhile.
* **Writers see a complete index or none.** :func:`connect_write` creates a new index in a temporary
  file (schema and meta rows committed) and links it into place only if no other builder was faster, so
  a reader or a second builder never sees an index without its tables (``no such table: meta``).
* **Old zoos stay readable.** Columns added later (a group's shard size and checksum) are added to an
  old index only when a writer opens it (:func:`migrate`); readers accept both.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

from ..errors import NotAZooError, StoreError, ZooNotReadyError

INDEX = "index.sqlite"
FORMAT = "wsnets-zoo-1"
MAGIC = b"SQLite format 3\x00"
COLUMNS: dict[str, str] = {
    "model_id": "TEXT NOT NULL", "run": "INTEGER", "seed": "INTEGER", "recipe": "TEXT", "arch": "TEXT",
    "arch_desc": "TEXT", "depth": "INTEGER", "width": "INTEGER", "activation": "TEXT", "num_params": "INTEGER",
    "dataset": "TEXT", "task": "TEXT", "base": "INTEGER", "optimizer": "TEXT", "lr": "REAL", "momentum": "REAL",
    "weight_decay": "REAL", "init_scale": "REAL", "dropout": "REAL", "label_noise": "REAL",
    "train_fraction": "REAL", "grad_clip": "REAL", "batch_size": "INTEGER", "hyperparameters": "TEXT",
    "epoch": "INTEGER NOT NULL", "train_acc": "REAL", "test_acc": "REAL", "train_loss": "REAL", "test_loss": "REAL",
    "gen_gap": "REAL", "diverged": "INTEGER", "group_id": "TEXT", "shard": "TEXT", "key": "TEXT", "idx": "INTEGER",
}
# columns of the groups table added after format wsnets-zoo-1 was first written: the shard's size and
# SHA-256 at commit (NULL in groups committed by older versions)
GROUP_EXTRA = {"bytes": "INTEGER", "sha256": "TEXT"}
TABLES = ("meta", "checkpoints", "groups", "extra")


def _schema() -> str:
    cols = ", ".join(f'"{c}" {t}' for c, t in COLUMNS.items())
    extra = "".join(f", {c} {t}" for c, t in GROUP_EXTRA.items())
    return f"""
        CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
        CREATE TABLE IF NOT EXISTS checkpoints ({cols}, PRIMARY KEY (model_id, epoch));
        CREATE TABLE IF NOT EXISTS groups (group_id TEXT PRIMARY KEY, shard TEXT, models INTEGER,
                                           seconds REAL, device TEXT, finished REAL{extra});
        CREATE TABLE IF NOT EXISTS extra (model_id TEXT, epoch INTEGER, name TEXT, value REAL,
                                          PRIMARY KEY (model_id, epoch, name));
        CREATE INDEX IF NOT EXISTS ck_dataset ON checkpoints (dataset);
        CREATE INDEX IF NOT EXISTS ck_arch ON checkpoints (arch_desc);
    """


def check_file(path: Path) -> None:
    """Refuse, without opening it with SQLite, an index file that is no SQLite database at all."""
    root = path.parent
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC))
    except FileNotFoundError:
        if (root / "shards").is_dir():
            raise ZooNotReadyError(f"{root}: the zoo is not ready (its build has not created {INDEX} yet)") from None
        raise NotAZooError(f"{root}: not a zoo directory (no {INDEX})") from None
    except IsADirectoryError:
        raise NotAZooError(f"{path}: is a directory, not a wsnets zoo index") from None
    if not head:
        raise NotAZooError(f"{path}: empty file, not a wsnets zoo index (left untouched; delete it to build "
                           "a zoo here)")
    if head != MAGIC:
        raise NotAZooError(f"{path}: not an SQLite database, so not a wsnets zoo index (left untouched)")


T = TypeVar("T")


def _uri(path: Path, **params: str) -> str:
    from urllib.parse import quote
    return f"file:{quote(str(path.resolve()))}?" + "&".join(f"{k}={v}" for k, v in params.items())


def _stamp(path: Path) -> tuple:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns, Path(f"{path}-wal").exists()


def read_index(path: str | Path, read: Callable[[sqlite3.Connection], T]) -> T:
    """``read(connection)`` on a read-only connection to the zoo index ``path`` after checking that it is
    one (see the module docstring); SQLite errors become one-line :class:`NotAZooError`/:class:`StoreError`."""
    path = Path(path)
    check_file(path)
    for attempt in range(3):
        snapshot = not Path(f"{path}-wal").exists()  # no writer: read the file as it is, creating nothing
        before = _stamp(path) if snapshot else None
        try:
            con = sqlite3.connect(_uri(path, mode="ro", **({"immutable": "1"} if snapshot else {})), uri=True,
                                  timeout=120.0, isolation_level=None)
        except sqlite3.Error as e:
            raise StoreError(f"{path}: cannot open the zoo index read-only ({e})") from None
        try:
            con.row_factory = sqlite3.Row
            check_schema(con, path)
            out = read(con)
        except sqlite3.DatabaseError as e:
            raise _db_error(path, e) from None
        finally:
            con.close()
        if not snapshot or _stamp(path) == before:
            return out
    # a writer kept changing the file under the snapshot: read once more with SQLite's locking
    con = sqlite3.connect(_uri(path, mode="ro"), uri=True, timeout=120.0, isolation_level=None)
    try:
        con.row_factory = sqlite3.Row
        check_schema(con, path)
        return read(con)
    except sqlite3.DatabaseError as e:
        raise _db_error(path, e) from None
    finally:
        con.close()


def _db_error(path: Path, e: sqlite3.Error) -> StoreError:
    if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
        return StoreError(f"{path}: the zoo index is locked by another process ({e})")
    return NotAZooError(f"{path}: corrupt or unreadable zoo index ({e})")


def check_schema(con: sqlite3.Connection, path: Path) -> None:
    """A wsnets index has the tables meta, checkpoints, groups and a ``format`` row (zoos of the first
    versions lack the row: they have the tables)."""
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    missing = [t for t in ("meta", "checkpoints", "groups") if t not in tables]
    if missing:
        what = f"tables {', '.join(sorted(tables))}" if tables else "no tables"
        raise NotAZooError(f"{path}: an SQLite database ({what}) but not a wsnets zoo index "
                           f"(no table {missing[0]}); left untouched")
    fmt = con.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
    if fmt is not None and fmt[0] != FORMAT:
        raise NotAZooError(f"{path}: zoo index format {fmt[0]!r}, this wsnets reads {FORMAT!r}")
    cols = {r[1] for r in con.execute("PRAGMA table_info(checkpoints)")}
    lost = [c for c in ("model_id", "epoch", "arch", "shard", "key", "idx") if c not in cols]
    if lost:
        raise NotAZooError(f"{path}: the checkpoints table has no column {lost[0]!r}: not a wsnets zoo index")


def connect_write(path: str | Path, meta: Sequence[tuple[str, str]]) -> sqlite3.Connection:
    """A read-write connection to the index ``path``, created (atomically, with ``meta``'s rows) if it
    does not exist; an existing file is checked first (a foreign file is refused untouched) and migrated
    (:func:`migrate`)."""
    path = Path(path)
    if not path.exists():
        try:
            _create(path, meta)
        except sqlite3.Error as e:
            from ..errors import DiskFullError
            from ..io import is_disk_full
            if is_disk_full(e):
                raise DiskFullError(f"{path}: no space left while creating the zoo index ({e})") from None
            raise StoreError(f"{path}: could not create the zoo index ({e})") from None
    else:
        read_index(path, lambda con: None)  # checked read-only first: a foreign or corrupt file stays untouched
    try:
        con = sqlite3.connect(str(path), timeout=120.0, isolation_level=None)
        con.row_factory = sqlite3.Row
        check_schema(con, path)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        migrate(con)
    except sqlite3.DatabaseError as e:
        raise _db_error(path, e) from None
    return con


def _create(path: Path, meta: Sequence[tuple[str, str]]) -> None:
    """Write a complete new index (schema, meta rows, WAL mode) in a temporary file, then link it to
    ``path`` unless another builder created ``path`` first (then theirs is used)."""
    from ..io import _writer_tag, file_mode
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_writer_tag()}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, file_mode(path))
        con = sqlite3.connect(tmp, isolation_level=None)
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(_schema())
            with con:
                con.execute("BEGIN IMMEDIATE")
                con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(meta))
        finally:
            con.close()  # checkpoints the WAL into the file and removes it
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic and never replaces: two builders starting together share one index
        except FileExistsError:
            pass
    finally:
        for p in (tmp, f"{tmp}-wal", f"{tmp}-shm"):
            if os.path.exists(p):
                os.unlink(p)


def migrate(con: sqlite3.Connection) -> None:
    """Bring an index written by an older wsnets up to this schema (writers only; idempotent)."""
    have = {r[1] for r in con.execute("PRAGMA table_info(groups)")}
    todo = [(c, t) for c, t in GROUP_EXTRA.items() if c not in have]
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not todo and "extra" in tables:
        return
    with con:
        con.execute("BEGIN IMMEDIATE")
        have = {r[1] for r in con.execute("PRAGMA table_info(groups)")}  # another writer may have done it
        for c, t in GROUP_EXTRA.items():
            if c not in have:
                con.execute(f"ALTER TABLE groups ADD COLUMN {c} {t}")
        con.execute("CREATE TABLE IF NOT EXISTS extra (model_id TEXT, epoch INTEGER, name TEXT, value REAL, "
                    "PRIMARY KEY (model_id, epoch, name))")


def read_meta(con: sqlite3.Connection) -> dict[str, str]:
    return {str(k): str(v) for k, v in con.execute("SELECT key, value FROM meta").fetchall()}


def read_groups(con: sqlite3.Connection) -> list[dict[str, Any]]:
    """The groups table as dicts (``bytes``/``sha256`` are None for groups of older versions)."""
    out = []
    for r in con.execute("SELECT * FROM groups ORDER BY group_id"):
        d = dict(r)
        for c in GROUP_EXTRA:
            d.setdefault(c, None)
        out.append(d)
    return out


def meta_rows(meta: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [(str(k), str(v)) for k, v in meta.items() if v is not None]
