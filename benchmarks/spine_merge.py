"""Weight matching on residual networks and transformers (issue 18), as merge_quality.py does for MLPs.

Two small ResNets (BatchNorm, a downsampling shortcut) and two ViT-style patch transformers are trained
independently (different seeds: init and data order) on 8x8 digits; the loss and accuracy barrier on the
straight line between them is measured before and after aligning the second to the first by weight
matching over the derived permutation spec (BatchNorm statistics recomputed at every point).

    python benchmarks/spine_merge.py --out benchmarks/results/spine_merge.json
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
from benchmarks.common import write  # noqa: E402
from wsnets import models  # noqa: E402
from wsnets.merge.align import weight_matching  # noqa: E402
from wsnets.merge.interpolate import interpolation_curve  # noqa: E402
from wsnets.zoo import datasets  # noqa: E402


def train(model: nn.Module, x, y, *, seed: int, epochs: int, lr: float) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    x, y, xt, yt = datasets.load("digits-img")
    rows = []
    makers = {"small ResNet (BatchNorm, downsampling shortcut)": (lambda: models.small_resnet(10, (16, 32)), 3e-3),
              "ViT-style patch transformer": (lambda: models.ViT(8, 2, 1, 32, 4, 2, 64, 10), 1e-3)}
    for label, (make, lr) in makers.items():
        nets = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            nets.append(wsnets.load(train(make(), x, y, seed=seed, epochs=args.epochs, lr=lr), input_shape=(1, 8, 8)))
        a, b = nets
        t = time.perf_counter()
        b2, _ = weight_matching(a, b)
        t_match = time.perf_counter() - t
        before = interpolation_curve(a, b, xt, yt, steps=11, bn_data=x)
        after = interpolation_curve(a, b2, xt, yt, steps=11, bn_data=x)
        acc_end = [float(before.acc[0]), float(before.acc[-1])]
        rows.append({"architecture": label, "describe": a.arch.describe(), "parameters": a.num_params,
                     "test acc (a, b)": f"{acc_end[0]:.3f}, {acc_end[1]:.3f}",
                     "loss barrier naive": before.barrier, "loss barrier aligned": after.barrier,
                     "midpoint acc naive": float(before.acc[len(before.acc) // 2]),
                     "midpoint acc aligned": float(after.acc[len(after.acc) // 2]),
                     "matching (s)": t_match})
    write(args.out, "spine_merge", rows, ["architecture", "parameters", "test acc (a, b)", "loss barrier naive",
                                          "loss barrier aligned", "midpoint acc naive", "midpoint acc aligned",
                                          "matching (s)"], {"epochs": args.epochs})


if __name__ == "__main__":
    main()
