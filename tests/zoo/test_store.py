"""Store: stored checkpoints reproduce their recorded accuracy; SIGKILL + resume equals one build; merge."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import wsnets
from wsnets.errors import ConfigError
from wsnets.zoo import build, datasets, merge, open as open_zoo, parse_recipe

ROOT = Path(__file__).resolve().parents[2]


def _recipe(**kw):
    raw = {"name": "t", "seed": 3, "population": 6, "datasets": ["digits"], "epochs": 2, "checkpoints": [0, 2],
           "batch_size": 128, "group_size": 4,
           "architecture": {"kind": "mlp", "depth": [1, 2], "width": [8], "activation": ["relu", "tanh"]},
           "hyperparameters": {"optimizer": ["sgd", "adam"], "lr": {"log_uniform": [1e-3, 0.3]},
                               "dropout": {"uniform": [0, 0.3], "zero": 0.5}, "train_fraction": {"uniform": [0.3, 1]},
                               "label_noise": {"uniform": [0, 0.3], "zero": 0.5}}}
    raw.update(kw)
    return parse_recipe(raw)


CASES = {
    "mlp": {},
    "conv2d": {"datasets": ["digits-img"], "architecture": {"kind": "cnn2d", "depth": [1, 2], "width": [4, 6],
                                                           "batchnorm": True, "activation": "relu"}},
    "conv1d": {"datasets": ["mnist1d-seq"], "population": 3, "batch_size": 500,
               "architecture": {"kind": "cnn1d", "depth": 2, "width": [4], "kernel_size": 5, "stride": 2}},
}


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("case", list(CASES))
def test_stored_checkpoint_reproduces_recorded_test_accuracy(tmp_path, case, device):
    """Trained on ``device`` and evaluated there by a plain nn.Module in full float32 (no TF32)."""
    r = _recipe(**CASES[case])
    build(r, tmp_path / "z", progress=False, device=device)
    zoo = open_zoo(tmp_path / "z")
    assert len(zoo) == r.population * 2 and zoo.epochs == [0, 2]
    for rec in zoo.filter(epoch=2):
        x, y, xt, yt = datasets.load(rec["dataset"])
        m = rec.to_module().to(device)
        assert type(m) is torch.nn.Sequential and not m.training
        with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            acc = (m(xt.to(device)).argmax(1).cpu() == yt).sum().item() / len(yt)
        assert acc == rec["test_acc"], (rec["model_id"], acc, rec["test_acc"])
        assert rec["gen_gap"] == rec["train_acc"] - rec["test_acc"]
        ws = rec.load()
        assert ws.arch.describe() == rec["arch_desc"]
        # shards are self-describing: plain wsnets.load of the shard file gives the architecture
        tensors, meta = wsnets.io.read_safetensors(tmp_path / "z" / rec["shard"])
        assert wsnets.Architecture.from_json(meta["wsnets.arch"]) == ws.arch


def _table(path):
    con = sqlite3.connect(str(path / "index.sqlite"))
    con.row_factory = sqlite3.Row
    rows = [dict(r) for r in con.execute("SELECT * FROM checkpoints ORDER BY model_id, epoch")]
    con.close()
    return rows


RECIPE_TOML = """
name = "kill"
seed = 1
population = 96
datasets = ["digits"]
epochs = 2
checkpoints = [1, 2]
batch_size = 64
group_size = 2
[architecture]
kind = "mlp"
depth = [1, 2]
width = [8, 16]
activation = ["relu", "tanh"]
[hyperparameters]
optimizer = ["sgd", "adam"]
lr = {log_uniform = [1e-3, 0.3]}
dropout = {uniform = [0.0, 0.3], zero = 0.5}
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("workers,start", [(1, "fork"), (2, "fork"), (2, "spawn")])
def test_sigkill_then_resume_equals_uninterrupted_build(tmp_path, workers, start, kill_build_after):
    """Killed in-process or with 2 worker processes (forked or spawned; they then exit), resumed
    in-process: equal to an uninterrupted in-process build."""
    recipe = tmp_path / "kill.toml"
    recipe.write_text(RECIPE_TOML)
    killed, ref = tmp_path / "killed", tmp_path / "ref"
    kids = kill_build_after(2, recipe, killed, workers=workers, env={"WSNETS_ZOO_WORKER_START": start})
    if workers > 1:
        assert len(kids) >= workers - 1  # this process trains too
        deadline = time.time() + 60
        while any(_alive(k) for k in kids) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(_alive(k) for k in kids), "worker processes outlived the killed build"
    partial = _table(killed)
    assert 0 < len({r["model_id"] for r in partial}) < 96  # 48 groups: killed mid-way (forked workers are quick)
    summary = build(recipe, killed, progress=False)  # resume
    assert summary["groups_skipped"] >= 2
    build(recipe, ref, progress=False)
    a, b = _table(killed), _table(ref)
    assert len(a) == len(b) == 192
    assert len({(r["model_id"], r["epoch"]) for r in a}) == 192  # no duplicates
    assert [dict(r) for r in a] == [dict(r) for r in b]  # same rows, same metrics, same shard names
    za, zb = open_zoo(killed), open_zoo(ref)
    for ra, rb in zip(za, zb):
        wa, wb = ra.load(), rb.load()
        for k in wa.params:
            assert torch.equal(wa.params[k], wb.params[k])
    assert not list(killed.glob("shards/.*.tmp"))  # every shard in place, no temp files survive
    shards = sorted(p.relative_to(killed) for p in killed.glob("shards/*.safetensors"))
    assert shards == sorted(p.relative_to(ref) for p in ref.glob("shards/*.safetensors"))
    assert all((killed / s).read_bytes() == (ref / s).read_bytes() for s in shards)  # byte for byte


