"""The Small CNN Zoo's training options in the batched trainer: RMSprop, Adam and SGD with a Keras-style L2
penalty on the kernels, no gradient clipping, and Keras' weight initializers -- each model k of a group
equals its own torch.optim loop, and initial weights have the initializer's distribution."""

import math

import pytest
import torch
import torch.nn.functional as F

import wsnets
from wsnets.errors import ConfigError
from wsnets.zoo.recipe import RunSpec
from wsnets.zoo.trainer import DataBank, init_params, train_group

BASE = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.0, "weight_decay": 0.0, "init_scale": 1.0, "dropout": 0.0,
        "label_noise": 0.0, "train_fraction": 1.0, "grad_clip": 0.0}


@pytest.mark.parametrize("engine,arch", [
    ("mlp", wsnets.mlp(2, [6, 5], 4, "tanh")),
    ("autograd", wsnets.mlp(2, [6, 5], 4, "relu")),
])
def test_rmsprop_adam_sgd_with_l2_match_torch_optim(engine, arch, reference_batches):
    """Each model equals one nn.Module trained by torch.optim on the same batches: RMSprop(alpha=0.9, eps=1e-7),
    Adam and SGD (with and without momentum), the L2 penalty as weight_decay = 2 * l2 on the weights only
    (biases in a group without decay), no clipping (grad_clip = 0)."""
    hps = [{"optimizer": "rmsprop", "lr": 0.01, "l2": 1e-3}, {"optimizer": "adam", "lr": 0.02, "l2": 3e-3},
           {"optimizer": "sgd", "lr": 0.1, "l2": 1e-2}, {"optimizer": "rmsprop", "lr": 0.003, "momentum": 0.5},
           {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "l2": 5e-4, "train_fraction": 0.4},
           {"optimizer": "rmsprop", "lr": 0.02, "l2": 0.0, "weight_decay": 0.01}]
    runs = [RunSpec(i, f"o-{i}", 700 + i, arch, "blobs2", {**BASE, **hp}) for i, hp in enumerate(hps)]
    bank = DataBank.build(["blobs2"])
    B, E = 128, 2
    ck = list(train_group(arch, runs, epochs=E, checkpoints=[0, E], batch_size=B, bank=bank, engine=engine))
    x, y, n = bank.x[0], bank.y[0], int(bank.n[0])
    steps = -(-n // B)
    for k, r in enumerate(runs):
        m = wsnets.WeightSpace(arch, {kk: v[k] for kk, v in ck[0].params.items()}).to_module().train()
        weights = [p for name, p in m.named_parameters() if name.endswith("weight")]
        biases = [p for name, p in m.named_parameters() if name.endswith("bias")]
        wd = 2 * r.hp.get("l2", 0.0)
        if r.hp["optimizer"] == "rmsprop":
            wd += r.hp["weight_decay"]
            make = lambda g: torch.optim.RMSprop(g, lr=r.hp["lr"], alpha=0.9, eps=1e-7, momentum=r.hp["momentum"])  # noqa: E731
        elif r.hp["optimizer"] == "adam":
            make = lambda g: torch.optim.Adam(g, lr=r.hp["lr"])  # noqa: E731
        else:
            make = lambda g: torch.optim.SGD(g, lr=r.hp["lr"], momentum=r.hp["momentum"])  # noqa: E731
        opt = make([{"params": weights, "weight_decay": wd},
                    {"params": biases, "weight_decay": r.hp["weight_decay"] if r.hp["optimizer"] == "rmsprop" else 0.0}])
        for idx in reference_batches(r.seed, n, r.hp["train_fraction"], E, steps, B):
            opt.zero_grad()
            F.cross_entropy(m(x[idx]), y[idx]).backward()
            opt.step()
        got = wsnets.WeightSpace(arch, {kk: v[k] for kk, v in ck[1].params.items()})
        for key, v in m.state_dict().items():
            i, suffix = key.split(".", 1)
            torch.testing.assert_close(got.params[f"{arch.layers[int(i)].name}.{suffix}"], v, rtol=1e-4, atol=1e-5,
                                       msg=f"model {k} ({r.hp['optimizer']}) {key}")


def test_keras_initializers_have_their_distributions():
    arch = wsnets.cnn(1, [16, 16], 10, input_shape=(1, 16, 16), stride=2, padding=0)
    kinds = ["normal", "truncated_normal", "he_normal", "glorot_normal", "orthogonal", "uniform"] * 20
    K = len(kinds)
    std = torch.full((K,), 0.2)
    p = init_params(arch, torch.arange(K), torch.ones(K), kinds, std)
    w = p["2.weight"]  # [K, 16, 16, 3, 3]: fan_in = fan_out = 144
    rows = {k: [i for i, x in enumerate(kinds) if x == k] for k in set(kinds)}

    def sd(kind):
        return float(w[rows[kind]].std())
    assert abs(sd("normal") - 0.2) < 0.01
    t = w[rows["truncated_normal"]]
    assert float(t.abs().max()) <= 2 * 0.2 + 1e-6 and abs(float(t.std()) - 0.2 * 0.8796) < 0.01
    assert abs(sd("he_normal") - math.sqrt(2 / 144)) < 0.005  # Keras divides the truncated std by 0.8796
    assert abs(sd("glorot_normal") - math.sqrt(2 / 288)) < 0.004
    assert float(w[rows["uniform"]].abs().max()) <= 1 / 12  # PyTorch's U(-1/sqrt(144), 1/sqrt(144)) unchanged
    for i in rows["orthogonal"]:  # 16 filters of 144 taps: orthonormal rows
        m = w[i].reshape(16, -1)
        torch.testing.assert_close(m @ m.T, torch.eye(16), atol=1e-5, rtol=0)
    first = p["0.weight"][rows["orthogonal"][0]].reshape(16, 9)  # 16 > 9: orthonormal columns
    torch.testing.assert_close(first.T @ first, torch.eye(9), atol=1e-5, rtol=0)
    keras = [i for i, x in enumerate(kinds) if x != "uniform"]
    assert float(p["0.bias"][keras].abs().max()) == 0 and float(p["0.bias"][rows["uniform"]].abs().max()) > 0
    # a model's initial weights depend on its own seed only
    alone = init_params(arch, torch.arange(3, 5), torch.ones(2), kinds[3:5], std[3:5])
    assert all(torch.equal(alone[k], p[k][3:5]) for k in p)
    with pytest.raises(ConfigError, match="unknown init"):
        init_params(arch, torch.arange(2), torch.ones(2), ["normal", "xavier"])


def test_old_groups_do_not_see_the_new_options():
    """Runs without init/l2 keys train exactly as runs that set them to their defaults."""
    arch = wsnets.mlp(2, [5], 4)
    plain = [RunSpec(0, "p", 3, arch, "blobs2", {**BASE, "grad_clip": 5.0})]
    named = [RunSpec(0, "p", 3, arch, "blobs2", {**BASE, "grad_clip": 5.0, "init": "uniform", "l2": 0.0, "init_std": 0.3})]
    bank = DataBank.build(["blobs2"])
    a, b = (list(train_group(arch, r, epochs=1, checkpoints=[1], batch_size=64, bank=bank))[-1] for r in (plain, named))
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
