import pytest
import torch

import wsnets
from wsnets.errors import ShapeMismatchError
from wsnets.merge.functional import evaluate, forward, recompute_bn
from torch.optim.swa_utils import update_bn

ARCHS = [
    (wsnets.mlp(8, [16, 12], 3, batchnorm=True), (8,)),
    (wsnets.mlp(8, [16], 3, layernorm=True, activation="gelu"), (8,)),
    (wsnets.cnn(2, [4, 6], 3, dims=2, batchnorm=True, hidden=[5]), (2, 8, 8)),
    (wsnets.cnn(2, [4, 6], 3, dims=1, batchnorm=True, activation="leaky_relu"), (2, 16)),
]


@pytest.mark.parametrize("arch,shape", ARCHS, ids=lambda a: a.describe() if hasattr(a, "describe") else "")
def test_batched_forward_matches_modules(arch, shape):
    ws = wsnets.WeightSpace.random(arch, 3)
    x = torch.randn(10, *shape)
    ref = torch.stack([w.to_module()(x) for w in ws])
    torch.testing.assert_close(forward(ws, x), ref, atol=1e-5, rtol=1e-5)
    # per-network inputs: network i sees its own batch
    xs = torch.randn(3, 10, *shape)
    ref = torch.stack([w.to_module()(xi) for w, xi in zip(ws, xs)])
    torch.testing.assert_close(forward(ws, xs, per_network=True), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch,shape", ARCHS, ids=lambda a: a.describe() if hasattr(a, "describe") else "")
def test_recompute_bn_equals_update_bn(arch, shape):
    ws = wsnets.WeightSpace.random(arch, 2)
    x = torch.randn(12, *shape)
    got = recompute_bn(ws, x, batch_size=5)  # uneven last batch
    for i in range(2):
        m = ws[i].to_module()
        update_bn(list(x.split(5)), m)
        ref = got[i].to_module().state_dict()
        for k, v in m.state_dict().items():
            if v.is_floating_point():
                torch.testing.assert_close(ref[k], v, atol=1e-6, rtol=1e-6)


def test_evaluate_matches_cross_entropy():
    ws = wsnets.WeightSpace.random(wsnets.mlp(5, [7], 4), 2)
    x, y = torch.randn(30, 5), torch.randint(0, 4, (30,))
    loss, acc = evaluate(ws, x, y, batch_size=7)
    for i in range(2):
        out = ws[i].to_module()(x)
        assert abs(loss[i].item() - torch.nn.functional.cross_entropy(out, y).item()) < 1e-5
        assert acc[i].item() == (out.argmax(1) == y).sum().item() / len(y)


def test_per_network_batch_count_checked():
    ws = wsnets.WeightSpace.random(wsnets.mlp(5, [7], 4), 2)
    with pytest.raises(ShapeMismatchError):
        forward(ws, torch.randn(3, 4, 5), per_network=True)


def test_bn_data_takes_what_update_bn_takes():
    """``update_bn`` is given a DataLoader of (input, target) pairs (it keeps the input): ``SWA.result``,
    ``recompute_bn`` and the functions taking ``bn_data`` crashed on it with an AttributeError. A one-shot
    iterator serves every candidate of a greedy soup; a batch that is no tensor is a one-line error."""
    from torch.optim.swa_utils import AveragedModel
    from torch.utils.data import DataLoader, TensorDataset

    from wsnets.errors import ConfigError
    from wsnets.merge import SWA, greedy_soup, uniform_soup
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x, y = torch.randn(70, 6), torch.randint(0, 3, (70,))
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    ours, theirs = SWA(), AveragedModel(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        ours.update(net)
        theirs.update_parameters(net)
    update_bn(loader, theirs)
    got, ref = ours.result(loader), theirs.module.state_dict()
    for k, v in got.params.items():
        torch.testing.assert_close(v, ref[k], atol=1e-6, rtol=1e-6)
    ws = wsnets.WeightSpace.random(wsnets.mlp(6, [8], 3, batchnorm=True), 3, generator=torch.Generator().manual_seed(1))
    want = recompute_bn(ws, x, batch_size=32)
    for batches in ([[xb, yb] for xb, yb in loader], ((xb, yb) for xb, yb in loader)):
        torch.testing.assert_close(recompute_bn(ws, batches).flat(), want.flat())
    singles = list(ws)
    r = greedy_soup(singles, lambda w: -float(w.flat().norm()), bn_data=(xb for xb in x.split(32)))
    assert r.model.flat().equal(greedy_soup(singles, lambda w: -float(w.flat().norm()), bn_data=x.split(32)).model.flat())
    assert len(r.history) == 2
    torch.testing.assert_close(uniform_soup(singles, bn_data=loader).flat(), uniform_soup(singles, bn_data=x.split(32)).flat())
    with pytest.raises(ConfigError, match="bn_data batch 0 is a dict"):
        recompute_bn(ws, [{"x": x}])
