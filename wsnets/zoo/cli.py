"""``wsnets zoo build|info|merge|export``."""

from __future__ import annotations

import argparse
import statistics
from collections import Counter
from typing import Any

from ..cli import add_common, add_parser, emit
from ..errors import ConfigError

ZOO_MMAP_THRESHOLD = 32 << 20  # bytes: glibc's largest; a build's per-step tensors stay below it
ZOO_TRIM_THRESHOLD = 256 << 20  # freed heap kept for the next step (a step frees what the next allocates)


def _build(args: argparse.Namespace) -> int:
    import torch

    from ..memory import tame_allocator
    from .build import build
    # a group's training frees and allocates the same tensor sizes every step: with the CLI's 1 MB threshold
    # every tensor above it was a fresh mapping, its pages faulted in and zeroed each step (a 4-group shard of
    # digits-wild: 33M page faults, 44 of 166 s of CPU time in the kernel); from the heap they are reused
    tame_allocator(mmap_threshold=ZOO_MMAP_THRESHOLD, trim_threshold=ZOO_TRIM_THRESHOLD)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif str(args.device).startswith("cpu"):
        torch.set_num_threads(1)  # small batched ops: one thread per process; --workers uses the other cores
    if args.tf32:
        torch.set_float32_matmul_precision("high")
    s = build(args.recipe, args.out, limit=args.limit, shard=args.shard, device=args.device, progress=not args.json,
              workers=args.workers)
    loops = {None: "", "ok": ", fused CPU loops"}.get(s.get("cpu_loops"),
                                                       f"; fused CPU loops off ({s.get('cpu_loops')}): the same "
                                                       "zoo, trained ~1.2x slower")
    repaired = f"; {s['groups_repaired']} damaged group(s) trained again" if s.get("groups_repaired") else ""
    emit(args, s, lambda: (f"{s['out']}: built {s['models_built']} models in {s['seconds']:.1f} s "
                           f"({s['models_per_s'] or 0:.2f} models/s), {s['groups_skipped']} of {s['groups_total']} "
                           f"groups already done (shard {s['shard']}, {s['device']}, {s['workers']} worker(s){loops})"
                           f"{repaired}"))
    return 0


def _number(v: Any) -> float | None:
    """A metric as a finite float, None if it is missing (NULL: SQLite stores NaN as NULL) or not finite."""
    import math
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def summarize(zoo) -> dict[str, Any]:
    """Counts per dataset / architecture / epoch and the test-accuracy spread at the last epoch."""
    rows = zoo.rows
    last = zoo.last_epoch().rows
    acc = sorted(v for v in (_number(r.get("test_acc")) for r in last) if v is not None)
    gaps = [v for v in (_number(r.get("gen_gap")) for r in last) if v is not None]

    def q(p: float) -> float:
        return acc[min(len(acc) - 1, int(p * (len(acc) - 1) + 0.5))] if acc else float("nan")
    return {
        "zoo": str(zoo.root), "recipe": zoo.meta.get("recipe"), "checkpoints": len(rows),
        "models": len({r["model_id"] for r in rows}),
        "per_dataset": dict(Counter(r.get("dataset") for r in last)), "per_task": dict(Counter(r.get("task") for r in last)),
        "per_arch": dict(Counter(r.get("arch_desc") for r in last).most_common()),
        "per_epoch": dict(sorted(Counter(r["epoch"] for r in rows).items())),
        "test_acc_last_epoch": {"min": q(0), "p10": q(0.1), "median": q(0.5), "p90": q(0.9), "max": q(1),
                                "mean": statistics.fmean(acc) if acc else float("nan")},
        "gen_gap_last_epoch_mean": statistics.fmean(gaps) if gaps else float("nan"),
        "no_test_acc": len(last) - len(acc),  # models whose metric is NULL (NaN when stored: diverged) or absent
        "diverged": sum(int(r.get("diverged") or 0) for r in last),
    }