def test_shards_merge_to_the_full_zoo_and_resume_refuses_other_recipe(tmp_path):
    r = _recipe(population=8, group_size=2, epochs=1, checkpoints=[1])
    build(r, tmp_path / "p0", shard="0/2", progress=False)
    build(r, tmp_path / "p1", shard="1/2", progress=False)
    build(r, tmp_path / "full", progress=False)
    p0, p1 = {x["model_id"] for x in _table(tmp_path / "p0")}, {x["model_id"] for x in _table(tmp_path / "p1")}
    assert p0 and p1 and not p0 & p1
    s = merge(tmp_path / "m", [tmp_path / "p0", tmp_path / "p1"])
    assert s["rows"] == 8
    assert merge(tmp_path / "m", [tmp_path / "p0"])["rows"] == 0  # idempotent
    assert _table(tmp_path / "m") == sorted(_table(tmp_path / "full"), key=lambda x: (x["model_id"], x["epoch"]))
    with pytest.raises(ConfigError):
        build(_recipe(seed=99), tmp_path / "full", progress=False)


def test_zoo_filter_record_and_errors(tmp_path):
    build(_recipe(population=4, epochs=1, checkpoints=[1]), tmp_path / "z", progress=False)
    zoo = open_zoo(tmp_path / "z")
    sub = zoo.filter(activation="tanh")
    assert all(r["activation"] == "tanh" for r in sub) and len(sub) + len(zoo.filter(activation="relu")) == 4
    zoo.record(zoo[0], "robustness", 0.25)
    assert open_zoo(tmp_path / "z")[0].metrics["robustness"] == 0.25
    with pytest.raises(wsnets.MissingKeyError):
        zoo.filter(colour="red")
    with pytest.raises(wsnets.CheckpointError):
        open_zoo(tmp_path / "nothing")
    shard = tmp_path / "z" / zoo[0]["shard"]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(wsnets.CheckpointError, match="corrupt"):
        open_zoo(tmp_path / "z")[0].load()


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_worker_processes_build_the_same_zoo_and_report_errors(tmp_path, monkeypatch, start):
    """Two processes (this one and a forked or spawned worker) give the in-process zoo; an error raised
    while training a group in a worker reaches the caller as itself; with two groups each process
    trains one (the worker is sent one group at a time, so none waits in its pipe while this process
    idles)."""
    import dataclasses
    import importlib
    B = importlib.import_module("wsnets.zoo.build")
    monkeypatch.setenv("WSNETS_ZOO_WORKER_START", start)
    r = _recipe(population=8, group_size=2, epochs=1, checkpoints=[1])
    s = build(r, tmp_path / "w2", progress=False, workers=2)
    assert s["workers"] == 2 and s["models_built"] == 8
    build(r, tmp_path / "w1", progress=False, workers=1)
    assert _table(tmp_path / "w2") == _table(tmp_path / "w1")
    # two groups of an unknown optimizer: this process trains its group with SGD instead, so the
    # error can only come from the worker's group
    bad = _recipe(population=8, group_size=4, epochs=1, checkpoints=[1], hyperparameters={"optimizer": "sgd"},
                  architecture={"kind": "mlp", "depth": 1, "width": 8})
    bad.hyperparameters["optimizer"] = "adagrad"  # past the recipe's own check: the trainer refuses it
    here, real = [], B._Trainer._here

    def here_sgd(self, g):
        here.append(g.group_id)
        runs = tuple(dataclasses.replace(r, hp={**r.hp, "optimizer": "sgd"}) for r in g.runs)
        return real(self, dataclasses.replace(g, runs=runs))
    monkeypatch.setattr(B._Trainer, "_here", here_sgd)
    with pytest.raises(ConfigError, match="unknown optimizer"):
        build(bad, tmp_path / "bad", progress=False, workers=2)
    assert len(here) == 1


