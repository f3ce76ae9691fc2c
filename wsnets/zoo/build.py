"""Building a zoo from a recipe: plan groups, train each group as one computation, commit, resume.

The plan is a pure function of the recipe (and ``limit``): models of equal architecture are split
into near-equal groups of at most ``group_size``, named by a hash of their members. ``--shard i/n``
builds groups ``i, i+n, i+2n, ...`` of the plan, so parts are disjoint and their union (``zoo merge``)
is the whole zoo. A rerun skips committed groups, so a killed build resumes where it stopped and
ends equal to an uninterrupted one (the groups it retrains are the same computation).

On CPU, groups are independent units of work: ``workers`` processes train them in parallel (a
batched group of ~20 small MLPs does not keep two cores busy with intra-op threads), and the parent
process commits each group as it arrives, so the store has one writer.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..arch import Architecture
from ..errors import CheckpointError, ConfigError, DamagedZooError, OutputExistsError
from ..io import ARCH_KEY, BATCH_KEY, read_safetensors, write_safetensors
from . import datasets as zds
from .recipe import HYPER_DEFAULTS, OPTIONAL_HYPER, Recipe, RunSpec, load_recipe
from .store import ZooWriter
from .trainer import Checkpoint, DataBank, train_group, trainer_tag


@dataclass(frozen=True)
class Group:
    """Models trained together: same architecture (and, in a fine-tuning zoo, the same bases)."""

    group_id: str
    arch: Architecture
    runs: tuple[RunSpec, ...]
    steps: int | None = None  # optimizer steps per epoch, where the recipe fixes them per group


def plan(recipe: Recipe, limit: int | None = None) -> list[Group]:
    """The deterministic list of groups for the first ``limit`` models of ``recipe``."""
    buckets: dict[str, list[RunSpec]] = {}
    for r in recipe.runs(limit):
        buckets.setdefault(recipe.bucket(r), []).append(r)
    groups = []
    for runs in buckets.values():
        n = math.ceil(len(runs) / max(1, recipe.group_size))
        size = math.ceil(len(runs) / n)
        for c in range(n):
            members = tuple(runs[c * size:(c + 1) * size])
            if members:
                h = hashlib.sha1(",".join(m.model_id for m in members).encode()).hexdigest()[:10]
                groups.append(Group(f"{recipe.name}-{members[0].index:06d}-{h}", members[0].arch, members,
                                    recipe.steps(members)))
    return sorted(groups, key=lambda g: g.runs[0].index)


def parse_shard(s: str | None) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``; ``None`` -> ``(0, 1)``."""
    if not s:
        return 0, 1
    try:
        i, n = (int(t) for t in s.split("/"))
    except ValueError:
        raise ConfigError(f"--shard must look like I/N (e.g. 0/4), got {s!r}") from None
    if not 0 <= i < n:
        raise ConfigError(f"--shard {s}: need 0 <= I < N")
    return i, n


