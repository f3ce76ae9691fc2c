"""Where the batched zoo trainer spends its time on one device: the fixed MLP 64-32-32-10 (SGD, 10
epochs on digits, the issue's GPU workload) trained as one group of ``K`` models, split into phases
(setup, sample order, optimizer steps, evaluation, copy to the host), plus a kernel table from
``torch.profiler`` for one epoch. A development tool for the CUDA engine; ``zoo_speed.py`` is the
benchmark.

Usage::

    python benchmarks/zoo_gpu_profile.py --device cuda --models 50000 --out benchmarks/out/zoo_gpu_profile.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wsnets.io import atomic_write_json  # noqa: E402
from wsnets.zoo import trainer as T  # noqa: E402
from wsnets.zoo.recipe import parse_recipe  # noqa: E402


def mlp_runs(k: int):
    raw = {"name": "mlp64", "seed": 0, "population": k, "datasets": ["digits"], "epochs": 10, "checkpoints": [10],
           "batch_size": 64, "group_size": k,
           "architecture": {"kind": "mlp", "depth": 2, "width": 32, "activation": "relu"},
           "hyperparameters": {"optimizer": "sgd", "lr": {"log_uniform": [0.01, 0.2]}, "momentum": 0.9}}
    r = parse_recipe(raw)
    return r, r.runs()


def timed_phases(recipe, runs, bank, dev, epochs: int, fused: bool | None = None) -> dict:
    """Seconds per phase of one ``train_group`` call (synchronized timers around each phase)."""
    acc: dict[str, float] = {"order": 0.0, "steps": 0.0, "evaluate": 0.0}
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)

    def wrap(name, fn):
        def inner(*a, **k):
            sync()
            t = time.perf_counter()
            out = fn(*a, **k)
            sync()
            acc[name] += time.perf_counter() - t
            return out
        return inner
    orig = (T._epoch_order, T.evaluate, T._MLPEngine.step)
    T._epoch_order, T.evaluate = wrap("order", orig[0]), wrap("evaluate", orig[1])
    T._MLPEngine.step = wrap("steps", orig[2])
    try:
        sync()
        t = time.perf_counter()
        cks = list(T.train_group(runs[0].arch, runs, epochs=epochs, checkpoints=[epochs], batch_size=recipe.batch_size,
                                 bank=bank, device=dev, fused=fused))
        sync()
        total = time.perf_counter() - t
    finally:
        T._epoch_order, T.evaluate, T._MLPEngine.step = orig
    acc["other"] = total - sum(acc.values())
    acc["total"] = total
    acc["models_per_s"] = len(runs) / total
    acc["median_test_acc"] = float(cks[-1].metrics["test_acc"].median())
    return acc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", type=int, default=50000)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--kernels", type=int, default=25, help="rows of the profiler's kernel table (0: skip)")
    ap.add_argument("--variants", default="torch,fused-ieee,fused-tf32",
                    help="comma-separated: torch (the torch MLP path), fused-<precision>[-w<warps>] (the Triton kernel: ieee, tf32, tf32x3)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    recipe, runs = mlp_runs(a.models)
    bank = T.DataBank.build(["digits"], dev)
    from wsnets.zoo import fused as fz

    def setup(v: str) -> bool:
        if v.startswith("fused-"):  # fused-<precision>[-w<warps>]
            parts = v.split("-")
            fz.PRECISION = parts[1]
            fz.WARPS = int(parts[2][1:]) if len(parts) > 2 else 4
            return True
        return False
    variants = a.variants.split(",")
    for v in variants:  # warm-up: library handles, kernel compilation, first launches
        timed_phases(recipe, runs[:256], bank, dev, 1, setup(v))
    res = {"device": str(dev), "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
           "torch": torch.__version__, "models": a.models, "epochs": a.epochs, "phases": {v: [] for v in variants}}
    for _ in range(a.repeat):  # variants interleaved
        for v in variants:
            res["phases"][v].append(timed_phases(recipe, runs, bank, dev, a.epochs, setup(v)))
            print(v, json.dumps({k: round(x, 4) for k, x in res["phases"][v][-1].items()}), flush=True)
    print("\n| variant | models/s (median) | total s | order s | steps s | evaluate s | other s | median test acc |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for v in variants:
        ph = sorted(res["phases"][v], key=lambda r: r["total"])[(len(res["phases"][v]) - 1) // 2]
        print(f"| {v} | {ph['models_per_s']:.0f} | {ph['total']:.3f} | {ph['order']:.3f} | {ph['steps']:.3f} | "
              f"{ph['evaluate']:.3f} | {ph['other']:.3f} | {ph['median_test_acc']:.3f} |")
    setup(variants[0])
    if a.kernels:
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            timed_phases(recipe, runs, bank, dev, 1, setup(variants[-1]))
        sort = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=a.kernels)
        res["kernel_table"] = table
        print(table)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
