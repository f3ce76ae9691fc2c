"""The hand-written CNN engine: autograd's gradients, nn.Module's logits, and the autograd engine's training."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import wsnets
from wsnets.errors import ConfigError
from wsnets.zoo.cnn_engine import CNNEngine, conv_maps
from wsnets.zoo.recipe import RunSpec
from wsnets.zoo.trainer import DataBank, init_params, train_group

ARCHS = {  # the Small CNN Zoo's network on 16x16 digits and as a Conv1d on MNIST-1D; padding, gelu and a hidden layer
    "zoo2d": ("digits-img16", wsnets.cnn(1, [16, 16, 16], 10, "relu", kernel_size=3, stride=2, padding=0,
                                         input_shape=(1, 16, 16))),
    "zoo1d": ("mnist1d-seq", wsnets.cnn(1, [16, 16, 16], 10, "tanh", kernel_size=3, stride=2, padding=0, dims=1,
                                        input_shape=(1, 40))),
    "padded": ("digits-img", wsnets.cnn(1, [6, 5], 10, "gelu", kernel_size=3, stride=2, padding=1, hidden=[7],
                                        input_shape=(1, 8, 8))),
}


def _theta(arch, grads, bank):
    """State-dict gradients of one model in the engine's flat layout."""
    return CNNEngine(arch, {k: g[None] for k, g in grads.items()}, bank, 4, torch.zeros(1), 0, torch.Generator()).theta[0]


@pytest.mark.parametrize("name", list(ARCHS))
@pytest.mark.parametrize("fused", [True, False])
def test_gradients_and_logits_match_autograd(name, fused, monkeypatch):
    """Chunks of 2 models, dropout on the last 2 rows: each model's gradient is autograd's for its own mean
    cross-entropy with the masks the engine drew; the C loops (im2col, col2im) and the torch path agree
    bit for bit; evaluation logits are nn.Module's."""
    from wsnets.zoo import cpu_kernels
    from wsnets.zoo import trainer as T
    if not fused:
        monkeypatch.setattr(cpu_kernels, "load", lambda: None)
    elif cpu_kernels.load() is None:
        pytest.skip(f"fused CPU loops unavailable: {cpu_kernels.status()}")
    dataset, arch = ARCHS[name]
    bank = DataBank.build([dataset])
    K, B = 5, 6
    params = init_params(arch, torch.arange(K), torch.full((K,), 1.5))
    drop = torch.tensor([0.0, 0.0, 0.0, 0.3, 0.5]) if name != "padded" else torch.zeros(K)
    masks = {}
    real = T._dropout_rows

    def record(eng, key, keep, y, out, shape):
        s = real(eng, key, keep, y, out, shape)
        masks[key] = s.clone()
        return s
    monkeypatch.setattr(T, "_dropout_rows", record)
    eng = CNNEngine(arch, params, bank, B, drop, int((drop > 0).sum()), torch.Generator().manual_seed(0), chunk=2)
    assert all(torch.equal(v, params[k]) for k, v in eng.params().items())
    idx = torch.randint(0, int(bank.n[0]), (K, B), generator=torch.Generator().manual_seed(1))
    yb = bank.y[0][idx]
    got = torch.cat([eng._grads(a, min(a + 2, K), idx[a:a + 2], yb[a:a + 2])[0].clone() for a in range(0, K, 2)])
    for k in range(K):
        ws = {n: v[k].clone().requires_grad_(True) for n, v in params.items()}
        module = wsnets.WeightSpace(arch, {n: v[k] for n, v in params.items()}).to_module()
        if drop[k] > 0:  # the engine's masks after each conv activation: chunk (2, 4) holds rows 3 and 4
            a, r = (2, 1) if k == 3 else (4, 0)
            hooks = [m.register_forward_hook(lambda mod, i, o, s=masks[(a, j)][r - (1 if a == 2 else 0)]:
                                             o * s.view(o.shape[0], *o.shape[2:], o.shape[1]).movedim(-1, 1))
                     for j, m in enumerate([m for m in module if isinstance(m, (torch.nn.ReLU, torch.nn.Tanh))])]
        loss = F.cross_entropy(functional_call(module, ws, (bank.x[0][idx[k]],)), yb[k])
        grads = dict(zip(ws, torch.autograd.grad(loss, list(ws.values()))))
        torch.testing.assert_close(got[k], _theta(arch, grads, bank), rtol=1e-4, atol=1e-6, msg=f"model {k}")
        if drop[k] > 0:
            for h in hooks:
                h.remove()
    x = bank.xt[0][:23]
    logits = eng.logits(x)
    # per-model inputs (the training split's members) go through the same products: the same bits
    assert torch.equal(eng.logits(x.expand(K, *x.shape)), logits)
    assert torch.equal(eng.row_logits(idx), eng.logits(bank.x[0][idx]))  # first-layer columns from the table
    for k in range(K):
        module = wsnets.WeightSpace(arch, {n: v[k] for n, v in params.items()}).to_module().eval()
        torch.testing.assert_close(logits[k].T, module(x), rtol=1e-4, atol=1e-5)
    if fused:  # the torch path of the same engine gives the same bits
        monkeypatch.setattr(cpu_kernels, "load", lambda: None)
        eng2 = CNNEngine(arch, params, bank, B, torch.zeros(K), 0, torch.Generator().manual_seed(0), chunk=2)
        eng1 = CNNEngine(arch, params, bank, B, torch.zeros(K), 0, torch.Generator().manual_seed(0), chunk=2)
        eng1.cpu_lib = cpu_kernels._STATE["lib"]
        for a in range(0, K, 2):
            b = min(a + 2, K)
            assert torch.equal(eng1._grads(a, b, idx[a:b], yb[a:b])[0], eng2._grads(a, b, idx[a:b], yb[a:b])[0])


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_engine_trains_as_the_autograd_engine(device):
    """Without dropout, a mixed SGD/Adam/RMSprop group with an L2 penalty and no clipping reaches the same
    weights and metrics with the CNN engine (chunks of 2) as with autograd through grouped convolutions
    (on CPU; on a GPU the engine's torch path, one chunk)."""
    dataset, arch = ARCHS["zoo1d"]
    base = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.0, "weight_decay": 0.0, "init_scale": 1.0, "dropout": 0.0,
            "label_noise": 0.0, "train_fraction": 1.0, "grad_clip": 0.0, "l2": 1e-3, "init": "he_normal", "init_std": 0.05}
    hps = [{}, {"optimizer": "adam", "lr": 0.003, "init": "orthogonal"}, {"optimizer": "rmsprop", "lr": 0.001},
           {"optimizer": "sgd", "lr": 0.02, "momentum": 0.9, "train_fraction": 0.5, "init": "truncated_normal"},
           {"optimizer": "adam", "lr": 0.001, "grad_clip": 1.0, "l2": 0.0}]
    runs = [RunSpec(i, f"c-{i}", 50 + i, arch, dataset, {**base, **hp}) for i, hp in enumerate(hps)]
    bank = DataBank.build([dataset], device)
    from wsnets.zoo import cnn_engine
    real = cnn_engine.CNNEngine.__init__
    try:
        cnn_engine.CNNEngine.__init__ = lambda self, *a, **kw: real(self, *a, chunk=2 if device == "cpu" else None, **kw)
        a = list(train_group(arch, runs, epochs=2, checkpoints=[2], batch_size=32, bank=bank, engine="cnn",
                             steps_per_epoch=6, device=device))[-1]
    finally:
        cnn_engine.CNNEngine.__init__ = real
    b = list(train_group(arch, runs, epochs=2, checkpoints=[2], batch_size=32, bank=bank, engine="autograd",
                         steps_per_epoch=6, device=device))[-1]
    for k in a.params:
        torch.testing.assert_close(a.params[k], b.params[k], rtol=1e-4, atol=1e-5, msg=k)
    torch.testing.assert_close(a.metrics["test_loss"], b.metrics["test_loss"], rtol=1e-4, atol=1e-5)
    assert torch.equal(a.metrics["test_acc"], b.metrics["test_acc"])


