"""Building a zoo from a recipe: plan groups, train each group as one computation, commit, resume.

The plan is a pure function of the recipe (and ``limit``): models of equal architecture are split
into near-equal groups of at most ``group_size``, named by a hash of their members. ``--shard i/n``
builds groups ``i, i+n, i+2n, ...`` of the plan, so parts are disjoint and their union (``zoo merge``)
is the whole zoo. A rerun skips committed groups, so a killed build resumes where it stopped and
ends equal to an uninterrupted one (the groups it retrains are the same computation).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..arch import Architecture
from ..errors import ConfigError
from ..io import atomic_write, read_safetensors
from . import datasets as zds
from .recipe import HYPER_DEFAULTS, Recipe, RunSpec, load_recipe
from .store import ZooWriter
from .trainer import Checkpoint, DataBank, train_group


@dataclass(frozen=True)
class Group:
    """Models trained together: same architecture (and, in a fine-tuning zoo, the same bases)."""

    group_id: str
    arch: Architecture
    runs: tuple[RunSpec, ...]


def plan(recipe: Recipe, limit: int | None = None) -> list[Group]:
    """The deterministic list of groups for the first ``limit`` models of ``recipe``."""
    buckets: dict[str, list[RunSpec]] = {}
    for r in recipe.runs(limit):
        buckets.setdefault(r.structure, []).append(r)
    groups = []
    for runs in buckets.values():
        n = math.ceil(len(runs) / max(1, recipe.group_size))
        size = math.ceil(len(runs) / n)
        for c in range(n):
            members = tuple(runs[c * size:(c + 1) * size])
            if members:
                h = hashlib.sha1(",".join(m.model_id for m in members).encode()).hexdigest()[:10]
                groups.append(Group(f"{recipe.name}-{members[0].index:06d}-{h}", members[0].arch, members))
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
          device: str = "cpu", progress: bool = True, stop_after: int | None = None) -> dict[str, Any]:
    """Build (or resume) the zoo of ``recipe`` in directory ``out``; returns a summary dict.

    ``stop_after`` stops after committing that many groups (tests, incremental work).
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    si, sn = parse_shard(shard)
    writer = ZooWriter(out, recipe.name, recipe.digest, Path(recipe.source).read_text() if Path(recipe.source).is_file() else "")
    groups = [g for i, g in enumerate(plan(recipe, limit)) if i % sn == si]
    done = writer.committed_groups()
    todo = [g for g in groups if g.group_id not in done]
    bases = _bases(recipe, Path(out), dev) if recipe.pretrain else None
    banks: dict[tuple[str, ...], DataBank] = {}
    n_models = sum(len(g.runs) for g in todo)
    t0 = time.perf_counter()
    bar = _bar(n_models, progress, f"zoo {recipe.name}")
    built = 0
    try:
        for g in todo:
            names = tuple(sorted({r.dataset for r in g.runs}))
            if names not in banks:
                banks[names] = DataBank.build(names, dev)
            bank = banks[names]
            steps = math.ceil(int(bank.n.max()) / recipe.batch_size) * recipe.epochs
            init = None
            if bases is not None:
                init = {k: v[torch.tensor([r.base for r in g.runs])] for k, v in bases.items()}
            tg = time.perf_counter()
            cks = list(train_group(g.arch, g.runs, epochs=recipe.epochs, checkpoints=recipe.checkpoints,
                                   batch_size=recipe.batch_size, bank=bank, device=dev, init=init,
                                   on_step=(lambda n, k=len(g.runs): bar.update(k / steps)) if bar else None))
            rows = [_row(recipe, r, c, k) for c in cks for k, r in enumerate(g.runs)]
            writer.commit_group(g.group_id, g.arch, [c.epoch for c in cks], [c.params for c in cks], rows,
                                seconds=time.perf_counter() - tg, device=str(dev))
            built += len(g.runs)
            if bar:
                bar.n = built
                bar.set_postfix_str(f"{built / (time.perf_counter() - t0):.1f} models/s")
                bar.refresh()
            if stop_after is not None and len(done) + (todo.index(g) + 1) >= stop_after:
                break
    finally:
        if bar:
            bar.close()
        writer.close()
    dt = time.perf_counter() - t0
    return {"out": str(out), "recipe": recipe.name, "groups_total": len(groups), "groups_skipped": len(groups) - len(todo),
            "models_built": built, "seconds": round(dt, 3), "models_per_s": round(built / dt, 3) if dt > 0 else None,
            "shard": f"{si}/{sn}", "device": str(dev)}


def _bar(total: int, progress: bool, desc: str):
    if not progress or total == 0:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="model", bar_format="{l_bar}{bar}| {n:.0f}/{total} [{elapsed}<{remaining}{postfix}]")


def _row(recipe: Recipe, r: RunSpec, c: Checkpoint, k: int) -> dict[str, Any]:
    m = {name: float(v[k]) for name, v in c.metrics.items()}
    hp = {name: r.hp[name] for name in HYPER_DEFAULTS}
    return {"model_id": r.model_id, "run": r.index, "seed": r.seed, "recipe": recipe.name, "arch": r.arch.to_json(),
            "arch_desc": r.arch.describe(), "depth": r.depth, "width": r.width, "activation": r.arch.activation,
            "num_params": r.arch.num_params, "dataset": r.dataset, "task": zds.info(r.dataset)["task"], "base": r.base,
            **hp, "batch_size": recipe.batch_size, "hyperparameters": hp, "epoch": c.epoch,
            "train_acc": m["train_acc"], "test_acc": m["test_acc"], "train_loss": m["train_loss"],
            "test_loss": m["test_loss"], "gen_gap": m["train_acc"] - m["test_acc"], "diverged": int(m["diverged"]),
            "key": f"e{c.epoch:04d}", "idx": k}


def _bases(recipe: Recipe, out: Path, dev: torch.device) -> dict[str, torch.Tensor]:
    """Pre-trained bases ``[n_bases, ...]`` of a fine-tuning zoo: trained once and cached in
    ``bases.safetensors`` (deterministic, so every shard of a build trains identical bases)."""
    path = out / "bases.safetensors"
    arch = recipe.base_arch()
    if path.exists():
        tensors, _ = read_safetensors(path)
        return {k: v.to(dev) for k, v in tensors.items()}
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
    from safetensors.torch import save_file
    meta = {"wsnets.arch": arch.to_json(), "wsnets.batch_size": str(n), "dataset": dataset,
            "test_acc": ",".join(f"{a:.4f}" for a in ck.metrics["test_acc"].tolist())}
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in ck.params.items()}, str(tmp), metadata=meta))
    return {k: v.to(dev) for k, v in ck.params.items()}
