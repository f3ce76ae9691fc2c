"""Quality numbers for wsnets.merge: SWA, soups, permutation alignment, Bezier mode connectivity.

Runs four experiments on small networks trained here with plain PyTorch loops (offline data from
``wsnets.zoo.datasets``) and prints one Markdown table (writes JSON with ``--out``):

1. SWA (Izmailov et al. 2018) vs the final SGD iterate of the same run, and vs SGD with the
   learning rate decayed over the same budget; the SWA weights are checked against
   ``torch.optim.swa_utils.AveragedModel`` + ``update_bn`` on the same snapshots (max abs difference).
2. Greedy soup vs best ingredient vs uniform soup (Wortsman et al. 2022) for a family fine-tuned from
   one base with varied learning rate, weight decay, label smoothing and data order.
3. Loss barrier on the line between two independently trained MLPs, before and after weight
   matching (and activation matching), at several widths (Ainsworth et al. 2023).
4. Worst point of a trained quadratic Bezier curve vs the straight line's (Garipov et al. 2018).

    python benchmarks/merge_quality.py --quick --out benchmarks/out/merge_quality.json --plots benchmarks/out
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, update_bn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import wsnets  # noqa: E402
from benchmarks.common import write  # noqa: E402
from wsnets.merge import (SWA, activation_matching, evaluate, greedy_soup, interpolation_curve,  # noqa: E402
                          train_bezier, uniform_soup, weight_matching)
from wsnets.zoo import datasets  # noqa: E402


def fit(net: torch.nn.Module, x, y, *, epochs: int, lr: float | callable, seed: int, batch_size: int = 128,
        weight_decay: float = 0.0, label_smoothing: float = 0.0, on_epoch=None) -> torch.nn.Module:
    """SGD with momentum; ``lr`` is a number or a function of the epoch; ``on_epoch(epoch)`` after each epoch."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=lr if not callable(lr) else lr(0), momentum=0.9,
                          weight_decay=weight_decay)
    net.train()
    for ep in range(epochs):
        for group in opt.param_groups:
            group["lr"] = lr(ep) if callable(lr) else lr
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx], label_smoothing=label_smoothing).backward()
            opt.step()
        if on_epoch is not None:
            on_epoch(ep)
    return net.eval()


def new_net(arch, seed: int) -> torch.nn.Module:
    return wsnets.WeightSpace.random(arch, generator=torch.Generator().manual_seed(seed)).to_module()


def acc(ws_or_net, x, y) -> float:
    ws = ws_or_net if isinstance(ws_or_net, wsnets.WeightSpace) else wsnets.load(ws_or_net)
    return float(evaluate(ws, x, y)[1])


# -- 1. SWA ----------------------------------------------------------------------------------------
def swa_experiment(quick: bool, seeds: list[int]) -> list[dict]:
    x, y, xt, yt = datasets.load("mnist1d")
    arch = wsnets.mlp(40, [128, 128], 10, batchnorm=True)
    e1, e2 = (10, 10) if quick else (30, 20)
    lr0, lr_min = 0.05, 0.0005
    rows = []
    for seed in seeds:
        net = fit(new_net(arch, seed), x, y, epochs=e1, lr=lr0, seed=seed)
        state = {k: v.clone() for k, v in net.state_dict().items()}
        # SWA branch: cyclic lr, one cycle per epoch, snapshot at each cycle's end
        ours, theirs = SWA(), AveragedModel(net)

        def snap(ep):
            ours.update(net)
            theirs.update_parameters(net)
        fit(net, x, y, epochs=e2, lr=lr0, seed=seed + 100, on_epoch=snap)  # constant SWA lr (Izmailov et al.)
        swa_ws = ours.result(list(x.split(256)))
        update_bn(list(x.split(256)), theirs)
        ref = wsnets.load(theirs.module.eval())
        diff = float((swa_ws.flat() - ref.flat()).abs().max())
        stat_diff = max(float((swa_ws.params[k] - ref.params[k]).abs().max()) for k in swa_ws.params if "running" in k)
        final_iter = acc(net, xt, yt)
        # SGD baseline: same total budget, lr decayed linearly to lr_min over the second phase
        base = new_net(arch, seed)
        base.load_state_dict(state)
        fit(base, x, y, epochs=e2, lr=lambda ep: lr0 + (lr_min - lr0) * (ep + 1) / e2, seed=seed + 100)
        rows.append({"experiment": "SWA", "seed": seed, "final SGD iterate (same run)": final_iter,
                     "SGD, decayed lr": acc(base, xt, yt), "SWA": acc(swa_ws, xt, yt),
                     "max abs diff vs swa_utils (params)": diff, "max abs diff vs swa_utils (BN stats)": stat_diff,
                     "snapshots": ours.n_averaged})
    return rows


