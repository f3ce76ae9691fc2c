"""Models/s of the batched zoo trainer against a sequential per-model PyTorch loop, side by side.

Two workloads, each timed both ways in one run:

* ``recipe``: a recipe (default ``zoo/digits-mlp.toml``: mixed depths, widths, activations,
  optimizers, dropout, label noise, train fractions) planned at its real population (1000 models:
  48 groups of 11-30 models), so groups have their real sizes; the batched trainer trains every
  ``--recipe-every``-th group of that plan (all groups without ``--quick``). Sequential = one
  ``nn.Module`` + ``torch.optim`` (SGD or AdamW) per model, same epochs, batch size, steps, gradient
  clipping and checkpoint evaluation, on models drawn from the same groups.
* ``mlp``: the fixed MLP 64-32-32-10 (ReLU, SGD) trained 10 epochs on digits, ``K`` models in one
  group (the issue's GPU target: >= 50,000 models/s on an H100), plus a naive ``torch.func.vmap``
  reference (``vmap(grad(loss))`` over stacked parameters, one SGD update per parameter tensor). On
  CUDA the batched trainer runs its fused Triton kernel (:mod:`wsnets.zoo.fused`) when Triton is
  installed, timed twice: in float32 (PyTorch's default precision) and with TF32 allowed.

* ``resnet`` and ``vit`` (``--workloads``, off by default): one group of residual CNNs of
  ``zoo/digits-wild.toml`` and one group of transformers of ``zoo/digits-vit.toml`` (planned at their
  real populations, or at ``--dag-population N`` models: the same architectures, each group N/population
  times larger; ``--dag-pick``: the group of median per-model cost, or the cheapest, or both), trained
  by the batched trainer's DAG engine (:mod:`wsnets.zoo.dag_engine`), against the sequential loop on
  the same models built as their own ``nn.Module`` class (:func:`wsnets.zoo.recipe.family_module`:
  ``WildCNN``, ``ViT`` with ``nn.TransformerEncoderLayer``) with the same initial weights.

Both methods run with the same torch thread count (``--threads``). On CPU the batched trainer uses its
fused C loops (:mod:`wsnets.zoo.cpu_kernels`) where they load (the header line and the JSON say so;
``WSNETS_CPU_KERNELS=0`` times the torch path, which trains the same numbers). ``--workers N`` adds a row for the
recipe built by ``wsnets zoo build`` with ``N`` worker processes (groups in parallel, one thread each,
commits included): the whole machine against the sequential loop at ``--threads``. The sequential loop is slow, so it
runs on a subset (``--seq-models``) and its models/s is extrapolated per model (each model's cost is
independent of the others). Timings on a shared CPU are noisy (this 2-core VM's speed drifts by
10-25% from minute to minute): ``--repeat N`` times each workload N times, batched and sequential
interleaved, and reports the median of the N speedups with their range; the JSON keeps every repeat
and the load average before and after, and the speedup is also given in CPU time.

Usage::

    python benchmarks/zoo_speed.py --quick --out benchmarks/out/zoo_speed.json
    python benchmarks/zoo_speed.py --threads 2 --workers 2 --out benchmarks/out/zoo_speed_2t.json
    python benchmarks/zoo_speed.py --device cuda --mlp-models 50000 --seq-models 20 --out zoo_speed_gpu.json
    python benchmarks/zoo_speed.py --workloads resnet,vit --dag-pick small,median --out benchmarks/results/zoo_speed_dag.json
    python benchmarks/zoo_speed.py --device cuda --workloads resnet,vit --dag-pick small,median --dag-vmap --out zoo_speed_dag_gpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import math
import os
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
from wsnets.zoo.build import _options  # noqa: E402
from wsnets.zoo.recipe import RunSpec, family_module, load_recipe, parse_recipe  # noqa: E402
from wsnets.zoo import cpu_kernels  # noqa: E402
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
                               batch_size=recipe.batch_size, bank=bank, device=dev, **_options(recipe, runs)))
        accs += cks[-1].metrics["test_acc"].tolist()
        n += len(runs)
    _sync(dev)
    return time.perf_counter() - t, time.process_time() - c, n, accs


def built(recipe, n_rec: int, every: int, workers: int, dev) -> tuple[float, float, int, list[float]]:
    """``wsnets zoo build`` itself (``workers`` processes, commits to a store in a temporary directory
    included) on every ``every``-th group of the plan (``--shard 0/every``); CPU time counts the workers."""
    import resource
    import tempfile
    from wsnets.zoo import build, open as open_zoo

    def cpu() -> float:
        return sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                   for f in ("ru_utime", "ru_stime"))
    with tempfile.TemporaryDirectory() as d:
        t, c = time.perf_counter(), cpu()
        s = build(recipe, Path(d) / "zoo", limit=n_rec, shard=f"0/{every}", device=str(dev), progress=False,
                  workers=workers)
        wall, cpu_s = time.perf_counter() - t, cpu() - c
        accs = [r["test_acc"] for r in open_zoo(Path(d) / "zoo").last_epoch()]
    return wall, cpu_s, s["models_built"], accs


def _is_family(r: RunSpec) -> bool:
    """A run of a ``wild-cnn`` or ``vit`` recipe, whose own class is :func:`family_module`'s."""
    return dict(r.fields).get("kind") in ("wild-cnn", "vit")


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
        if _is_family(r):  # the class it was drawn as
            model = family_module(r)
            model.load_state_dict({k: v[0] for k, v in p.items()}, strict=False)
            model = model.to(dev).train()
            assert r.hp["dropout"] == 0, "the family workloads have no dropout"
        else:
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


