"""Forward + backward of a group of K small CNNs: grouped convolution vs unfold + bmm vs the hand-written
CNN engine, side by side.

The networks are the Small CNN Zoo's (``zoo/cnn-zoo.toml``): three 3x3 stride-2 convolutions of 16
channels without padding, ReLU, global average pooling and a dense layer to 10 classes, on 1x16x16
digits (``digits-img16``) and, as a Conv1d, on 1x40 MNIST-1D sequences (``mnist1d-seq``). One step is
the gradient of the sum over models of each model's mean cross-entropy on its own batch of ``B`` samples:

* ``grouped``: :func:`wsnets.functional.forward` (one grouped convolution with ``groups=K`` per layer)
  and ``torch.autograd.grad`` -- what the trainer's autograd engine runs;
* ``unfold``: ``F.unfold`` (im2col) + ``bmm`` per layer, channels-first, and ``torch.autograd.grad``;
* ``engine``: :class:`wsnets.zoo.cnn_engine.CNNEngine` (im2col by index maps, hand-written backward,
  models in cache-sized chunks; the first layer's columns gathered from a precomputed table), without
  its optimizer update.

Each (shape, K) is timed ``--repeat`` times with the three methods interleaved; rows give the median
samples/s (models x batch per second) and the engine's and unfold's speedup over grouped convolution.

``--train N`` adds whole-trainer rows: the first N models of the recipe's largest group per dataset
(train fraction 1) trained ``--train-epochs`` epochs by ``train_group`` with ``engine="cnn"`` and with
``engine="autograd"`` (grouped convolutions), optimizer, dropout and the checkpoint evaluation included,
interleaved; process CPU time as well as wall time. ``--before REV`` adds the CNN engine of git revision
``REV`` (its whole ``wsnets`` package, loaded next to today's as ``wsnets_REV``) to those rows, interleaved
too, so an engine change is measured before/after in one run. Timings on a shared CPU are noisy: compare
within a row. Usage::

    python benchmarks/conv_speed.py --train 64 --out benchmarks/results/conv_speed.json
    python benchmarks/conv_speed.py --models 32 --train 64 --before 282621e --train-epochs 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write  # noqa: E402
from wsnets.arch import cnn  # noqa: E402
from wsnets.functional import forward  # noqa: E402
from wsnets.zoo.cnn_engine import CNNEngine  # noqa: E402
from wsnets.zoo.trainer import DataBank, init_params  # noqa: E402

SHAPES = {"digits-img16": (1, 16, 16), "mnist1d-seq": (1, 40)}


def _arch(dataset: str):
    shape = SHAPES[dataset]
    return cnn(1, [16, 16, 16], 10, "relu", kernel_size=3, stride=2, padding=0, dims=len(shape) - 1, input_shape=shape)


def _unfold_grads(arch, params, xb, yb):
    """im2col with ``F.unfold`` + ``bmm`` per layer (1-d inputs as 1 x L images), autograd backward."""
    K, B = xb.shape[:2]
    ps = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    convs = [l for l in arch.layers if l.kind in ("conv1d", "conv2d")]
    h = xb.reshape(K * B, 1, *([1] if xb.dim() == 4 else []), *xb.shape[-(xb.dim() - 3):])
    for l in convs:
        w = ps[f"{l.name}.weight"]
        kh, kw = (1, l.kernel_size[0]) if l.dims == 1 else l.kernel_size
        cols = F.unfold(h, (kh, kw), stride=(1, l.stride[0]) if l.dims == 1 else l.stride)  # [K*B, Cin*k, L]
        L = cols.shape[-1]
        cols = cols.view(K, B, -1, L).permute(0, 2, 1, 3).reshape(K, -1, B * L)  # [K, Cin*k, B*L]
        z = torch.baddbmm(ps[f"{l.name}.bias"][:, :, None], w.reshape(K, l.out_features, -1), cols)  # [K, Cout, B*L]
        oh = (h.shape[-2] - kh) // (1 if l.dims == 1 else l.stride[0]) + 1
        h = torch.relu(z).view(K, l.out_features, B, oh, L // oh).transpose(1, 2).reshape(K * B, l.out_features, oh, L // oh)
    lin = [l for l in arch.layers if l.kind == "linear"][0]
    g = h.mean((2, 3)).view(K, B, -1)
    logits = torch.baddbmm(ps[f"{lin.name}.bias"][:, None], g, ps[f"{lin.name}.weight"].transpose(1, 2))
    loss = F.cross_entropy(logits.transpose(1, 2), yb, reduction="sum") / B
    return torch.autograd.grad(loss, list(ps.values()))


def _grouped_grads(arch, params, xb, yb):
    ps = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    logits = forward(arch, ps, xb)
    loss = F.cross_entropy(logits.transpose(1, 2), yb, reduction="sum") / xb.shape[1]
    return torch.autograd.grad(loss, list(ps.values()))


def run(dataset: str, K: int, B: int, steps: int, repeat: int) -> dict:
    arch = _arch(dataset)
    bank = DataBank.build([dataset])
    params = init_params(arch, torch.arange(K), torch.ones(K))
    eng = CNNEngine(arch, params, bank, B, torch.zeros(K), 0, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, int(bank.n[0]), (K, B), generator=gen) for _ in range(steps)]
    x, y = bank.x[0], bank.y[0]
    data = [(x[i], y[i]) for i in batches]

    def grouped():
        for xb, yb in data:
            _grouped_grads(arch, params, xb, yb)

    def unfold():
        for xb, yb in data:
            _unfold_grads(arch, params, xb, yb)

    def engine():
        for i in batches:
            for a in range(0, K, eng.C):
                b = min(a + eng.C, K)
                eng._grads(a, b, i[a:b], y[i[a:b]])

    fns = {"grouped": grouped, "unfold": unfold, "engine": engine}
    for f in fns.values():  # warm-up (allocator, MKL, the C loops)
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    rate = {k: K * B * steps / statistics.median(v) for k, v in times.items()}
    speed = {k: [times["grouped"][i] / times[k][i] for i in range(repeat)] for k in ("engine", "unfold")}
    return {"dataset": dataset, "K": K, "B": B, "chunk": eng.C, "grouped_samples_per_s": rate["grouped"],
            "unfold_samples_per_s": rate["unfold"], "engine_samples_per_s": rate["engine"],
            "engine_vs_grouped": statistics.median(speed["engine"]), "unfold_vs_grouped": statistics.median(speed["unfold"]),
            "engine_vs_grouped_range": [min(speed["engine"]), max(speed["engine"])],
            "seconds": {k: v for k, v in times.items()}}


def package_at(rev: str):
    """The ``wsnets`` package of git revision ``rev``, imported next to today's as ``wsnets_<rev>`` (its
    absolute ``wsnets.`` imports rewritten; relative ones work as they are). Returns its ``zoo.trainer``."""
    import importlib
    import re
    import subprocess
    import tarfile
    import tempfile
    root = Path(__file__).resolve().parents[1]
    name = f"wsnets_{rev}".replace("-", "_")
    tmp = Path(tempfile.mkdtemp(prefix="conv_speed_before_"))
    tar = subprocess.run(["git", "archive", rev, "wsnets"], cwd=root, check=True, capture_output=True).stdout
    import io
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(tmp, filter="data")
    (tmp / "wsnets").rename(tmp / name)
    for f in (tmp / name).rglob("*.py"):
        f.write_text(re.sub(r"\b(from|import) wsnets(?=[.\s])", rf"\1 {name}", re.sub(r"(?<![\w.])wsnets\.", f"{name}.", f.read_text())))
    sys.path.insert(0, str(tmp))
    return importlib.import_module(f"{name}.zoo.trainer")


def train_rows(n: int, epochs: int, repeat: int, before: str | None = None) -> list[dict]:
    """Whole-trainer rows: ``n`` models of ``zoo/cnn-zoo.toml`` per dataset, CNN engine vs autograd engine
    (and vs the CNN engine of revision ``before``)."""
    from wsnets.zoo import load_recipe, plan
    from wsnets.zoo.build import _options
    from wsnets.zoo.trainer import train_group
    r = load_recipe(Path(__file__).resolve().parents[1] / "zoo" / "cnn-zoo.toml")
    old = package_at(before) if before else None
    rows = []
    for dataset in SHAPES:
        g = max((g for g in plan(r) if g.runs[0].dataset == dataset), key=lambda g: (g.steps, len(g.runs)))
        runs = g.runs[:n]
        bank = DataBank.build([dataset])
        opts = _options(r, runs)
        kw = dict(epochs=epochs, checkpoints=[epochs], batch_size=r.batch_size)
        fns = {"cnn": lambda: train_group(g.arch, runs, bank=bank, **kw, **opts),
               "autograd": lambda: train_group(g.arch, runs, bank=bank, **kw, **{**opts, "engine": "autograd"})}
        if old is not None:
            old_bank = old.DataBank.build([dataset])
            fns["before"] = lambda: old.train_group(g.arch, runs, bank=old_bank, **kw, **opts)
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
        for _ in range(repeat):
            for k, f in fns.items():
                t, c = time.perf_counter(), time.process_time()
                list(f())
                times[k].append((time.perf_counter() - t, time.process_time() - c))
        samples = len(runs) * epochs * opts["steps_per_epoch"] * r.batch_size
        med = {e: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for e, v in times.items()}
        row = {"dataset": dataset, "models": len(runs), "epochs": epochs, "steps_per_epoch": opts["steps_per_epoch"],
               "cnn_samples_per_cpu_s": samples / med["cnn"][1], "autograd_samples_per_cpu_s": samples / med["autograd"][1],
               "cnn_vs_autograd_cpu": med["autograd"][1] / med["cnn"][1],
               "cnn_vs_autograd_wall": med["autograd"][0] / med["cnn"][0], "seconds": times}
        if old is not None:
            row["before_samples_per_cpu_s"] = samples / med["before"][1]
            row["cnn_vs_before_cpu"] = med["before"][1] / med["cnn"][1]
            row["cnn_vs_before_cpu_range"] = [min(b[1] / a[1] for a, b in zip(times["cnn"], times["before"])),
                                              max(b[1] / a[1] for a, b in zip(times["cnn"], times["before"]))]
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="8,32,128,512", help="comma-separated K")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5, help="steps per timing")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--datasets", default="digits-img16,mnist1d-seq")
    ap.add_argument("--train", type=int, default=0, help="also time train_group on this many models per dataset")
    ap.add_argument("--train-epochs", type=int, default=2)
    ap.add_argument("--before", default=None, metavar="REV", help="whole-trainer rows also time the CNN engine of git revision REV")
    ap.add_argument("--out", default=None, help="JSON output (the Markdown table next to it, .md)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    rows = [run(d, int(k), args.batch, args.steps, args.repeat) for d in args.datasets.split(",")
            for k in args.models.split(",")]
    from wsnets.zoo import cpu_kernels
    train = train_rows(args.train, args.train_epochs, args.repeat, args.before) if args.train else []
    extra = {"loadavg_before": load0, "loadavg_after": os.getloadavg(), "cpu_loops": cpu_kernels.status(),
             "threads": args.threads, "train": train, "before": args.before}
    cols = ["dataset", "K", "B", "chunk", "grouped_samples_per_s", "unfold_samples_per_s", "engine_samples_per_s",
            "unfold_vs_grouped", "engine_vs_grouped"]
    md = write(args.out, "conv_speed", rows, cols, extra)
    if train:
        from benchmarks.common import markdown_table
        tcols = ["dataset", "models", "epochs", "steps_per_epoch", "cnn_samples_per_cpu_s", "autograd_samples_per_cpu_s",
                 "cnn_vs_autograd_cpu", "cnn_vs_autograd_wall"]
        if args.before:
            tcols += ["before_samples_per_cpu_s", "cnn_vs_before_cpu"]
        tmd = markdown_table(train, tcols)
        print(tmd)
        md += "\n\nWhole trainer (`train_group`: optimizer, dropout, checkpoint evaluation included), " \
              f"median of {args.repeat} interleaved repeats" + \
              (f"; `before` = the CNN engine at `{args.before}`, same run" if args.before else "") + ":\n\n" + tmd
    print(f"load average before {load0[0]:.2f}, after {extra['loadavg_after'][0]:.2f}; fused CPU loops: {extra['cpu_loops']}")
    if args.out:
        from wsnets.io import atomic_write_text
        atomic_write_text(Path(args.out).with_suffix(".md"),
                          f"# conv_speed: forward + backward of K Small-CNN-Zoo CNNs, {args.threads} thread(s)\n\n"
                          f"Median of {args.repeat} interleaved repeats of {args.steps} steps; samples/s = models x "
                          f"batch per second. Load average {load0[0]:.2f} before, {extra['loadavg_after'][0]:.2f} after "
                          f"(2-core VM shared with other jobs); fused CPU loops: {extra['cpu_loops']}.\n\n{md}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
