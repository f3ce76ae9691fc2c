import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Small batched ops run fastest on one thread when the 2 cores are shared (no OpenMP spin-waits)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture()
def reference_batches():
    """``batches(seed, n, train_fraction, epochs, steps, B)``: the sample indices of every optimizer step of
    one model, as the batched trainer draws them (its subset: the ``round(train_fraction * n)`` positions
    with the smallest hash keys; then reshuffled passes), for single-model reference loops."""
    from wsnets.zoo import trainer as T

    def batches(seed: int, n: int, train_fraction: float, epochs: int, steps: int, B: int):
        seeds = torch.tensor([seed])
        n_sub = max(1, round(train_fraction * n))
        keys = T.hash_uniform(seeds, T._STREAM["subset"], torch.arange(n))[0]
        member = torch.zeros(n, dtype=torch.bool)
        member[keys.argsort()[:n_sub]] = True
        for e in range(epochs):
            order = T._epoch_order(seeds, T._members(member[None]), torch.tensor([n_sub]), e, steps * B, n)[0]
            assert bool(member[order].all())
            for s in range(steps):
                yield order[s * B:(s + 1) * B]
    return batches


def _children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (Linux /proc)."""
    out = []
    for st in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = st.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(st.parent.name))
    return out


@pytest.fixture()
def kill_build_after():
    """``kill(n, recipe, out, workers=1, env=None)``: run ``wsnets zoo build RECIPE --out OUT`` in a
    subprocess, SIGKILL it once ``n`` groups are committed (asserting it had not finished), and return
    the PIDs of its child processes at that moment."""
    def kill(n: int, recipe: Path, out: Path, workers: int = 1, env: dict | None = None) -> list[int]:
        env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
        proc = subprocess.Popen([sys.executable, "-m", "wsnets", "zoo", "build", str(recipe), "--out", str(out),
                                 "--json", "--workers", str(workers)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
            try:
                con = sqlite3.connect(f"file:{out / 'index.sqlite'}?mode=ro", uri=True, timeout=1)
                done = con.execute("SELECT count(*) FROM groups").fetchone()[0]
                con.close()
            except sqlite3.Error:
                continue
            if done >= n:
                break
        assert proc.poll() is None, "build finished before it could be killed"
        kids = _children(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return kids
    return kill
