"""``wsnets merge average|soup|task-arithmetic|ties|align|barrier``.

Merged models are written as safetensors whose metadata records the provenance: method, parameters
and ingredients (path and SHA-256 of each input file).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from ..cli import add_arch_options, add_common, add_parser, emit
from ..errors import ConfigError
from ..weights import WeightSpace

META_PREFIX = "wsnets.merge."


def _sha256(path: str) -> str:
    from ..io import sha256_file
    return sha256_file(path)


def provenance(method: str, ingredients: list[str], parameters: dict[str, Any], base: str | None = None) -> dict[str, str]:
    """Metadata entries describing how a merged model was made."""
    from .. import __version__
    ing = [{"path": p, "sha256": _sha256(p)} for p in ingredients]
    meta = {f"{META_PREFIX}method": method, f"{META_PREFIX}ingredients": json.dumps(ing),
            f"{META_PREFIX}parameters": json.dumps(parameters, default=str),
            f"{META_PREFIX}version": __version__}
    if base is not None:
        meta[f"{META_PREFIX}base"] = json.dumps({"path": base, "sha256": _sha256(base)})
    return meta


def _load_all(paths: list[str], device: str, args=None) -> WeightSpace:
    from .compat import gather
    from ..cli import load_checkpoint
    for p in paths:
        if not Path(p).exists():
            raise FileNotFoundError(2, "no such file", p)
    return gather([load_checkpoint(p, args) for p in paths], names=paths).to(device)


def _data(name: str | None, ws: WeightSpace, device: str, *, needed: bool = False):
    """(train x, train y, test x, test y) of a zoo dataset, reshaped to the model's input if possible."""
    if name is None:
        if needed:
            raise ConfigError("this needs --dataset (e.g. digits, mnist1d)")
        return None
    from ..zoo import datasets
    x, y, xt, yt = datasets.load(name)
    shape = ws.arch.input_shape
    if shape is not None and tuple(x.shape[1:]) != tuple(shape):
        n = 1
        for s in shape:
            n *= s
        if n != x[0].numel():
            raise ConfigError(f"dataset {name!r} has inputs {tuple(x.shape[1:])}, the model expects {tuple(shape)}")
        x, xt = x.reshape(len(x), *shape), xt.reshape(len(xt), *shape)
    return x.to(device), y.to(device), xt.to(device), yt.to(device)


def _write(args: argparse.Namespace, ws: WeightSpace, method: str, params: dict[str, Any], extra: dict | None = None,
           base: str | None = None) -> int:
    from ..io import save
    meta = provenance(method, list(args.models), params, base)
    save(ws.to("cpu"), args.out, meta)
    out = {"out": str(args.out), "method": method, "parameters": params, "ingredients": list(args.models),
           "architecture": ws.arch.describe(), **(extra or {})}
    emit(args, out, f"wrote {args.out}: {method} of {len(args.models)} model(s), {ws.arch.describe()}")
    return 0


def _average(args):
    from .average import average
    batch = _load_all(args.models, args.device, args)
    d = _data(args.dataset, batch, args.device)
    w = [float(v) for v in args.weights.split(",")] if args.weights else None
    ws = average(batch, w, bn_data=d[0] if d else None)
    return _write(args, ws, "average", {"weights": w, "bn_dataset": args.dataset})


def _soup(args):
    from .soup import dataset_evaluator, greedy_soup, uniform_soup
    batch = _load_all(args.models, args.device, args)
    if args.uniform:
        d = _data(args.dataset, batch, args.device)
        ws = uniform_soup(batch, bn_data=d[0] if d else None)
        return _write(args, ws, "uniform_soup", {"bn_dataset": args.dataset})
    if args.dataset is None:
        raise ConfigError("a greedy soup needs --dataset to score ingredients (or pass --uniform)")
    evaluate, xtrain = dataset_evaluator(args.dataset, split=args.split, val_fraction=args.val_fraction,
                                         device=args.device)
    shape = batch.arch.input_shape
    bn = xtrain.reshape(len(xtrain), *shape) if shape is not None else xtrain
    r = greedy_soup(batch, evaluate, bn_data=bn)
    extra = {"kept": [args.models[i] for i in r.ingredients], "ingredient_scores": r.scores, "soup_score": r.score}
    return _write(args, r.model, "greedy_soup", {"dataset": args.dataset, "split": args.split,
                                                 "val_fraction": args.val_fraction,
                                                 "kept": [args.models[i] for i in r.ingredients]}, extra)


def _task_arith(args):
    from .task_arithmetic import task_arithmetic
    batch = _load_all([args.base, *args.models], args.device, args)
    d = _data(args.dataset, batch, args.device)
    ws = task_arithmetic(batch[0], batch[1:], scale=args.scale, bn_data=d[0] if d else None)
    return _write(args, ws, "task_arithmetic", {"scale": args.scale, "bn_dataset": args.dataset}, base=args.base)


def _ties(args):
    from .task_arithmetic import ties
    batch = _load_all([args.base, *args.models], args.device, args)
    d = _data(args.dataset, batch, args.device)
    ws = ties(batch[0], batch[1:], density=args.density, scale=args.scale, bn_data=d[0] if d else None)
    return _write(args, ws, "ties", {"density": args.density, "scale": args.scale, "bn_dataset": args.dataset},
                  base=args.base)


def _align(args):
    from .align import align
    batch = _load_all(args.models, args.device, args)
    d = _data(args.dataset, batch, args.device, needed=args.method == "activation")
    data = d[0][:args.num_examples] if d else None
    kw = {"seed": args.seed} if args.method == "weight" else {}
    ws, perms = align(batch[0], batch[1], method=args.method, data=data, **kw)
    return _write(args, ws, f"{args.method}_matching", {"reference": args.models[0], "seed": args.seed},
                  {"permutations": {str(g): p.tolist() for g, p in perms.items()}})