def vmap_loop(runs: list[RunSpec], recipe, bank, dev) -> tuple[float, float, int, list[float]]:
    """A naive ``torch.func`` reference: ``vmap(grad(loss))`` over the stacked parameters of all models,
    one SGD-with-momentum update per parameter tensor, random batches, test accuracy at the end.

    A residual CNN or transformer group runs through its family's own class (:func:`family_module`:
    ``WildCNN``, ``ViT``); BatchNorm there uses batch statistics only
    (``torch.func.replace_all_batch_norm_modules_``: running statistics are state ``vmap`` cannot update)."""
    from torch.func import functional_call, grad, replace_all_batch_norm_modules_, vmap
    arch = runs[0].arch
    K, B = len(runs), recipe.batch_size
    x, y, xt, yt = bank.x[0], bank.y[0], bank.xt[0], bank.yt[0]
    n = int(bank.n[0])
    steps = math.ceil(n / B)
    family = _is_family(runs[0])
    if family:
        base = replace_all_batch_norm_modules_(family_module(runs[0]).to(dev).train())
    else:
        base = WeightSpace(arch, {k: v[0] for k, v in init_params(arch, torch.zeros(1, dtype=torch.long, device=dev),
                                                                 torch.ones(1, device=dev)).items()}).to_module().to(dev)
    _sync(dev)
    t, c = time.perf_counter(), time.process_time()
    p = init_params(arch, torch.tensor([r.seed for r in runs], device=dev), torch.ones(K, device=dev))
    if family:  # the checkpoint's keys are the class's (see family_module); buffers stay the module's
        names = dict(base.named_parameters())
        p = {k: v for k, v in p.items() if k in names}
        missing = set(names) - set(p)
        assert not missing, f"parameters without an initial value: {sorted(missing)}"
    else:
        p = dict(zip(base.state_dict().keys(), p.values()))  # module keys, in the architecture's order
    buf = {k: torch.zeros_like(v) for k, v in p.items()}
    lr = torch.tensor([r.hp["lr"] for r in runs], device=dev)
    g_fn = vmap(grad(lambda q, xb, yb: F.cross_entropy(functional_call(base, q, (xb,)), yb)))
    gen = torch.Generator(device=dev).manual_seed(0)
    for _ in range(recipe.epochs):
        order = torch.rand(K, n, generator=gen, device=dev).argsort(1)
        for s in range(steps):
            idx = order[:, (s * B) % n:(s * B) % n + B]
            grads = g_fn(p, x[idx], y[idx])
            for k in p:
                buf[k].mul_(0.9).add_(grads[k])
                p[k].sub_(lr.view((-1,) + (1,) * (p[k].dim() - 1)) * buf[k])
    with torch.no_grad():
        accs = (vmap(lambda q: functional_call(base, q, (xt,)))(p).argmax(-1) == yt).float().mean(1).tolist()
    _sync(dev)
    return time.perf_counter() - t, time.process_time() - c, K, accs


def _macs(arch) -> int:
    """Multiply-adds of one forward pass of one sample through the convolutions, linear layers and attention."""
    m = 0
    for l, s in zip(arch.layers, arch.shapes):
        if l.kind in ("conv1d", "conv2d"):
            m += math.prod(s[2:]) * l.in_features * l.out_features * l.kernel_numel
        elif l.kind == "linear":
            m += math.prod(s[1:-1]) * l.in_features * l.out_features
        elif l.kind == "mha":
            m += s[1] * 4 * l.out_features ** 2 + 2 * s[1] ** 2 * l.out_features
    return m


