"""The graph transformer's attention on groups of similar-size graphs against one dense batch.

:class:`wsnets.nn.NeuralGraphTransformer` pads the graphs of a batch to the largest one for its dense
attention; since ``c40f5d9`` it does so per group of similar-size graphs (:func:`wsnets.nn.transformer.
attention_groups`). This script times one training step (forward + backward of a scalar loss) on the same
random batches of a zoo both ways, each in its own process, so that peak memory (``ru_maxrss``) is per way,
and checks that both give the same embeddings. The modes alternate, ``--repeat`` processes each.

    python benchmarks/transformer_groups.py --zoo ZOOS/digits-vit --filter epoch=5 --filter 'width=[16,32]' \\
        --out benchmarks/results/transformer_groups_vit.json
    python benchmarks/transformer_groups.py --zoo ZOOS/digits-wild --filter epoch=4 \\
        --out benchmarks/results/transformer_groups_wild.json

The encoder is ``train/transformer.toml``'s (hidden 16, 2 layers, 4 heads) with 5x5 kernels (``edge_dim=25``).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import write  # noqa: E402


def _filters(items: list[str]) -> dict:
    out = {}
    for f in items:
        k, v = f.split("=", 1)
        out[k] = json.loads(v) if v[:1] in "[0123456789" else v
    return out


def child(a) -> dict:
    """One process: ``--steps`` training steps in one mode; prints a JSON line."""
    import wsnets.nn.transformer as T
    from wsnets.zoo.dataset import ZooDataset
    torch.set_num_threads(a.threads)
    ds = ZooDataset(a.zoo, "graph", targets=["test_acc"], split="all", filter=_filters(a.filter))
    gen = torch.Generator().manual_seed(a.seed)
    batches = [ds.collate([ds[i] for i in torch.randperm(len(ds), generator=gen)[:a.batch].tolist()])[0]
               for _ in range(a.steps)]
    torch.manual_seed(0)
    enc = T.NeuralGraphTransformer(hidden=16, layers=2, heads=4, out_dim=64, edge_dim=25, layer_scale=True,
                                   edge_readout=True)
    if a.child == "dense":
        T.attention_groups = lambda *args, **kw: None
    groups = [T.attention_groups(b.batch, b.edge_index, 4) for b in batches]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times, sums = [], []
    for b in batches:
        t = time.perf_counter()
        enc.zero_grad()
        out = enc(b)
        out.square().sum().backward()
        times.append(time.perf_counter() - t)
        sums.append(out.detach().double().sum().item())
    return {"mode": a.child, "s_per_step": statistics.median(times), "peak_mb": resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / 1024, "mb_before_steps": before, "out_sums": sums,
        "groups": [1 if g is None else len(g.parts) for g in groups],
        "neurons": [torch.bincount(b.batch).tolist() for b in batches]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", required=True)
    ap.add_argument("--filter", action="append", default=[], help="column=value or column=[v1,v2] (repeatable)")
    ap.add_argument("--batch", type=int, default=32, help="graphs per batch (train/transformer.toml: 32)")
    ap.add_argument("--steps", type=int, default=3, help="random batches per process")
    ap.add_argument("--repeat", type=int, default=2, help="processes per mode, alternating")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", choices=["dense", "grouped"], help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a)))
        return 0
    runs: dict[str, list[dict]] = {"dense": [], "grouped": []}
    for _ in range(a.repeat):
        for mode in runs:
            cmd = [sys.executable, __file__, "--child", mode, *[x for f in a.filter for x in ("--filter", f)],
                   *(str(x) for kv in (("--zoo", a.zoo), ("--batch", a.batch), ("--steps", a.steps),
                                       ("--threads", a.threads), ("--seed", a.seed)) for x in kv)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                sys.exit(f"transformer_groups: the {mode} process failed: {res.stderr.strip().splitlines()[-1:]}")
            runs[mode].append(json.loads(res.stdout.strip().splitlines()[-1]))
    d, g = runs["dense"][0], runs["grouped"][0]
    diff = max(abs(x - y) / max(1.0, abs(x)) for x, y in zip(d["out_sums"], g["out_sums"]))
    rows = []
    for mode, rs in runs.items():
        rows.append({"mode": mode, "s/step": statistics.median(r["s_per_step"] for r in rs),
                     "peak MB": statistics.median(r["peak_mb"] for r in rs),
                     "attention groups per batch": statistics.median(r["groups"][i] for r in rs
                                                                      for i in range(len(r["groups"])))})
    rows.append({"mode": "dense / grouped", "s/step": rows[0]["s/step"] / rows[1]["s/step"],
                 "peak MB": rows[0]["peak MB"] / rows[1]["peak MB"]})
    sizes = [n for b in d["neurons"] for n in b]
    print(f"{a.zoo} ({', '.join(a.filter)}): {a.steps} batches of {a.batch} graphs, {min(sizes)}-{max(sizes)} neurons "
          f"per graph; max relative difference of the embeddings' sums {diff:.1e}\n")
    write(a.out, "transformer_groups", rows, ["mode", "s/step", "peak MB", "attention groups per batch"],
          {"zoo": a.zoo, "filter": a.filter, "batch": a.batch, "steps": a.steps, "threads": a.threads,
           "max_rel_diff": diff, "runs": runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
