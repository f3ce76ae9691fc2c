"""Merge speed and memory: ``wsnets merge`` vs mergekit on sharded ~2 GB checkpoints, in one run.

Writes three synthetic checkpoints (a base and two fine-tunes) in the Hugging Face layout: a
Llama-shaped bfloat16 model (vocabulary 32,000, hidden 2,048, MLP 5,632, as many layers as make
``--size-gb``), ``config.json`` and 1 GB shards written by the ``safetensors`` library. Then merges them
with TIES (base + two fine-tunes, density 0.5, per-tensor trimming as mergekit does) and with a linear
average of the three, each tool in its own process: ``python -m wsnets merge ...`` and mergekit's
``mergekit-yaml`` (its path for sharded Hugging Face checkpoints), both computing in float32 and writing
bfloat16 shards of 1 GB. For each run: wall time, CPU time (user + sys) and peak resident memory of the
process (``os.wait4``'s ``ru_maxrss``). The outputs are compared tensor by tensor (max |difference| and
the fraction of entries that differ), then deleted, as are the inputs unless ``--keep``.

Target (issue 19): wsnets' peak RSS under 1.5x the largest tensor + 500 MB, wall time no worse than
mergekit's. The page cache is warmed before each run so both tools read from memory. wsnets runs as it
comes (for the provenance it digests every input file with XXH3-128 from the bytes it reads, ~0.2
CPU-second per GB) and, with ``--variants``, with ``--hash sha256`` (the cryptographic digest, ~1
CPU-second per GB) and ``--no-hash`` (the same work as mergekit, which records no digests).

    python benchmarks/merge_speed.py [--size-gb 2] [--methods ties,linear] [--dir /tmp/wsnets-merge-bench]
                                     [--variants default,sha256,no-hash] [--keep] [--out merge_speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import write  # noqa: E402

VOCAB, HIDDEN, MLP = 32000, 2048, 5632
GB = 1e9


def layout(size_gb: float) -> list[tuple[str, tuple[int, ...]]]:
    """Llama tensor names and shapes for about ``size_gb`` GB of bfloat16."""
    per_layer = 2 * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * MLP + 2 * HIDDEN)
    fixed = 2 * (2 * VOCAB * HIDDEN + HIDDEN)
    n_layers = max(1, round((size_gb * GB - fixed) / per_layer))
    names = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        names += [(p + "input_layernorm.weight", (HIDDEN,)), (p + "post_attention_layernorm.weight", (HIDDEN,))]
        names += [(p + f"self_attn.{k}_proj.weight", (HIDDEN, HIDDEN)) for k in "qkvo"]
        names += [(p + "mlp.gate_proj.weight", (MLP, HIDDEN)), (p + "mlp.up_proj.weight", (MLP, HIDDEN)),
                  (p + "mlp.down_proj.weight", (HIDDEN, MLP))]
    names += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    return names


def config(n_layers: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB, "hidden_size": HIDDEN,
            "intermediate_size": MLP, "num_hidden_layers": n_layers, "num_attention_heads": 16,
            "num_key_value_heads": 16, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
            "tie_word_embeddings": False}


def write_models(root: Path, size_gb: float, seed: int = 0) -> tuple[list[Path], int]:
    """base, ft1, ft2 directories (safetensors shards of <= 1 GB + index + config.json)."""
    from safetensors.torch import save_file
    names = layout(size_gb)
    n_layers = sum(1 for n, _ in names if n.endswith("input_layernorm.weight"))
    dirs = [root / d for d in ("base", "ft1", "ft2")]
    g = torch.Generator().manual_seed(seed)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for n, s in names:
        nb = 2 * int(torch.Size(s).numel())
        if shards[-1] and size + nb > 1e9:
            shards.append([])
            size = 0
        shards[-1].append((n, s))
        size += nb
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(config(n_layers), indent=2))
    weight_map = {}
    for i, sh in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        base = {}
        for n, s in sh:
            base[n] = (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16)
            weight_map[n] = fname
        save_file(base, str(dirs[0] / fname), metadata={"format": "pt"})
        for d in dirs[1:]:
            ft = {n: (t.float() + 0.002 * torch.randn(t.shape, generator=g)).to(torch.bfloat16) for n, t in base.items()}
            save_file(ft, str(d / fname), metadata={"format": "pt"})
            del ft
        del base
    total = sum(2 * int(torch.Size(s).numel()) for _, s in names)
    for d in dirs:
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                    "weight_map": weight_map}))
    return dirs, max(2 * int(torch.Size(s).numel()) for _, s in names)


def warm(dirs: list[Path]) -> None:
    for d in dirs:
        for f in sorted(d.glob("*.safetensors")):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def _hwm_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Wall time, CPU time (user + sys, from ``os.wait4``) and peak RSS of one process.

    Peak RSS is the process's own high-water mark ``VmHWM`` (``/proc/PID/status``), sampled every 20 ms
    until it exits: ``ru_maxrss`` would start from this (large) parent's resident set, which a forked
    child inherits before it execs."""
    import threading
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    bufs: dict[str, bytes] = {}
    threads = [threading.Thread(target=lambda k=k, f=f: bufs.__setitem__(k, f.read()))
               for k, f in (("out", p.stdout), ("err", p.stderr))]
    for th in threads:
        th.start()
    peak = 0.0
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        peak = max(peak, _hwm_mb(p.pid) or 0.0)
        time.sleep(0.02)
    wall = time.perf_counter() - t
    p.returncode = os.waitstatus_to_exitcode(status)
    for th in threads:
        th.join()
    return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss_mb": peak, "exit": p.returncode,
            "stderr": bufs["err"].decode(errors="replace")[-3000:], "stdout": bufs["out"].decode(errors="replace")[-3000:]}


