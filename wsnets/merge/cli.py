"""``wsnets merge METHOD|config|methods|soup|align|barrier``.

Every registered per-tensor method (``linear``/``average``, ``slerp``, ``task-arithmetic``, ``ties``,
``dare-ties``, ``dare-linear``, ``breadcrumbs``, ``breadcrumbs-ties``, ``model-stock``) is a sub-command
whose options come from the method's signature; it streams any checkpoint (a ``.safetensors`` file, a
sharded Hugging Face directory or index, a ``.pt``/``.bin`` state_dict) tensor by tensor and needs no
architecture. ``config`` runs a TOML merge config. ``soup``, ``align`` and ``barrier`` evaluate or permute
networks, so they need an architecture wsnets can trace, and say so in one line when it cannot.

Merged models are written as safetensors whose metadata records the provenance: method, parameters,
dtypes and ingredients (path and digest of each input: XXH3-128 by default, ``--hash sha256`` for a
cryptographic one; see :func:`wsnets.merge.stream.digest_files`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


from ..cli import add_arch_options, add_common, add_parser, emit
from ..errors import ConfigError, ShapeMismatchError, UnsupportedLayerError
from ..weights import WeightSpace
from .registry import Method, list_methods
from .digest import DEFAULT_DIGEST, DIGESTS, digest_files
from .stream import META_PREFIX


def provenance(method: str, ingredients: list[str], parameters: dict[str, Any], base: str | None = None) -> dict[str, str]:
    """Metadata entries describing how a merged model was made."""
    from .. import __version__
    ing = [{"path": p, "digest": digest_files([Path(p)])} for p in ingredients]
    meta = {f"{META_PREFIX}method": method, f"{META_PREFIX}ingredients": json.dumps(ing),
            f"{META_PREFIX}parameters": json.dumps(parameters, default=str),
            f"{META_PREFIX}version": __version__, f"{META_PREFIX}digest": DEFAULT_DIGEST}
    if base is not None:
        meta[f"{META_PREFIX}base"] = json.dumps({"path": base, "digest": digest_files([Path(base)])})
    return meta


def _load_all(paths: list[str], device: str, args=None, command: str = "this merge") -> WeightSpace:
    from .compat import gather
    from ..cli import load_checkpoint
    for p in paths:
        if not Path(p).exists():
            raise FileNotFoundError(2, "no such file", p)
    spaces = []
    for p in paths:
        try:
            spaces.append(load_checkpoint(p, args))
        except (UnsupportedLayerError, ShapeMismatchError) as e:
            raise type(e)(f"{command} needs each model's architecture ({e}); a per-tensor merge needs none "
                          "(wsnets merge methods)") from None
    return gather(spaces, names=paths).to(device)


def _data(name: str | None, ws: WeightSpace, device: str, *, needed: bool = False):
    """(train x, train y, test x, test y) of a zoo dataset, reshaped to the model's input if possible."""
    if name is None:
        if needed:
            raise ConfigError("this needs --dataset (e.g. digits, mnist1d)")
        return None
    from ..zoo import datasets
    from .soup import model_inputs
    x, y, xt, yt = datasets.load(name)
    x, xt = model_inputs(name, x, ws.arch.input_shape), model_inputs(name, xt, ws.arch.input_shape)
    classes, outputs = int(max(y.max(), yt.max())) + 1, ws.arch.out_features
    if classes > outputs:  # a loss on labels the network has no output for (was an IndexError)
        raise ConfigError(f"dataset {name!r} has {classes} classes, the model has {outputs} output(s)")
    return x.to(device), y.to(device), xt.to(device), yt.to(device)


def _write(args: argparse.Namespace, ws: WeightSpace, method: str, params: dict[str, Any], extra: dict | None = None,
           base: str | None = None) -> int:
    from ..io import save
    from .stream import check_output
    check_output(args.out, [*args.models, base], args.overwrite)
    meta = provenance(method, list(args.models), params, base)
    save(ws.to("cpu"), args.out, meta)
    out = {"out": str(args.out), "method": method, "parameters": params, "ingredients": list(args.models),
           "architecture": ws.arch.describe(), **(extra or {})}
    emit(args, out, f"wrote {args.out}: {method} of {len(args.models)} model(s), {ws.arch.describe()}")
    return 0