def build(recipe: Recipe | str | Path, out: str | Path, *, limit: int | None = None, shard: str | None = None,
          device: str = "cpu", progress: bool = True, stop_after: int | None = None,
          workers: int | None = None) -> dict[str, Any]:
    """Build (or resume) the zoo of ``recipe`` in directory ``out``; returns a summary dict.

    ``workers``: processes that train groups in parallel on CPU, this one included (each with one
    torch thread; this process also commits). ``None`` = one per available core (at most one per group
    left) when the groups left are worth a worker's start (see :func:`_n_workers`), else 1 = train
    here, at the caller's torch thread count. CUDA builds use one process.
    A group's result does not depend on which process trained it; MLP groups are also bit-identical
    at any thread count, convolution groups are reproducible at a fixed thread count (oneDNN's
    reductions change with it: the CLI trains with one thread unless ``--threads``).
    ``stop_after`` stops after committing that many groups (tests, incremental work).
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    si, sn = parse_shard(shard)
    text = Path(recipe.source).read_text() if Path(recipe.source).is_file() else ""
    writer = ZooWriter(out, recipe.name, recipe.digest, text, trainer=trainer_tag(dev),
                       recipe_json=json.dumps(recipe.raw, sort_keys=True, default=str),
                       plan={"limit": limit, "shard": f"{si}/{sn}"})
    try:
        full = plan(recipe, limit)
        groups = [g for i, g in enumerate(full) if i % sn == si]
        done = writer.committed_groups()
        if writer.other_trainer and any(g.group_id not in done for g in groups):
            raise ConfigError(f"{out}: its {len(done)} groups were trained by wsnets trainer version "
                              f"{writer.other_trainer}, this build trains version {trainer_tag(dev)} (other numbers "
                              "for the same recipe and seed): build into a new --out (or open the finished part as it is)")
        repaired = _check_existing(writer, groups, limit, f"{si}/{sn}", out)
    except BaseException:
        writer.close()
        raise
    done = writer.committed_groups()
    todo = [g for g in groups if g.group_id not in done]
    if repaired and progress:
        print(f"{out}: {len(repaired)} committed group(s) had a missing or damaged shard ("
              + "; ".join(f"{d['shard']} {d['problem']}" for d in repaired[:3]) + (" ..." if len(repaired) > 3 else "")
              + "): training them again", file=sys.stderr)
    bases = _bases(recipe, Path(out), dev, writer) if recipe.pretrain else None
    n_models = sum(len(g.runs) for g in todo)
    n_workers = _n_workers(workers, dev, todo, n_models)
    t0 = time.perf_counter()
    built = committed = 0
    # workers first: forked ones start before the progress bar's monitor thread exists
    trainer = _Trainer(recipe, dev, bases, None, n_workers, limit=limit, plan=full, bases_path=Path(out) / "bases.safetensors")
    bar = trainer.bar = _bar(n_models, progress, f"zoo {recipe.name}")
    try:
        for g, cks, seconds in trainer.run(todo):
            rows = [_row(recipe, r, c, k) for c in cks for k, r in enumerate(g.runs)]
            writer.commit_group(g.group_id, g.arch, [c.epoch for c in cks], [c.params for c in cks], rows,
                                seconds=seconds, device=str(dev))
            built += len(g.runs)
            committed += 1
            if bar:
                bar.n = built
                bar.set_postfix_str(f"{built / (time.perf_counter() - t0):.1f} models/s", refresh=False)
                bar.refresh()
            if stop_after is not None and len(done) + committed >= stop_after:
                break
    finally:
        trainer.close()
        if bar:
            bar.close()
        writer.close()
    dt = time.perf_counter() - t0
    return {"out": str(out), "recipe": recipe.name, "groups_total": len(groups), "groups_skipped": len(groups) - len(todo),
            "models_built": built, "seconds": round(dt, 3), "models_per_s": round(built / dt, 3) if dt > 0 else None,
            "shard": f"{si}/{sn}", "device": str(dev), "workers": n_workers, "cpu_loops": _cpu_loops(dev),
            "groups_repaired": len(repaired), "repaired": [d["shard"] for d in repaired]}


def _check_existing(writer: ZooWriter, groups: Sequence[Group], limit: int | None, shard: str,
                    out: str | Path) -> list[dict[str, Any]]:
    """Before building into an existing zoo: refuse one of another plan (``--limit``/``--shard``: its groups
    would mix with these), and forget committed groups whose shard is missing or changed (deleted,
    truncated, overwritten) so that they are trained again. Returns the forgotten groups' damage reports."""
    planned = {g.group_id for g in groups}
    committed = writer.committed_groups()
    foreign = committed - planned
    if foreign:
        recorded = [f"--{k} {writer.meta[k]}" for k in ("limit", "shard") if k in writer.meta]
        raise OutputExistsError(
            f"{out} holds {len(foreign)} group(s) of another plan (built with {', '.join(recorded) or 'another --limit or --shard'}); "
            f"this build is --limit {'none' if limit is None else limit} --shard {shard}: build into another --out "
            "(or repeat the original command)")
    lim = "none" if limit is None else str(limit)
    if writer.meta.get("limit") != lim or writer.meta.get("shard") != shard:  # new, or an older zoo's first record
        writer.set_meta({"limit": lim, "shard": shard})
    damaged = writer.damaged_groups(committed)
    if damaged and writer.other_trainer:
        from .verify import describe_damage
        raise DamagedZooError(describe_damage(Path(out), damaged) + "; they were trained by wsnets trainer version "
                              f"{writer.other_trainer} and cannot be repaired by this one")
    writer.forget_groups([d["group_id"] for d in damaged])
    writer.record_checksums()  # groups of older versions, checked by structure above
    return damaged