FORK_AFTER_THREADS = """
import sqlite3, sys, torch
from wsnets.zoo import build
from wsnets.zoo.recipe import parse_recipe
RAW = {"name": "t", "seed": 3, "population": 12, "datasets": ["digits"], "epochs": 1, "checkpoints": [1], "batch_size": 128,
       "group_size": 2, "architecture": {"kind": "mlp", "depth": [1, 2], "width": [8], "activation": ["relu", "tanh"]},
       "hyperparameters": {"optimizer": ["sgd", "adam"], "dropout": {"uniform": [0, 0.3], "zero": 0.5}}}
def _table(path):
    con = sqlite3.connect(path + "/index.sqlite")
    rows = con.execute("SELECT * FROM checkpoints ORDER BY model_id, epoch").fetchall()
    con.close()
    return rows
torch.set_num_threads(2)  # this process's OpenMP pool is up (and idle) when the workers are forked
a = torch.rand(600, 600)
for _ in range(5):
    (a @ a).tanh_().sum()
r = parse_recipe(RAW)
s = build(r, sys.argv[1] + "/w3", progress=False, workers=3)
assert s["workers"] == 3 and torch.get_num_threads() == 2, s
build(r, sys.argv[1] + "/w1", progress=False, workers=1)
assert _table(sys.argv[1] + "/w3") == _table(sys.argv[1] + "/w1")
"""