def _soup(args):
    from .soup import dataset_evaluator, greedy_soup, uniform_soup
    batch = _load_all(args.models, args.device, args, "a soup")
    if args.uniform:
        d = _data(args.dataset, batch, args.device)
        ws = uniform_soup(batch, bn_data=d[0] if d else None)
        return _write(args, ws, "uniform_soup", {"bn_dataset": args.dataset})
    if args.dataset is None:
        raise ConfigError("a greedy soup needs --dataset to score ingredients (or pass --uniform)")
    evaluate, xtrain = dataset_evaluator(args.dataset, split=args.split, val_fraction=args.val_fraction,
                                         device=args.device, input_shape=batch.arch.input_shape)
    r = greedy_soup(batch, evaluate, bn_data=xtrain)
    extra = {"kept": [args.models[i] for i in r.ingredients], "ingredient_scores": r.scores, "soup_score": r.score}
    return _write(args, r.model, "greedy_soup", {"dataset": args.dataset, "split": args.split,
                                                 "val_fraction": args.val_fraction,
                                                 "kept": [args.models[i] for i in r.ingredients]}, extra)


def _two(args, command: str) -> None:
    if len(args.models) != 2:
        raise ConfigError(f"{command} takes exactly two models (A, then B), got {len(args.models)}")


def _align(args):
    from .align import align
    _two(args, "alignment")
    batch = _load_all(args.models, args.device, args, "alignment")
    d = _data(args.dataset, batch, args.device, needed=args.matching == "activation")
    data = d[0][:args.num_examples] if d else None
    kw = {"seed": args.seed} if args.matching == "weight" else {}
    ws, perms = align(batch[0], batch[1], method=args.matching, data=data, **kw)
    return _write(args, ws, f"{args.matching}_matching", {"reference": args.models[0], "seed": args.seed},
                  {"permutations": {str(g): p.tolist() for g, p in perms.items()}})


def _barrier(args):
    from .align import weight_matching
    from .interpolate import interpolation_curve
    _two(args, "a barrier")
    batch = _load_all(args.models, args.device, args, "a barrier")
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


def _method_options(method: Method, args: argparse.Namespace) -> dict[str, Any]:
    return {o.name: getattr(args, f"opt_{o.name}") for o in method.options
            if getattr(args, f"opt_{o.name}", None) is not None}


def _merge(args):
    """A registered per-tensor method, streamed (or, with --dataset, on WeightSpaces with BatchNorm
    statistics recomputed afterwards)."""
    from .registry import get_method
    method = get_method(args.method_name)
    options = _method_options(method, args)
    if getattr(args, "dataset", None):
        return _merge_with_bn(args, method, options)
    from .stream import merge_checkpoints
    res = merge_checkpoints(method, args.models, base=getattr(args, "base", None), out=args.out, options=options,
                            dtype=args.dtype, out_dtype=getattr(args, "out_dtype", None),
                            scope=getattr(args, "scope", None),
                            shared_only=args.shared_only, shard_size=args.shard_size, chunk_mb=args.chunk_mb,
                            device=args.device, digest=_digest(args), overwrite=args.overwrite,
                            progress=not args.json)
    return _report(args, res)


def _digest(args) -> str:
    return "none" if args.no_hash else getattr(args, "hash", DEFAULT_DIGEST)


def _add_overwrite(q) -> None:
    q.add_argument("--overwrite", action="store_true", help="replace an existing output (an input never is)")


def _add_hash(q) -> None:
    q.add_argument("--hash", default=argparse.SUPPRESS, choices=[*DIGESTS, "none"],
                   help=f"digest of each input recorded in the provenance (default {DEFAULT_DIGEST}: fast, catches "
                   "any accidental change, what xxh128sum prints; sha256: cryptographic, ~1 CPU-second per GB; none)")
    q.add_argument("--no-hash", action="store_true", help="record no digest of the inputs (= --hash none)")


def _report(args, res) -> int:
    def text() -> str:
        base = f" onto {res.base}" if res.base else ""
        lines = [f"wrote {res.out}: {res.method} of {len(res.models)} model(s){base}; {len(res.merged)} tensors merged "
                 f"in {res.compute_dtype or '-'}, {len(res.stats)} running statistics averaged, "
                 f"{len(res.copied)} copied (not floating point); {len(res.files)} file(s)"]
        if res.left_out:
            shown = ", ".join(res.left_out[:8]) + (f" and {len(res.left_out) - 8} more" if len(res.left_out) > 8 else "")
            lines.append(f"left out (not in every model or of another shape): {shown}")
        if res.extra_files:
            lines.append(f"copied from the reference model: {', '.join(res.extra_files[:8])}"
                         + (" ..." if len(res.extra_files) > 8 else ""))
        return "\n".join(lines)
    emit(args, res.to_dict(), text)
    return 0


