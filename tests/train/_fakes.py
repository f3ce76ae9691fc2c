"""A tiny in-memory stand-in for ZooDataset and a tiny encoder, so the training code is tested alone.

Networks are random ``mlp(4, [6], 3)``; ``test_acc`` is a smooth function of the weights (so a flat
encoder can learn it), ``gen_gap`` another, and ``dataset`` a class decided by the sign of the sum
of the first eight weights.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

import wsnets
from wsnets.train.meta_model import register_encoder

ARCH = wsnets.mlp(4, [6], 3, "relu")
CLASSES = ["digits", "mnist1d"]


class FakeZooDataset(torch.utils.data.Dataset):
    """``ds[i] -> (x, y)``; ``collate`` batches like ZooDataset (flat: ``[B, P]``, graph: Batch)."""

    def __init__(self, n: int = 64, seed: int = 0, representation: str = "flat",
                 targets=("test_acc", "gen_gap", "dataset")) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ws = wsnets.WeightSpace.random(ARCH, n, generator=g)
        flat = self.ws.flat()
        self.representation = representation
        self.targets = list(targets)
        self.y = {"test_acc": torch.sigmoid(flat[:, :8].sum(1)).float(),
                  "gen_gap": (0.1 * flat[:, 8:16].mean(1)).float(),
                  "dataset": (flat[:, :8].sum(1) > 0).long()}

    def __len__(self) -> int:
        return self.ws.batch_size

    def __getitem__(self, i: int):
        return i, {t: self.y[t][i] for t in self.targets}

    def collate(self, items):
        idx = torch.tensor([i for i, _ in items])
        sub = self.ws[idx]
        x = {"flat": sub.flat, "stats": sub.stat_features, "graph": lambda: wsnets.to_batch(sub)}[self.representation]()
        return x, {t: self.y[t][idx] for t in self.targets}

    def weightspaces(self):
        return self.ws

    def classes(self, target: str):
        return CLASSES

    def target_values(self, target: str):
        return self.y[target]


class TinyFlatEncoder(nn.Module):
    """A two-layer MLP on the flat weight vector (fixed architecture)."""

    representation = "flat"

    def __init__(self, in_dim: int, out_dim: int = 16) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.net = nn.Sequential(nn.Linear(in_dim, 32), nn.ReLU(), nn.Linear(32, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_dim:
            raise wsnets.ArchitectureMismatchError(f"TinyFlatEncoder takes {self.in_dim} weights, got {x.shape[-1]}")
        return self.net(x)


class TinyGraphEncoder(nn.Module):
    """Invariant by construction: mean of edge weights per layer + mean of biases per group, then an MLP."""

    representation = "graph"

    def __init__(self, out_dim: int = 8) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, out_dim))

    def forward(self, b) -> torch.Tensor:
        from torch_geometric.utils import scatter
        B = int(b.num_graphs)
        eb = b.batch[b.edge_index[1]]
        w = b.edge_attr[:, 0]
        f = torch.stack([scatter(w, eb, 0, B, "mean"), scatter(w.abs(), eb, 0, B, "mean"),
                         scatter(b.x[:, 0], b.batch, 0, B, "mean"), scatter(b.x[:, 0].abs(), b.batch, 0, B, "mean")], 1)
        return self.net(f)


register_encoder("tiny-flat", lambda cfg, ex: TinyFlatEncoder(ex.arch.num_params, int(cfg.get("out_dim", 16))))
register_encoder("tiny-graph", lambda cfg, ex: TinyGraphEncoder(int(cfg.get("out_dim", 8))))


def splits(representation: str = "flat", targets=("test_acc", "gen_gap", "dataset"), n=(64, 24, 24)):
    """Disjoint fake train/val/test datasets (different generator seeds)."""
    return {s: FakeZooDataset(k, seed=i, representation=representation, targets=targets)
            for i, (s, k) in enumerate(zip(("train", "val", "test"), n))}


def config(enc: str = "tiny-flat", epochs: int = 8, **sections):
    from wsnets.train import from_dict
    d = {"name": "fake", "encoder": {"name": enc}, "optim": {"epochs": epochs, "lr": 3e-3, "warmup_epochs": 1},
         "data": {"targets": ["test_acc", "gen_gap", "dataset"], "batch_size": 16}, "log": {"progress": False}}
    for k, v in sections.items():
        d.setdefault(k, {}).update(v)
    return from_dict(d)


# -- the DDP test's pieces (here so that spawned ranks can import them) ------------------------------
EPOCHS, BATCH, WORLD = 3, 8, 2


def ddp_model(ds, cfg):
    from wsnets.train import MetaModel
    from wsnets.train.loop import normalization
    from wsnets.train.meta_model import build_encoder
    torch.manual_seed(0)
    enc = build_encoder(cfg.encoder, ds["train"].weightspaces())
    return MetaModel(enc, cfg.data.targets, classes={"dataset": CLASSES},
                     normalization=normalization(ds["train"], cfg.data.targets), representation="flat")


def ddp_config():
    return config(epochs=EPOCHS, data={"batch_size": BATCH}, optim={"patience": 0})


def scalars(m):
    return {f"{t}.{k}": v for t, d in m.items() if isinstance(d, dict) for k, v in d.items() if isinstance(v, float)}


def ddp_worker(rank, port, out):
    import os
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from wsnets.train import evaluate, fit
    from wsnets.train.distributed import setup, teardown
    dist = setup("cpu")
    ds, cfg = splits(), ddp_config()
    mm = ddp_model(ds, cfg)
    res = fit(mm, ds["train"], ds["val"], cfg, dist=dist)
    ev = evaluate(mm, ds["val"], dist=dist)
    flat = torch.cat([p.detach().flatten() for p in mm.parameters()])
    torch.save({"params": flat, "val": scalars(ev), "loss": ev["loss"], "best_epoch": res.best_epoch},
               f"{out}/rank{rank}.pt")
    teardown(dist)
    # skip interpreter shutdown: gloo's background threads can abort it ("terminate called without an
    # active exception", seen once in ~20 full runs), which mp.spawn reports as a failed rank
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
