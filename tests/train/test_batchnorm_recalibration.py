"""recalibrate_batchnorm: running statistics equal the statistics of the current encoder's features."""

import torch
from torch import nn

import wsnets
from wsnets.nn.graph_encoder import NeuralGraphEncoder
from wsnets.train.loop import recalibrate_batchnorm

from ._fakes import FakeZooDataset


def test_running_stats_are_the_pass_statistics_of_the_bn_input():
    ds = FakeZooDataset(48, seed=3, representation="flat")
    model = nn.Sequential(nn.Linear(ds.ws.flat().shape[1], 5), nn.BatchNorm1d(5), nn.Dropout(0.5), nn.Linear(5, 1))
    model[1].running_mean.fill_(7.0)   # stale statistics, as after training
    model.train()
    assert recalibrate_batchnorm(model, ds, batch_size=len(ds))   # one batch: exact mean and unbiased variance
    feats = model[0](ds.ws.flat())
    torch.testing.assert_close(model[1].running_mean, feats.mean(0))
    torch.testing.assert_close(model[1].running_var, feats.var(0, unbiased=True))
    assert model.training and model[1].momentum == 0.1 and model[2].training   # modes and momentum restored


def test_recalibrated_graph_encoder_is_batch_independent_and_invariant():
    ds = FakeZooDataset(32, seed=4, representation="graph")
    enc = NeuralGraphEncoder(hidden=8, layers=1, out_dim=4, readout_norm=True)
    model = nn.Sequential(enc)
    recalibrate_batchnorm(model, ds, batch_size=8)
    model.eval()
    nets = ds.ws[torch.arange(6)]
    with torch.no_grad():
        together = model(wsnets.to_batch(nets))
        alone = torch.cat([model(wsnets.to_batch(nets[torch.tensor([i])])) for i in range(6)])
        permuted = model(wsnets.to_batch(wsnets.random_permute(nets, generator=torch.Generator().manual_seed(0))))
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(together, permuted, atol=1e-5, rtol=1e-4)


def test_no_batchnorm_is_a_no_op():
    ds = FakeZooDataset(8, representation="flat")
    model = nn.Linear(ds.ws.flat().shape[1], 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert not recalibrate_batchnorm(model, ds)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_batch_of_one_network_trains_and_recalibrates():
    ds = FakeZooDataset(9, seed=5, representation="graph")   # batches of 4: the last one holds one network
    enc = NeuralGraphEncoder(hidden=8, layers=1, out_dim=4, readout_norm=True).train()
    out = enc(wsnets.to_batch(ds.ws[torch.tensor([0])]))
    assert out.shape == (1, 4) and torch.isfinite(out).all()
    assert recalibrate_batchnorm(nn.Sequential(enc), ds, batch_size=4)
    assert int(enc.readout_norm.num_batches_tracked) == 2   # the one-network batch adds no statistics