def _flop_rates(row: dict, arch, recipe, bank) -> dict:
    """Arithmetic rate of both methods on a DAG group: floating-point operations of one model's training
    (2 x multiply-adds x 3 per training sample: forward, and backward at about twice the forward) and
    checkpoint evaluations (forward on the train and test sets), per second of process CPU time."""
    n, n_test = int(bank.n[0]), len(bank.yt[0])
    samples = recipe.epochs * math.ceil(n / recipe.batch_size) * recipe.batch_size
    flops = 2 * _macs(arch) * (3 * samples + len(recipe.checkpoints) * (n + n_test))
    return {"flops_per_model": flops,
            "batched_gflops_per_cpu_s": flops * row["batched_models"] / row["batched_cpu_seconds"] / 1e9,
            "sequential_gflops_per_cpu_s": flops * row["sequential_models"] / row["sequential_cpu_seconds"] / 1e9}


def _sgemm_gflops(dev) -> float:
    """What one float32 1024x1024 matrix product reaches at the run's thread count (GFLOP/s of process CPU
    time on CPU, of wall time on a GPU): the ceiling the arithmetic rates above compare with."""
    a = torch.randn(1024, 1024, device=dev)
    a @ a
    _sync(dev)
    t, c, reps = time.perf_counter(), time.process_time(), 20
    for _ in range(reps):
        a @ a
    _sync(dev)
    spent = time.perf_counter() - t if dev.type == "cuda" else time.process_time() - c
    return 2 * 1024 ** 3 * reps / spent / 1e9


