"""Meta-models on the heterogeneous zoos (issue 20): digits-wild, digits-vit and the fine-tuning zoo.

Runs :mod:`benchmarks.metamodel_quality` once per (zoo, split, method), each into its own JSON file
under ``--out`` (an existing file is kept, so an interrupted run resumes, and several processes can
share the work with ``--only``), then writes one Markdown table per zoo with a column pair
(τ test accuracy, τ generalization gap) per split, and the dataset/task accuracies of the
fine-tuning zoo::

    python benchmarks/heterogeneous_quality.py --zoos ZOOS --out benchmarks/results/heterogeneous --seeds 3
    python benchmarks/heterogeneous_quality.py --zoos ZOOS --out OUT --only wild-id,wild-residual --methods graph
    python benchmarks/heterogeneous_quality.py --out OUT --assemble          # tables from the JSON files only

``ZOOS`` holds the zoos built from ``zoo/digits-wild.toml``, ``zoo/digits-vit.toml`` and
``zoo/digits-wild-regions.toml`` (directories named like the recipes). Splits (every method of a split
trains and tests on the same rows: the last checkpoint of each model, split by model):

==================  =========================================================================
``wild-id``         digits-wild, in distribution (train/val/test 0.7/0.15/0.15)
``wild-residual``   trained and validated on plain CNNs, tested on every residual network
``wild-depth``      trained on depth <= 4, tested on depth 5-6
``vit-id``          digits-vit, in distribution
``vit-depth``       trained on 1-2 blocks, tested on 3-4
``vit-width``       trained on widths 16-32, tested on widths 48-64
``regions``         digits-wild-regions: which of 8 datasets / 3 tasks a fine-tune came from
==================  =========================================================================

The graph encoders read 5x5 kernels (``encoder.edge_dim=25``). On ``wild-residual`` the graph encoder's probe
features are the logits only (``encoder.probe_hidden=false``): residual networks have no hidden-neuron probe
activations (:func:`wsnets.nn.probes.graph_probe_activations`), so training on plain CNNs with them would
teach features the test networks lack. ``--vit-filter`` (e.g. ``width=[16,32]``)
restricts the vit splits to part of the zoo for every method alike, where the graph encoders' cost on
the transformers of width 48-64 (81,000-90,000 edges per graph) does not fit the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ["graph", "transformer", "statnn-gbm", "statnn-mlp", "esd"]
# split -> (zoo directory name, last epoch, extra metamodel_quality arguments, column title)
SPLITS: dict[str, tuple[str, int, list[str], str]] = {
    "wild-id": ("digits-wild", 4, [], "in distribution"),
    "wild-residual": ("digits-wild", 4, ["--ood", "family:!=:resnet", "--set", "encoder.probe_hidden=false"],
                      "OOD: plain → residual"),
    "wild-depth": ("digits-wild", 4, ["--ood", "depth:<=:4"], "OOD: depth ≤ 4 → 5-6"),
    "vit-id": ("digits-vit", 5, [], "in distribution"),
    "vit-depth": ("digits-vit", 5, ["--ood", "depth:<=:2"], "OOD: 1-2 blocks → 3-4"),
    "vit-width": ("digits-vit", 5, ["--ood", "width:<=:32"], "OOD: width 16-32 → 48-64"),
    "regions": ("digits-wild-regions", 3, ["--targets", "dataset,task"], "fine-tuning zoo"),
}


def run(zoos: Path, out: Path, splits: list[str], methods: list[str], seeds: int, extra: list[str],
        vit_filter: str | None) -> None:
    from benchmarks import metamodel_quality
    out.mkdir(parents=True, exist_ok=True)
    for split in splits:
        zoo, epoch, args, _ = SPLITS[split]
        for m in methods:
            path = out / f"{split}.{m}.json"
            if path.exists():
                continue
            argv = ["--zoo", str(zoos / zoo), "--methods", m, "--seeds", str(seeds), "--filter", f"epoch={epoch}",
                    "--set", "encoder.edge_dim=25", "--out", str(path), *args, *extra]
            if split.startswith("vit") and vit_filter:
                argv += ["--filter", vit_filter]
            if split == "regions":
                argv += ["--set", "optim.epochs=30", "--set", "optim.patience=10"]
            t = time.time()
            print(f"{split} {m}: metamodel_quality {' '.join(argv)}", file=sys.stderr, flush=True)
            metamodel_quality.main(argv)
            print(f"{split} {m}: {time.time() - t:.0f} s", file=sys.stderr, flush=True)


def tables(out: Path) -> str:
    """One Markdown table per zoo from the JSON files in ``out``."""
    from benchmarks.metamodel_quality import LABELS
    from wsnets.train.metrics import fmt
    res: dict[str, dict[str, dict]] = {}
    for f in sorted(out.glob("*.json")):
        split, m = f.stem.split(".", 1)
        if split in SPLITS:
            d = json.loads(f.read_text())
            if m in d.get("methods", {}):
                res.setdefault(split, {})[m] = {**d["methods"][m], "seeds": d.get("seeds")}
    text = []
    for zoo in ("digits-wild", "digits-vit"):
        cols = [s for s in SPLITS if SPLITS[s][0] == zoo and s in res]
        if not cols:
            continue
        head = ["method"] + [f"{SPLITS[s][3]}: τ test acc / τ gap" for s in cols]
        lines = [f"**{zoo}** (Kendall τ on the test split, mean ± std over seeds; checkpoints train/val/test per split: "
                 + "; ".join(f"{SPLITS[s][3]} {_sizes(res[s])}" for s in cols) + ")", "",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m in METHODS:
            cells = []
            for s in cols:
                r = res[s].get(m)
                if r is None or "error" in r:
                    cells.append("n/a" if r is None else f"error: {r['error'][:40]}")
                else:
                    t = r["test"]
                    cells.append(f"{fmt(t['test_acc']['kendall_tau'])} / {fmt(t['gen_gap']['kendall_tau'])}")
            lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
        text.append("\n".join(lines))
    if "regions" in res:
        lines = ["**digits-wild-regions** (accuracy on the test split, mean ± std over seeds; chance 0.125 / 0.333; "
                 f"checkpoints {_sizes(res['regions'])})", "", "| method | dataset accuracy | task accuracy |", "|---|---|---|"]
        for m in METHODS:
            r = res["regions"].get(m)
            if r is not None and "error" not in r:
                lines.append(f"| {LABELS.get(m, m)} | {fmt(r['test']['dataset']['accuracy'])} | "
                             f"{fmt(r['test']['task']['accuracy'])} |")
        text.append("\n".join(lines))
    return "\n\n".join(text)


def _sizes(by_method: dict) -> str:
    s = next((r["sizes"] for r in by_method.values() if "sizes" in r), None)
    return f"{s['train']}/{s['val']}/{s['test']}" if s else "?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoos", default=None, help="directory holding digits-wild, digits-vit, digits-wild-regions")
    ap.add_argument("--out", required=True, help="directory of per-run JSON files (kept: reruns skip them)")
    ap.add_argument("--only", default=",".join(SPLITS), help="comma-separated splits")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--vit-filter", default=None, metavar="KEY=VALUE", help="row filter for the vit splits")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to metamodel_quality")
    ap.add_argument("--assemble", action="store_true", help="only print the tables of the JSON files in --out")
    a = ap.parse_args(argv)
    out = Path(a.out)
    if not a.assemble:
        if not a.zoos:
            ap.error("--zoos is required (unless --assemble)")
        bad = [s for s in a.only.split(",") if s not in SPLITS]
        if bad:
            ap.error(f"unknown split(s) {bad} (known: {', '.join(SPLITS)})")
        extra = [x for kv in a.set for x in ("--set", kv)]
        run(Path(a.zoos), out, a.only.split(","), a.methods.split(","), a.seeds, extra, a.vit_filter)
    print(tables(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
