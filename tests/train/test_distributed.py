"""Two CPU ranks (gloo) with DistributedDataParallel against one process on the same data order."""

import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
import _fakes  # noqa: E402

from wsnets.train import evaluate, fit  # noqa: E402
from wsnets.train.distributed import EquivalentBatchSampler  # noqa: E402

from _fakes import BATCH, EPOCHS, WORLD, ddp_model as _model, ddp_config as _cfg, ddp_worker as _worker, scalars as _scalars  # noqa: E402


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_each_other_and_one_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    assert torch.equal(r0["params"], r1["params"])                     # DDP keeps ranks identical
    assert r0["val"] == r1["val"]                                       # gathered evaluation: same metrics

    ds, cfg = _fakes.splits(), _cfg()
    mm = _model(ds, cfg)
    init = torch.cat([p.detach().flatten() for p in mm.parameters()])
    sampler = EquivalentBatchSampler(len(ds["train"]), WORLD, BATCH, seed=cfg.seed)
    res = fit(mm, ds["train"], ds["val"], cfg, batch_sampler=sampler)
    single = torch.cat([p.detach().flatten() for p in mm.parameters()])
    assert not torch.allclose(single, init)                             # training moved the weights
    torch.testing.assert_close(r0["params"], single, rtol=1e-4, atol=1e-5)
    ev = evaluate(mm, ds["val"])
    assert res.best_epoch == r0["best_epoch"]
    for k, v in _scalars(ev).items():
        assert r0["val"][k] == pytest.approx(v, abs=1e-4), k
