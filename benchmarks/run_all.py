"""Run every benchmark and rewrite ``benchmarks/RESULTS.md`` (machine, date, versions, commit in the header).

Each script runs in its own process (so one failure does not stop the rest) and writes its JSON into
``benchmarks/out/``; its Markdown table (stdout), with the command, date, commit, load and status of
that run, is kept in ``benchmarks/results/run_all/<name>.md``. RESULTS.md is then assembled from every
section file: the scripts' sections in the order below, then the hand-written result notes in
``benchmarks/results/*.md`` (the main job, multi-seed tables) in name order. ``--only`` reruns some
scripts and keeps the other sections as they were (each says when and at which commit it ran).

    python benchmarks/run_all.py --quick           # CI-sized, minutes on 2 cores
    python benchmarks/run_all.py                   # full sizes
    python benchmarks/run_all.py --only graph_speed,esd_speed
    python benchmarks/run_all.py --assemble        # only rebuild RESULTS.md from the section files
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
from benchmarks.common import machine  # noqa: E402
from wsnets.io import atomic_write_text  # noqa: E402

SECTIONS = HERE / "results" / "run_all"
ZOOS = {"metamodel_fixed": "digits-mlp-fixed", "metamodel_regions": "regions"}   # default: digits-mlp

# name -> (what it shows, extra args, extra args with --quick)
SCRIPTS: dict[str, tuple[str, list[str], list[str]]] = {
    "graph_speed": ("Neural-graph conversion: graphs/s vs per-graph and naive conversion (issue 2)", [], ["--quick"]),
    "zoo_speed": ("Batched zoo training vs a sequential per-model loop (issue 3)", ["--workers", "auto"], ["--quick"]),
    "encoder_speed": ("Encoder parameters and forward+backward throughput vs nfn (issue 4)", [], ["--quick"]),
    "esd_speed": ("ESD analysis vs weightwatcher 0.7.7, same layers, equal alpha (issue 6)", [], ["--quick"]),
    "landscape_speed": ("Batched 2-D loss surface vs the naive per-point loop (issue 8)", [], ["--quick"]),
    "merge_quality": ("SWA, soups, barriers before/after weight matching, Bezier curves (issue 7)", [], ["--quick"]),
    "merge_speed": ("Streamed merges of three ~2 GB sharded checkpoints, TIES and linear, vs mergekit: wall time and "
                    "peak RSS (issue 19)", [], ["--quick"]),
    "region_distances": ("Gueta et al.: distances within dataset < within task < across tasks", [], ["--quick"]),
    "metamodel_quality": ("Meta-model Kendall tau table on the default mixed-architecture zoo, seeds mean ± std (issue 5)",
                          ["--seeds", "3", "--filter", "epoch=15", "--methods", "graph,transformer,statnn-gbm,statnn-mlp,esd"],
                          ["--quick", "--filter", "epoch=15", "--methods", "graph,statnn-gbm"]),
    "metamodel_fixed": ("Every meta-model on the one-architecture zoo digits-mlp-fixed, seeds mean ± std (issue 5)",
                        ["--seeds", "3", "--filter", "epoch=15"],
                        ["--quick", "--filter", "epoch=15", "--methods", "graph,hnp,statnn-gbm"]),
    "metamodel_ood": ("Out-of-distribution: trained on widths <= 32, tested on width 64 (issue 5)",
                      ["--seeds", "3", "--filter", "epoch=15", "--ood", "width:<=:32", "--methods", "graph,transformer,statnn-gbm"],
                      ["--quick", "--filter", "epoch=15", "--ood", "width:<=:32", "--methods", "graph,statnn-gbm"]),
    "metamodel_regions": ("Region zoo: dataset and task prediction accuracy (issue 5)",
                          ["--seeds", "3", "--targets", "dataset,task", "--filter", "epoch=4", "--set", "optim.epochs=30",
                           "--set", "optim.patience=10", "--methods", "graph,hnp,np,statnn-gbm,statnn-mlp,flatmlp,esd"],
                          ["--quick", "--targets", "dataset,task", "--filter", "epoch=4", "--methods", "graph,statnn-gbm"]),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default=None, help="comma-separated script names")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per script")
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--assemble", action="store_true", help="run nothing; rebuild RESULTS.md from the section files")
    args = ap.parse_args(argv)
    names = [] if args.assemble else (args.only.split(",") if args.only else list(SCRIPTS))
    unknown = sorted(set(names) - set(SCRIPTS))
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {list(SCRIPTS)}")
    out_dir = HERE / "out"
    out_dir.mkdir(exist_ok=True)
    SECTIONS.mkdir(parents=True, exist_ok=True)
    zoos: dict[str, Path] = {}
    for name in names:
        what, full, quick = SCRIPTS[name]
        script = "metamodel_quality" if name.startswith("metamodel") else name
        cmd = [sys.executable, str(HERE / f"{script}.py"), *(quick if args.quick else full), "--out",
               str(out_dir / f"{name}.json")]
        if script == "metamodel_quality":
            from wsnets.run import default_cache, ensure_zoo
            recipe = ZOOS.get(name, "digits-mlp")
            if recipe not in zoos:
                zoos[recipe] = ensure_zoo(recipe, default_cache(), "cpu", progress=False)
            cmd += ["--zoo", str(zoos[recipe])]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t = time.perf_counter()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
            status = "ok" if r.returncode == 0 else f"failed (exit {r.returncode})"
            body = _tables(r.stdout) or r.stdout[-3000:]
            if r.returncode:
                body += "\n```\n" + r.stderr[-2000:] + "\n```"
        except subprocess.TimeoutExpired:
            status, body = f"timed out after {args.timeout} s", ""
        dt = time.perf_counter() - t
        print(f"   {status} in {dt:.0f} s", flush=True)
        rel = f"benchmarks/{script}.py " + " ".join(cmd[2:]).replace(str(ROOT) + "/", "")
        m = machine()
        atomic_write_text(SECTIONS / f"{name}.md",
                          f"## {name}\n\n{what}.\n\n`python {rel}` — {status}, {dt:.0f} s; {m['date']}, commit "
                          f"`{m['commit']}`{' (--quick)' if args.quick else ''}, load average {os.getloadavg()[0]:.1f} "
                          f"at the end.\n\n{body.strip()}\n")
    atomic_write_text(args.results, assemble())
    print(f"wrote {args.results}")
    return 0


def assemble() -> str:
    """RESULTS.md: header, the scripts' sections (order of SCRIPTS), then the hand-written notes."""
    m = machine()
    head = (f"# wsnets benchmark results\n\nAssembled by `python benchmarks/run_all.py` on {m['date']} at commit "
            f"`{m['commit']}`; each section says when, at which commit and with which command it ran.\n\n"
            f"Machine: {m['platform']}, {m['cpu_count']} CPU cores, torch {m['torch']}, Python {m['python']}, "
            f"GPU: {m['cuda'] or 'none'}. Timings are ratios measured side by side in one run; absolute numbers "
            "depend on the machine and on its load.\n")
    parts = [(SECTIONS / f"{n}.md").read_text() for n in SCRIPTS if (SECTIONS / f"{n}.md").is_file()]
    parts += [p.read_text() for p in sorted((HERE / "results").glob("*.md"))]
    return head + "\n" + "\n".join(p.strip() + "\n" for p in parts)


def _tables(stdout: str) -> str:
    """The Markdown tables and result lines a script printed (progress noise dropped)."""
    keep = [l for l in stdout.splitlines() if l.startswith("|") or l.startswith("#") or not l.strip() or
            l[:1].isalpha()]
    return "\n".join(keep).strip()


if __name__ == "__main__":
    sys.exit(main())