def _merge_with_bn(args, method: Method, options: dict[str, Any]) -> int:
    from .functional import has_batchnorm, recompute_bn
    from .stream import merge_spaces
    base = getattr(args, "base", None)
    batch = _load_all(([base] if base else []) + list(args.models), args.device, args,
                      "recomputing BatchNorm statistics (--dataset)")
    d = _data(args.dataset, batch, args.device)
    scope = getattr(args, "scope", None) or method.scope
    ws = merge_spaces(method, batch[1:] if base else batch, base=batch[0] if base else None, scope=scope, **options)
    if has_batchnorm(ws):
        ws = recompute_bn(ws, d[0])
    params = {**options, "scope": scope, "bn_dataset": args.dataset}
    return _write(args, ws, method.name, params, base=base)


def _config(args):
    from .config import merge_config
    kw = {"digest": _digest(args)} if hasattr(args, "hash") or args.no_hash else {}   # else the config's
    res = merge_config(args.config, args.out, progress=not args.json, device=args.device, overwrite=args.overwrite,
                       **kw)
    return _report(args, res)


def _methods(args):
    ms = list_methods()
    out = {n: {"summary": m.summary, "paper": m.paper, "base": m.base, "models": [m.min_models, m.max_models],
               "scope": m.scope, "aliases": list(m.aliases),
               "options": {o.name: {"type": o.type.__name__, "default": o.default, "per_model": o.per_model,
                                    "choices": list(o.choices) if o.choices else None,
                                    "range": str(o.interval) if o.interval else None, "help": o.help}
                           for o in m.options}} for n, m in ms.items()}

    def text() -> str:
        rows = []
        for n, m in ms.items():
            opts = ", ".join(f"{o.name}={o.default}" + ("/model" if o.per_model else "") for o in m.options)
            rows.append(f"{n.replace('_', '-'):<17} {'base + ' if m.base else ''}models; {m.summary.replace('``', '')}\n"
                        f"{'':<17} options: {opts or '-'}   ({m.paper})")
        return "\n".join(rows)
    emit(args, out, text)
    return 0


def _add_method(ms, method: Method, name: str) -> None:
    example = (f"wsnets merge {name} --base base/ ft1/ ft2/ -o merged/" if method.base
               else f"wsnets merge {name} a.safetensors b.safetensors -o merged.safetensors")
    alias = name.replace("-", "_") != method.name
    summary = method.summary.replace("``", "")
    q = add_parser(ms, name, f"same as {method.name.replace('_', '-')}" if alias else f"{summary} [{method.paper}]",
                   example, _merge)
    q.set_defaults(method_name=method.name)
    q.add_argument("models", nargs="+", help="checkpoints: .safetensors, a sharded directory or "
                   "model.safetensors.index.json, .pt/.bin" + (" (the fine-tuned models)" if method.base else ""))
    if method.base:
        q.add_argument("--base", required=True, help="the base model the others were fine-tuned from")
    q.add_argument("-o", "--out", required=True, help="output: a .safetensors file, or a directory (Hugging Face "
                   "layout, sharded by --shard-size, the reference model's config/tokenizer files copied)")
    _add_overwrite(q)
    for o in method.options:
        flags = [f"--{o.name.replace('_', '-')}"] + (["--weights"] if o.name == "weight" else [])
        what = o.help + (" (one per model, comma-separated, or one for all)" if o.per_model else "")
        what += f"; default {o.default}" + (f", range {o.interval}" if o.interval else "")
        if o.type is bool:
            q.add_argument(*flags, dest=f"opt_{o.name}", action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=what)
        else:
            q.add_argument(*flags, dest=f"opt_{o.name}", default=argparse.SUPPRESS, choices=o.choices, help=what,
                           metavar=None if o.choices else o.type.__name__.upper() + ("[,...]" if o.per_model else ""))
    q.add_argument("--dtype", default="auto", help="compute dtype: auto (float32 for half-precision inputs, else "
                   "theirs), float32, float64, bfloat16, float16")
    q.add_argument("--out-dtype", default=argparse.SUPPRESS,
                   help="output dtype (default: the reference model's, tensor by tensor)")
    q.add_argument("--scope", default=argparse.SUPPRESS, choices=["tensor", "model"],
                   help=f"unit of whole-tensor statistics (top-k, angles, norms); default {method.scope}")
    q.add_argument("--shared-only", action="store_true", help="merge only the tensors every model has with one "
                   "shape and list the rest (else a differing name or shape is an error)")
    q.add_argument("--shard-size", default="5GB", help="largest output shard in a directory output")
    q.add_argument("--chunk-mb", type=float, default=16.0, help="slice size per model in MB of compute dtype "
                   "(memory is a few slices)")
    _add_hash(q)
    if method.name in ("linear", "task_arithmetic", "ties"):
        q.add_argument("--dataset", default=None, help="zoo dataset whose training inputs recompute BatchNorm "
                       "statistics of the result (needs an architecture wsnets can trace)")
        add_arch_options(q)
    add_common(q)