# -- 2. soups --------------------------------------------------------------------------------------
def soup_experiment(quick: bool, seeds: list[int]) -> list[dict]:
    x, y, xt, yt = datasets.load("mnist1d")
    n_val = round(0.2 * len(x))                     # what dataset_evaluator("mnist1d") holds out
    xtr, ytr, xv, yv = x[:-n_val], y[:-n_val], x[-n_val:], y[-n_val:]
    arch = wsnets.mlp(40, [128, 128], 10)
    hps = [dict(lr=lr, weight_decay=wd, label_smoothing=ls, epochs=ep)
           for lr, wd, ls, ep in [(0.003, 0, 0, 4), (0.01, 1e-4, 0, 4), (0.01, 0, 0.1, 6), (0.02, 5e-4, 0, 4),
                                  (0.005, 1e-3, 0.1, 6), (0.03, 0, 0, 3), (0.01, 5e-4, 0.05, 5), (0.05, 1e-4, 0.1, 3)]]
    if quick:
        hps = hps[:6]
    rows = []
    for seed in seeds:
        base = fit(new_net(arch, seed), xtr, ytr, epochs=8 if quick else 15, lr=0.05, seed=seed)
        base_sd = {k: v.clone() for k, v in base.state_dict().items()}
        fts = []
        for i, hp in enumerate(hps):
            net = new_net(arch, seed)
            net.load_state_dict(base_sd)
            hp = dict(hp)
            fts.append(wsnets.load(fit(net, xtr, ytr, epochs=hp.pop("epochs"), seed=1000 * seed + i, **hp)))
        val = [acc(m, xv, yv) for m in fts]
        best = max(range(len(fts)), key=lambda i: val[i])
        r = greedy_soup(fts, lambda ws: acc(ws, xv, yv))
        uni = uniform_soup(fts)
        rows.append({"experiment": "soup", "seed": seed, "ingredients": len(fts), "kept": len(r.ingredients),
                     "base (test)": acc(wsnets.load(base), xt, yt),
                     "best ingredient (val)": val[best], "greedy soup (val)": r.score,
                     "uniform soup (val)": acc(uni, xv, yv),
                     "best ingredient (test)": acc(fts[best], xt, yt), "greedy soup (test)": acc(r.model, xt, yt),
                     "uniform soup (test)": acc(uni, xt, yt)})
    return rows


# -- 3 + 4. alignment barriers and Bezier ----------------------------------------------------------
def barrier_experiment(quick: bool, widths: list[int], seeds: list[int], plots: Path | None,
                       bezier_width: int) -> tuple[list[dict], list[dict]]:
    x, y, xt, yt = datasets.load("digits")
    rows, bez_rows, curves_for_plot = [], [], {}
    epochs = 10 if quick else 20
    for width in widths:
        for seed in seeds:
            arch = wsnets.mlp(64, [width, width], 10)
            a = wsnets.load(fit(new_net(arch, 2 * seed), x, y, epochs=epochs, lr=0.05, seed=2 * seed))
            b = wsnets.load(fit(new_net(arch, 2 * seed + 1), x, y, epochs=epochs, lr=0.05, seed=2 * seed + 1))
            t0 = time.perf_counter()
            b_wm, _ = weight_matching(a, b)
            t_wm = time.perf_counter() - t0
            b_am, _ = activation_matching(a, b, x[:1000])
            naive = interpolation_curve(a, b, xt, yt, steps=21)
            wm = interpolation_curve(a, b_wm, xt, yt, steps=21)
            am = interpolation_curve(a, b_am, xt, yt, steps=21)
            rows.append({"experiment": "barrier", "width": width, "seed": seed,
                         "endpoint test loss": (naive.loss[0] + naive.loss[-1]) / 2,
                         "barrier naive": naive.barrier, "barrier weight matching": wm.barrier,
                         "barrier activation matching": am.barrier,
                         "acc drop naive (pts)": 100 * naive.acc_barrier, "acc drop weight matching (pts)": 100 * wm.acc_barrier,
                         "weight matching time (s)": t_wm})
            if width == bezier_width:
                curve = train_bezier(a, b, x, y, epochs=10 if quick else 20, lr=1e-2, seed=seed)
                bz = curve.metrics(xt, yt, steps=21)
                bez_rows.append({"experiment": "bezier", "width": width, "seed": seed,
                                 "line max loss": max(naive.loss), "line barrier": naive.barrier,
                                 "Bezier max loss": max(bz.loss), "Bezier barrier": bz.barrier,
                                 "endpoint test loss": (naive.loss[0] + naive.loss[-1]) / 2})
                if seed == seeds[0]:
                    curves_for_plot = {"straight line": naive, "line after weight matching": wm, "Bezier curve (trained)": bz}
    if plots is not None:
        from wsnets.merge.plot import plot_barriers_by_width, plot_curves
        plots.mkdir(parents=True, exist_ok=True)
        if curves_for_plot:
            plot_curves(curves_for_plot, plots / "merge_curves.png",
                        title=f"Two MLPs 64-{bezier_width}-{bezier_width}-10 trained apart on digits (seed {seeds[0]})")
        mean = lambda key, w: sum(r[key] for r in rows if r["width"] == w) / len(seeds)  # noqa: E731
        plot_barriers_by_width(widths, [mean("barrier naive", w) for w in widths],
                               [mean("barrier weight matching", w) for w in widths], plots / "merge_barrier_width.png",
                               title=f"Loss barrier, MLPs on digits (mean of {len(seeds)} pairs)")
    return rows, bez_rows


