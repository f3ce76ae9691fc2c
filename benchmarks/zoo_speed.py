"""Models/s of the batched zoo trainer against a sequential per-model PyTorch loop, side by side.

Two workloads, each timed both ways in one run:

* ``recipe``: the first models of a recipe (default ``zoo/digits-mlp.toml``: mixed depths, widths,
  activations, optimizers, dropout, label noise, train fractions). Batched = the zoo builder's groups;
  sequential = one ``nn.Module`` + ``torch.optim`` (SGD or AdamW) per model, same epochs, batch size,
  steps, gradient clipping and checkpoint evaluation.
* ``mlp``: the fixed MLP 64-32-32-10 (ReLU, SGD) trained 10 epochs on digits, ``K`` models in one
  group (the issue's GPU target: >= 50,000 models/s on an H100).

The sequential loop is slow, so it runs on a subset (``--seq-models``) and its models/s is
extrapolated per model (each model's cost is independent of the others). Timings on a shared CPU
are noisy; ratios come from the same run.

Usage::

    python benchmarks/zoo_speed.py --quick --out benchmarks/out/zoo_speed.json
    python benchmarks/zoo_speed.py --device cuda --mlp-models 50000 --out zoo_speed_gpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wsnets.io import atomic_write_json  # noqa: E402
from wsnets.weights import WeightSpace  # noqa: E402
from wsnets.zoo.build import plan  # noqa: E402
from wsnets.zoo.recipe import RunSpec, load_recipe, parse_recipe  # noqa: E402
from wsnets.zoo.trainer import DataBank, init_params, train_group  # noqa: E402


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def batched(groups, recipe, bank, dev) -> tuple[float, int, list[float]]:
    """Train ``groups`` with the batched trainer; returns (wall s, CPU s, models, final test accs)."""
    _sync(dev)
    t, c = time.perf_counter(), time.process_time()
    n, accs = 0, []
    for arch, runs in groups:
        cks = list(train_group(arch, runs, epochs=recipe.epochs, checkpoints=recipe.checkpoints,
                               batch_size=recipe.batch_size, bank=bank, device=dev))
        accs += cks[-1].metrics["test_acc"].tolist()
        n += len(runs)
    _sync(dev)
    return time.perf_counter() - t, time.process_time() - c, n, accs


def sequential(runs: list[RunSpec], recipe, bank, dev) -> tuple[float, int, list[float]]:
    """The usual loop: one model at a time, nn.Module + torch.optim, evaluated at each checkpoint epoch."""
    x, y, xt, yt = bank.x[0], bank.y[0], bank.xt[0], bank.yt[0]
    n = int(bank.n[0])
    steps = math.ceil(n / recipe.batch_size)
    _sync(dev)
    t, c = time.perf_counter(), time.process_time()
    accs = []
    for r in runs:
        p = init_params(r.arch, torch.tensor([r.seed], device=dev), torch.tensor([r.hp["init_scale"]], device=dev))
        model = WeightSpace(r.arch, {k: v[0] for k, v in p.items()}).to_module().to(dev).train()
        if r.hp["dropout"] > 0:  # dropout after each hidden activation, as the batched trainer does
            mods = list(model)
            last = max(i for i, m in enumerate(mods) if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)))
            new = []
            for i, m in enumerate(mods):
                new.append(m)
                if i < last and m.__class__.__name__ in ("ReLU", "Tanh", "GELU", "ELU", "SiLU", "Sigmoid", "LeakyReLU"):
                    new.append(torch.nn.Dropout(r.hp["dropout"]))
            model = torch.nn.Sequential(*new).to(dev).train()
        opt = (torch.optim.SGD(model.parameters(), lr=r.hp["lr"], momentum=r.hp["momentum"], weight_decay=r.hp["weight_decay"])
               if r.hp["optimizer"] == "sgd" else
               torch.optim.AdamW(model.parameters(), lr=r.hp["lr"], weight_decay=r.hp["weight_decay"]))
        g = torch.Generator(device="cpu").manual_seed(r.seed)
        n_sub = max(1, round(r.hp["train_fraction"] * n))
        subset = torch.randperm(n, generator=g)[:n_sub].to(dev)
        yk = y.clone()
        noisy = torch.rand(n, generator=g).to(dev) < r.hp["label_noise"]
        yk[noisy] = torch.randint(0, 10, (int(noisy.sum()),), generator=g).to(dev)
        order = torch.empty(0, dtype=torch.long, device=dev)
        for epoch in range(1, recipe.epochs + 1):
            for _ in range(steps):
                while len(order) < recipe.batch_size:
                    order = torch.cat([order, subset[torch.randperm(n_sub, generator=g).to(dev)]])
                idx, order = order[:recipe.batch_size], order[recipe.batch_size:]
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x[idx]), yk[idx]).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), r.hp["grad_clip"])
                opt.step()
            if epoch in recipe.checkpoints:
                model.eval()
                with torch.no_grad():
                    acc = (model(xt).argmax(1) == yt).float().mean().item()
                    model(x)  # train metrics, as the zoo records them
                model.train()
        accs.append(acc)
    _sync(dev)
    return time.perf_counter() - t, time.process_time() - c, len(runs), accs


def _compare(name: str, b: tuple, s: tuple) -> dict:
    """One result row from (wall s, CPU s, models, accuracies) of the batched and the sequential run."""
    (tb, cb, nb, acc_b), (ts, cs, ns, acc_s) = b, s
    return {"workload": name, "batched_models_per_s": nb / tb, "sequential_models_per_s": ns / ts,
            "speedup": (nb / tb) / (ns / ts), "speedup_cpu_time": (nb / cb) / (ns / cs),
            "batched_seconds": tb, "batched_cpu_seconds": cb, "batched_models": nb,
            "sequential_seconds": ts, "sequential_cpu_seconds": cs, "sequential_models": ns,
            "batched_median_test_acc": float(torch.tensor(acc_b).median()),
            "sequential_median_test_acc": float(torch.tensor(acc_s).median())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="zoo/digits-mlp.toml")
    ap.add_argument("--quick", action="store_true", help="small sizes (about a minute on a shared CPU)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (both methods)")
    ap.add_argument("--recipe-models", type=int, default=None, help="models of the recipe for the batched trainer")
    ap.add_argument("--mlp-models", type=int, default=None, help="K for the fixed 64-32-32-10 MLP workload")
    ap.add_argument("--seq-models", type=int, default=None, help="models timed in the sequential loop")
    ap.add_argument("--out", required=True, help="JSON file to write")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    n_rec = a.recipe_models or (96 if a.quick else 1000)
    n_mlp = a.mlp_models or (512 if a.quick else 4096)
    n_seq = a.seq_models or (6 if a.quick else 24)
    recipe = load_recipe(a.recipe)
    bank = DataBank.build(recipe.datasets, dev)
    results = []

    # workload 1: the recipe's first n_rec models, in the builder's groups
    groups = [(g.arch, list(g.runs)) for g in plan(recipe, n_rec)]
    all_runs = sorted((r for _, rs in groups for r in rs), key=lambda r: r.index)
    seq_runs = all_runs[:: max(1, len(all_runs) // n_seq)][:n_seq]
    results.append(_compare(f"{recipe.name} recipe ({n_rec} models, {len(groups)} groups, {recipe.epochs} epochs)",
                            batched(groups, recipe, bank, dev), sequential(seq_runs, recipe, bank, dev)))

    # workload 2: fixed MLP 64-32-32-10, SGD, 10 epochs on digits
    raw = {"name": "mlp64", "seed": 0, "population": n_mlp, "datasets": ["digits"], "epochs": 10, "checkpoints": [10],
           "batch_size": 64, "group_size": n_mlp,
           "architecture": {"kind": "mlp", "depth": 2, "width": 32, "activation": "relu"},
           "hyperparameters": {"optimizer": "sgd", "lr": {"log_uniform": [0.01, 0.2]}, "momentum": 0.9}}
    mr = parse_recipe(raw)
    runs = mr.runs()
    results.append(_compare(f"MLP 64-32-32-10, 10 epochs on digits (K={n_mlp})",
                            batched([(runs[0].arch, runs)], mr, bank, dev), sequential(runs[:n_seq], mr, bank, dev)))

    env = {"device": str(dev), "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
           "threads": a.threads, "torch": torch.__version__, "python": platform.python_version(),
           "cpu": platform.processor() or platform.machine(), "quick": a.quick,
           "note": "timed on a shared machine; ratios are from the same run"}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.out, {"env": env, "results": results})
    print(f"device {env['device']}{' (' + env['gpu'] + ')' if env['gpu'] else ''}, {a.threads} thread(s)\n")
    print("| workload | batched models/s | sequential models/s | speedup (wall) | speedup (CPU time) "
          "| median test acc (batched / seq) |")
    print("|---|---:|---:|---:|---:|---|")
    for r in results:
        print(f"| {r['workload']} | {r['batched_models_per_s']:.2f} | {r['sequential_models_per_s']:.3f} | "
              f"{r['speedup']:.1f}x | {r['speedup_cpu_time']:.1f}x | {r['batched_median_test_acc']:.3f} / {r['sequential_median_test_acc']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
