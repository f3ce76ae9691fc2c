"""ESD speed: ``wsnets.esd`` vs ``weightwatcher.analyze`` on the same layers, in one run.

Workloads
---------
* ``bert_mini``: a BERT-mini-sized stack of 40 matrices (6 blocks of Q, K, V, O 384x384, FFN
  1536x384 and 384x1536, plus 4 more 384x384), random heavy-tailed (Student-t, 3 d.o.f.) weights.
* ``zoo``: 1,000 small MLPs 64-32-32-10 (PyTorch default init, one seed each). WeightWatcher analyzes
  them one model at a time (its only mode); wsnets analyzes the whole batched WeightSpace at once
  (every same-shape matrix of the zoo through one eigenvalue call and one batched fit).

Both sides compute the same metrics (alpha, D, xmin, norms, stable rank, entropy) and we report the
largest |Δα| between them, so the speed-up is at equal α. Also: eigenvalues alone (WeightWatcher's
float64 SciPy SVD vs our batched Gram ``eigvalsh``) and the accuracy of Gram vs SVD on the metrics.

Usage::

    python benchmarks/esd_speed.py [--quick] [--device cpu|cuda] [--threads 1] --out esd_speed.json

Prints a Markdown table; writes JSON. Timings are best of ``--repeat`` runs (wall clock), the two
sides alternating so that load changes on a shared machine affect both.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import wsnets  # noqa: E402
from wsnets.esd import analyze, esd_features, layer_spectrum  # noqa: E402
from wsnets.io import atomic_write_json  # noqa: E402


@contextlib.contextmanager
def quiet():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def import_ww():
    with quiet():
        import weightwatcher
    logging.disable(logging.WARNING)
    return weightwatcher


def best_of(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def paired(fn_ref, fn_ours, repeat: int) -> tuple[float, object, float, object]:
    """Best-of timings of two functions run alternately, so load changes on a shared machine hit both."""
    t_ref = t_ours = float("inf")
    out_ref = out_ours = None
    for _ in range(repeat):
        a, out_ref = best_of(fn_ref, 1)
        b, out_ours = best_of(fn_ours, 1)
        t_ref, t_ours = min(t_ref, a), min(t_ours, b)
    return t_ref, out_ref, t_ours, out_ours


def bert_mini(seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    t = torch.distributions.StudentT(3.0)
    layers = nn.ModuleDict()
    shapes = [(384, 384)] * 4 + [(1536, 384), (384, 1536)]
    for b in range(6):
        for j, (o, i) in enumerate(shapes):
            layers[f"block{b}_{j}"] = nn.Linear(i, o, bias=False)
    for j in range(4):
        layers[f"extra{j}"] = nn.Linear(384, 384, bias=False)
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in layers.values():
            m.weight.copy_(0.02 * t.sample(m.weight.shape))
    return layers


def alpha_gap(ours, ref) -> float:
    a = np.asarray(ours, float)
    b = np.asarray(ref, float)
    ok = np.isfinite(a) & (b > 0)
    return float(np.abs(a[ok] - b[ok]).max()) if ok.any() else float("nan")


def bench_bert(ww, args) -> dict:
    model = bert_mini()
    n_mats = len(list(model.parameters()))
    t_ww, ref, t_ours, df = paired(lambda: _ww_analyze(ww, model), lambda: analyze(model, device=args.device),
                                   args.repeat)
    # eigenvalues alone
    mats = [p.detach() for p in model.parameters()]
    from weightwatcher.RMT_Util import svd_vals

    def ours_eig():
        by_shape: dict = {}
        for m in mats:
            by_shape.setdefault(tuple(m.shape), []).append(m)
        return [layer_spectrum(torch.stack(v), 2, device=args.device).evals.cpu() for v in by_shape.values()]
    t_ww_eig, _, t_eig, _ = paired(lambda: [svd_vals(m.numpy().astype(float)) for m in mats], ours_eig, args.repeat)
    svd = analyze(model, method="svd", device=args.device)
    acc = {c: float(np.nanmax(np.abs(df[c] - svd[c]) / np.abs(svd[c])))
           for c in ("alpha", "alpha_weighted", "log_norm", "log_spectral_norm", "stable_rank", "entropy")}
    return {"matrices": n_mats, "ww_s": t_ww, "ours_s": t_ours, "speedup": t_ww / t_ours,
            "ww_eigen_s": t_ww_eig, "ours_eigen_s": t_eig, "eigen_speedup": t_ww_eig / t_eig,
            "max_abs_alpha_diff_vs_ww": alpha_gap(df["alpha"], ref["alpha"]),
            "gram_vs_svd_max_rel_diff": acc}


def _ww_analyze(ww, model):
    with quiet():
        return ww.WeightWatcher(model=model).analyze()


def bench_zoo(ww, args) -> dict:
    n = 200 if args.quick else 1000
    n_ww = 50 if args.quick else args.ww_models
    arch = wsnets.mlp(64, [32, 32], 10)
    ws = wsnets.WeightSpace.random(arch, batch_size=n, generator=torch.Generator().manual_seed(0))
    modules = [ws[i].to_module() for i in range(n_ww)]
    t_ww, refs, t_table, df = paired(lambda: [_ww_analyze(ww, m) for m in modules],
                                     lambda: analyze(ws, device=args.device), args.repeat)
    t_feat, _ = best_of(lambda: esd_features(ws, device=args.device), args.repeat)
    ours_alpha = df[df["model"] < n_ww]["alpha"].to_numpy()
    ref_alpha = np.concatenate([r["alpha"].to_numpy() for r in refs])
    ww_rate = n_ww / t_ww
    return {"models": n, "ww_models_timed": n_ww, "ww_models_per_s": ww_rate,
            "ours_table_models_per_s": n / t_table, "ours_features_models_per_s": n / t_feat,
            "speedup_table": (n / t_table) / ww_rate, "speedup_features": (n / t_feat) / ww_rate,
            "max_abs_alpha_diff_vs_ww": alpha_gap(ours_alpha, ref_alpha)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller zoo, fewer repeats (CI smoke run)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=None, help="best of this many runs (default 3, quick 1)")
    p.add_argument("--ww-models", type=int, default=200, help="zoo models WeightWatcher analyzes (rate extrapolated)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch and BLAS threads for both sides (1 is the fair, stable choice on a shared machine)")
    p.add_argument("--out", default="esd_speed.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from threadpoolctl import threadpool_limits
    threadpool_limits(args.threads)
    args.repeat = args.repeat or (1 if args.quick else 3)
    ww = import_ww()
    bert = bench_bert(ww, args)
    zoo = bench_zoo(ww, args)
    res = {"device": args.device, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "load_average": os.getloadavg(), "python": platform.python_version(), "torch": torch.__version__,
           "weightwatcher": ww.__version__, "quick": args.quick, "bert_mini": bert, "zoo_mlp_64_32_32_10": zoo,
           "note": "wall-clock, best of repeats, on a shared machine (load average recorded)"}
    atomic_write_json(args.out, res)
    print(f"| workload | weightwatcher | wsnets.esd | ratio | max abs Δα |\n|---|---|---|---|---|")
    print(f"| BERT-mini stack, {bert['matrices']} matrices (analyze) | {bert['ww_s']:.2f} s | {bert['ours_s']:.3f} s | "
          f"{bert['speedup']:.1f}x | {bert['max_abs_alpha_diff_vs_ww']:.1e} |")
    print(f"| BERT-mini stack, eigenvalues only | {bert['ww_eigen_s']:.2f} s | {bert['ours_eigen_s']:.3f} s | "
          f"{bert['eigen_speedup']:.1f}x | |")
    print(f"| zoo of {zoo['models']} MLPs 64-32-32-10, table | {zoo['ww_models_per_s']:.0f} models/s | "
          f"{zoo['ours_table_models_per_s']:.0f} models/s | {zoo['speedup_table']:.1f}x | "
          f"{zoo['max_abs_alpha_diff_vs_ww']:.1e} |")
    print(f"| zoo, esd_features | {zoo['ww_models_per_s']:.0f} models/s | {zoo['ours_features_models_per_s']:.0f} "
          f"models/s | {zoo['speedup_features']:.1f}x | |")
    print(f"\nGram vs SVD, max relative difference: " +
          ", ".join(f"{k} {v:.1e}" for k, v in bert["gram_vs_svd_max_rel_diff"].items()))
    print(f"device={args.device} threads={res['torch_threads']} load={res['load_average'][0]:.1f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