def register(sub) -> None:
    p = add_parser(sub, "merge", "merge checkpoints of any architecture (linear, SLERP, task arithmetic, TIES, DARE, "
                   "breadcrumbs, model stock), soups, permutation alignment, barriers",
                   "wsnets merge ties --base base.safetensors ft1.safetensors ft2.safetensors -o merged/",
                   lambda args: (p.print_help(), 2)[1])
    ms = p.add_subparsers(dest="method", metavar="METHOD")

    def common(q, out: bool = True, dataset_help: str = "zoo dataset whose training inputs recompute BatchNorm statistics",
               two: bool = False):
        q.add_argument("models", nargs="+", help=("two checkpoints, A then B" if two else "checkpoints") +
                       " (.safetensors, .pt, .pth) of one architecture")
        if out:
            q.add_argument("-o", "--out", required=True, help="output .safetensors (provenance in its metadata)")
            _add_overwrite(q)
        q.add_argument("--dataset", default=None, help=dataset_help)
        add_arch_options(q)
        add_common(q)

    for name, method in list_methods().items():
        for n in (name, *method.aliases):
            _add_method(ms, method, n.replace("_", "-"))

    q = add_parser(ms, "config", "run a TOML merge config (models, weights, per-tensor options)",
                   "wsnets merge config merge.toml -o merged/", _config)
    q.add_argument("config", help="TOML file (see wsnets.merge.config)")
    q.add_argument("-o", "--out", default=None, help="output (overrides the config's out)")
    _add_overwrite(q)
    _add_hash(q)
    add_common(q)

    q = add_parser(ms, "methods", "list the per-tensor merge methods and their options",
                   "wsnets merge methods --json", _methods)
    add_common(q, device=False)

    q = add_parser(ms, "soup", "greedy (default) or uniform model soup (Wortsman et al. 2022)",
                   "wsnets merge soup ft*.safetensors --dataset digits -o soup.safetensors", _soup)
    common(q, dataset_help="zoo dataset whose validation split scores the greedy soup")
    q.add_argument("--uniform", action="store_true", help="uniform soup (no scoring)")
    q.add_argument("--split", default="val", choices=["val", "test"], help="held-out split for greedy scoring")
    q.add_argument("--val-fraction", type=float, default=0.2, help="tail of the training split used as validation")

    q = add_parser(ms, "align", "permute model B's hidden neurons to match model A (Git Re-Basin)",
                   "wsnets merge align a.safetensors b.safetensors -o b_aligned.safetensors", _align)
    common(q, dataset_help="zoo dataset for activation matching", two=True)
    q.add_argument("--method", dest="matching", default="weight", choices=["weight", "activation"],
                   help="matching method")
    q.add_argument("--num-examples", type=int, default=512, help="examples for activation matching")
    q.add_argument("--seed", type=int, default=0, help="order of the coordinate descent over layers")

    q = add_parser(ms, "barrier", "loss/accuracy along the line between two models and the loss barrier",
                   "wsnets merge barrier a.safetensors b.safetensors --dataset digits --align --plot curve.png", _barrier)
    common(q, out=False, dataset_help="zoo dataset: test split evaluates, training inputs recompute BatchNorm", two=True)
    q.add_argument("--steps", type=int, default=11, help="points on the path, endpoints included")
    q.add_argument("--align", action="store_true", help="also the curve after weight matching")
    q.add_argument("--bezier-epochs", type=int, default=0, help="also train a Bezier curve for this many epochs")
    q.add_argument("--plot", default=None, metavar="PNG_OR_DIR",
                   help="write a plot of the curves: a .png file, or a folder (barrier.png in it)")