def _info(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .records import open as open_zoo
    zoo = open_zoo(args.dir)
    store = (Path(args.dir) / "index.sqlite").exists()
    check = _store_check(Path(args.dir), zoo.meta, args.verify) if store else {}
    if len(zoo) == 0:
        raise ConfigError(f"{args.dir}: the zoo has no committed checkpoints yet"
                          + (f" ({check['plan']['state']}: 0 of {check['plan']['planned_groups']} groups)"
                             if check.get("plan", {}).get("planned_groups") else ""))
    s = summarize(zoo)
    s.update(check)
    if args.verify and not store:
        s["verify"] = {"ok": True, "note": "Small CNN Zoo layout: weights.npy, metrics and layout checked when opened"}
    if args.plot:
        from ..cli import PlotTarget
        from .plots import accuracy_histogram
        s["plot"] = str(accuracy_histogram(zoo, PlotTarget(args.plot).path("zoo_test_accuracy.png", main=True)))

    def text() -> str:
        a = s["test_acc_last_epoch"]
        lines = [f"{s['zoo']}: recipe {s['recipe']}, {s['models']} models, {s['checkpoints']} checkpoints",
                 f"  test accuracy (last epoch): min {a['min']:.3f}  p10 {a['p10']:.3f}  median {a['median']:.3f}  "
                 f"p90 {a['p90']:.3f}  max {a['max']:.3f}  (mean gap {s['gen_gap_last_epoch_mean']:+.3f}, "
                 f"{s['diverged']} diverged)",
                 "  checkpoints per epoch: " + ", ".join(f"{e}: {n}" for e, n in s["per_epoch"].items()),
                 "  models per dataset: " + ", ".join(f"{d} {n}" for d, n in s["per_dataset"].items()),
                 "  models per task: " + ", ".join(f"{d} {n}" for d, n in s["per_task"].items()),
                 f"  architectures ({len(s['per_arch'])}): " + ", ".join(f"{d} {n}" for d, n in list(s["per_arch"].items())[:8])
                 + (" ..." if len(s["per_arch"]) > 8 else "")]
        if "plan" in s:
            lines.append("  " + _plan_line(s["plan"]))
        if "verify" in s:
            lines.append("  " + _verify_line(s["verify"]))
        if args.plot:
            lines.append(f"  histogram: {s['plot']}")
        return "\n".join(lines)
    emit(args, s, text)
    v = s.get("verify")
    if v and not v["ok"]:
        from ..errors import DamagedZooError
        from .verify import describe_damage
        raise DamagedZooError(describe_damage(Path(args.dir), v["damaged"]) if v["damaged"] else
                              f"{args.dir}: {v['orphan_rows']} rows belong to no committed group")
    return 0


def _store_check(root, meta: dict, verify_shards: bool) -> dict[str, Any]:
    """The plan status (complete / partial / mixed) and, with ``verify_shards``, every shard checked."""
    from .index import INDEX, read_groups, read_index
    from .store import read_rows
    from .verify import plan_status, verify
    groups, rows = read_index(root / INDEX, lambda con: (read_groups(con), read_rows(con) if verify_shards else []))
    out: dict[str, Any] = {"plan": plan_status(meta, [g["group_id"] for g in groups])}
    if verify_shards:
        out["verify"] = verify(root, groups, rows)
    return out


def _plan_line(p: dict[str, Any]) -> str:
    state = p["state"]
    if state == "unknown":
        return (f"plan: unknown ({p['committed_groups']} groups; the zoo records no recipe plan it can check: built by an "
                "older wsnets with --limit or --shard?)")
    where = f"--limit {p['limit'] if p['limit'] is not None else 'none'}, --shard {p['shard']}"
    done = p["planned_groups"] - p["missing_groups"]
    if state == "complete":
        return f"plan: complete ({done} of {p['planned_groups']} groups, {p['planned_models']} models; {where})"
    if state == "partial":
        return (f"plan: PARTIAL: {done} of {p['planned_groups']} groups committed ({where}); an interrupted build: "
                "run the same 'wsnets zoo build' again to finish it")
    return (f"plan: MIXED: {p['foreign_groups']} group(s) belong to another plan than {where} (another --limit or "
            "--shard built into this directory)")


def _verify_line(v: dict[str, Any]) -> str:
    if v.get("note"):
        return f"verify: {v['note']}"
    if v["ok"]:
        old = (f"; {v['without_checksum']} committed before wsnets recorded checksums: checked by structure"
               if v.get("without_checksum") else "")
        return (f"verify: all {v['groups']} shards intact ({v['checked_bytes'] / 1e6:.2f} MB checked against the "
                f"SHA-256 recorded at commit{old})")
    return (f"verify: DAMAGED: {len(v['damaged'])} of {v['groups']} shards ("
            + "; ".join(f"{d['shard']} {d['problem']}" for d in v["damaged"][:3])
            + (" ..." if len(v["damaged"]) > 3 else "") + ")"
            + (f", {v['orphan_rows']} rows without a committed group" if v["orphan_rows"] else ""))


def _merge(args: argparse.Namespace) -> int:
    from .store import merge
    s = merge(args.out, args.parts)
    emit(args, s, f"{args.out}: merged {s['groups']} groups ({s['rows']} checkpoints) from {len(args.parts)} parts")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .cnnzoo import export_cnn_zoo
    s = export_cnn_zoo(args.zoo, args.out, progress=not args.json)
    emit(args, s, lambda: "\n".join(f"{d['dir']}: {d['rows']} checkpoints of {d['models']} models ({d['dataset']}, "
                                      f"{d['architecture']}, {d['params']} parameters)" for d in s["directories"]))
    return 0


def register(sub) -> None:
    p = sub.add_parser("zoo", help="build, inspect, merge and export model zoos",
                       description="build, inspect, merge and export model zoos\n\nexample:\n  wsnets zoo build zoo/digits-mlp.toml --out zoos/digits-mlp",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    zsub = p.add_subparsers(dest="zoo_command", metavar="SUBCOMMAND")
    b = add_parser(zsub, "build", "train a zoo from a recipe (resumes an interrupted build)",
                   "wsnets zoo build zoo/digits-mlp.toml --out zoos/digits-mlp --shard 0/2", _build)
    b.add_argument("recipe", help="a shipped recipe by name (digits-mlp, regions, ...: zoo/*.toml) or a TOML path")
    b.add_argument("--out", required=True, help="zoo directory (created; an existing one is resumed)")
    b.add_argument("--limit", type=int, default=None, help="build only the first N models of the population")
    b.add_argument("--shard", default=None, help="build part I of N (0-based), e.g. 0/4; merge parts with 'zoo merge'")
    b.add_argument("--workers", type=int, default=None,
                   help="processes training groups in parallel on CPU (default: one per core, at most one per group, "
                        "for builds of at least ~1 s of training with forked workers (Linux) or ~5 s with spawned "
                        "ones (WSNETS_ZOO_WORKER_START=spawn, other systems), else 1)")
    b.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads of an in-process build (default 1 on CPU; the trainer's elementwise work runs "
                        "in C loops built once with the system compiler, WSNETS_CPU_KERNELS=0 turns them off: the same "
                        "zoo, ~1.2x slower)")
    b.add_argument("--tf32", action="store_true",
                   help="CUDA: allow TF32 matrix products in training (about 2x faster for MLP groups on an H100; "
                        "recorded metrics are still evaluated in float32)")
    add_common(b)
    i = add_parser(zsub, "info", "counts, accuracy spread and an accuracy histogram of a zoo",
                   "wsnets zoo info zoos/digits-mlp --plot zoo_acc.png", _info)
    i.add_argument("dir", help="zoo directory (wsnets store or Small CNN Zoo layout)")
    i.add_argument("--plot", default=None, metavar="PNG_OR_DIR",
                   help="write a test-accuracy histogram: a .png file, or a folder (zoo_test_accuracy.png in it)")
    i.add_argument("--verify", action="store_true",
                   help="check every committed shard against the size and SHA-256 recorded at commit (exit 2 if any "
                        "is missing or damaged; running the zoo's build again repairs it)")
    add_common(i, device=False)
    m = add_parser(zsub, "merge", "union zoo parts built with --shard into one zoo",
                   "wsnets zoo merge zoos/all zoos/part0 zoos/part1", _merge)
    m.add_argument("out", help="output zoo directory")
    m.add_argument("parts", nargs="+", help="zoo directories built as parts of one recipe")
    add_common(m, device=False)
    e = add_parser(zsub, "export", "write a zoo in the public Small CNN Zoo layout (weights.npy, metrics.csv.gz, "
                   "layout.csv) that NFN's and Neural-Graphs' loaders read",
                   "wsnets zoo export --format cnn-zoo zoos/cnn-zoo exported/cnn-zoo", _export)
    e.add_argument("zoo", help="zoo directory")
    e.add_argument("out", help="output directory (one sub-directory per dataset and architecture when there are several)")
    e.add_argument("--format", choices=["cnn-zoo"], default="cnn-zoo",
                   help="cnn-zoo: TF variable names, HWIO kernels, biases before kernels, config.* columns")
    add_common(e, device=False)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