def test_member_evaluation_matches_masked_evaluation():
    """The training split evaluated on each model's own subset (rows of the training table) gives the
    masked evaluation's counts and accuracies exactly and its losses up to summation order."""
    from wsnets.zoo.trainer import _members, evaluate
    dataset, arch = ARCHS["zoo2d"]
    bank = DataBank.build([dataset])
    K, Nmax = 3, bank.x.shape[1]
    eng = CNNEngine(arch, init_params(arch, torch.arange(K), torch.ones(K)), bank, 8, torch.zeros(K), 0,
                    torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(3)
    member = torch.rand(K, Nmax, generator=gen) < torch.tensor([0.1, 0.5, 1.0])[:, None]
    didx = torch.zeros(K, dtype=torch.long)
    y_train = torch.randint(0, 10, (K, Nmax), generator=gen)  # labels differ per model (label noise)
    a = evaluate(eng.logits, bank, didx, y_train, member, True, chunk=100)
    b = evaluate(eng.logits, bank, didx, y_train, member, True, chunk=100,
                 members=(_members(member), member.sum(1), didx[:, None] * Nmax, eng.row_logits))
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith("loss"):
            torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(a[k], b[k]), k


def test_conv_maps_cover_every_tap_once():
    """Every (window, tap) reading the input appears exactly once in the backward map; padding taps nowhere."""
    for shape, k, s, pad in (((16, 16), 3, 2, 0), ((8, 8), 3, 2, 1), ((40,), 3, 2, 0), ((7, 5), 3, 1, 1)):
        out, fwd, bwd = conv_maps(shape, k, s, pad)
        P, QT = int(torch.tensor(shape).prod()), len(fwd)
        assert out == tuple((n + 2 * pad - k) // s + 1 for n in shape)
        real = torch.arange(QT)[fwd < P]
        listed = bwd[bwd < QT]
        assert sorted(listed.tolist()) == real.tolist()
        for p in range(P):  # each listed entry reads position p, in increasing order
            e = bwd[:, p][bwd[:, p] < QT]
            assert bool((fwd[e] == p).all()) and e.tolist() == sorted(e.tolist())


def test_supports_only_conv_gap_linear_stacks():
    assert CNNEngine.supports(ARCHS["zoo2d"][1])
    assert not CNNEngine.supports(wsnets.cnn(1, [4], 10, batchnorm=True, input_shape=(1, 8, 8)))
    assert not CNNEngine.supports(wsnets.mlp(4, [3], 2))
    with pytest.raises(ConfigError, match="dropout after hidden linear"):
        CNNEngine(ARCHS["padded"][1], init_params(ARCHS["padded"][1], torch.arange(2), torch.ones(2)),
                  DataBank.build(["digits-img"]), 4, torch.tensor([0.0, 0.5]), 1, torch.Generator())
