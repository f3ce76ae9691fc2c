"""``wsnets landscape surface|hessian|intrinsic CKPT --dataset NAME``: the landscape tools from the shell."""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch

from ..cli import PlotTarget, add_common, add_parser, emit, finite_float, int_at_least
from ..errors import ConfigError, ShapeMismatchError
from ..io import atomic_write_json
from ..weights import WeightSpace

HELP = "loss surfaces, Hessian spectra, intrinsic dimension"


def _data(args: argparse.Namespace, ws: WeightSpace) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple]:
    from ..zoo import datasets
    x, y, xt, yt = datasets.load(args.dataset)
    want = ws.arch.input_shape
    if want is not None and tuple(x.shape[1:]) != tuple(want):
        raise ShapeMismatchError(f"dataset {args.dataset!r} has inputs {tuple(x.shape[1:])} but {args.ckpt} "
                                 f"({ws.arch.describe()}) expects {tuple(want)}")
    if want is None and x.shape[1] != ws.arch.in_features:
        raise ShapeMismatchError(f"dataset {args.dataset!r} has {x.shape[1]} input features/channels but {args.ckpt} "
                                 f"({ws.arch.describe()}) expects {ws.arch.in_features}")
    if int(y.max()) >= ws.arch.out_features:
        raise ShapeMismatchError(f"dataset {args.dataset!r} has {int(y.max()) + 1} classes but {args.ckpt} "
                                 f"has {ws.arch.out_features} outputs")
    split = {"train": (x, y), "test": (xt, yt), "all": (torch.cat([x, xt]), torch.cat([y, yt]))}
    return split[getattr(args, "split", "train")], (xt, yt)


def _load(args: argparse.Namespace) -> WeightSpace:
    from ..cli import load_checkpoint, note
    from ..io import compute_dtype
    ws = load_checkpoint(args.ckpt, args)
    if ws.batch_size is not None:
        raise ConfigError(f"{args.ckpt} holds {ws.batch_size} networks; landscape tools take one")
    ws, cast = compute_dtype(ws, str(args.ckpt))  # half precision: losses, Hessians and eigensolvers in float32
    if cast:
        note(args, cast)
        args.cast = cast
    return ws.to(args.device)


