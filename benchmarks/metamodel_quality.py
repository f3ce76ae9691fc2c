"""Meta-model quality side by side: Kendall τ of predicted test accuracy and generalization gap.

Every method trains on the same zoo split (``data.split_seed``), ``--seeds`` seeds each, and reports
mean ± std of the test-split metrics; one JSON file (``--out``) and a Markdown table on stdout.

    python benchmarks/metamodel_quality.py --zoo zoos/digits-mlp --seeds 3 --out bench/quality.json
    python benchmarks/metamodel_quality.py --zoo zoos/digits-mlp --quick          # minutes, 1 seed
    python benchmarks/metamodel_quality.py --zoo zoos/regions --targets dataset,task
    python benchmarks/metamodel_quality.py --zoo zoos/digits-mlp --ood 'width:<=:32'   # OOD: wider test

Fixed-architecture methods (np, hnp, nfn-hnp, flatmlp) need one architecture: use the one-architecture
zoo ``zoo/digits-mlp-fixed.toml`` (MLP 64-32-32-10), or pass ``--filter width=32 --filter depth=2``
(applied to every method, so the split stays the same).

Results of separate invocations (e.g. the graph encoder run in parallel with the baselines, or more
seeds of one method) merge into one table; the seeds of a method present in several files are pooled:

    python benchmarks/metamodel_quality.py --merge base.json graph.json graph-seeds12.json --out all.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ["graph", "transformer", "np", "hnp", "nfn-hnp", "statnn-gbm", "statnn-mlp", "flatmlp", "esd"]
LABELS = {"graph": "neural-graph encoder (PNA)", "transformer": "neural-graph transformer", "np": "NP (wsnets)",
          "hnp": "HNP (wsnets)", "nfn-hnp": "HNP (nfn package)", "statnn-gbm": "StatNN (GBM)",
          "statnn-mlp": "StatNN (MLP)", "flatmlp": "FlatMLP", "esd": "ESD features (linear)",
          "esd-gbm": "ESD features (GBM)"}


def _value(text: str):
    import tomllib
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _takes(encoder: dict, override: str) -> bool:
    """Whether ``encoder.KEY=VALUE`` applies to an encoder config (see the call site)."""
    key, text = override.split("=", 1)
    key = key[len("encoder."):]
    if key in encoder:
        return type(_value(text)) is type(encoder[key])
    import inspect
    from wsnets.nn.registry import ENCODERS
    cls = ENCODERS.get(encoder.get("name"))
    return cls is not None and key in inspect.signature(cls.__init__).parameters


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", default=None, help="zoo directory (required unless --merge)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated names of train/*.toml")
    p.add_argument("--targets", default="test_acc,gen_gap")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="1 seed, few epochs, small encoders")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE", help="zoo row filter (all methods)")
    p.add_argument("--ood", default=None, metavar="KEY:OP:VALUE", help="e.g. 'width:<=:32': train/val in-distribution, test the rest")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for all methods (encoder.X only where the encoder has option X)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: no oversubscription on shared cores)")
    p.add_argument("--out", default=None, help="JSON results file")
    p.add_argument("--runs", default=None, help="keep run directories here (default: a temporary directory)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON", help="merge result files of earlier runs")
    a = p.parse_args(argv)
    if a.merge:
        results = merge([json.loads(Path(f).read_text()) for f in a.merge])
        if a.out:
            from wsnets.io import atomic_write_json
            atomic_write_json(a.out, results)
        print(table(results))
        return 0
    if not a.zoo:
        p.error("--zoo is required (unless --merge)")

    import torch
    torch.set_num_threads(a.threads)
    from wsnets.errors import WSNetsError
    from wsnets.io import atomic_write_json
    from wsnets.train.config import load_config
    from wsnets.train.experiment import run_training

    targets = [t for t in a.targets.split(",") if t]
    seeds = 1 if a.quick else a.seeds
    common = [f"data.targets={json.dumps(targets)}", "log.progress=false"]
    if a.filter:
        common.append("data.filter={" + ", ".join(f"{k} = {json.dumps(_value(v))}" for k, v in
                                                   (f.split("=", 1) for f in a.filter)) + "}")
    if a.ood:
        k, op, v = a.ood.split(":", 2)
        common.append(f"data.ood={{{k} = [{json.dumps(op)}, {json.dumps(_value(v))}]}}")
    if a.quick:
        common += ["optim.epochs=8", "optim.patience=4"]
    if a.epochs:
        common.append(f"optim.epochs={a.epochs}")
    common += a.set
    runs = Path(a.runs) if a.runs else Path(tempfile.mkdtemp(prefix="wsnets-quality-"))
    results: dict = {"zoo": a.zoo, "targets": targets, "seeds": seeds, "quick": a.quick, "filter": a.filter,
                     "ood": a.ood, "overrides": common, "methods": {}}
    for m in [x for x in a.methods.split(",") if x]:
        cfg_path = ROOT / "train" / f"{m}.toml"
        t0 = time.perf_counter()
        try:
            base = load_config(cfg_path)
            # encoder.* overrides only where the method's encoder has that option: in its config with a value of
            # the same type (GBMs have no 'hidden'; FlatMLP's is a list), or as an argument of its class
            # (e.g. the graph encoders' edge_dim = 25 for 5x5 kernels)
            ovr = [o for o in common if not o.startswith("encoder.") or _takes(base.encoder, o)]
            cfg = load_config(cfg_path, ovr)
            res = run_training(cfg, zoo=a.zoo, out=runs / m, seeds=seeds, device=a.device, plots=not a.quick,
                               overwrite=True)
        except WSNetsError as e:
            print(f"{m}: skipped: {e}", file=sys.stderr)
            results["methods"][m] = {"error": str(e)}
            continue
        results["methods"][m] = {"test": res["test"], "sizes": res["sizes"], "wall_s": time.perf_counter() - t0,
                                 "run": str(runs / m), "config": res["config"],
                                 "per_seed": [{"seed": x["seed"], "test": x["test"]} for x in res["seeds"]]}
        print(f"{m}: done in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        if a.out:   # after every method, so a long run interrupted later keeps what it measured
            atomic_write_json(a.out, results)
    if a.out:
        atomic_write_json(a.out, results)

    print(table(results))
    return 0


def table(results: dict) -> str:
    """The Markdown table (with a title line) of a results dict of :func:`main` or :func:`merge`."""
    from wsnets.train.metrics import fmt
    targets, seeds = results["targets"], results["seeds"]
    reg = [t for t in targets if t not in ("dataset", "task")]
    cls = [t for t in targets if t in ("dataset", "task")]
    head = ["method"] + [f"τ {t}" for t in reg] + [f"R² {t}" for t in reg] + [f"acc {t}" for t in cls] + \
        ["checkpoints (train/val/test)", "time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, r in results["methods"].items():
        if "error" in r:
            lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(["n/a"] * (len(head) - 2)) + f" | {r['error'][:60]} |")
            continue
        t = r["test"]
        cells = [fmt(t[x]["kendall_tau"]) for x in reg] + [fmt(t[x]["r2"]) for x in reg] + \
                [fmt(t[x]["accuracy"]) for x in cls]
        s = r["sizes"]
        lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) +
                     f" | {s['train']}/{s['val']}/{s['test']} | {r['wall_s']:.0f} |")
    title = (f"Meta-model quality on {results['zoo']} (test split, mean ± std over {seeds} seed(s)"
             f"{', quick' if results.get('quick') else ''}{', OOD ' + results['ood'] if results.get('ood') else ''}):")
    return f"\n{title}\n\n" + "\n".join(lines)


def _per_seed(r: dict) -> list[dict]:
    if "per_seed" in r:
        return r["per_seed"]
    metrics = json.loads((Path(r["run"]) / "metrics.json").read_text())   # files written before per_seed existed
    return [{"seed": x["seed"], "test": x["test"]} for x in metrics["seeds"]]


def merge(parts: list[dict]) -> dict:
    """One results dict from several: same zoo, targets, filter and OOD split required; a method found in
    several parts gets their seeds pooled (a seed found twice is an error), mean ± std recomputed."""
    from wsnets.train.metrics import aggregate
    keys = ("zoo", "targets", "filter", "ood")
    for p in parts[1:]:
        for k in keys:
            if p.get(k) != parts[0].get(k):
                raise SystemExit(f"--merge: the files differ in {k!r}: {parts[0].get(k)!r} vs {p.get(k)!r}")
    out = {**{k: parts[0].get(k) for k in keys}, "quick": any(p.get("quick") for p in parts),
           "overrides": [p.get("overrides") for p in parts], "methods": {}}
    for p in parts:
        for m, r in p["methods"].items():
            if "error" in r:
                out["methods"].setdefault(m, r)
                continue
            prev = out["methods"].get(m)
            if prev is None or "error" in prev:
                out["methods"][m] = {**r, "per_seed": list(_per_seed(r)), "runs": [r.get("run")]}
                continue
            if prev["sizes"] != r["sizes"]:
                raise SystemExit(f"--merge: {m} has split sizes {prev['sizes']} and {r['sizes']}")
            seen = {x["seed"] for x in prev["per_seed"]}
            new = _per_seed(r)
            if seen & {x["seed"] for x in new}:
                raise SystemExit(f"--merge: {m} has seed(s) {sorted(seen & {x['seed'] for x in new})} twice")
            prev["per_seed"] += new
            prev["wall_s"] += r["wall_s"]
            prev["runs"].append(r.get("run"))
    for r in out["methods"].values():
        if "per_seed" in r:
            r["per_seed"].sort(key=lambda x: x["seed"])
            r["test"] = aggregate([x["test"] for x in r["per_seed"]])
    counts = {len(r["per_seed"]) for r in out["methods"].values() if "per_seed" in r}
    out["seeds"] = counts.pop() if len(counts) == 1 else "/".join(map(str, sorted(counts)))
    return out


if __name__ == "__main__":
    sys.exit(main())
