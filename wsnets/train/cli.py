"""``wsnets train`` and ``wsnets predict``.

``wsnets train CONFIG --zoo DIR --out RUN [--seeds 3] [--wandb] [--device D] [--set key=value] [--key value]``
``wsnets predict CKPT... --meta-model RUN [--json]``
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from ..cli import COMMANDS, add_common, add_parser, emit


def _lenient(p: argparse.ArgumentParser) -> None:
    """Let ``--section.key value`` pass through the sub-parser as config overrides."""
    orig = p.parse_known_args

    def parse_known_args(args=None, namespace=None):
        ns, extra = orig(args, namespace)
        ns.extra = list(getattr(ns, "extra", None) or []) + list(extra)
        return ns, []
    p.parse_known_args = parse_known_args  # type: ignore[method-assign]


def _train(args: argparse.Namespace) -> int:
    from .config import load_config, split_cli_overrides
    from .experiment import run_training
    overrides = list(args.set or []) + split_cli_overrides(getattr(args, "extra", []) or [])
    cfg = load_config(args.config, overrides)
    if args.no_progress:
        cfg.log.progress = False
    res = run_training(cfg, zoo=args.zoo, out=args.out, seeds=args.seeds, device=args.device, wandb=args.wandb,
                       overwrite=args.overwrite)
    summary = {"out": args.out, "sizes": res["sizes"], "models": res.get("models"), "test": res["test"]}

    def text() -> str:
        from .metrics import fmt
        sz, models = res["sizes"], res.get("models") or {}
        of = (f" (of {models['train']}/{models['val']}/{models['test']} models)"
              if models and any(models[s] != sz[s] for s in models) else " (one per model)" if models else "")
        lines = [f"{res['name']} ({res['encoder']}) -> {args.out}   checkpoints train/val/test: "
                 f"{sz['train']}/{sz['val']}/{sz['test']}{of}, {len(res['seeds'])} seed(s)"]
        for t, ms in res["test"].items():
            if t in ("loss", "loss_parts") or not isinstance(ms, dict):
                continue
            keys = ("kendall_tau", "spearman", "r2", "mae") if "kendall_tau" in ms else ("accuracy", "macro_f1")
            lines.append(f"  {t:<10} " + "   ".join(f"{k} {fmt(ms[k])}" for k in keys))
        return "\n".join(lines)
    emit(args, summary, text)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from .meta_model import MetaModel
    mm = MetaModel.load(args.meta_model, device=args.device)
    tested = mm.test_metrics or {}
    rows = [{"checkpoint": c, **r, **({"meta_model_test": tested} if tested else {})}
            for c, r in zip(args.checkpoints, _predict_each(mm, args.checkpoints, args))]
    outside = [r for r in rows if r.get("in_range") is False]
    if outside and not args.json:
        from ..cli import note
        note(args, f"{len(outside)} of {len(rows)} network(s) lie outside the range the meta-model was trained on: "
                   "their predictions are extrapolations, not to be trusted")

    def text() -> str:
        out = []
        for r in rows:
            parts = []
            for t in mm.targets:
                if r.get(f"{t}_probs"):
                    probs = sorted(r[f"{t}_probs"].items(), key=lambda kv: -kv[1])[:3]
                    parts.append(f"{t} {r[t]} (" + ", ".join(f"{c} {p:.2f}" for c, p in probs) + ")")
                elif r[t] is None or r[t] != r[t]:  # a network the meta-model cannot read
                    parts.append(f"{t} -")
                else:
                    raw = r.get(f"{t}_unclipped")
                    clip = f" (clipped from {raw:.4f})" if raw is not None and raw != r[t] else ""
                    parts.append(f"{t} {r[t]:.4f}{clip}")
            if r.get("in_range") is False:
                parts.append("WARNING out of range: " + "; ".join(r["range_reasons"]))
            if r.get("cast"):
                parts.append(f"({r['cast']})")
            out.append(f"{r['checkpoint']}: " + "   ".join(parts))
        return "\n".join(out + [_meta_model_line(mm, args.meta_model)])
    emit(args, [_json_safe(r) for r in rows] if args.json else rows, text)
    return 0


def _json_safe(v: Any) -> Any:
    """NaN and infinities as null: ``--json`` prints standard JSON (``NaN`` is not) for any consumer."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def _meta_model_line(mm: Any, run: str) -> str:
    """The meta-model's own test metrics and the range it was trained on, shown beside its predictions."""
    enc = (getattr(mm, "config", None) or {}).get("encoder", {}).get("name", "?")
    tested = mm.test_metrics or {}
    if tested:
        names = {"kendall_tau": "τ", "mae": "MAE", "r2": "R²", "accuracy": "accuracy", "macro_f1": "macro-F1"}
        test = "; its test split: " + ", ".join(
            f"{t} " + " ".join(f"{names[k]} {v:.3f}" for k, v in ms.items() if k in ("kendall_tau", "mae", "accuracy"))
            for t, ms in tested.items())
    else:
        test = "; its test metrics were not recorded (an older run: see metrics.json)"
    rng = mm.trained_on.summary() if mm.trained_on is not None else \
        "training range unknown (saved by an older wsnets): predictions are not checked against it"
    caveat = ("; it reads the raw parameter vector, so it is not permutation invariant: a network with its neurons "
              "permuted (the same function) can get another prediction") if enc == "flat" else ""
    return f"meta-model {run} ({enc}){test}; {rng}{caveat}"


def _predict_each(mm: Any, paths: list[str], args: Any = None) -> list[dict]:
    """One prediction per path (a batched checkpoint file contributes its first network)."""
    from ..cli import load_checkpoint
    nets = []
    for p in paths:
        ws = load_checkpoint(p, args)
        nets.append(ws[0] if ws.batch_size is not None else ws)
    return mm.predict_records(nets)


def register(sub) -> None:
    p = add_parser(sub, "train", COMMANDS["train"][1],
                   "wsnets train train/graph.toml --zoo zoos/digits-mlp --out runs/graph --seeds 3 --optim.epochs 20",
                   _train)
    p.add_argument("config", help="a shipped config by name (graph, hnp, statnn-gbm, ...: train/*.toml) or a TOML path")
    p.add_argument("--zoo", required=True, help="zoo directory (wsnets zoo build)")
    p.add_argument("--out", required=True, help="run directory to write (model, config, metrics, plots)")
    p.add_argument("--seeds", type=int, default=1, help="train this many seeds; metrics report mean ± std")
    p.add_argument("--wandb", action="store_true", help="log to wandb (WANDB_MODE=offline works without network)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field, e.g. optim.lr=3e-4 (repeatable); --optim.lr 3e-4 works too")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out if there is one (default: refuse; its files are removed first)")
    add_common(p)
    _lenient(p)
    q = add_parser(sub, "predict", COMMANDS["predict"][1],
                   "wsnets predict model.safetensors other.pt --meta-model runs/graph --json", _predict)
    q.add_argument("checkpoints", nargs="+", metavar="CKPT", help=".safetensors, .pt or .pth checkpoints")
    from ..cli import add_arch_options
    add_arch_options(q)
    q.add_argument("--meta-model", required=True, metavar="RUN", help="run directory written by wsnets train")
    add_common(q)