def _cpu_loops(dev: torch.device) -> str | None:
    """On CPU: ``"ok"`` if the trainer used its fused C loops (:mod:`wsnets.zoo.cpu_kernels`), else why not."""
    if dev.type != "cpu":
        return None
    from . import cpu_kernels
    return cpu_kernels.status()


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cost(g: Group) -> int:
    """A group's training cost in arbitrary units (~2.5 us each for MLPs on one core; groups whose
    steps per epoch the recipe fixes, ``steps_per_epoch = "subset"``, cost in proportion to them)."""
    return len(g.runs) * (g.arch.num_params + 2000) * (g.steps or 1)


def _n_workers(workers: int | None, dev: torch.device, todo: Sequence[Group], n_models: int) -> int:
    """Processes for a build: ``workers`` if given, else one per core (at most one per group) when the
    work is worth a worker's start: at least ~1 s of MLP training on one core (``_cost`` >= 400k) for a
    forked worker (~0.05 s to start), ~5 s (2M) for a spawned one (~1-1.5 s), or at least two groups
    per core and 64 models (convolutional groups cost more than ``_cost`` says)."""
    if dev.type != "cpu" or not todo:
        return 1
    if workers is not None:
        return min(workers, len(todo))
    cores = _cores()
    least = 400_000 if worker_start() == "fork" else 2_000_000
    big = sum(map(_cost, todo)) >= least or (len(todo) >= 2 * cores and n_models >= 64)
    return min(cores, len(todo)) if cores > 1 and len(todo) > 1 and big else 1


def train_one(recipe: Recipe, g: Group, bank: DataBank, dev: torch.device,
              bases: dict[str, torch.Tensor] | None = None, on_step=None) -> tuple[list[Checkpoint], float]:
    """Train one planned group (the unit of work of a build): its checkpoints in epoch order and the
    seconds the training took."""
    t = time.perf_counter()
    init = None
    if bases is not None:
        init = {k: v[torch.tensor([r.base for r in g.runs])] for k, v in bases.items()}
    cks = list(train_group(g.arch, g.runs, epochs=recipe.epochs, checkpoints=recipe.checkpoints,
                           batch_size=recipe.batch_size, bank=bank, device=dev, init=init, on_step=on_step,
                           **_options(recipe, g.runs)))
    return cks, time.perf_counter() - t


def _options(recipe: Recipe, runs: Sequence[RunSpec]) -> dict[str, Any]:
    """The recipe's training options for ``train_group`` (none for recipes that set none, so their
    groups train exactly as before the options existed)."""
    out: dict[str, Any] = {}
    if recipe.engine != "auto":
        out["engine"] = recipe.engine
    steps = recipe.steps(runs)  # = the group's .steps
    if steps is not None:
        out["steps_per_epoch"] = steps
    return out


class _Banks(dict):
    """Data banks by dataset tuple, built on first use."""

    def __init__(self, dev: torch.device):
        super().__init__()
        self.dev = dev

    def __missing__(self, names: tuple[str, ...]) -> DataBank:
        self[names] = DataBank.build(names, self.dev)
        return self[names]

    def of(self, g: Group) -> DataBank:
        return self[tuple(sorted({r.dataset for r in g.runs}))]


