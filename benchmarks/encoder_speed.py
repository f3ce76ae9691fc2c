"""Encoder size and speed: parameters and forward+backward graphs/s of every wsnets.nn encoder on
zoo-sized networks, against the `nfn` package's NP/HNP encoders of similar size, in one run.

Networks: MLP 64-32-32-10 (digits), CNN2d 1-8-16-16-10 3x3 (digits 8x8), CNN1d 1-16-16-10 k=5
(MNIST-1D). Each encoder embeds a batch of ``--batch`` networks (input representation built
beforehand and timed separately in ``represent_ms``), then a scalar loss is back-propagated.
``vs_nfn_hnp`` is graphs/s divided by that of nfn's HNP stack (HNPLinear x2 + HNPPool + MLP head)
on the same networks: > 1 means faster. Our np/hnp use ``layers=1`` (lift + one residual block: two
equivariant layers, as the nfn stacks), 16 channels each.

    python benchmarks/encoder_speed.py --quick --out benchmarks/out/encoder_speed.json
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
ENCODERS = {
    "graph (PNA)": {"name": "graph", "hidden": 32, "layers": 3, "out_dim": 64},
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


def bench(enc: nn.Module, inputs, device: str, repeat: int) -> float:
    enc.to(device).train()

    def step():
        enc.zero_grad(set_to_none=True)
        enc(inputs).square().mean().backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return timeit(step, repeat=repeat, warmup=1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller batch, fewer repeats")
    ap.add_argument("--batch", type=int, default=None, help="networks per batch (default 64; 16 with --quick)")
    ap.add_argument("--device", default="cpu", help="torch device (cuda works)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--out", default=None, help="write JSON results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    B = args.batch or (16 if args.quick else 64)
    repeat = 2 if args.quick else 5
    rows = []
    for net_name, arch in NETWORKS.items():
        g = torch.Generator().manual_seed(0)
        ws = wsnets.WeightSpace.random(arch, B, generator=g)
        candidates = {name: (lambda c=cfg: build_encoder(c, ws)) for name, cfg in ENCODERS.items()}
        candidates["nfn NP"] = lambda: NFNEncoder(ws, "NP")
        candidates["nfn HNP"] = lambda: NFNEncoder(ws, "HNP")
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
            inputs = inputs.to(args.device)  # WeightSpace, Batch, tensor and nfn features all have .to
            sec = bench(enc, inputs, args.device, repeat)
            net_rows.append({"network": net_name, "encoder": enc_name, "params": sum(p.numel() for p in enc.parameters()),
                             "represent_ms": rep_ms, "fwd_bwd_ms": 1000 * sec, "graphs_per_s": B / sec})
            print(f"  {net_name:<22} {enc_name:<16} {B / sec:10.1f} graphs/s", file=sys.stderr)
        ref = next((r.get("graphs_per_s") for r in net_rows if r["encoder"] == "nfn HNP"), None)
        for r in net_rows:
            if ref and "graphs_per_s" in r:
                r["vs_nfn_hnp"] = r["graphs_per_s"] / ref
        rows += net_rows
    cols = ["network", "encoder", "params", "represent_ms", "fwd_bwd_ms", "graphs_per_s", "vs_nfn_hnp", "note"]
    write(args.out, "encoder_speed", rows, cols,
          {"batch": B, "device": args.device, "quick": args.quick, "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
