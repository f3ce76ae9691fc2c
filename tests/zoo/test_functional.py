"""The batched functional forward agrees with K separate nn.Modules (eval and train mode, gradients)."""

import copy

import pytest
import torch

import wsnets
from wsnets.arch import Architecture, Layer
from wsnets.errors import ShapeMismatchError
from wsnets.functional import forward, predict

K = 3


def _pooled_cnn():
    # pools spell out stride/padding: spine build_layer passes padding=() to nn.MaxPool2d otherwise
    L = [Layer("conv2d", "0", 1, 4, (3, 3), (1, 1), (1, 1), (1, 1), dims=2), Layer("act", fn="leaky_relu", slope=0.2),
         Layer("maxpool", kernel_size=(2, 2), stride=(2, 2), padding=(0, 0), dims=2), Layer("conv2d", "3", 4, 5, (3, 3), (1, 1), (0, 0), (1, 1), dims=2),
         Layer("act", fn="silu"), Layer("avgpool", kernel_size=(1, 1), stride=(1, 1), padding=(0, 0), dims=2), Layer("gap", dims=2), Layer("flatten"),
         Layer("linear", "8", 5, 3)]
    return Architecture(tuple(L), (1, 8, 8))


ARCHS = {
    "mlp": (wsnets.mlp(6, [5, 4], 3, "tanh"), (6,)),
    "mlp-bn-ln": (Architecture(wsnets.mlp(6, [5], 3, "gelu", batchnorm=True).layers[:-1]
                               + (Layer("layernorm", "9", 5, 5),) + wsnets.mlp(6, [5], 3, "gelu").layers[-1:], (6,)), (6,)),
    "img-mlp": (wsnets.mlp(64, [7], 3, "elu", input_shape=(1, 8, 8)), (1, 8, 8)),
    "cnn2d-bn": (wsnets.cnn(1, [4, 6], 3, "relu", batchnorm=True, input_shape=(1, 8, 8)), (1, 8, 8)),
    "cnn1d": (wsnets.cnn(1, [4, 5], 3, "softplus", dims=1, kernel_size=[5, 3], stride=[2, 1], hidden=[6],
                         input_shape=(1, 20)), (1, 20)),
    "cnn2d-pool": (_pooled_cnn(), (1, 8, 8)),
}


def _random(arch):
    ws = wsnets.WeightSpace.random(arch, batch_size=K)
    return ws, [ws[k].to_module() for k in range(K)]


@pytest.mark.parametrize("name", list(ARCHS))
def test_eval_matches_modules_shared_and_per_model_inputs(name):
    arch, shape = ARCHS[name]
    ws, mods = _random(arch)
    x = torch.randn(9, *shape)
    ref = torch.stack([m(x) for m in mods])
    torch.testing.assert_close(forward(arch, ws.params, x), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(predict(arch, ws.params, x, chunk=4), ref, rtol=1e-5, atol=1e-5)
    xs = torch.randn(K, 9, *shape)
    ref2 = torch.stack([m(xs[k]) for k, m in enumerate(mods)])
    torch.testing.assert_close(forward(arch, ws.params, xs), ref2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mlp-bn-ln", "cnn2d-bn", "cnn1d"])
def test_train_mode_batch_stats_running_updates_and_gradients(name):
    arch, shape = ARCHS[name]
    ws, mods = _random(arch)
    params = {k: v.clone().requires_grad_(not k.endswith(("running_mean", "running_var"))) for k, v in ws.params.items()}
    xs = torch.randn(K, 10, *shape)
    out = forward(arch, params, xs, train=True)
    ref = []
    for k, m in enumerate(mods):
        m.train()
        ref.append(m(xs[k]))
    ref = torch.stack(ref)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    (out ** 2).sum().backward()
    (ref ** 2).sum().backward()
    for i, l in enumerate(arch.layers):
        for s in l.param_shapes():
            key = f"{l.name}.{s}"
            got = params[key].grad if params[key].requires_grad else params[key]
            want = torch.stack([getattr(mods[k][i], s).grad if params[key].requires_grad else getattr(mods[k][i], s)
                                for k in range(K)])
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=key)


def test_per_model_dropout_rates():
    arch = wsnets.mlp(6, [200], 3)
    ws = wsnets.WeightSpace.random(arch, batch_size=3)
    params = dict(ws.params)
    params["0.bias"] = torch.ones(3, 200)  # positive pre-activations: dropout zeros are visible after relu
    params["0.weight"] = torch.zeros(3, 200, 6)
    params["2.weight"] = torch.eye(3, 200).expand(3, 3, 200).clone()
    params["2.bias"] = torch.zeros(3, 3)
    x = torch.randn(500, 6)
    p = torch.tensor([0.0, 0.5, 0.9])
    g = torch.Generator().manual_seed(0)
    # the first logit reads hidden unit 0: 1/(1-p) when kept, 0 when dropped
    out = forward(arch, params, x, train=True, dropout=p, generator=g)[:, :, 0]
    kept = (out > 0).float().mean(1)
    torch.testing.assert_close(kept, 1 - p, atol=0.06, rtol=0)
    torch.testing.assert_close(out.max(1).values, 1 / (1 - p))
    assert torch.equal(forward(arch, params, x, dropout=p), forward(arch, params, x))  # eval: identity


def test_bad_inputs():
    arch, _ = ARCHS["mlp"]
    ws = wsnets.WeightSpace.random(arch, batch_size=K)
    with pytest.raises(ShapeMismatchError):
        forward(arch, ws.params, torch.randn(4, 7))
    with pytest.raises(ShapeMismatchError):
        forward(arch, ws[0].params, torch.randn(4, 6))
