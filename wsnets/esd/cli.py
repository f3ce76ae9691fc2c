"""``wsnets esd PATH``: per-layer spectral metrics of a checkpoint, one line per layer."""

from __future__ import annotations

import argparse
import math
from typing import Any

from ..cli import COMMANDS, add_common, add_parser, emit, int_at_least
from ..errors import CheckpointError

_TEXT_COLS = ("alpha", "alpha_weighted", "log_norm", "log_spectral_norm", "stable_rank", "num_pl_spikes")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _esd(args: argparse.Namespace) -> int:
    from .analyze import run, summary, to_table
    res = run(args.path, min_evals=args.min_evals, max_evals=args.max_evals, mp_fit=args.mp_fit,
              randomize=args.randomize, method=args.method, device=args.device, progress=not args.json,
              conv2d_norm=not args.no_conv2d_norm, pool=not args.per_slice)
    rows = res.rows
    if not rows:
        raise CheckpointError(f"{args.path}: no 2-D, 3-D or 4-D floating-point weight tensor to analyze "
                              f"({len(res.skipped)} other tensor(s))")
    summ = summary(rows)
    plots: list[str] = []
    if args.plot:
        from ..cli import PlotTarget
        from .plot import plot_all
        t = PlotTarget(args.plot)
        plots = [str(p) for p in plot_all(res, t.dir, title=str(args.path), mp_fit=args.mp_fit, prefix=t.prefix,
                                          main=t.path("alpha_per_layer.png", main=True))]
    obj = {"path": str(args.path), "layers": rows, "summary": summ, "skipped": res.skipped, "plots": plots}

    def text() -> str:
        cols = [c for c in _TEXT_COLS] + (["num_spikes", "mp_softrank"] if args.mp_fit else []) + \
            (["rand_distance", "num_traps"] if args.randomize else [])
        width = max([len(r["name"]) for r in rows] + [5])
        lines = [f"{args.path}: {len(rows)} layer row(s), {summ['num_fitted']} fitted, {summ['num_skipped']} "
                 f"skipped or failed; {len(res.skipped)} other tensor(s) ignored (1-D or not floating point)",
                 f"  {'layer':<{width}}  {'shape':>14}  " + "  ".join(f"{c:>17}" for c in cols)]
        for r in rows:
            shape = f"{r['N']}x{r['M']}" + (f"x{r['rf']}" if r["rf"] > 1 else "") + \
                (f" [{r['slice_id']}]" if "slice_id" in r else "")
            if r["status"] != "success":
                lines.append(f"  {r['name']:<{width}}  {shape:>14}  {r['status']}")
                continue
            lines.append(f"  {r['name']:<{width}}  {shape:>14}  " + "  ".join(f"{_fmt(r.get(c)):>17}" for c in cols))
        lines.append("summary: " + ", ".join(f"{k}={_fmt(v)}" for k, v in summ.items()))
        if plots:
            lines.append(f"plots: {len(plots)} file(s): {plots[-1]} and the per-layer ESDs beside it" if len(plots) > 1
                         else f"plots: {plots[0]}")
        return "\n".join(lines)
    emit(args, obj, text)
    return 0


def register(sub) -> None:
    p = add_parser(sub, "esd", COMMANDS["esd"][1], "wsnets esd model.safetensors --mp-fit --plot esd_plots/", _esd)
    p.add_argument("path", help="checkpoint: .safetensors (streamed), .pt or .pth; any 2-D/3-D/4-D weight is analyzed")
    p.add_argument("--plot", metavar="PNG_OR_DIR",
                   help="write the alpha-per-layer plot and per-layer ESD plots: into a folder, or to a .png file "
                        "(alpha per layer; the ESDs beside it as <name>_esd_*.png)")
    p.add_argument("--mp-fit", action="store_true", help="Marchenko-Pastur fit: num_spikes, mp_softrank, sigma_mp")
    p.add_argument("--randomize", action="store_true", help="compare with shuffled weights: rand_distance, num_traps")
    p.add_argument("--min-evals", type=int_at_least(1), default=8, help="layers with fewer eigenvalues are reported as skipped")
    p.add_argument("--max-evals", type=int_at_least(0), default=15000, help="layers with more eigenvalues are reported as skipped")
    p.add_argument("--method", choices=("gram", "svd"), default="gram", help="eigvalsh of the Gram matrix, or SVD")
    p.add_argument("--per-slice", action="store_true", help="one row per conv kernel position (no pooling)")
    p.add_argument("--no-conv2d-norm", action="store_true", help="do not halve Conv2d eigenvalues (WeightWatcher does)")
    add_common(p)