@contextlib.contextmanager
def _matmul_precision(p: str):
    """``torch.set_float32_matmul_precision(p)`` inside, the previous setting restored after."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(p)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)


def _repeated(name: str, pairs: list[tuple[tuple, tuple]]) -> dict:
    """One result row from ``repeat`` (batched, sequential) timings taken in turn: medians of the rates
    and of the per-repeat speedups, the speedups' range, and every repeat."""
    reps = [_compare(name, b, s) for b, s in pairs]
    med = lambda k: float(torch.tensor([r[k] for r in reps]).median())  # noqa: E731 - lower median
    out = dict(reps[0])
    out.update({k: med(k) for k in ("batched_models_per_s", "sequential_models_per_s", "speedup", "speedup_cpu_time")})
    out["speedup_range"] = [min(r["speedup"] for r in reps), max(r["speedup"] for r in reps)]
    out["repeats"] = reps
    return out


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
    ap.add_argument("--quick", action="store_true", help="small sizes (a few minutes on a shared 2-core CPU)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (both methods)")
    ap.add_argument("--workers", default="0",
                    help="also time 'wsnets zoo build' of the recipe with this many processes (CPU; 'auto': one per "
                         "core; 0: skip)")
    ap.add_argument("--recipe-models", type=int, default=None, help="population the recipe is planned at (default: its own)")
    ap.add_argument("--recipe-every", type=int, default=None, help="train every N-th group of the plan (default 6 with --quick, else 1)")
    ap.add_argument("--mlp-models", type=int, default=None, help="K for the fixed 64-32-32-10 MLP workload")
    ap.add_argument("--seq-models", type=int, default=None, help="models timed in the sequential loop (per workload)")
    ap.add_argument("--vmap-models", type=int, default=None,
                    help="K of the torch.func.vmap reference on the MLP workload (0: skip); the resnet/vit groups "
                         "get it with --dag-vmap")
    ap.add_argument("--dag-vmap", action="store_true",
                    help="also time the naive torch.func.vmap loop on each resnet/vit group (all its models)")
    ap.add_argument("--repeat", type=int, default=None,
                    help="time each workload this many times, interleaved, and report median speedups (default 3, 1 with --quick)")
    ap.add_argument("--workloads", default="recipe,mlp",
                    help="comma-separated: recipe, mlp, resnet (a residual group of zoo/digits-wild.toml), "
                         "vit (a transformer group of zoo/digits-vit.toml)")
    ap.add_argument("--dag-pick", default="median", help="which resnet/vit group(s): median, small (comma-separated)")
    ap.add_argument("--dag-population", type=int, default=None,
                    help="plan the resnet/vit recipes at this many models (default: their own population); the "
                         "architecture pool stays, so each group holds proportionally more models (a larger K)")
    ap.add_argument("--out", required=True, help="JSON file to write")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from wsnets.zoo.build import _cores
    a.workers = _cores() if a.workers == "auto" else int(a.workers)
    dev = torch.device(a.device)
    recipe = load_recipe(a.recipe)
    n_rec = a.recipe_models or recipe.population
    every = a.recipe_every or (6 if a.quick else 1)
    n_mlp = a.mlp_models or (512 if a.quick else 4096)
    n_seq = a.seq_models or (8 if a.quick else 48)
    repeat = a.repeat or (1 if a.quick else 3)
    n_vmap = a.vmap_models if a.vmap_models is not None else min(n_mlp, 256 if dev.type == "cpu" else n_mlp)
    bank = DataBank.build(recipe.datasets, dev)
    # torch.optim imports torch._dynamo on its first step (~1 s): import it before timing, or the sequential
    # loop's first model pays for it (it made the recipe's loop look 20% slower than it is)
    importlib.import_module("torch._dynamo")
    load0 = os.getloadavg()
    results = []

    work = set(a.workloads.split(","))
    bad = work - {"recipe", "mlp", "resnet", "vit"}
    if bad:
        ap.error(f"--workloads: unknown {sorted(bad)}")
    full = plan(recipe, n_rec)
    groups = [(g.arch, list(g.runs)) for g in full[::every]]
    # the fixed-MLP workload's models (timed below)
    raw = {"name": "mlp64", "seed": 0, "population": n_mlp, "datasets": ["digits"], "epochs": 10, "checkpoints": [10],
           "batch_size": 64, "group_size": n_mlp,
           "architecture": {"kind": "mlp", "depth": 2, "width": 32, "activation": "relu"},
           "hyperparameters": {"optimizer": "sgd", "lr": {"log_uniform": [0.01, 0.2]}, "momentum": 0.9}}
    mr = parse_recipe(raw)
    runs = mr.runs()
    mbank = bank if recipe.datasets == ["digits"] else DataBank.build(["digits"], dev)
    warmup = {}
    if dev.type == "cuda" and work & {"recipe", "mlp"}:  # outside the timings: CUDA libraries' first calls, Triton's compilation of the
        # fused kernel (once per configuration and machine, then cached on disk), in both precisions
        from wsnets.zoo import fused
        for p in ("highest", "high"):
            with _matmul_precision(p):
                t = time.perf_counter()
                list(train_group(runs[0].arch, runs[:fused.MIN_MODELS], epochs=1, checkpoints=[1], batch_size=64,
                                 bank=mbank, device=dev))
                warmup[f"mlp_{p}_s"] = time.perf_counter() - t
        t = time.perf_counter()
        batched(groups[:1], recipe, bank, dev)
        warmup["recipe_first_group_s"] = time.perf_counter() - t
    # workload 1: every `every`-th group of the recipe planned at its real size
    all_runs = sorted((r for _, rs in groups for r in rs), key=lambda r: r.index)
    seq_runs = all_runs[:: max(1, len(all_runs) // n_seq)][:n_seq]
    sizes = sorted(len(rs) for _, rs in groups)
    rec, bld = [], []
    for _ in range(repeat if "recipe" in work else 0):
        rec.append((batched(groups, recipe, bank, dev), rseq := sequential(seq_runs, recipe, bank, dev)))
        if a.workers:
            bld.append((built(recipe, n_rec, every, a.workers, dev), rseq))
    if rec:
        results.append(_repeated(f"{recipe.name} recipe planned at {n_rec} models: {len(all_runs)} models in {len(groups)} "
                                 f"of {len(full)} groups (sizes {sizes[0]}-{sizes[-1]}), {recipe.epochs} epochs, batch "
                                 f"{recipe.batch_size}", rec))
    if bld:
        results.append(_repeated(f"same {len(all_runs)} models through `wsnets zoo build` with {a.workers} worker process(es) "
                                 f"(1 thread each; store writes included; sequential loop as above)", bld))

    # workload 2: fixed MLP 64-32-32-10, SGD, 10 epochs on digits
    mlp, vm, tf32 = [], [], []
    for _ in range(repeat if "mlp" in work else 0):
        seq = sequential(runs[:n_seq], mr, mbank, dev)
        mlp.append((batched([(runs[0].arch, runs)], mr, mbank, dev), seq))
        if dev.type == "cuda":  # the same with TF32 matrix products allowed (the fused kernel's tensor-core path)
            with _matmul_precision("high"):
                tf32.append((batched([(runs[0].arch, runs)], mr, mbank, dev), seq))
        if n_vmap:
            vm.append((vmap_loop(runs[:n_vmap], mr, mbank, dev), seq))
    if mlp:
        results.append(_repeated(f"MLP 64-32-32-10, 10 epochs on digits, batch 64 (K={n_mlp})", mlp))
    if tf32:
        results.append(_repeated("same, TF32 matrix products (torch.set_float32_matmul_precision('high'); "
                                 "sequential loop in float32 as above)", tf32))
    if vm:
        results.append(_repeated(f"naive torch.func.vmap loop, same MLP (K={n_vmap})", vm))

    # workloads 3 and 4: a residual CNN group and a transformer group of the heterogeneous recipes
    for fam, path, want in (("resnet", "zoo/digits-wild.toml", "resnet"), ("vit", "zoo/digits-vit.toml", "transformer")):
        if fam not in work:
            continue
        fr = load_recipe(path)
        if a.dag_population:
            fr = dataclasses.replace(fr, population=a.dag_population)
        fbank = DataBank.build(fr.datasets, dev)
        cands = sorted((g for g in plan(fr) if g.arch.describe().startswith(want)),
                       key=lambda g: (_macs(g.arch), g.runs[0].index))
        for pick in a.dag_pick.split(","):
            g = cands[0] if pick == "small" else cands[len(cands) // 2]
            runs = list(g.runs)
            seq_n = min(len(runs), a.seq_models or (4 if a.quick else 8))
            reps, vreps = [], []
            for _ in range(repeat):
                reps.append((batched([(g.arch, runs)], fr, fbank, dev), sequential(runs[:seq_n], fr, fbank, dev)))
                if a.dag_vmap:
                    vreps.append((reps[-1][0], vmap_loop(runs, fr, fbank, dev)))
            desc = ", ".join(f"{k}={v}" for k, v in dict(runs[0].fields).items() if k != "kind")
            row = _repeated(f"{fr.name}: {pick} {want} group ({desc}; {g.arch.num_params} params, "
                                     f"{_macs(g.arch) / 1e3:.0f}k MACs/sample), K={len(runs)}, {fr.epochs} epochs, "
                                     f"batch {fr.batch_size}; sequential {seq_n} models", reps)
            results.append({**row, **_flop_rates(row, g.arch, fr, fbank)})
            if vreps:  # the engine's repeats against the vmap loop's ("sequential" columns: the vmap loop)
                results.append(_repeated(f"same {pick} {want} group, batched engine vs a naive torch.func.vmap loop "
                                         f"over its K={len(runs)} models (in this row the sequential columns are the "
                                         f"vmap loop: SGD with momentum, no checkpoint evaluations)", vreps))

    env = {"device": str(dev), "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
           "threads": a.threads, "repeat": repeat, "torch": torch.__version__, "python": platform.python_version(),
           "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "quick": a.quick,
           "load_average_before": [round(v, 2) for v in load0],
           "load_average_after": [round(v, 2) for v in os.getloadavg()], "warmup": warmup,
           "cpu_loops": cpu_kernels.status() if dev.type == "cpu" else None,
           "sgemm_gflops": _sgemm_gflops(dev),
           "note": "timed on a shared machine; ratios are from the same run"}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.out, {"env": env, "results": results})
    print(f"device {env['device']}{' (' + env['gpu'] + ')' if env['gpu'] else ''}, {a.threads} torch thread(s) for both "
          f"methods, {env['cores']} cores, load average {load0[0]:.2f} before / {os.getloadavg()[0]:.2f} after; "
          f"medians of {repeat} interleaved repeat(s)"
          + (f"; batched trainer's fused CPU loops: {env['cpu_loops']}" if env["cpu_loops"] else "") + "\n")
    print("| workload | batched models/s | sequential models/s | speedup (wall) | speedup range | speedup (CPU time) "
          "| median test acc (batched / seq) |")
    print("|---|---:|---:|---:|---|---:|---|")
    for r in results:
        lo, hi = r["speedup_range"]
        print(f"| {r['workload']} | {r['batched_models_per_s']:.2f} | {r['sequential_models_per_s']:.3f} | "
              f"{r['speedup']:.1f}x | {lo:.1f}-{hi:.1f}x | {r['speedup_cpu_time']:.1f}x | "
              f"{r['batched_median_test_acc']:.3f} / {r['sequential_median_test_acc']:.3f} |")
    rates = [r for r in results if "flops_per_model" in r]
    if rates:
        print(f"\narithmetic rate, GFLOP/s of process CPU time (a 1024x1024 float32 matrix product: "
              f"{env['sgemm_gflops']:.1f}):\n\n| workload | GFLOP per model | sequential | batched |\n|---|---:|---:|---:|")
        for r in rates:
            print(f"| {r['workload'].split(' (')[0]} | {r['flops_per_model'] / 1e9:.1f} | "
                  f"{r['sequential_gflops_per_cpu_s']:.1f} | {r['batched_gflops_per_cpu_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
