"""Gueta et al. (2023), "Knowledge is a region in weight space": fine-tuned models of one dataset lie
closer together than models of different datasets of one task, which lie closer than models of
different tasks.

On the ``regions`` zoo (bases pre-trained on digits, fine-tuned on 8 datasets in 3 tasks) this computes
the mean Euclidean distance between the final fine-tuned weight vectors of pairs of models that share
(a) the dataset, (b) the task but not the dataset, (c) nothing, for models fine-tuned from the same base
(different bases are far apart for reasons unrelated to data). All pairwise distances come from one
``torch.cdist`` call.

    python benchmarks/region_distances.py --out benchmarks/out/region_distances.json [--zoo DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import write  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", default=None, help="regions zoo directory (default: build/reuse it in the cache)")
    ap.add_argument("--quick", action="store_true", help="first 160 models only")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import wsnets.zoo
    from wsnets.run import default_cache, ensure_zoo
    zoo_dir = args.zoo or ensure_zoo("regions", default_cache(), "cpu", limit=160 if args.quick else None)
    zoo = wsnets.zoo.open(zoo_dir).last_epoch()
    rows = list(zoo)
    flat = zoo.load(rows).flat().double()   # one batched WeightSpace (one architecture)
    def codes(col: str) -> torch.Tensor:  # category -> integer code, compared by broadcasting below
        names = {v: i for i, v in enumerate(sorted({str(r[col]) for r in rows}))}
        return torch.tensor([names[str(r[col])] for r in rows])
    n = len(rows)
    D = torch.cdist(flat, flat)
    iu = torch.triu_indices(n, n, 1)
    same = {c: (lambda k: k[iu[0]] == k[iu[1]])(codes(c)) for c in ("base", "dataset", "task")}
    same_base, same_ds, same_task = same["base"], same["dataset"], same["task"]
    d = D[iu[0], iu[1]]
    groups = {"same dataset": same_ds & same_base, "same task, other dataset": same_task & ~same_ds & same_base,
              "other task": ~same_task & same_base}
    out = []
    for name, m in groups.items():
        out.append({"pairs": name, "n": int(m.sum()), "mean distance": float(d[m].mean()),
                    "std": float(d[m].std()) if m.sum() > 1 else 0.0})
    means = [r["mean distance"] for r in out]
    holds = means[0] < means[1] < means[2]
    write(args.out, "region_distances", out, ["pairs", "n", "mean distance", "std"],
          {"ordering_holds": holds, "models": n, "paper": "Gueta et al. 2023: within dataset < within task < across tasks"})
    print(f"\nwithin dataset < within task < across tasks: {'holds' if holds else 'does NOT hold'} ({n} models)")


if __name__ == "__main__":
    main()