class _Trainer:
    """Trains the groups of a build and yields ``(group, checkpoints, seconds)`` as they finish.

    With ``workers > 1`` (CPU), ``workers - 1`` worker processes (forked, or ``python -m
    wsnets.zoo.worker``: see :func:`worker_start`; two pipes each; a reader thread sends a worker its
    next group as soon as it returns one) and this process itself train groups, largest first, every
    process with one torch thread; otherwise groups train here one after another, with progress per
    optimizer step. Workers are forked or plain subprocesses (never ``multiprocessing``), so a calling
    script needs no ``if __name__ == "__main__"`` guard. A worker exits when its input pipe closes:
    as soon as no group is left for it, and when a build is killed (even with SIGKILL) once its
    current group is done; :meth:`close` kills workers still busy.
    """

    def __init__(self, recipe: Recipe, dev: torch.device, bases, bar, workers: int = 1, *, limit: int | None = None,
                 plan: Sequence[Group] = (), bases_path: Path | None = None):
        """``plan`` (= ``plan(recipe, limit)``) is needed with ``workers > 1``: tasks name groups by position."""
        self.recipe, self.dev, self.bases, self.bar = recipe, dev, bases, bar
        self.banks = _Banks(dev)
        self.workers: list[tuple[Any, int, int]] = []  # (Popen or _Forked, fd we write, fd we read)
        self.threads = torch.get_num_threads()
        self.readers: list = []  # threads taking worker results off their pipes (see run)
        self.lock = threading.Lock()  # the task queue and the pipes to workers
        self.closed = False
        self.released: set[int] = set()  # worker input pipes closed early (no work left for them)
        if workers > 1:
            self.plan_index = {g.group_id: j for j, g in enumerate(plan)}
            torch.set_num_threads(1)  # restored by close()
            start = worker_start()
            if start == "fork" and dev.type == "cpu":  # built and checked once, inherited by the workers
                from . import cpu_kernels
                cpu_kernels.load()
            try:
                for _ in range(workers - 1):
                    r_child, w_parent = os.pipe()
                    r_parent, w_child = os.pipe()
                    if start == "fork":
                        proc: Any = _fork_worker(r_child, w_child, recipe, plan, bases)
                    else:
                        proc = _spawn_worker(r_child, w_child)
                    os.close(r_child)
                    os.close(w_child)
                    self.workers.append((proc, w_parent, r_parent))
                    if start != "fork":
                        # small messages only (a pipe holds 64 KB and the worker is still starting): the
                        # worker plans the recipe itself and reads the bases from the zoo directory
                        send_msg(w_parent, (recipe, limit, str(bases_path) if bases is not None else None))
            except BaseException:
                self.close()
                raise

    def _here(self, g: Group) -> tuple[list[Checkpoint], float]:
        bank = self.banks.of(g)
        on_step = None
        if self.bar is not None and not self.workers:
            steps = (self.recipe.steps(g.runs) or math.ceil(int(bank.n.max()) / self.recipe.batch_size)) * self.recipe.epochs
            on_step = lambda n, k=len(g.runs): self.bar.update(k / steps)  # noqa: E731
        return train_one(self.recipe, g, bank, self.dev, self.bases, on_step)

    def run(self, todo: Sequence[Group]) -> Iterator[tuple[Group, list[Checkpoint], float]]:
        if not self.workers:
            for g in todo:
                yield (g, *self._here(g))
            return
        import queue as queue_mod
        # largest first (cost ~ models x (parameters + per-model overhead)), so the processes finish together
        queue = sorted(enumerate(todo), key=lambda ig: _cost(ig[1]))
        results: queue_mod.Queue = queue_mod.Queue()

        def feed(fd: int) -> None:
            """Send worker ``fd`` the largest group left (under the lock: ``close`` may close ``fd``); with
            none left, close its input so that it exits now, while this process may still be training."""
            with self.lock:
                if queue and not self.closed:
                    i, g = queue.pop()
                    send_msg(fd, (i, self.plan_index[g.group_id], g.group_id))
                elif not self.closed and fd not in self.released:
                    self.released.add(fd)
                    os.close(fd)

        def read(fd_in: int, fd_out: int) -> None:
            """A worker's results, taken off its pipe at once (a worker blocks on a full pipe while this
            process trains a group of its own); each result sends the worker its next group at once, so
            it waits only for that round trip (milliseconds), never for this process, and a worker holds
            one group at a time (none is stranded in its pipe while this process has nothing to do)."""
            while True:
                try:
                    msg = recv_msg(fd_in, "a zoo worker process died (out of memory?); rerun the build to resume")
                    results.put(msg)
                    if msg[3] is None:
                        feed(fd_out)
                except (EOFError, OSError) as e:
                    if fd_out not in self.released:  # else: the worker exited because it was told to
                        results.put(e)
                    return
        for _, w, _ in self.workers:
            feed(w)
        self.readers = [threading.Thread(target=read, args=(r, w), daemon=True) for _, w, r in self.workers]
        for t in self.readers:
            t.start()
        left = len(todo)
        while left:
            try:
                msg = results.get_nowait()
            except queue_mod.Empty:
                with self.lock:
                    mine = queue.pop() if queue else None
                if mine is not None:
                    left -= 1
                    yield (mine[1], *self._here(mine[1]))
                    continue
                msg = results.get()
            if isinstance(msg, BaseException):
                raise RuntimeError(str(msg)) from msg
            i, cks, seconds, err = msg
            if err is not None:
                raise err
            left -= 1
            yield todo[i], checkpoints_from_numpy(cks), seconds

    def close(self) -> None:
        with self.lock:  # no reader thread writes to a pipe from now on
            self.closed = True
            for _, w, _ in self.workers:  # workers exit on EOF (after their current group)...
                if w not in self.released:
                    os.close(w)
        for proc, _, _ in self.workers:
            try:
                proc.wait(timeout=0.5)
            except Exception:  # noqa: BLE001 - ...or are killed: busy with a group nobody will commit
                proc.kill()
                proc.wait()
        for t in self.readers:  # their pipes are closed at the other end now: EOF
            t.join()
        for _, _, r in self.workers:
            os.close(r)
        self.workers = []
        torch.set_num_threads(self.threads)