def summarize(tables: dict[str, list[dict]]) -> list[dict]:
    """Mean over seeds of each experiment's headline numbers (one row per comparison)."""
    def mean(rows, key):
        return sum(r[key] for r in rows) / len(rows)
    out = []
    if tables.get("swa"):
        r = tables["swa"]
        out += [{"comparison": "SWA vs SGD (mnist1d test acc)", "A": "final SGD iterate", "A value": mean(r, "final SGD iterate (same run)"),
                 "B": "SWA", "B value": mean(r, "SWA"), "C": "SGD, decayed lr", "C value": mean(r, "SGD, decayed lr")}]
    if tables.get("soup"):
        r = tables["soup"]
        for split in ("val", "test"):
            out.append({"comparison": f"soups (mnist1d {split} acc)", "A": "best ingredient", "A value": mean(r, f"best ingredient ({split})"),
                        "B": "greedy soup", "B value": mean(r, f"greedy soup ({split})"),
                        "C": "uniform soup", "C value": mean(r, f"uniform soup ({split})")})
    if tables.get("barrier"):
        for w in sorted({r["width"] for r in tables["barrier"]}):
            r = [x for x in tables["barrier"] if x["width"] == w]
            out.append({"comparison": f"loss barrier, width {w} (digits test, nats)", "A": "naive", "A value": mean(r, "barrier naive"),
                        "B": "weight matching", "B value": mean(r, "barrier weight matching"),
                        "C": "activation matching", "C value": mean(r, "barrier activation matching")})
    if tables.get("bezier"):
        r = tables["bezier"]
        out.append({"comparison": f"worst test loss on path, width {r[0]['width']} (nats)", "A": "straight line",
                    "A value": mean(r, "line max loss"), "B": "Bezier curve", "B value": mean(r, "Bezier max loss"),
                    "C": "endpoints (mean)", "C value": mean(r, "endpoint test loss")})
    return out


def report(tables: dict[str, list[dict]]) -> list[dict]:
    for name, rows in tables.items():
        if rows:
            print(f"\n### {name}")
            write(None, name, rows, list(rows[0]))
    summary = summarize(tables)
    print("\n### summary (mean over seeds)")
    write(None, "summary", summary, ["comparison", "A", "A value", "B", "B value", "C", "C value"])
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer seeds, epochs and widths (a few minutes on 2 cores)")
    ap.add_argument("--out", default=None, help="JSON file to write")
    ap.add_argument("--plots", default=None, help="folder for PNG plots")
    ap.add_argument("--only", default=None, choices=["swa", "soup", "barrier"], help="run one experiment")
    ap.add_argument("--summarize", default=None, metavar="JSON", help="reprint the tables of an earlier run's JSON")
    args = ap.parse_args(argv)
    if args.summarize:
        report(json.loads(Path(args.summarize).read_text())["tables"])
        return 0
    torch.set_num_threads(min(2, torch.get_num_threads()))
    seeds = [0, 1] if args.quick else [0, 1, 2]
    widths = [16, 64, 256] if args.quick else [8, 16, 64, 256, 512]
    t0 = time.perf_counter()
    swa = swa_experiment(args.quick, seeds) if args.only in (None, "swa") else []
    soup = soup_experiment(args.quick, seeds) if args.only in (None, "soup") else []
    bar, bez = barrier_experiment(args.quick, widths, seeds, Path(args.plots) if args.plots else None, 64) \
        if args.only in (None, "barrier") else ([], [])
    tables = {"swa": swa, "soup": soup, "barrier": bar, "bezier": bez}
    summary = report(tables)
    if args.out:
        from benchmarks.common import machine
        from wsnets.io import atomic_write_json
        atomic_write_json(args.out, {"benchmark": "merge_quality", "machine": machine(), "quick": args.quick,
                                     "seconds": time.perf_counter() - t0, "tables": tables, "summary": summary,
                                     "note": "timings under contention: 2 CPU cores shared by ~6 concurrent "
                                             "engineers; no GPU"})
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
