"""A store that checks itself: readers never write, foreign files are refused untouched, damage is found,
repaired on resume and never merged, a full disk is one line with exact resume, plans never mix."""

import errno
import hashlib
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from wsnets.cli import main
from wsnets.errors import CheckpointError, DamagedZooError, DiskFullError, NotAZooError, OutputExistsError, WSNetsError, ZooNotReadyError
from wsnets.zoo import build, merge, open as open_zoo, parse_recipe

ROOT = Path(__file__).resolve().parents[2]
RAW = {"name": "s", "seed": 2, "population": 6, "datasets": ["digits"], "epochs": 1, "checkpoints": [1],
       "batch_size": 128, "group_size": 2,
       "architecture": {"kind": "mlp", "depth": [1, 2], "width": [8]},
       "hyperparameters": {"lr": {"log_uniform": [1e-3, 0.1]}}}


def _recipe(**kw):
    return parse_recipe({**RAW, **kw})


def _tree(d: Path) -> dict[str, str]:
    """Every file under ``d`` with the SHA-1 of its bytes (to show that nothing was written)."""
    return {str(p.relative_to(d)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def _cli(*argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _foreign(kind: str, path: Path) -> None:
    path.parent.mkdir(parents=True)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(bytes(range(256)) * 20)
    elif kind == "other-app":
        con = sqlite3.connect(str(path))
        con.execute("CREATE TABLE notes (x TEXT)")
        con.execute("INSERT INTO notes VALUES ('mine')")
        con.commit()
        con.close()
    elif kind == "corrupt":  # a wsnets index whose pages were overwritten
        build(_recipe(population=2), path.parent, progress=False)
        data = bytearray(path.read_bytes())
        data[100:4096] = b"\xff" * (4096 - 100)
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["empty", "garbage", "other-app", "corrupt"])
def test_commands_refuse_a_foreign_index_without_touching_it(tmp_path, capsys, kind):
    """zoo info, zoo merge, zoo build and train pointed at a directory whose index.sqlite is not a wsnets
    index: exit 2, one line, and the directory's files (index included) are byte for byte as before."""
    zdir = tmp_path / "z"
    _foreign(kind, zdir / "index.sqlite")
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "s"\npopulation = 2\ndatasets = ["digits"]\nepochs = 1\n')
    before = _tree(zdir)
    for argv in (["zoo", "info", zdir], ["zoo", "info", zdir, "--verify"], ["zoo", "merge", tmp_path / "m", zdir],
                 ["zoo", "build", recipe, "--out", zdir, "--json"],
                 ["train", ROOT / "train" / "statnn-gbm.toml", "--zoo", zdir, "--out", tmp_path / "run"]):
        code, out, err = _cli(*argv, capsys=capsys)
        assert code == 2, (argv, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert "index.sqlite" in err
        assert _tree(zdir) == before, argv  # untouched: no bytes changed, no -wal/-shm created
    assert not (tmp_path / "m").exists()
    with pytest.raises(NotAZooError):
        open_zoo(zdir)


def test_reading_a_zoo_writes_nothing(tmp_path):
    """Opening, reading rows and weights, info and verify leave every byte and the file list unchanged
    (no -wal/-shm files either), also when the directory is read-only."""
    build(_recipe(), tmp_path / "z", progress=False)
    before = _tree(tmp_path / "z")
    zoo = open_zoo(tmp_path / "z")
    assert len(zoo) == 6 and zoo[0].load().arch.describe() == zoo[0]["arch_desc"]
    assert main(["zoo", "info", str(tmp_path / "z"), "--verify", "--json"]) == 0
    assert _tree(tmp_path / "z") == before
    assert sorted(p.name for p in (tmp_path / "z").iterdir()) == ["index.sqlite", "shards"]


def test_a_reader_never_sees_an_index_without_its_tables(tmp_path):
    """Readers polling while builders create zoo indexes get a zoo or 'not ready'/'no index', never a
    half-created index ("no such table: meta"): the index appears complete (created aside, then linked)."""
    from wsnets.zoo.store import ZooWriter
    stop, bad, seen = threading.Event(), [], []
    target = {"dir": tmp_path / "d0"}

    def read() -> None:
        while not stop.is_set():
            d = target["dir"]
            try:
                open_zoo(d)
                seen.append(d)
            except WSNetsError as e:  # no index yet / not ready: fine; a half-created index is not
                if "no such table" in str(e) or not isinstance(e, (ZooNotReadyError, NotAZooError, CheckpointError)):
                    bad.append(repr(e))
            except Exception as e:  # noqa: BLE001 - what the test looks for (sqlite3.OperationalError)
                bad.append(repr(e))
    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in readers:
        t.start()
    try:
        for i in range(150):
            d = tmp_path / f"d{i}"
            (d / "shards").mkdir(parents=True)
            target["dir"] = d
            ZooWriter(d, "s", "digest", "", "4").close()
    finally:
        stop.set()
        for t in readers:
            t.join()
    assert not bad, bad[:3]
    assert seen  # the readers did open finished indexes


def _damage(z: Path) -> list[str]:
    shards = sorted((z / "shards").glob("*.safetensors"))
    shards[0].unlink()                                             # deleted
    shards[1].write_bytes(shards[1].read_bytes()[:500])            # truncated
    data = bytearray(shards[2].read_bytes())
    data[-8:] = b"\x00" * 8                                        # same size, other bytes
    shards[2].write_bytes(bytes(data))
    return [str(s.relative_to(z)) for s in shards[:3]]


def test_damaged_shards_are_found_refused_by_merge_and_repaired_by_resume(tmp_path, capsys):
    r = _recipe()
    build(r, tmp_path / "ref", progress=False)
    build(r, tmp_path / "z", progress=False)
    damaged = _damage(tmp_path / "z")
    code, out, err = _cli("zoo", "info", tmp_path / "z", "--verify", capsys=capsys)
    assert code == 2 and "3 damaged shard(s)" in err and all(d in err for d in damaged)
    assert "DAMAGED: 3 of" in out
    code, _, err = _cli("zoo", "merge", tmp_path / "m", tmp_path / "z", capsys=capsys)
    assert code == 2 and "nothing written" in err and not (tmp_path / "m").exists()
    with pytest.raises(DamagedZooError):
        open_zoo(tmp_path / "z").filter(shard=damaged[0])[0].load()
    s = build(r, tmp_path / "z", progress=False)  # resume: finds the damage, trains those groups again
    assert s["groups_repaired"] == 3 and sorted(s["repaired"]) == damaged
    assert main(["zoo", "info", str(tmp_path / "z"), "--verify"]) == 0
    assert _tree(tmp_path / "z" / "shards") == _tree(tmp_path / "ref" / "shards")  # byte for byte
    a, b = open_zoo(tmp_path / "z"), open_zoo(tmp_path / "ref")
    assert [dict(x) | {"group_id": 0} for x in a] == [dict(x) | {"group_id": 0} for x in b]
    assert merge(tmp_path / "m", [tmp_path / "z"])["rows"] == 6


def test_an_old_zoo_stays_readable_and_gets_checksums_on_its_next_build(tmp_path):
    """An index of the previous schema (no shard size/checksum, no recorded plan) is read without being
    written; its shards are checked by structure; a build migrates it (and so checks by checksum)."""
    r = _recipe()
    build(r, tmp_path / "z", progress=False)
    con = sqlite3.connect(str(tmp_path / "z" / "index.sqlite"))
    con.execute("ALTER TABLE groups DROP COLUMN bytes")
    con.execute("ALTER TABLE groups DROP COLUMN sha256")
    con.execute("DELETE FROM meta WHERE key IN ('limit', 'shard', 'recipe_json')")
    con.commit()
    con.close()
    before = _tree(tmp_path / "z")
    assert len(open_zoo(tmp_path / "z")) == 6
    assert main(["zoo", "info", str(tmp_path / "z"), "--verify"]) == 0
    assert _tree(tmp_path / "z") == before
    shard = sorted((tmp_path / "z" / "shards").glob("*.safetensors"))[1]
    good = shard.read_bytes()
    shard.write_bytes(good[:-4])
    assert main(["zoo", "info", str(tmp_path / "z"), "--verify"]) == 2  # structural check finds it
    assert build(r, tmp_path / "z", progress=False)["groups_repaired"] == 1
    assert shard.read_bytes() == good
    con = sqlite3.connect(str(tmp_path / "z" / "index.sqlite"))
    assert con.execute("SELECT count(*) FROM groups WHERE sha256 IS NULL").fetchone()[0] == 0
    con.close()


def test_a_full_disk_is_one_line_and_the_build_resumes_exactly(tmp_path, monkeypatch, capsys):
    """ENOSPC while writing the second group's shard (the OS) and 'database or disk is full' while
    committing the third (SQLite): one-line errors; committed groups intact; resume equals one build."""
    import wsnets.zoo.store as store
    r = _recipe()
    build(r, tmp_path / "ref", progress=False)
    real_write, real_insert = store.atomic_write, store.insert_rows
    calls = {"write": 0, "insert": 0}

    def full_write(path, fn):
        calls["write"] += 1
        if calls["write"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(path, fn)

    def full_insert(con, rows, group=None):
        calls["insert"] += 1
        if calls["insert"] == 2:
            raise sqlite3.OperationalError("database or disk is full")
        return real_insert(con, rows, group)
    monkeypatch.setattr(store, "atomic_write", full_write)
    monkeypatch.setattr(store, "insert_rows", full_insert)
    with pytest.raises(DiskFullError, match="no space left while committing group .*intact"):
        build(r, tmp_path / "z", progress=False)
    assert len(open_zoo(tmp_path / "z")) == 2  # the first group
    with pytest.raises(DiskFullError):
        build(r, tmp_path / "z", progress=False)
    assert len(open_zoo(tmp_path / "z")) == 2  # the second group's rows did not commit; its shard is gone
    assert len(list((tmp_path / "z" / "shards").glob("*.safetensors"))) == 1
    monkeypatch.undo()
    code, out, err = _cli("zoo", "info", tmp_path / "z", capsys=capsys)
    assert code == 0 and "PARTIAL: 1 of 3 groups" in out
    build(r, tmp_path / "z", progress=False)
    assert _tree(tmp_path / "z" / "shards") == _tree(tmp_path / "ref" / "shards")


def test_a_file_size_limit_ends_a_build_with_one_line(tmp_path):
    """A real write failure from the kernel (RLIMIT_FSIZE: EFBIG) in a subprocess: exit 2, one line, no
    traceback; the zoo resumes to the full zoo afterwards."""
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "s"\nseed = 2\npopulation = 6\ndatasets = ["digits"]\nepochs = 1\nbatch_size = 128\n'
                      'group_size = 2\n[architecture]\nkind = "mlp"\ndepth = [1, 4]\nwidth = [64]\n')
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (120_000, 120_000)); "
            "from wsnets.cli import main; sys.exit(main(sys.argv[1:]))")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", code, "zoo", "build", str(recipe), "--out", str(tmp_path / "z"), "--json"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr and "no space left" in p.stderr, p.stderr
    assert 0 < len(open_zoo(tmp_path / "z")) < 6
    build(str(recipe), tmp_path / "z", progress=False)
    build(str(recipe), tmp_path / "ref", progress=False)
    assert _tree(tmp_path / "z" / "shards") == _tree(tmp_path / "ref" / "shards")


def test_zoos_of_another_limit_or_shard_are_not_mixed_and_info_flags_partial_zoos(tmp_path, capsys):
    r = _recipe(population=8, group_size=4)  # --limit 4 groups models otherwise than the full plan
    build(r, tmp_path / "z", progress=False, limit=4)
    with pytest.raises(OutputExistsError, match="another plan"):
        build(r, tmp_path / "z", progress=False)
    build(r, tmp_path / "p", progress=False, shard="0/2")
    with pytest.raises(OutputExistsError, match="--shard 0/2"):
        build(r, tmp_path / "p", progress=False, shard="1/2")
    code, out, _ = _cli("zoo", "info", tmp_path / "z", capsys=capsys)
    assert code == 0 and "plan: complete" in out and "--limit 4" in out
    build(r, tmp_path / "q", progress=False, stop_after=1)
    code, out, _ = _cli("zoo", "info", tmp_path / "q", "--json", capsys=capsys)
    import json
    plan = json.loads(out)["plan"]
    assert plan["state"] == "partial" and plan["missing_groups"] == plan["planned_groups"] - 1
    build(r, tmp_path / "p1", progress=False, shard="1/2")
    merge(tmp_path / "all", [tmp_path / "p", tmp_path / "p1"])
    code, out, _ = _cli("zoo", "info", tmp_path / "all", capsys=capsys)
    assert "plan: complete" in out and "--shard 0/2,1/2" in out
