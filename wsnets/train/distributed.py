"""Data-parallel training: ``torchrun`` + DistributedDataParallel + DistributedSampler.

``torchrun --nproc-per-node N -m wsnets.train CONFIG --zoo DIR --out RUN`` sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR``/``MASTER_PORT``; :func:`setup` reads them and
initializes the process group (``nccl`` on CUDA, ``gloo`` on CPU). Without them everything runs in
one process and :class:`Dist` is a no-op.

Each rank trains on ``1/N`` of every global batch (``DistributedSampler``; gradients are averaged
by DDP), so a run with N ranks of per-rank batch ``b`` follows the same optimization trajectory as
one process with batch ``N·b`` visiting :func:`equivalent_batches` — which is what the tests check.
Evaluation is sharded too and the predictions are gathered, so every rank computes the same metrics
and takes the same early-stopping decision.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as tdist
from torch import nn
from torch.utils.data import DistributedSampler, Sampler


@dataclass
class Dist:
    """Where this process stands: ``rank``, ``world_size``, ``local_rank``; ``enabled`` if > 1 process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """``DistributedDataParallel(model)`` when distributed, else the model itself."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [device.index if device.index is not None else self.local_rank] if device.type == "cuda" else None
        return DDP(model, device_ids=ids)

    def sampler(self, n: int, *, shuffle: bool, seed: int) -> Sampler:
        """A DistributedSampler over ``range(n)`` (padded so every rank has the same number of items)."""
        return DistributedSampler(range(n), num_replicas=self.world_size, rank=self.rank, shuffle=shuffle,
                                  seed=seed, drop_last=False)

    def gather(self, obj: Any) -> list[Any]:
        """Objects from every rank, in rank order (``[obj]`` in one process)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def all_same(self, value: float) -> float:
        """Rank 0's value on every rank (keeps early-stopping decisions in lockstep)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        tdist.broadcast(t, 0)
        return float(t.item())


def setup(device: str = "cpu") -> Dist:
    """Initialize the process group from torchrun's environment; a no-op outside torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not tdist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") and torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        tdist.init_process_group(backend=backend, rank=rank, world_size=world)
    return Dist(rank=rank, world_size=world, local_rank=local, enabled=True)


def device_for(dist: Dist, device: str) -> torch.device:
    """``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun; other devices are unchanged."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None and dist.enabled:
        return torch.device("cuda", dist.local_rank)
    return d


def teardown(dist: Dist) -> None:
    if dist.enabled and tdist.is_initialized():
        tdist.destroy_process_group()


class EquivalentBatchSampler(Sampler[list[int]]):
    """One process visiting exactly the global batches of an N-rank run (DistributedSampler order).

    Step ``k`` yields rank 0's ``k``-th batch followed by rank 1's, ... so a single-process run with
    batch ``N·b`` reproduces DDP's averaged gradients. ``set_epoch`` as for DistributedSampler.
    """

    def __init__(self, n: int, world_size: int, batch_size: int, *, shuffle: bool = True, seed: int = 0) -> None:
        self.n, self.world, self.b, self.shuffle, self.seed, self.epoch = n, world_size, batch_size, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rank_indices(self) -> list[list[int]]:
        out = []
        for r in range(self.world):  # world is a handful of ranks, not data items
            s = DistributedSampler(range(self.n), num_replicas=self.world, rank=r, shuffle=self.shuffle,
                                   seed=self.seed, drop_last=False)
            s.set_epoch(self.epoch)
            out.append(list(s))
        return out

    def __iter__(self) -> Iterator[list[int]]:
        per_rank = self._rank_indices()
        m = len(per_rank[0])
        for k in range(0, m, self.b):
            yield [i for r in per_rank for i in r[k:k + self.b]]

    def __len__(self) -> int:
        m = -(-self.n // self.world)
        return -(-m // self.b)