def mergekit_config(method: str, dirs: list[Path]) -> str:
    base, fts = dirs[0], dirs[1:]
    if method == "ties":
        models = "".join(f"  - model: {d}\n    parameters: {{weight: 1.0, density: 0.5}}\n" for d in fts)
        return f"merge_method: ties\nbase_model: {base}\nmodels:\n{models}dtype: float32\nout_dtype: bfloat16\n"
    models = "".join(f"  - model: {d}\n    parameters: {{weight: 1.0}}\n" for d in dirs)
    return f"merge_method: linear\nmodels:\n{models}dtype: float32\nout_dtype: bfloat16\n"


def wsnets_cmd(method: str, dirs: list[Path], out: Path) -> list[str]:
    common = ["-o", str(out), "--shard-size", "1GB", "--dtype", "float32", "--json"]
    if method == "ties":
        return [sys.executable, "-m", "wsnets", "merge", "ties", "--base", str(dirs[0]), *map(str, dirs[1:]),
                "--density", "0.5", "--scope", "tensor", *common]
    return [sys.executable, "-m", "wsnets", "merge", "linear", *map(str, dirs), *common]


def compare(a: Path, b: Path, ties_inputs: list[Path] | None = None, density: float = 0.5) -> dict:
    """Max |a - b| and the fraction of entries that differ, over every tensor of two outputs. For TIES
    (``ties_inputs`` = base, fine-tunes) also how many differing entries are *not* explained by the two
    documented differences: ties in magnitude at the trimming cutoff (wsnets keeps the earlier entries,
    mergekit's argsort any of them) and an elected sum of exactly 0 (wsnets keeps the base, mergekit
    elects +)."""
    from wsnets.merge import keep_count, open_checkpoint
    ca, cb = open_checkpoint(a), open_checkpoint(b)
    ins = [open_checkpoint(p) for p in ties_inputs] if ties_inputs else []
    try:
        if set(ca.infos) != set(cb.infos):
            return {"same_names": False}
        worst, diff, n, unexplained = 0.0, 0, 0, 0
        for name, info in ca.infos.items():
            x, y = ca.read(name).float(), cb.read(name).float()
            d = (x - y).abs()
            worst = max(worst, float(d.max()))
            bad = d > 0
            diff += int(bad.sum())
            n += info.numel
            if ins and bad.any():
                base = ins[0].read(name).float()
                tv = torch.stack([c.read(name).float() - base for c in ins[1:]])
                k = keep_count(density, info.numel)
                thr = tv.abs().kthvalue(info.numel - k + 1, dim=1).values      # k-th largest |tau| per model
                tied = (tv.abs() == thr[:, None]).any(0)
                kept = tv * (tv.abs() >= thr[:, None])
                zero_sum = (kept.sum(0) == 0) & (kept != 0).any(0)
                unexplained += int((bad & ~tied & ~zero_sum).sum())
            del x, y, d, bad
        out = {"same_names": True, "max_abs_diff": worst, "frac_differ": diff / n}
        if ins:
            out["unexplained"] = unexplained
        return out
    finally:
        for c in (ca, cb, *ins):
            c.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=2.0, help="size of each input checkpoint")
    ap.add_argument("--methods", default="ties,linear")
    ap.add_argument("--dir", default="/tmp/wsnets-merge-bench", help="where inputs and outputs are written")
    ap.add_argument("--keep", action="store_true", help="keep the inputs (outputs are always deleted)")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--variants", default="default,sha256,no-hash",
                    help="wsnets runs: default (XXH3-128 digests), sha256 (--hash sha256), no-hash (--no-hash)")
    ap.add_argument("--quick", action="store_true", help="0.4 GB checkpoints")
    ap.add_argument("--out", default=None, help="JSON results")
    args = ap.parse_args(argv)
    size = 0.4 if args.quick else args.size_gb
    root = Path(args.dir)
    methods = args.methods.split(",")
    need = (3 + 2) * size * GB * 1.1
    free = shutil.disk_usage(root.parent if not root.exists() else root).free
    if free < need:
        print(f"not enough disk: {free / GB:.1f} GB free under {root}, need {need / GB:.1f} GB", file=sys.stderr)
        return 2
    mergekit_bin = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")
    have_mk = not args.skip_mergekit and Path(mergekit_bin).exists()
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    rows, extra = [], {}
    try:
        t = time.perf_counter()
        dirs, largest = write_models(root, size) if not (root / "ft2" / "config.json").exists() else \
            (_existing(root), max(2 * int(torch.Size(s).numel()) for _, s in layout(size)))
        extra["write_inputs_s"] = time.perf_counter() - t
        in_bytes = sum(f.stat().st_size for f in dirs[0].glob("*.safetensors"))
        target = (1.5 * largest + 500e6) / 1e6
        extra.update({"input_gb_each": in_bytes / GB, "largest_tensor_mb": largest / 1e6, "rss_target_mb": target,
                      "tensors": len(layout(size))})
        print(f"inputs: 3 x {in_bytes / GB:.2f} GB, {len(layout(size))} tensors, largest {largest / 1e6:.0f} MB; "
              f"RSS target {target:.0f} MB", flush=True)
        for method in methods:
            outs = {}
            flags = {"default": [], "sha256": ["--hash", "sha256"], "no-hash": ["--no-hash"]}
            tools = [(" ".join(["wsnets", *flags[v]]), lambda out, v=v: wsnets_cmd(method, dirs, out) + flags[v])
                     for v in args.variants.split(",")]
            if have_mk:
                cfg = root / f"mergekit_{method}.yml"
                cfg.write_text(mergekit_config(method, dirs))
                tools.append(("mergekit", lambda out: [mergekit_bin, str(cfg), str(out), "--out-shard-size", "500M",
                                                       "--no-copy-tokenizer", "--no-write-model-card"]))
            for tool, cmd in tools:
                out = root / f"out_{tool.replace(' --', '_').replace('-', '_').replace(' ', '_')}_{method}"
                shutil.rmtree(out, ignore_errors=True)
                warm(dirs)
                r = run_measured(cmd(out), env)
                ok = r["exit"] == 0
                print(f"{method:<7} {tool:<20} exit {r['exit']}  wall {r['wall_s']:.1f} s  cpu {r['cpu_s']:.1f} s  "
                      f"peak RSS {r['peak_rss_mb']:.0f} MB  load {os.getloadavg()[0]:.1f}", flush=True)
                if not ok:
                    print(r["stderr"], file=sys.stderr)
                row = {"method": method, "tool": tool, "wall_s": r["wall_s"], "cpu_s": r["cpu_s"],
                       "peak_rss_mb": r["peak_rss_mb"], "ok": ok, "load": os.getloadavg()[0]}
                if tool.startswith("wsnets"):
                    row["rss_under_target"] = r["peak_rss_mb"] < target
                rows.append(row)
                if tool in ("wsnets", "mergekit"):
                    outs[tool] = out
                else:
                    shutil.rmtree(out, ignore_errors=True)        # same numbers as the default run
            mine = rows[-len(tools):]
            if len(outs) == 2 and all(r["ok"] for r in mine):
                c = compare(outs["wsnets"], outs["mergekit"], dirs if method == "ties" else None)
                extra[f"{method}_agreement"] = c
                mk = mine[-1]
                for ws in mine[:-1]:
                    ws["wall_vs_mergekit"] = ws["wall_s"] / mk["wall_s"]
                    ws["cpu_vs_mergekit"] = ws["cpu_s"] / mk["cpu_s"]
                    ws["rss_vs_mergekit"] = ws["peak_rss_mb"] / mk["peak_rss_mb"]
                print(f"{method}: outputs differ in {100 * c.get('frac_differ', 1):.4f}% of entries, max |diff| "
                      f"{c.get('max_abs_diff', float('nan')):.3g}"
                      + (f", {c['unexplained']} of them not at a tie at the cutoff or a zero sum" if "unexplained" in c
                         else ""), flush=True)
            for out in outs.values():
                shutil.rmtree(out, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    cols = ["method", "tool", "wall_s", "cpu_s", "peak_rss_mb", "wall_vs_mergekit", "cpu_vs_mergekit", "rss_vs_mergekit",
            "rss_under_target"]
    print(f"\n3 checkpoints of {extra['input_gb_each']:.2f} GB (bfloat16, {extra['tensors']} tensors, largest "
          f"{extra['largest_tensor_mb']:.0f} MB); RSS target 1.5 x largest + 500 MB = {extra['rss_target_mb']:.0f} MB\n")
    write(args.out, "merge_speed", rows, cols, extra)
    for m in methods:
        c = extra.get(f"{m}_agreement")
        if c:
            why = (f"; {c['unexplained']} of the differing entries are not at a magnitude tied at the trimming cutoff "
                   "or an elected sum of exactly 0" if "unexplained" in c else "")
            print(f"\n{m}: wsnets and mergekit outputs differ in {100 * c['frac_differ']:.4f}% of entries "
                  f"(max |diff| {c['max_abs_diff']:.3g}){why}")
    return 0


def _existing(root: Path) -> list[Path]:
    return [root / d for d in ("base", "ft1", "ft2")]


if __name__ == "__main__":
    sys.exit(main())