def worker_start() -> str:
    """How worker processes start: ``"fork"`` on Linux (~0.05 s: the child has torch, the recipe and
    the bases already), else ``"spawn"`` (a fresh ``python -m wsnets.zoo.worker``, ~1-1.5 s to import
    torch); ``WSNETS_ZOO_WORKER_START=fork|spawn`` overrides."""
    import sys
    how = os.environ.get("WSNETS_ZOO_WORKER_START", "fork" if sys.platform == "linux" else "spawn")
    if how not in ("fork", "spawn") or (how == "fork" and not hasattr(os, "fork")):
        raise ConfigError(f"WSNETS_ZOO_WORKER_START={how!r}: use fork (Linux) or spawn")
    return how


def _spawn_worker(r_child: int, w_child: int):
    """A worker in a new interpreter (``python -m wsnets.zoo.worker``), given its two pipe ends."""
    import subprocess
    import sys

    import wsnets
    path = [str(Path(wsnets.__file__).resolve().parents[1])] + [
        p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(path))
    return subprocess.Popen([sys.executable, "-m", "wsnets.zoo.worker", str(r_child), str(w_child)],
                            pass_fds=(r_child, w_child), env=env, stdin=subprocess.DEVNULL)


class _Forked:
    """The parent's handle on a forked worker (the part of ``subprocess.Popen`` that builds use)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, 0 if deadline is None else os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere (SIGCHLD ignored or handled): gone, as Popen assumes
                self.returncode = 0
                break
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
            elif time.monotonic() >= deadline:
                raise TimeoutError(f"zoo worker {self.pid} still running")
            else:
                time.sleep(0.005)
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _fork_worker(r_child: int, w_child: int, recipe: Recipe, groups: Sequence[Group], bases) -> _Forked:
    """A worker forked from this process (as torch's DataLoader forks its workers): the child keeps
    only its two pipe ends (no other process's input pipe, so every worker still sees EOF when the
    build ends or is killed), resets the usual signals to their default action, trains the groups of
    this process's plan ``groups`` with one torch thread and leaves with ``os._exit`` (none of this process's files, database connection, signal or
    exit handlers are touched by the child)."""
    import gc
    import sys
    import warnings
    for f in (sys.stdout, sys.stderr):  # else the child would write this process's buffered output again
        try:
            f.flush()
        except (AttributeError, OSError, ValueError):
            pass
    with warnings.catch_warnings():  # Python >= 3.12 warns about fork with threads (torch's idle pools)
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid:
        return _Forked(pid)
    code = 1
    try:
        for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2"):  # never run this process's handlers
            if hasattr(signal, name):  # (they might clean up its files); Ctrl-C or a kill ends the worker
                signal.signal(getattr(signal, name), signal.SIG_DFL)
        gc.disable()  # no finalizer of an inherited object may run (and close a file of the parent)
        _own_std_streams()
        for fd in _open_fds():
            if fd > 2 and fd not in (r_child, w_child):
                try:
                    os.close(fd)
                except OSError:
                    pass
        from .worker import serve
        code = serve(r_child, w_child, recipe, groups, bases)
    except BaseException:  # noqa: BLE001 - report, never return into the parent's code
        import traceback
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _own_std_streams() -> None:
    """In a forked worker: ``sys.stdout`` / ``sys.stderr`` write straight to file descriptors 1 and 2, as
    a spawned worker's do. The inherited objects may be the parent's redirections (a notebook kernel's
    socket-backed streams, a test's capture, a logger) that cannot work, or must not be used, here."""
    import sys
    for name, fd in (("stdout", 1), ("stderr", 2)):
        try:
            stream = open(fd, "w", buffering=1, closefd=False, errors="backslashreplace")
        except OSError:
            stream = open(os.devnull, "w")
        setattr(sys, name, stream)
    sys.__stdout__, sys.__stderr__ = sys.stdout, sys.stderr


def _open_fds() -> list[int]:
    """This process's open file descriptors (Linux: /proc/self/fd; else every number up to the limit)."""
    try:
        return [int(f) for f in os.listdir("/proc/self/fd")]
    except OSError:
        return list(range(os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 1024))


def checkpoints_to_numpy(cks: Sequence[Checkpoint]) -> list[tuple[int, dict, dict]]:
    """Checkpoints as ``(epoch, params, metrics)`` with NumPy arrays, as a worker sends them."""
    return [(c.epoch, {k: v.numpy() for k, v in c.params.items()}, {k: v.numpy() for k, v in c.metrics.items()})
            for c in cks]


def checkpoints_from_numpy(cks: Sequence[tuple[int, dict, dict]]) -> list[Checkpoint]:
    """The inverse of :func:`checkpoints_to_numpy` (tensors share the arrays' memory)."""
    return [Checkpoint(e, {k: torch.from_numpy(v) for k, v in p.items()}, {k: torch.from_numpy(v) for k, v in m.items()})
            for e, p, m in cks]


def send_msg(fd: int, obj: Any) -> None:
    """Write ``obj`` to file descriptor ``fd`` as one length-prefixed pickle (private worker pipes)."""
    import pickle
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(len(data).to_bytes(8, "little") + data)
    while view:
        view = view[os.write(fd, view):]


def recv_msg(fd: int, eof: str) -> Any:
    """Read one :func:`send_msg` message from ``fd``; ``EOFError(eof)`` if the writer is gone."""
    import pickle

    def exactly(n: int) -> bytes:
        parts = []
        while n:
            b = os.read(fd, min(n, 1 << 20))
            if not b:
                raise EOFError(eof)
            parts.append(b)
            n -= len(b)
        return b"".join(parts)
    return pickle.loads(exactly(int.from_bytes(exactly(8), "little")))


def _bar(total: int, progress: bool, desc: str):
    if not progress or total == 0:
        return None
    import sys

    from tqdm.auto import tqdm
    # Redirected to a log (not a terminal), a bar redrawn every 0.1 s writes megabytes over a long build:
    # redraw it every 30 s there instead.
    return tqdm(total=total, desc=desc, unit="model", mininterval=0.1 if sys.stderr.isatty() else 30,
                bar_format="{l_bar}{bar}| {n:.0f}/{total} [{elapsed}<{remaining}{postfix}]")


def _row(recipe: Recipe, r: RunSpec, c: Checkpoint, k: int) -> dict[str, Any]:
    m = {name: float(v[k]) for name, v in c.metrics.items()}
    hp = {name: r.hp[name] for name in HYPER_DEFAULTS}
    hp.update({name: r.hp[name] for name in OPTIONAL_HYPER if name in r.hp})  # only where the recipe names them
    return {"model_id": r.model_id, "run": r.index, "seed": r.seed, "recipe": recipe.name, "arch": r.arch.to_json(),
            "arch_desc": r.arch.describe(), "depth": r.depth, "width": r.width, "activation": r.arch.activation,
            "num_params": r.arch.num_params, "dataset": r.dataset, "task": zds.info(r.dataset)["task"], "base": r.base,
            **hp, "batch_size": recipe.batch_size, "hyperparameters": hp, "epoch": c.epoch,
            "train_acc": m["train_acc"], "test_acc": m["test_acc"], "train_loss": m["train_loss"],
            "test_loss": m["test_loss"], "gen_gap": m["train_acc"] - m["test_acc"], "diverged": int(m["diverged"]),
            "key": f"e{c.epoch:04d}", "idx": k}


def _bases(recipe: Recipe, out: Path, dev: torch.device, writer: ZooWriter | None = None) -> dict[str, torch.Tensor]:
    """Pre-trained bases ``[n_bases, ...]`` of a fine-tuning zoo: trained once and cached in
    ``bases.safetensors`` (deterministic, so every shard of a build trains identical bases). Its SHA-256
    is recorded in the zoo's meta table; a missing, unreadable or changed file is trained again."""
    from .verify import file_digest
    path = out / "bases.safetensors"
    arch = recipe.base_arch()
    recorded = writer.meta.get("bases_sha256") if writer is not None else None
    if path.exists():
        try:
            tensors, _ = read_safetensors(path)
            sha = file_digest(path)
            if recorded and sha != recorded:
                raise CheckpointError(f"{path}: contents changed since it was written (SHA-256 differs)")
            if writer is not None and not recorded:
                writer.set_meta({"bases_sha256": sha})
            return {k: v.to(dev) for k, v in tensors.items()}
        except CheckpointError as e:
            print(f"{e}: training the bases again", file=sys.stderr)
    pre = dict(recipe.pretrain or {})
    n = int(pre.pop("bases", 1))
    dataset = pre.pop("dataset")
    epochs = int(pre.pop("epochs", 10))
    batch = int(pre.pop("batch_size", recipe.batch_size))
    hp = dict(HYPER_DEFAULTS)
    hp.update(pre)
    runs = [RunSpec(i, f"{recipe.name}-base{i}", 7919 * (recipe.seed + 1) + i, arch, dataset, hp) for i in range(n)]
    ck = list(train_group(arch, runs, epochs=epochs, checkpoints=[epochs], batch_size=batch,
                          bank=DataBank.build([dataset], dev), device=dev))[-1]
    meta = {ARCH_KEY: arch.to_json(), BATCH_KEY: str(n), "dataset": dataset,
            "test_acc": ",".join(f"{a:.4f}" for a in ck.metrics["test_acc"].tolist())}
    write_safetensors(path, ck.params, meta)
    if writer is not None:
        writer.set_meta({"bases_sha256": file_digest(path)})
    return {k: v.to(dev) for k, v in ck.params.items()}
