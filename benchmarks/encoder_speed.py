"""Encoder size and speed: parameters and forward+backward graphs/s of every wsnets.nn encoder on
zoo-sized networks, against the `nfn` package's NP/HNP encoders of similar size, in one run.

Networks: MLP 64-32-32-10 (digits), CNN2d 1-8-16-16-10 3x3 (digits 8x8), CNN1d 1-16-16-10 k=5
(MNIST-1D). Each encoder embeds a batch of ``--batch`` networks (input representation built
beforehand and timed separately in ``represent_ms``), then a scalar loss is back-propagated.
``vs_nfn_hnp`` is graphs/s divided by that of nfn's HNP stack (HNPLinear x2 + HNPPool + MLP head)
on the same networks: > 1 means faster; ``vs_nfn_hnp_cpu`` is the same ratio of process CPU time
(user + sys), which a machine shared with other jobs distorts less than wall time (with ``--threads 1``).
Every encoder is timed ``--rounds`` times, interleaved, and keeps its best. Our np/hnp use ``layers=1``
(lift + one residual block: two equivariant layers, as the nfn stacks), 16 channels each.

    python benchmarks/encoder_speed.py --quick --out benchmarks/out/encoder_speed.json

``--before REV`` also times the graph encoder of git revision ``REV`` (its ``wsnets/nn/graph_encoder.py``
loaded next to today's package, same settings), so a speed-up is measured before/after in one run
(repeat it for several revisions); ``--encoders`` times only the named rows (and nfn HNP, the reference):

    python benchmarks/encoder_speed.py --before 7845389 --only-mlp
    python benchmarks/encoder_speed.py --before 2e54276 --before 282621e --only-mlp --encoders "graph (PNA)"
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import wsnets  # noqa: E402
from benchmarks.common import timeit, write  # noqa: E402
from wsnets.nn import build_encoder, represent  # noqa: E402

NETWORKS = {
    "mlp 64-32-32-10": wsnets.mlp(64, [32, 32], 10),
    "cnn2d 1-8-16-16-10": wsnets.cnn(1, [8, 16, 16], 10, dims=2, kernel_size=3),
    "cnn1d 1-16-16-10 k5": wsnets.cnn(1, [16, 16], 10, dims=1, kernel_size=5),
}
GRAPH = {"name": "graph", "hidden": 32, "layers": 3, "out_dim": 64}
ENCODERS = {
    "graph (PNA)": GRAPH,
    "graph (PNA, edges 32)": {**GRAPH, "edge_hidden": 32},
    "transformer": {"name": "transformer", "hidden": 32, "layers": 3, "heads": 4, "out_dim": 64},
    "np": {"name": "np", "hidden": 16, "layers": 1, "out_dim": 64},
    "hnp": {"name": "hnp", "hidden": 16, "layers": 1, "out_dim": 64},
    "stats (StatNN)": {"name": "stats", "out_dim": 64, "hidden": [128]},
    "flat MLP": {"name": "flat", "out_dim": 64, "hidden": [256, 128]},
}


class NFNEncoder(nn.Module):
    """nfn reference: ``{NP,HNP}Linear(1->c) -> ReLU -> {NP,HNP}Linear(c->c) -> ReLU -> Pool -> MLP``."""

    representation = "tensors"

    def __init__(self, ws: wsnets.WeightSpace, kind: str = "HNP", channels: int = 16, out_dim: int = 64) -> None:
        super().__init__()
        from nfn import layers as L
        from nfn.common import network_spec_from_wsfeat
        spec = network_spec_from_wsfeat(self.convert(ws))
        Lin, Pool = getattr(L, f"{kind}Linear"), getattr(L, f"{kind}Pool")
        self.body = nn.Sequential(Lin(spec, 1, channels), L.TupleOp(nn.ReLU()), Lin(spec, channels, channels),
                                  L.TupleOp(nn.ReLU()), Pool(spec), nn.Flatten())
        n = Pool.get_num_outs(spec) * channels
        self.head = nn.Sequential(nn.Linear(n, 2 * out_dim), nn.GELU(), nn.Linear(2 * out_dim, out_dim))
        self.out_dim = out_dim

    @staticmethod
    def convert(ws: wsnets.WeightSpace):
        from nfn.common import WeightSpaceFeatures
        w, b = ws.batched().tensors()
        return WeightSpaceFeatures([x.unsqueeze(1) for x in w], [x.unsqueeze(1) for x in b])

    def forward(self, feats) -> torch.Tensor:
        return self.head(self.body(feats))


def graph_encoder_at(rev: str) -> type[nn.Module]:
    """``NeuralGraphEncoder`` as of git revision ``rev``, loaded as a module of today's ``wsnets.nn``."""
    import importlib.util
    import subprocess
    root = Path(__file__).resolve().parent.parent
    src = subprocess.run(["git", "show", f"{rev}:wsnets/nn/graph_encoder.py"], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    name = f"wsnets.nn._graph_encoder_{rev}"
    spec = importlib.util.spec_from_loader(name, loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "wsnets.nn"
    exec(compile(src, f"{rev}:wsnets/nn/graph_encoder.py", "exec"), mod.__dict__)  # noqa: S102 - our own git history
    return mod.NeuralGraphEncoder


def bench(enc: nn.Module, inputs, device: str, repeat: int) -> tuple[float, float]:
    """Best wall time and best process CPU time (user + sys) of one forward+backward, in seconds."""
    enc.to(device).train()

    def step():
        enc.zero_grad(set_to_none=True)
        enc(inputs).square().mean().backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    cpu = [float("inf")]

    def timed():
        t = time.process_time()
        step()
        cpu[0] = min(cpu[0], time.process_time() - t)
    return timeit(timed, repeat=repeat, warmup=1), cpu[0]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller batch, fewer repeats")
    ap.add_argument("--batch", type=int, default=None, help="networks per batch (default 64; 16 with --quick)")
    ap.add_argument("--device", default="cpu", help="torch device (cuda works)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--out", default=None, help="write JSON results here")
    ap.add_argument("--before", action="append", default=[], metavar="REV",
                    help="also time the graph encoder of git revision REV (repeatable)")
    ap.add_argument("--encoders", default=None, metavar="A,B",
                    help="only these encoders (names as in the table; nfn HNP and --before revisions always run)")
    ap.add_argument("--only-mlp", action="store_true", help="only the MLP 64-32-32-10 networks")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time every encoder this many times, interleaved, and keep each one's best (load noise)")
    args = ap.parse_args(argv)
    before = {rev: graph_encoder_at(rev) for rev in args.before}
    only = None if args.encoders is None else {x.strip() for x in args.encoders.split(",")}
    if args.threads:
        torch.set_num_threads(args.threads)
    B = args.batch or (16 if args.quick else 64)
    repeat = 2 if args.quick else 5
    rows = []
    networks = {k: v for k, v in NETWORKS.items() if not args.only_mlp or k.startswith("mlp")}
    for net_name, arch in networks.items():
        g = torch.Generator().manual_seed(0)
        ws = wsnets.WeightSpace.random(arch, B, generator=g)
        candidates = {name: (lambda c=cfg: build_encoder(c, ws)) for name, cfg in ENCODERS.items()
                      if only is None or name in only}
        for rev, cls in before.items():
            candidates[f"graph (PNA) @{rev}"] = lambda c=cls: c(**{k: v for k, v in GRAPH.items() if k != "name"})
        if only is None or "nfn NP" in only:
            candidates["nfn NP"] = lambda: NFNEncoder(ws, "NP")
        candidates["nfn HNP"] = lambda: NFNEncoder(ws, "HNP")
        built = {}
        net_rows = []
        for enc_name, make in candidates.items():
            torch.manual_seed(0)
            try:
                enc = make()
            except ValueError as e:  # nfn supports Linear and Conv2d only
                net_rows.append({"network": net_name, "encoder": enc_name, "note": f"nfn cannot read it ({e})"})
                continue
            t0 = time.perf_counter()
            inputs = NFNEncoder.convert(ws) if enc_name.startswith("nfn") else represent(enc, ws)
            rep_ms = 1000 * (time.perf_counter() - t0)
            built[enc_name] = (enc, inputs.to(args.device), rep_ms)  # WeightSpace, Batch, tensor, nfn features: .to
        best: dict[str, list[float]] = {}
        for _ in range(args.rounds):      # interleaved, so load changes hit every encoder alike
            for enc_name, (enc, inputs, _) in built.items():
                wall, cpu = bench(enc, inputs, args.device, repeat)
                prev = best.get(enc_name, [float("inf")] * 2)
                best[enc_name] = [min(prev[0], wall), min(prev[1], cpu)]
        for enc_name, (enc, _, rep_ms) in built.items():
            sec, cpu = best[enc_name]
            net_rows.append({"network": net_name, "encoder": enc_name, "params": sum(p.numel() for p in enc.parameters()),
                             "represent_ms": rep_ms, "fwd_bwd_ms": 1000 * sec, "graphs_per_s": B / sec,
                             "graphs_per_cpu_s": B / cpu if cpu > 0 else None})
            print(f"  {net_name:<22} {enc_name:<22} {B / sec:10.1f} graphs/s", file=sys.stderr)
        ref = next((r for r in net_rows if r["encoder"] == "nfn HNP" and "graphs_per_s" in r), None)
        for r in net_rows:
            if ref and "graphs_per_s" in r:
                r["vs_nfn_hnp"] = r["graphs_per_s"] / ref["graphs_per_s"]
                if r["graphs_per_cpu_s"] and ref["graphs_per_cpu_s"]:
                    r["vs_nfn_hnp_cpu"] = r["graphs_per_cpu_s"] / ref["graphs_per_cpu_s"]
        rows += net_rows
    cols = ["network", "encoder", "params", "represent_ms", "fwd_bwd_ms", "graphs_per_s", "vs_nfn_hnp",
            "graphs_per_cpu_s", "vs_nfn_hnp_cpu", "note"]
    write(args.out, "encoder_speed", rows, cols,
          {"batch": B, "device": args.device, "quick": args.quick, "threads": torch.get_num_threads(),
           "before": args.before, "encoders": args.encoders, "rounds": args.rounds})


if __name__ == "__main__":
    main()