def _batches(data: tuple[torch.Tensor, torch.Tensor], size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = data
    if size <= 0:
        return [(x, y)]
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


# -- surface ---------------------------------------------------------------------------------------
def _surface(args: argparse.Namespace) -> int:
    from . import plot
    from .directions import random_directions
    from .surface import surface_1d, surface_2d
    ws = _load(args)
    data, _ = _data(args, ws)
    g = torch.Generator().manual_seed(args.seed)
    dirs = random_directions(ws, args.dim, args.norm, include_bias=args.include_bias,
                             include_norm=args.include_norm, generator=g)
    if not args.range[0] < args.range[1]:
        raise ConfigError(f"--range {args.range[0]:g} {args.range[1]:g}: LO must be below HI")
    xs = np.linspace(args.range[0], args.range[1], args.grid)
    meta = {"dataset": args.dataset, "split": args.split, "checkpoint": str(args.ckpt), "seed": args.seed,
            "directions": f"{args.norm}-normalized" + (" incl. bias" if args.include_bias else "")
            + (" incl. norm" if args.include_norm else ""), "norm": args.norm}
    kw = dict(meta=meta, device=args.device, progress=not args.json, chunk_size=args.chunk_size)
    data_b = _batches(data, args.batch_size)
    s = surface_1d(ws, dirs[0], data_b, xs, **kw) if args.dim == 1 else surface_2d(ws, dirs[0], dirs[1], data_b, xs, xs, **kw)
    out = {"checkpoint": str(args.ckpt), "architecture": ws.arch.describe(), "dataset": args.dataset,
           "grid": [args.grid] * args.dim, "range": list(args.range), "loss_at_model": float(s.loss[tuple([args.grid // 2] * args.dim)]),
           "loss_min": float(s.loss.min()), "loss_max": float(s.loss.max()), "acc_max": float(s.acc.max())}
    if args.out:
        out["npz"] = str(s.save(args.out))
    if args.plot:
        t = PlotTarget(args.plot)
        out["plots"] = [str(plot.curve(s, t.path("surface_1d.png", main=True)))] if args.dim == 1 else \
            [str(plot.contour(s, t.path("surface_contour.png", main=True))), str(plot.surface3d(s, t.path("surface_3d.png")))]
    emit(args, out, lambda: "\n".join(f"{k}: {v}" for k, v in out.items()))
    return 0


# -- hessian ---------------------------------------------------------------------------------------
def _hessian(args: argparse.Namespace) -> int:
    from . import plot
    from .hessian import HessianOperator, hutchinson_trace, slq_density, top_eigenvalues
    ws = _load(args)
    data, _ = _data(args, ws)
    op = HessianOperator(ws, _batches(data, args.batch_size), device=args.device,
                         dtype=torch.float64 if args.float64 else None)
    vals, _ = top_eigenvalues(op, args.top_k, method=args.method, **({"progress": not args.json} if args.method == "power" else {}))
    tr, se = hutchinson_trace(op, args.trace_samples, progress=not args.json)
    out: dict[str, Any] = {"checkpoint": str(args.ckpt), "architecture": ws.arch.describe(), "dataset": args.dataset,
                           "params": op.size, "loss": float(op.loss()), "top_eigenvalues": [float(v) for v in vals],
                           "method": args.method, "trace": tr, "trace_stderr": se, "trace_samples": args.trace_samples}
    if args.slq_vectors > 0:
        dens = slq_density(op, args.slq_vectors, args.slq_steps, progress=not args.json)
        nodes, w = dens.flat()
        out["slq"] = {"vectors": args.slq_vectors, "steps": args.slq_steps, "min": float(nodes.min()), "max": float(nodes.max()),
                      "negative_mass": float(w[nodes < -1e-3 * np.abs(nodes).max()].sum())}  # below -0.1% of the spectral radius
        if args.plot:
            out["plots"] = [str(plot.spectral_density(
                dens, PlotTarget(args.plot).path("hessian_density.png", main=True),
                title=f"Hessian spectral density (SLQ, {args.slq_vectors}x{args.slq_steps})\n{ws.arch.describe()} on {args.dataset}"))]
    out["hvp_products"] = op.n_products
    if args.out:
        atomic_write_json(args.out, out)
    emit(args, out, lambda: "\n".join(f"{k}: {v}" for k, v in out.items()))
    return 0


# -- intrinsic ------------------------------------------------------------------------------------
def _intrinsic(args: argparse.Namespace) -> int:
    from . import plot
    from .intrinsic import intrinsic_dimension
    ws = _load(args)
    train, test = _data(args, ws)
    if not args.keep_weights:
        ws = WeightSpace.random(ws.arch, generator=torch.Generator().manual_seed(args.seed)).to(args.device)
    try:
        dims = [int(d) for d in args.dims.split(",") if d.strip()]
    except ValueError:
        raise ConfigError(f"--dims must be comma-separated integers, got {args.dims!r}") from None
    r = intrinsic_dimension(ws, train, test, dims, projection=args.projection, steps=args.steps,
                            batch_size=args.batch_size, lr=args.lr, full_lr=args.full_lr, seed=args.seed,
                            device=args.device, progress=not args.json)
    out = {"checkpoint": str(args.ckpt), "dataset": args.dataset, **r.to_dict()}
    if args.plot:
        out["plots"] = [str(plot.intrinsic_curve(
            r, PlotTarget(args.plot).path("intrinsic_dimension.png", main=True),
            title=f"Intrinsic dimension: {ws.arch.describe()} on {args.dataset} ({args.projection} projection)"))]
    if args.out:
        atomic_write_json(args.out, out)

    def text() -> str:
        rows = "\n".join(f"  d={d:>6}: test {100 * a:5.1f}%  train {100 * b:5.1f}%"
                         for d, a, b in zip(r.dims, r.test_acc, r.train_acc))
        return (f"{ws.arch.describe()} on {args.dataset}: D = {r.num_params:,}, full model test "
                f"{100 * r.full_test_acc:.1f}%, 90% threshold {100 * r.threshold:.1f}%\n{rows}\nd_int90 = {r.d_int90}")
    emit(args, out, text)
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="checkpoint: .safetensors, .pt or .pth")
    p.add_argument("--dataset", default="digits", help="dataset name from wsnets.zoo.datasets (digits, mnist1d, ...)")
    p.add_argument("--activation", default="relu", help="activation assumed for a bare state_dict")
    from ..cli import add_arch_options
    add_arch_options(p)
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", default=None, help="write the result here (.npz for surface, .json otherwise)")
    p.add_argument("--plot", default=None, metavar="PNG_OR_DIR",
                   help="write the plot(s): a .png file (further plots beside it as <name>_*.png) or a folder")
    add_common(p)


def register(sub) -> None:
    p = add_parser(sub, "landscape", HELP, "wsnets landscape surface model.safetensors --dataset digits --plot plots/",
                   lambda a: (a.parser.print_help(), 2)[1])
    p.set_defaults(parser=p)
    lsub = p.add_subparsers(dest="landscape_command", metavar="WHAT")

    s = add_parser(lsub, "surface", "1D/2D loss and accuracy surface along filter-normalized random directions",
                   "wsnets landscape surface model.safetensors --dataset digits --grid 31 --out s.npz --plot plots/", _surface)
    _common(s)
    s.add_argument("--dim", type=int, choices=(1, 2), default=2, help="1D line or 2D plane")
    s.add_argument("--grid", type=int_at_least(1), default=31, help="points per axis")
    s.add_argument("--range", type=finite_float, nargs=2, default=(-1.0, 1.0), metavar=("LO", "HI"), help="coordinate range")
    s.add_argument("--norm", choices=("filter", "layer", "none"), default="filter", help="direction normalization")
    s.add_argument("--include-bias", action="store_true", help="also move biases (zero by default)")
    s.add_argument("--include-norm", action="store_true", help="also move normalization weights/biases")
    s.add_argument("--split", choices=("train", "test", "all"), default="train", help="which examples to evaluate")
    s.add_argument("--batch-size", type=int_at_least(0), default=0, help="examples per batch (0 = full batch)")
    s.add_argument("--chunk-size", type=int_at_least(1), default=None, help="grid points per vmap call (default: 32 on CPU, 256 on GPU)")

    h = add_parser(lsub, "hessian", "Hessian top eigenvalues, trace and spectral density (SLQ)",
                   "wsnets landscape hessian model.safetensors --dataset digits --top-k 5 --plot plots/", _hessian)
    _common(h)
    h.add_argument("--top-k", type=int_at_least(1), default=5, help="number of top eigenvalues")
    h.add_argument("--method", choices=("lanczos", "power"), default="lanczos", help="eigenvalue method")
    h.add_argument("--trace-samples", type=int_at_least(1), default=100, help="Hutchinson Rademacher samples")
    h.add_argument("--slq-vectors", type=int_at_least(0), default=5, help="SLQ random vectors (0 = skip the density)")
    h.add_argument("--slq-steps", type=int_at_least(1), default=40, help="Lanczos steps per SLQ vector")
    h.add_argument("--split", choices=("train", "test", "all"), default="train", help="which examples define the loss")
    h.add_argument("--batch-size", type=int_at_least(0), default=0, help="examples per batch (0 = full batch)")
    h.add_argument("--float64", action="store_true", help="compute in float64")

    i = add_parser(lsub, "intrinsic", "intrinsic dimension: random-subspace training sweep and d_int90",
                   "wsnets landscape intrinsic model.safetensors --dataset digits --dims 10,50,100,200,500 --plot plots/",
                   _intrinsic)
    _common(i)
    i.add_argument("--dims", default="10,20,50,100,200,300,500,750,1000", help="comma-separated subspace dimensions")
    i.add_argument("--projection", choices=("dense", "sparse", "fastfood"), default="dense", help="random projection")
    i.add_argument("--steps", type=int_at_least(1), default=1000, help="Adam steps")
    i.add_argument("--batch-size", type=int_at_least(1), default=128, help="minibatch size")
    i.add_argument("--lr", type=finite_float, default=1e-2, help="learning rate of the subspace coordinates")
    i.add_argument("--full-lr", type=finite_float, default=3e-3, help="learning rate of the full-dimensional baseline")
    i.add_argument("--keep-weights", action="store_true",
                   help="start from the checkpoint's weights (default: a fresh init of its architecture, --seed)")