def _barrier(args):
    from .align import weight_matching
    from .interpolate import interpolation_curve
    batch = _load_all(args.models, args.device, args)
    x, y, xt, yt = _data(args.dataset, batch, args.device, needed=True)
    a, b = batch[0], batch[1]
    curves = {"straight line": interpolation_curve(a, b, xt, yt, steps=args.steps, bn_data=x)}
    if args.align:
        b_al, _ = weight_matching(a, b)
        curves["after weight matching"] = interpolation_curve(a, b_al, xt, yt, steps=args.steps, bn_data=x)
    if args.bezier_epochs:
        from .bezier import train_bezier
        curve = train_bezier(a, b, x, y, epochs=args.bezier_epochs, progress=not args.json)
        curves["Bezier curve"] = curve.metrics(xt, yt, steps=args.steps, bn_data=x)
    if args.plot:
        from ..cli import PlotTarget
        from .plot import plot_curves
        args.plot = str(PlotTarget(args.plot).path("barrier.png", main=True))
        plot_curves(curves, args.plot, title=f"{Path(args.models[0]).name} to {Path(args.models[1]).name} "
                    f"({args.dataset} test split)")
    out = {"models": list(args.models), "dataset": args.dataset, "curves": {k: c.to_dict() for k, c in curves.items()},
           "plot": args.plot}

    def text() -> str:
        rows = [f"{k:<22} loss barrier {c.barrier:.4f}  worst loss {max(c.loss):.4f}  "
                f"accuracy drop {100 * c.acc_barrier:.1f} pts" for k, c in curves.items()]
        return "\n".join(rows + ([f"plot: {args.plot}"] if args.plot else []))
    emit(args, out, text)
    return 0


def register(sub) -> None:
    p = add_parser(sub, "merge", "average, soup, task arithmetic, TIES, permutation alignment, barriers",
                   "wsnets merge ties --base base.safetensors ft1.safetensors ft2.safetensors -o merged.safetensors",
                   lambda args: (p.print_help(), 2)[1])
    ms = p.add_subparsers(dest="method", metavar="METHOD")

    def common(q, out: bool = True, dataset_help: str = "zoo dataset whose training inputs recompute BatchNorm statistics"):
        q.add_argument("models", nargs="+", help="checkpoints (.safetensors, .pt, .pth) of one architecture")
        if out:
            q.add_argument("-o", "--out", required=True, help="output .safetensors (provenance in its metadata)")
        q.add_argument("--dataset", default=None, help=dataset_help)
        add_arch_options(q)
        add_common(q)

    q = add_parser(ms, "average", "weighted average of models",
                   "wsnets merge average a.safetensors b.safetensors -o avg.safetensors --weights 1,3", _average)
    common(q)
    q.add_argument("--weights", default=None, help="comma-separated mixing weights (normalized), uniform if omitted")

    q = add_parser(ms, "soup", "greedy (default) or uniform model soup (Wortsman et al. 2022)",
                   "wsnets merge soup ft*.safetensors --dataset digits -o soup.safetensors", _soup)
    common(q, dataset_help="zoo dataset whose validation split scores the greedy soup")
    q.add_argument("--uniform", action="store_true", help="uniform soup (no scoring)")
    q.add_argument("--split", default="val", choices=["val", "test"], help="held-out split for greedy scoring")
    q.add_argument("--val-fraction", type=float, default=0.2, help="tail of the training split used as validation")

    for name, fn, help_ in (("task-arithmetic", _task_arith, "base + scale * sum of task vectors (Ilharco et al. 2023)"),
                            ("ties", _ties, "TIES merging: trim, elect sign, disjoint mean (Yadav et al. 2023)")):
        q = add_parser(ms, name, help_, f"wsnets merge {name} --base base.safetensors ft1.safetensors ft2.safetensors "
                       "-o merged.safetensors", fn)
        q.add_argument("--base", required=True, help="the shared pre-trained model")
        common(q)
        if name == "ties":
            q.add_argument("--density", type=float, default=0.2, help="fraction of each task vector kept by magnitude")
            q.add_argument("--scale", type=float, default=1.0, help="lambda on the merged task vector")
        else:
            q.add_argument("--scale", type=float, default=0.4, help="lambda on the summed task vectors")

    q = add_parser(ms, "align", "permute model B's hidden neurons to match model A (Git Re-Basin)",
                   "wsnets merge align a.safetensors b.safetensors -o b_aligned.safetensors", _align)
    common(q, dataset_help="zoo dataset for activation matching")
    q.add_argument("--method", default="weight", choices=["weight", "activation"], help="matching method")
    q.add_argument("--num-examples", type=int, default=512, help="examples for activation matching")
    q.add_argument("--seed", type=int, default=0, help="order of the coordinate descent over layers")

    q = add_parser(ms, "barrier", "loss/accuracy along the line between two models and the loss barrier",
                   "wsnets merge barrier a.safetensors b.safetensors --dataset digits --align --plot curve.png", _barrier)
    common(q, out=False, dataset_help="zoo dataset: test split evaluates, training inputs recompute BatchNorm")
    q.add_argument("--steps", type=int, default=11, help="points on the path, endpoints included")
    q.add_argument("--align", action="store_true", help="also the curve after weight matching")
    q.add_argument("--bezier-epochs", type=int, default=0, help="also train a Bezier curve for this many epochs")
    q.add_argument("--plot", default=None, metavar="PNG_OR_DIR",
                   help="write a plot of the curves: a .png file, or a folder (barrier.png in it)")
