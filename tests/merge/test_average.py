import pytest
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, update_bn

import wsnets
from wsnets.errors import ArchitectureMismatchError, ConfigError
from wsnets.merge import SWA, average, greedy_soup, is_snapshot, swa_lr, task_arithmetic, ties, uniform_soup


def _same(a: wsnets.WeightSpace, b: wsnets.WeightSpace, atol=1e-6):
    assert a.arch == b.arch
    for k in a.params:
        torch.testing.assert_close(a.params[k], b.params[k], atol=atol, rtol=1e-6)


@pytest.mark.parametrize("arch", [wsnets.mlp(6, [8, 8], 3, batchnorm=True),
                                  wsnets.cnn(2, [4, 4], 3, batchnorm=True, input_shape=(2, 6, 6))])
def test_merging_identical_models_returns_the_model(arch):
    ws = wsnets.WeightSpace.random(arch, generator=torch.Generator().manual_seed(1))
    models = [ws, ws.clone(), ws.clone()]
    _same(average(models), ws)
    _same(average(models, [1, 2, 3]), ws)
    _same(uniform_soup(models), ws)
    _same(greedy_soup(models, lambda w: 0.0).model, ws)
    _same(task_arithmetic(ws, models[1:], scale=0.7), ws)
    _same(ties(ws, models[1:], density=0.2), ws)


def test_weighted_average_is_weighted_sum():
    arch = wsnets.mlp(4, [5], 2)
    a, b = wsnets.WeightSpace.random(arch), wsnets.WeightSpace.random(arch)
    got = average([a, b], [1.0, 3.0])
    for k in a.params:
        torch.testing.assert_close(got.params[k], 0.25 * a.params[k] + 0.75 * b.params[k])


def test_mismatch_names_the_first_difference():
    a = wsnets.WeightSpace.random(wsnets.mlp(4, [5], 2))
    b = wsnets.WeightSpace.random(wsnets.mlp(4, [6], 2))
    with pytest.raises(ArchitectureMismatchError, match=r"model 1 does not match model 0 .*'0.weight' has shape \(6, 4\)"):
        average([a, b])
    c = wsnets.WeightSpace.random(wsnets.mlp(4, [5], 2, batchnorm=True))
    with pytest.raises(ArchitectureMismatchError, match="key '1.weight' where '2.weight'"):
        average([a, c])
    with pytest.raises(ConfigError):
        average([a, a], [1.0])


def _swa_run(arch, x, y, *, steps=60, cycle=10, seed=0):
    """SGD with a cyclic schedule; our SWA and torch's AveragedModel see the same snapshots."""
    torch.manual_seed(seed)
    net = wsnets.WeightSpace.random(arch, generator=torch.Generator().manual_seed(seed)).to_module().train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    ours, theirs = SWA(), AveragedModel(net)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = swa_lr(step, lr_max=0.1, lr_min=0.01, cycle=cycle)
        idx = torch.randint(0, len(x), (32,), generator=g)
        opt.zero_grad()
        F.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()
        if is_snapshot(step, cycle):
            ours.update(net)
            theirs.update_parameters(net)
    batches = list(x[:200].split(50))
    update_bn(batches, theirs)
    return ours.result(batches), theirs.module, ours.n_averaged, net


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_swa_equals_torch_swa_utils(kind, digits, digits_img):
    if kind == "mlp":
        arch, (x, y, _, _) = wsnets.mlp(64, [32], 10, batchnorm=True), digits
    else:
        arch, (x, y, _, _) = wsnets.cnn(1, [6, 8], 10, batchnorm=True, input_shape=(1, 8, 8)), digits_img
    ws, ref, n, last = _swa_run(arch, x, y)
    assert n == 6
    ref_sd = ref.state_dict()
    for i, l in enumerate(arch.layers):
        for k in l.param_shapes():
            torch.testing.assert_close(ws.params[f"{l.name}.{k}"], ref_sd[f"{i}.{k}"], atol=1e-6, rtol=0)
    # the average is not the final iterate (else the comparison would be vacuous)
    assert (ws.flat() - wsnets.load(last.eval()).flat()).abs().max() > 1e-3


def test_swa_lr_schedule():
    lrs = [swa_lr(s, lr_max=1.0, lr_min=0.1, cycle=4) for s in range(8)]
    assert lrs[3] == pytest.approx(0.1) and lrs[7] == pytest.approx(0.1)
    assert lrs[0] == pytest.approx(1.0 - 0.25 * 0.9) and lrs[4] == lrs[0]
    assert [is_snapshot(s, 4) for s in range(8)] == [False, False, False, True] * 2
    assert swa_lr(5, lr_max=0.05, schedule="constant") == 0.05
    with pytest.raises(ConfigError):
        swa_lr(0, lr_max=0.1, schedule="linear")
