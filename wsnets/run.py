"""The main job: ``wsnets run [RECIPE]``.

1. Builds the default zoo (``zoo/digits-mlp.toml``) and the region zoo (``zoo/regions.toml``) into the
   cache (``~/.cache/wsnets/zoos`` or ``--cache``) unless they are there already; a killed build resumes.
2. Trains the neural-graph encoder and the baselines on one split by model: StatNN (weight statistics
   with gradient-boosted trees and with an MLP; Unterthiner et al. 2020), FlatMLP (flat weights; a
   fixed-architecture encoder, so trained and tested on the zoo's most common architecture only), ESD
   features (Martin & Mahoney) with a linear head, and mean ESD alpha alone as a zero-training ranker.
   Every method reads the last checkpoint of each model; a method that cannot train is reported, not fatal.
3. On the region zoo (one architecture), trains the graph encoder (with its readout standardized:
   ``encoder.readout_norm``) and StatNN-GBM to predict the fine-tuning dataset and task (Gueta et
   al. 2023); ``--region-methods`` adds others (``hnp`` reaches the same accuracy, slower on a CPU).
4. Prints one table (Kendall tau / R^2 for test accuracy and generalization gap, dataset/task accuracy,
   time per method) and writes ``report/`` with ``results.md``, ``results.json`` and plots.

Recipes and configs are those shipped with wsnets (the repository's ``zoo/`` and ``train/``, copied into
an installed wheel; see :mod:`wsnets.resources`) or paths given on the command line.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from .errors import WSNetsError

REGRESSION = ("test_acc", "gen_gap")
DEFAULT_METHODS = ("graph", "statnn-gbm", "statnn-mlp", "flatmlp", "esd", "esd-alpha")
REGION_METHODS = ("graph", "statnn-gbm")
# Sizes for the main job's 10-minute budget on 2 CPU cores (``--full-configs`` uses train/*.toml as written).
# Every method sees the same rows: the last checkpoint of each model, split by model.
MAIN_OVERRIDES: dict[str, list[str]] = {
    "graph": ["encoder.hidden=16", "encoder.layers=2", "optim.epochs=15", "optim.patience=5", "optim.lr=0.003"],
    "transformer": ["optim.epochs=15", "optim.patience=5"],
    "statnn-mlp": ["optim.epochs=60", "optim.patience=10"],
    "flatmlp": ["optim.epochs=40", "optim.patience=8"],
    "esd": ["optim.epochs=60", "optim.patience=10"],
    "hnp": ["optim.epochs=25", "optim.patience=8"],
}
# The region zoo is smaller (fewer steps per epoch) and its networks share one architecture, differing
# by under 1% of the graph readout's norm (train/graph.toml standardizes the readout: readout_norm).
REGION_OVERRIDES: dict[str, list[str]] = {
    "graph": ["optim.epochs=25", "optim.patience=8"],
}
# encoders that read one architecture's weights: trained and tested on the zoo's most common architecture
FIXED_ARCH = ("flatmlp", "np", "hnp", "nfn-hnp")
LABELS = {"graph": "Neural-graph encoder (PNA)", "transformer": "Neural-graph transformer",
          "statnn-gbm": "StatNN (GBM)", "statnn-mlp": "StatNN (MLP)", "flatmlp": "FlatMLP",
          "esd": "ESD features (linear)", "esd-gbm": "ESD features (GBM)", "esd-alpha": "ESD mean α (no training)",
          "np": "NP (equivariant)", "hnp": "HNP (equivariant)"}


def resource(kind: str, name: str) -> Path:
    """A recipe (``kind="zoo"``) or config (``kind="train"``) by path or by name (see :mod:`wsnets.resources`)."""
    from .resources import find
    return find({"zoo": "recipe", "train": "config"}[kind], name)


def default_cache() -> Path:
    from .io import cache_dir
    return cache_dir("zoos")


def ensure_zoo(recipe_name: str, cache: Path, device: str, progress: bool = True, limit: int | None = None) -> Path:
    """Build (or resume, or reuse) a zoo in the cache; returns its directory."""
    from .zoo import build, load_recipe
    recipe = load_recipe(resource("zoo", recipe_name))
    from .zoo.trainer import TRAINER_VERSION
    out = cache / (f"{recipe.name}-{recipe.digest[:10]}-t{TRAINER_VERSION}" + (f"-limit{limit}" if limit else ""))
    build(recipe, out, device=device, progress=progress, limit=limit)
    return out


def _train(method: str, zoo: Path, out: Path, targets: list[str], *, seeds: int, device: str, epochs: int | None,
           progress: bool, full_configs: bool = False, region: bool = False) -> dict:
    from collections import Counter

    from .train.config import apply_overrides, load_config
    from .train.experiment import run_training
    from .zoo import open as open_zoo
    cfg = load_config(resource("train", method))
    z = open_zoo(zoo)
    last = z.epochs[-1]
    where = f"epoch = {last}"
    arch = None
    if method in FIXED_ARCH:
        arch = Counter(z.column("arch_desc")).most_common(1)[0][0]
        where += f', arch_desc = "{arch}"'
    sets = [f"data.targets={targets!r}".replace("'", '"'), f"log.progress={'true' if progress else 'false'}",
            f"data.filter={{{where}}}"]
    if not full_configs:
        sets += MAIN_OVERRIDES.get(method, [])
    if region:
        sets += REGION_OVERRIDES.get(method, [])
    if epochs is not None:
        sets += [f"optim.epochs={epochs}", f"optim.patience={max(3, epochs // 3)}"]
    cfg = apply_overrides(cfg, sets)
    res = run_training(cfg, zoo=zoo, out=out, seeds=seeds, device=device, overwrite=True)  # (report/ checked by run)
    if arch:
        res["only_architecture"] = arch
    return res


def alpha_ranker(zoo: Path, split_seed: int = 0, filter: dict | None = None) -> dict:  # noqa: A002
    """Mean ESD alpha of each network as a predictor, with no training: Kendall tau on the test split;
    R^2 of a 1-D linear fit of the target on alpha made on the training split."""
    from .train.metrics import mean_std, regression_metrics
    from .zoo import ZooDataset
    out: dict[str, Any] = {"test": {}, "alpha": {}, "slope": {}}
    sets = {s: ZooDataset(zoo, "esd", targets=list(REGRESSION), split=s, split_seed=split_seed, filter=filter)
            for s in ("train", "test")}
    alphas, ys = {}, {}
    for s, ds in sets.items():
        alphas[s] = mean_alpha(ds.weightspaces())
        ys[s] = {t: torch.tensor([ds.target(r, t) for r in ds.rows], dtype=torch.float64) for t in REGRESSION}
    ok = {s: torch.isfinite(a) for s, a in alphas.items()}
    for t in REGRESSION:
        a, y = alphas["train"][ok["train"]], ys["train"][t][ok["train"]]
        A = torch.stack([a, torch.ones_like(a)], 1)
        coef = torch.linalg.lstsq(A, y.unsqueeze(1)).solution.squeeze(1)
        at, yt = alphas["test"][ok["test"]], ys["test"][t][ok["test"]]
        pred = coef[0] * at + coef[1]
        out["test"][t] = {k: mean_std([v]) for k, v in regression_metrics(pred, yt).items()}
        out["test"][t]["kendall_tau_raw_alpha"] = mean_std([regression_metrics(at, yt)["kendall_tau"]])
        out["slope"][t] = float(coef[0])  # the table's τ is that of the line: sign(slope) x τ(α, target)
    out["alpha"] = {"test_alpha": alphas["test"].tolist(), "test_acc": ys["test"]["test_acc"].tolist(),
                    "gen_gap": ys["test"]["gen_gap"].tolist(), "valid": int(ok["test"].sum())}
    return out


def mean_alpha(networks: list) -> torch.Tensor:
    """Mean power-law alpha over layers with a valid fit, per network (NaN if none); batched per architecture."""
    from .esd import esd_feature_names, esd_features
    from .weights import stack
    res = torch.full((len(networks),), float("nan"), dtype=torch.float64)
    groups: dict[Any, list[int]] = {}
    for i, w in enumerate(networks):
        groups.setdefault(w.arch, []).append(i)
    for arch, idx in groups.items():
        f = esd_features(stack([networks[i] for i in idx]), fill=None)
        res[torch.tensor(idx)] = f[:, esd_feature_names(arch).index("model.mean_alpha")].double()
    return res


def run(recipe: str = "digits-mlp", *, regions: str | None = "regions", cache: str | Path | None = None,
        out: str | Path = "report", device: str = "cpu", seeds: int = 1, methods: tuple[str, ...] = DEFAULT_METHODS,
        epochs: int | None = None, limit: int | None = None, progress: bool = True, full_configs: bool = False,
        threads: int | None = 1, region_methods: tuple[str, ...] = REGION_METHODS, overwrite: bool = False) -> dict:
    """Run the main job (see module docstring); returns what ``report/results.json`` holds.

    ``threads`` sets torch's CPU threads for the whole job (default 1: the zoo trainer's and the
    encoders' many small ops lose more to thread synchronization than they gain, and on a busy
    machine oversubscribed threads slow them down by an order of magnitude); None keeps torch's.
    An ``out`` holding the report of an earlier run is refused unless ``overwrite``.
    """
    if threads:
        torch.set_num_threads(threads)
    from .memory import tame_allocator
    tame_allocator()  # else glibc keeps freed batch tensors' memory and the job grows every epoch (wsnets.memory)
    from .report import write_report
    for m in methods + region_methods:
        if m != "esd-alpha":
            resource("train", m)  # fail fast on a typo, before minutes of zoo building
    cache = Path(cache) if cache else default_cache()
    out = Path(out)
    if (out / "results.json").exists() and not overwrite:
        from .errors import OutputExistsError
        raise OutputExistsError(f"{out} holds the report of an earlier run (results.json): pass --overwrite to "
                                "replace it, or --out another folder")
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    t = time.perf_counter()
    zoo = ensure_zoo(recipe, cache, device, progress, limit)
    timings["zoo:" + recipe] = time.perf_counter() - t
    from .zoo import open as open_zoo
    results: dict[str, Any] = {"recipe": recipe, "zoo": str(zoo), "methods": {}, "regions": {}, "timings": timings,
                               "filter": {"epoch": open_zoo(zoo).epochs[-1]}}
    for m in methods:
        t = time.perf_counter()
        try:
            if m == "esd-alpha":
                results["methods"][m] = alpha_ranker(zoo, filter=results["filter"])
            else:
                results["methods"][m] = _train(m, zoo, out / "runs" / m, list(REGRESSION), seeds=seeds, device=device,
                                               epochs=epochs, progress=progress, full_configs=full_configs)
        except WSNetsError as e:  # one method's failure (e.g. too few models of one architecture) is reported
            results["methods"][m] = {"test": {}, "error": str(e)}
        timings[m] = time.perf_counter() - t
    if regions:
        t = time.perf_counter()
        rzoo = ensure_zoo(regions, cache, device, progress, limit)
        timings["zoo:" + regions] = time.perf_counter() - t
        results["regions_zoo"] = str(rzoo)
        for m in region_methods:
            t = time.perf_counter()
            try:
                results["regions"][m] = _train(m, rzoo, out / "runs" / f"regions-{m}", ["dataset", "task"],
                                               seeds=seeds, device=device, epochs=epochs, progress=progress,
                                               full_configs=full_configs, region=True)
            except WSNetsError as e:
                results["regions"][m] = {"test": {}, "error": str(e)}
            timings["regions:" + m] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    write_report(results, out)
    return results


def _run(args: argparse.Namespace) -> int:
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    region_methods = tuple(m.strip() for m in args.region_methods.split(",") if m.strip())
    res = run(args.recipe, regions=None if args.no_regions else args.regions, cache=args.cache, out=args.out,
              device=args.device, seeds=args.seeds, methods=methods, epochs=args.epochs, limit=args.limit, progress=not args.json,
              full_configs=args.full_configs, threads=args.threads or None,
              region_methods=region_methods, overwrite=args.overwrite)
    from .cli import emit
    from .report import results_table
    emit(args, res, lambda: results_table(res) + f"\n\nreport written to {args.out}/ "
         f"(results.md, results.json, plots); total {res['timings']['total']:.0f} s")
    return 0


def register(sub) -> None:
    from .cli import add_common, add_parser
    p = add_parser(sub, "run", "the main job: build the default zoo, train meta-models and baselines, write report/",
                   "wsnets run                       # digits-mlp + regions, ~10 min on 2 CPU cores", _run)
    p.add_argument("recipe", nargs="?", default="digits-mlp", help="zoo recipe name in zoo/ or a .toml path")
    p.add_argument("--regions", default="regions", help="fine-tuning zoo recipe for dataset/task prediction")
    p.add_argument("--no-regions", action="store_true", help="skip the region zoo")
    p.add_argument("--cache", default=None, help="zoo cache directory (default ~/.cache/wsnets/zoos)")
    p.add_argument("--out", default="report", help="report directory")
    p.add_argument("--overwrite", action="store_true", help="replace the report of an earlier run in --out")
    p.add_argument("--seeds", type=int, default=1, help="seeds per method (mean ± std reported)")
    p.add_argument("--epochs", type=int, default=None, help="override training epochs of every neural method")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--full-configs", action="store_true",
                   help="train with train/*.toml as written (bigger encoders, more epochs) instead of the 10-minute sizes")
    p.add_argument("--limit", type=int, default=None, help="train only the first N models of each zoo (a quick look)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma-separated train/*.toml names, plus esd-alpha")
    p.add_argument("--region-methods", default=",".join(REGION_METHODS),
                   help="comma-separated train/*.toml names trained on the region zoo")
    add_common(p)
