"""Batched 2D loss surface vs the naive per-point loop (Li et al. 2018), side by side in one run.

Model: MLP 64-64-64-10 (ReLU) trained briefly on all 1,797 scikit-learn digits; surface over a
filter-normalized plane, full-batch evaluation, 30x30 grid (10x10 with --quick). The naive loop
overwrites the weights of one nn.Module per grid point and evaluates the whole dataset
(wsnets.landscape.naive_surface); the batched variants stack grid points and run them under
torch.func.vmap, with and without reusing the first layer's outputs (it is linear in the grid
coordinates). Every variant's values are checked against the naive loop.

    python benchmarks/landscape_speed.py --quick --out landscape_speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import wsnets
from wsnets.io import atomic_write_json
from wsnets.landscape import evaluate_points, naive_surface, random_directions
from wsnets.landscape._functional import FunctionalNet
from wsnets.zoo import datasets


def _trained(X: torch.Tensor, y: torch.Tensor, steps: int) -> wsnets.WeightSpace:
    ws = wsnets.WeightSpace.random(wsnets.mlp(64, [64, 64], 10), generator=torch.Generator().manual_seed(0))
    net = FunctionalNet(ws)
    th = net.theta0.clone().requires_grad_(True)
    opt = torch.optim.Adam([th], 1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(th, X), y).backward()
        opt.step()
    return net.to_weightspace(th.detach())


def _time(fn, repeats: int):
    """Best wall time and best process CPU time over ``repeats`` calls (CPU time is robust to other
    jobs on a shared machine; with one thread it is the compute time), and the last output."""
    wall, cpu, out = float("inf"), float("inf"), None
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
    return wall, cpu, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10x10 grid, one repeat")
    ap.add_argument("--grid", type=int, default=None, help="points per axis (default 30, 10 with --quick)")
    ap.add_argument("--repeats", type=int, default=None, help="best of N timings (default 3, 1 with --quick)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps timings stable on a shared machine)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    n = args.grid or (10 if args.quick else 30)
    repeats = args.repeats or (1 if args.quick else 3)

    xtr, ytr, xte, yte = datasets.load("digits")
    X, y = torch.cat([xtr, xte]), torch.cat([ytr, yte])  # all 1,797 digits
    ws = _trained(X, y, 100 if args.quick else 300)
    d1, d2 = random_directions(ws, 2, generator=torch.Generator().manual_seed(1))
    g = np.linspace(-1, 1, n)
    gx, gy = np.meshgrid(g, g, indexing="ij")
    coeffs = torch.tensor(np.stack([gx.ravel(), gy.ravel()], 1), dtype=torch.float32)
    G = coeffs.shape[0]

    t_naive, c_naive, (ref_l, ref_a) = _time(lambda: naive_surface(ws, [d1, d2], coeffs, (X, y)), repeats)
    rows = [{"method": "naive per-point loop (Li et al.)", "device": "cpu", "seconds": t_naive, "cpu_seconds": c_naive,
             "points_per_s": G / t_naive, "points_per_cpu_s": G / c_naive, "speedup": 1.0, "speedup_cpu_time": 1.0,
             "max_abs_loss_diff": 0.0, "acc_equal": True}]
    variants = [("functional, 1 point at a time", dict(first_layer_trick=False, chunk_size=1)),
                ("functional + first-layer trick, 1 point at a time", dict(first_layer_trick=True, chunk_size=1)),
                ("vmap over 32 stacked points", dict(first_layer_trick=False, chunk_size=32)),
                ("vmap over 32 points + first-layer trick (CPU default)", dict(first_layer_trick=True, chunk_size=32)),
                ("vmap over 128 points + first-layer trick", dict(first_layer_trick=True, chunk_size=128))]
    for name, kw in variants:
        t, c, (l, a) = _time(lambda: evaluate_points(ws, [d1, d2], coeffs, (X, y), **kw), repeats)
        rows.append({"method": name, "device": "cpu", "seconds": t, "cpu_seconds": c, "points_per_s": G / t,
                     "points_per_cpu_s": G / c, "speedup": t_naive / t, "speedup_cpu_time": c_naive / c,
                     "max_abs_loss_diff": float((l - ref_l).abs().max()), "acc_equal": bool(torch.equal(a, ref_a))})
    rows.append({"method": "any (GPU)", "device": "cuda", "seconds": None, "cpu_seconds": None, "points_per_s": None,
                 "speedup": None,
                 "note": "not measured: no GPU in this session"})
    result = {"benchmark": "landscape_speed", "model": ws.arch.describe(), "params": ws.num_params,
              "dataset": "digits (all 1,797, full batch)", "grid": f"{n}x{n}", "points": G, "repeats": repeats,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "note": "CPU timings on a 2-core machine shared with other jobs (contention); best of repeats",
              "rows": rows}
    print(f"\n{n}x{n} grid = {G} points, {ws.arch.describe()} ({ws.num_params} params), digits 1,797 full batch, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| method | device | wall s | points/s (wall) | speed-up (wall) | CPU s | points/CPU-s | speed-up (CPU time) "
          "| max abs Δloss | same acc |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["seconds"] is None:
            print(f"| {r['method']} | {r['device']} | not measured (no GPU) | – | – | – | – | – | – | – |")
            continue
        print(f"| {r['method']} | {r['device']} | {r['seconds']:.3f} | {r['points_per_s']:.0f} | {r['speedup']:.2f}x | "
              f"{r['cpu_seconds']:.3f} | {r['points_per_cpu_s']:.0f} | {r['speedup_cpu_time']:.2f}x | "
              f"{r['max_abs_loss_diff']:.1e} | {r['acc_equal']} |")
    if args.out:
        atomic_write_json(args.out, result)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