def test_workers_forked_after_torch_used_its_thread_pool(tmp_path):
    """Forked workers (one torch thread each) train correctly in a process whose OpenMP pool has run
    (as torch's DataLoader workers do), do not hang, and give the in-process zoo; two of them make the
    reader threads and the early release of idle workers run with more than one peer."""
    from pathlib import Path as P
    env = dict(os.environ, PYTHONPATH=str(ROOT), WSNETS_ZOO_WORKER_START="fork")
    res = subprocess.run([sys.executable, "-c", FORK_AFTER_THREADS, str(tmp_path)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(_table(P(tmp_path) / "w3")) == 12


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_fine_tuning_zoo_with_workers_equals_one_process(tmp_path, monkeypatch, start):
    """Workers fine-tune from the build's pre-trained bases (in memory when forked, read from the zoo's
    bases file when spawned): the zoo equals a one-process build, shard bytes included."""
    monkeypatch.setenv("WSNETS_ZOO_WORKER_START", start)
    r = _recipe(population=12, group_size=3, epochs=1, checkpoints=[1], datasets=["digits", "digits+invert"],
                architecture={"kind": "mlp", "depth": 1, "width": 8, "activation": "relu"},
                pretrain={"dataset": "digits", "bases": 2, "epochs": 1})
    s = build(r, tmp_path / "w2", progress=False, workers=2)
    assert s["workers"] == 2 and s["models_built"] == 12
    build(r, tmp_path / "w1", progress=False, workers=1)
    assert _table(tmp_path / "w2") == _table(tmp_path / "w1")
    shards = sorted(p.name for p in (tmp_path / "w1" / "shards").glob("*.safetensors"))
    assert len(shards) == 4 and all((tmp_path / "w2" / "shards" / n).read_bytes() == (tmp_path / "w1" / "shards" / n).read_bytes()
                                    for n in shards)


def test_forked_worker_runs_none_of_the_parents_signal_handlers(tmp_path):
    """A SIGTERM handler of the building process (which might clean up its files) is not inherited: the
    worker dies of the signal, the handler never runs in it; the worker also exits on EOF."""
    import importlib
    B = importlib.import_module("wsnets.zoo.build")
    marker = tmp_path / "handler-ran"
    old = signal.signal(signal.SIGTERM, lambda *a: marker.write_text(str(os.getpid())))
    pipes = []
    try:
        procs = []
        for _ in range(2):
            r_child, w_parent = os.pipe()
            r_parent, w_child = os.pipe()
            procs.append(B._fork_worker(r_child, w_child, _recipe(), B.plan(_recipe()), None))
            os.close(r_child)
            os.close(w_child)
            pipes += [w_parent, r_parent]
        os.kill(procs[0].pid, signal.SIGTERM)
        assert procs[0].wait(30) == -signal.SIGTERM
        os.close(pipes[2])  # the second worker's input: it exits on EOF, by itself
        assert procs[1].wait(30) == 0
    finally:
        signal.signal(signal.SIGTERM, old)
        for fd in pipes:
            try:
                os.close(fd)
            except OSError:
                pass
    assert not marker.exists()


def test_forked_worker_writes_to_its_own_stderr(tmp_path, monkeypatch):
    """A forked worker does not use the building process's ``sys.stderr`` object (here one that cannot
    be written, like a notebook kernel's socket stream in a child): what a library prints while the
    worker trains goes to file descriptor 2 and the build completes."""
    import importlib
    B = importlib.import_module("wsnets.zoo.build")
    parent, real = os.getpid(), B.train_one

    def warn_in_worker(*a, **k):
        if os.getpid() != parent:
            print("a message from a forked worker", file=sys.stderr, flush=True)
        return real(*a, **k)

    class Unwritable:
        def write(self, s):
            raise RuntimeError("this stream belongs to the building process")

        def flush(self):
            pass
    monkeypatch.setenv("WSNETS_ZOO_WORKER_START", "fork")
    monkeypatch.setattr(B, "train_one", warn_in_worker)
    monkeypatch.setattr(sys, "stderr", Unwritable())
    s = build(_recipe(population=8, group_size=2, epochs=1, checkpoints=[1]), tmp_path / "z", progress=False, workers=2)
    assert s["models_built"] == 8


def test_forked_worker_handle_when_children_are_reaped_elsewhere():
    """With SIGCHLD ignored (the kernel reaps children), waiting on a forked worker must not raise."""
    import importlib
    B = importlib.import_module("wsnets.zoo.build")
    old = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        time.sleep(0.2)
        handle = B._Forked(pid)
        assert handle.wait(5) == 0
        handle.kill()  # already gone: no error either
    finally:
        signal.signal(signal.SIGCHLD, old)


def test_worker_start_setting(monkeypatch):
    from wsnets.zoo.build import worker_start
    monkeypatch.setenv("WSNETS_ZOO_WORKER_START", "spawn")
    assert worker_start() == "spawn"
    monkeypatch.setenv("WSNETS_ZOO_WORKER_START", "thread")
    with pytest.raises(ConfigError, match="WSNETS_ZOO_WORKER_START='thread'"):
        worker_start()


def test_resume_removes_temp_files_of_killed_writers_only(tmp_path):
    from wsnets.io import _host, remove_stale_temps
    host = _host()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    d = tmp_path / "shards"
    d.mkdir()
    files = {name: d / name for name in (f".g1.safetensors.{host}-{dead.pid}.ab12.tmp",      # killed writer
                                         f".g2.safetensors.{host}-{os.getpid()}.cd34.tmp",   # live writer
                                         f".g3.safetensors.otherhost-{dead.pid}.ef56.tmp",   # another machine's
                                         "g4.safetensors")}
    for p in files.values():
        p.write_bytes(b"x")
    assert remove_stale_temps(d) == 1
    assert sorted(p.name for p in d.iterdir()) == sorted(list(files)[1:])


def test_a_zoo_of_another_trainer_version_is_not_extended_or_merged(tmp_path):
    from wsnets.zoo.trainer import TRAINER_VERSION
    r = _recipe(population=8, group_size=2, epochs=1, checkpoints=[1])
    build(r, tmp_path / "old", progress=False, limit=4)
    build(r, tmp_path / "new", progress=False)
    con = sqlite3.connect(str(tmp_path / "old" / "index.sqlite"))
    assert con.execute("SELECT value FROM meta WHERE key = 'trainer'").fetchone()[0] == TRAINER_VERSION
    with con:
        con.execute("UPDATE meta SET value = '2' WHERE key = 'trainer'")
    con.close()
    assert build(r, tmp_path / "old", progress=False, limit=4)["models_built"] == 0  # nothing to add: fine
    with pytest.raises(ConfigError, match="trainer version 2"):
        build(r, tmp_path / "old", progress=False)
    with pytest.raises(ConfigError, match="different wsnets trainer versions"):
        merge(tmp_path / "m", [tmp_path / "old", tmp_path / "new"])
    assert len(_table(tmp_path / "old")) == 4  # untouched


def test_a_gpu_trained_zoo_is_not_extended_on_the_cpu(tmp_path):
    """The trainer tag records the device (and the fused kernel's precision): a build resumed on
    another device would mix low-order bits, so it is refused like another trainer version."""
    from wsnets.zoo import fused
    from wsnets.zoo.trainer import TRAINER_VERSION, trainer_tag
    assert trainer_tag("cpu") == TRAINER_VERSION
    if fused.available(torch.device("cuda")):
        prec = torch.get_float32_matmul_precision()
        try:
            assert trainer_tag("cuda") == f"{TRAINER_VERSION}+cuda+fused-ieee"
            torch.set_float32_matmul_precision("high")
            assert trainer_tag("cuda") == f"{TRAINER_VERSION}+cuda+fused-tf32"
        finally:
            torch.set_float32_matmul_precision(prec)
    r = _recipe(population=8, group_size=2, epochs=1, checkpoints=[1])
    build(r, tmp_path / "z", progress=False, limit=4)
    con = sqlite3.connect(str(tmp_path / "z" / "index.sqlite"))
    with con:
        con.execute("UPDATE meta SET value = ? WHERE key = 'trainer'", (f"{TRAINER_VERSION}+cuda+fused-ieee",))
    con.close()
    with pytest.raises(ConfigError, match=rf"trainer version {TRAINER_VERSION}\+cuda\+fused-ieee.*this build trains "
                                          rf"version {TRAINER_VERSION} "):
        build(r, tmp_path / "z", progress=False)
    assert len(_table(tmp_path / "z")) == 4
