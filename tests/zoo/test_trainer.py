"""The batched trainer equals K separate torch.optim loops, and its randomness is per model."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

import wsnets
from wsnets.zoo.recipe import RunSpec
from wsnets.zoo.trainer import DataBank, _argmax_is, _epoch_order, _members, _mix, hash_uniform, init_params, train_group


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))


def _runs(arch, hps, dataset="blobs2"):
    base = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0, "init_scale": 1.0, "dropout": 0.0,
            "label_noise": 0.0, "train_fraction": 1.0, "grad_clip": 1e9}
    return [RunSpec(i, f"t-{i}", 1000 + i, arch, dataset, {**base, **hp}) for i, hp in enumerate(hps)]


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("batchnorm", [False, True])
def test_matches_torch_optim_reference(batchnorm, device, reference_batches):
    arch = wsnets.mlp(2, [6, 5], 4, "tanh", batchnorm=batchnorm)
    hps = [{"optimizer": "sgd", "lr": 0.1}, {"optimizer": "adam", "lr": 0.01, "weight_decay": 0.05},
           {"optimizer": "sgd", "lr": 0.03, "momentum": 0.0, "weight_decay": 0.01, "init_scale": 2.0,
            "train_fraction": 0.3, "label_noise": 0.4}]
    if batchnorm:  # a bias right before BatchNorm gets a ~1e-9 noise gradient that Adam would turn into +-lr steps
        hps[1]["optimizer"] = "sgd"
    runs = _runs(arch, hps)
    bank = DataBank.build(["blobs2"])
    B, E = 200, 2
    ck = list(train_group(arch, runs, epochs=E, checkpoints=[0, E], batch_size=B, bank=DataBank.build(["blobs2"], device),
                          device=device))
    assert [c.epoch for c in ck] == [0, E]
    init = ck[0].params
    # reference: one nn.Module and one torch.optim optimizer per model, fed the same batches
    seeds = torch.tensor([r.seed for r in runs])
    x, y = bank.x[0], bank.y[0]
    n = len(y)
    from wsnets.zoo import trainer as T
    for k, r in enumerate(runs):
        m = wsnets.WeightSpace(arch, {kk: v[k] for kk, v in init.items()}).to_module().train()
        opt = (torch.optim.SGD(m.parameters(), lr=r.hp["lr"], momentum=r.hp["momentum"], weight_decay=r.hp["weight_decay"])
               if r.hp["optimizer"] == "sgd" else
               torch.optim.AdamW(m.parameters(), lr=r.hp["lr"], weight_decay=r.hp["weight_decay"]))
        flip = hash_uniform(seeds[k:k + 1], T._STREAM["noise_flip"], torch.arange(n))[0] < r.hp["label_noise"]
        rnd = (hash_uniform(seeds[k:k + 1], T._STREAM["noise_label"], torch.arange(n))[0] * 4).long()
        yk = torch.where(flip, rnd, y)
        for idx in reference_batches(r.seed, n, r.hp["train_fraction"], E, -(-n // B), B):
            opt.zero_grad()
            F.cross_entropy(m(x[idx]), yk[idx]).backward()
            opt.step()
        got = wsnets.WeightSpace(arch, {kk: v[k] for kk, v in ck[1].params.items()})
        for key, v in m.state_dict().items():
            if key.endswith("num_batches_tracked"):
                continue
            i, suffix = key.split(".", 1)
            torch.testing.assert_close(got.params[f"{arch.layers[int(i)].name}.{suffix}"], v, rtol=1e-4, atol=1e-5, msg=f"{k} {key}")
        # recorded test accuracy equals the reference model's
        m.eval()
        acc = (m(bank.xt[0]).argmax(1) == bank.yt[0]).sum().item() / len(bank.yt[0])
        assert ck[1].metrics["test_acc"][k].item() == acc


def test_model_is_independent_of_its_group():
    arch = wsnets.mlp(2, [8], 4)
    runs = _runs(arch, [{"lr": 0.1, "train_fraction": 0.5}, {"lr": 0.2, "dropout": 0.0}, {"lr": 0.05}])
    bank = DataBank.build(["blobs2"])
    full = list(train_group(arch, runs, epochs=1, checkpoints=[1], batch_size=64, bank=bank))[-1]
    alone = list(train_group(arch, runs[1:2], epochs=1, checkpoints=[1], batch_size=64, bank=bank))[-1]
    for k, v in alone.params.items():
        torch.testing.assert_close(v[0], full.params[k][1], rtol=1e-5, atol=1e-6)


def test_init_statistics_match_pytorch_default():
    arch = wsnets.mlp(50, [40], 3)
    p = init_params(arch, torch.arange(200), torch.full((200,), 2.0))
    w = p["0.weight"]
    bound = 2.0 / 50 ** 0.5
    assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.99 * bound
    assert abs(float(w.std()) - bound / 3 ** 0.5) < 0.01 * bound  # U(-b, b) has std b/sqrt(3)
    assert not torch.equal(w[0], w[1])
    u = hash_uniform(torch.tensor([7]), 3, torch.arange(100000))[0]
    assert abs(float(u.mean()) - 0.5) < 0.01 and float(u.min()) >= 0 and float(u.max()) < 1


def test_diverging_model_is_restored_and_frozen():
    arch = wsnets.mlp(2, [8], 4)
    runs = _runs(arch, [{"lr": 0.1}, {"lr": 1e30, "momentum": 0.0}])
    bank = DataBank.build(["blobs2"])
    ck = list(train_group(arch, runs, epochs=2, checkpoints=[0, 2], batch_size=64, bank=bank))
    assert ck[-1].metrics["diverged"].tolist() == [0.0, 1.0]
    assert all(torch.isfinite(v).all() for v in ck[-1].params.values())
    for k, v in ck[0].params.items():  # frozen at the start of the epoch it diverged in
        torch.testing.assert_close(ck[-1].params[k][1], v[1])


@pytest.mark.parametrize("use_numpy,fused,device", [(True, False, "cpu"), (True, None, "cpu"), (False, None, "cpu"),
                                                    pytest.param(False, None, "cuda", marks=CUDA.marks)])
def test_epoch_order_is_hash_sorted_passes(use_numpy, fused, device):
    """Each model's stream is its reshuffled passes over its subset, pass p ordered by hash(seed, p*N + pos),
    whatever the chunking of the sort and whichever backend (NumPy or the fused C loop on CPU, torch on
    devices)."""
    from wsnets.zoo import cpu_kernels
    if use_numpy and fused is None and cpu_kernels.load() is None:
        pytest.skip(f"fused CPU loops unavailable: {cpu_kernels.status()}")
    N, total = 50, 64
    seeds = torch.tensor([11, 2 ** 32 - 5, 777, 3])
    member = torch.zeros(4, N, dtype=torch.bool)
    member[0] = True
    member[1, ::7] = True
    member[2, 5] = True  # a single member: every pass is the same
    member[3, 10:40] = True
    n_sub = member.sum(1)
    memb = _members(member)
    for epoch in (0, 1, 7):
        got = _epoch_order(seeds.to(device), memb.to(device), n_sub.to(device), epoch, total, N, use_numpy=use_numpy,
                           fused=fused).cpu()
        for k in range(4):
            pos = member[k].nonzero().flatten().tolist()
            key = lambda p, i: int(_mix(torch.tensor(((int(_mix(torch.tensor((int(seeds[k]) ^ 4))))) + (p * N + i) * 0x9E3779B1) & 0xFFFFFFFF)))
            stream = []
            for p in range((epoch * total) // len(pos), (epoch * total + total) // len(pos) + 1):
                stream += sorted(pos, key=lambda i: key(p, i))
            off = epoch * total - ((epoch * total) // len(pos)) * len(pos)
            assert got[k].tolist() == stream[off:off + total], (epoch, k)
    both = _epoch_order(seeds, memb, n_sub, 3, total, N, use_numpy=use_numpy, epochs=2, fused=fused)
    assert torch.equal(both, torch.cat([_epoch_order(seeds, memb, n_sub, e, total, N) for e in (3, 4)], 1))


@pytest.mark.parametrize("kernel", [False, pytest.param(True, marks=pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="needs Triton"))])
@pytest.mark.parametrize("cap", [1, 40, 1 << 26])
def test_epoch_order_torch_path_equals_numpy_in_any_chunking(cap, kernel):
    """The torch path (sort keys from torch ops, or from the Triton kernel: on the GPU, else in Triton's
    CPU interpreter) gives the NumPy path's sample order whatever the chunking."""
    from wsnets.zoo.trainer import _epoch_order_torch
    dev = "cuda" if kernel and torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(1)
    N, K = 37, 9
    member = torch.rand(K, N, generator=g) < torch.rand(K, 1, generator=g)
    member[:, 0] = True
    seeds = torch.randint(0, 2 ** 32, (K,), generator=g)
    memb, n_sub = _members(member), member.sum(1)
    for epoch, total, epochs in ((0, 40, 1), (2, 40, 3), (5, 7, 2)):
        ref = _epoch_order(seeds, memb, n_sub, epoch, total, N, use_numpy=True, epochs=epochs, fused=False)
        got = _epoch_order_torch(seeds.to(dev), memb.to(dev), n_sub.to(dev), epoch * total, total * epochs, N, 6,
                                 cap=cap, kernel=kernel)
        assert torch.equal(got.cpu(), ref), (cap, epoch)


def test_argmax_is_matches_argmax_with_ties_and_nan():
    g = torch.Generator().manual_seed(0)
    lg = torch.randint(0, 3, (4, 5, 300), generator=g).float()  # many ties
    lg[0, 2, :50] = float("nan")
    lg[1, :, 60:] = float("-inf")
    y = torch.randint(0, 5, (4, 300), generator=g)
    assert torch.equal(_argmax_is(lg, y), lg.argmax(1) == y)


def test_hash_uniform_numpy_path_is_bit_identical():
    from wsnets.zoo import trainer as T
    seeds, ctr = torch.tensor([0, 5, 2 ** 32 - 1, 123456789]), torch.arange(3000).reshape(30, 100)
    got = hash_uniform(seeds, 7, ctr)
    k = T._mix((seeds ^ T._mix(torch.tensor(7))) & T._MASK)
    ref = (T._mix((k[:, None, None] + ctr[None] * T._GOLD) & T._MASK) >> 8).float() * (1.0 / (1 << 24))
    assert got.dtype == torch.float32 and torch.equal(got, ref)


@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("act", ["relu", "tanh", "gelu", "sigmoid", "silu", "elu", "softplus", "leaky_relu"])
def test_mlp_engine_gradients_match_autograd_with_chunks_and_dropout(act, in_place, monkeypatch):
    """The hand-written MLP forward/backward (in chunks of 2 models, dropout on the last 2 rows) gives
    autograd's gradients of the same loss with the same dropout masks; the softmax written over the
    logits (CPU) or into its own buffer (other devices)."""
    from wsnets.zoo import trainer as T
    arch = wsnets.mlp(4, [7, 6], 3, act)
    K, B = 5, 8
    bank = DataBank.build(["blobs2"])
    bank = DataBank(["x"], torch.randn(1, 50, 4), torch.randint(0, 3, (1, 50)), torch.tensor([50]), bank.xt[:, :, :2].repeat(1, 1, 2),
                    bank.yt.clamp_max(2), bank.nt, 3)
    params = init_params(arch, torch.arange(K), torch.full((K,), 1.5))
    drop = torch.tensor([0.0, 0.0, 0.0, 0.3, 0.5])
    masks = []
    real = T._MLPEngine._dropout

    def record(self, *a):
        s = real(self, *a)
        masks.append(s.clone())
        return s
    monkeypatch.setattr(T._MLPEngine, "_dropout", record)
    eng = T._MLPEngine(arch, params, bank, B, drop, 2, torch.Generator().manual_seed(0), chunk=2)
    eng.softmax_in_place = in_place
    idx = torch.randint(0, 50, (K, B))
    yb = bank.y[0][idx]
    got = torch.cat([torch.cat([g.clone() for g in [t.flatten(1) for t in eng._grads(a, min(a + 2, K), idx[a:a + 2], yb[a:a + 2])]], 1)
                     for a in range(0, K, 2)])
    # reference: autograd through per-model modules with the recorded masks ([rows, out, B] per chunk and layer)
    it = iter(masks)
    chunk_masks = {3: [next(it), next(it)], 4: [next(it), next(it)]}  # chunk 1 holds row 3, chunk 2 row 4
    ref = []
    for k in range(K):
        ws = {n: v[k].clone().requires_grad_(True) for n, v in params.items()}
        h = bank.x[0][idx[k]]
        for i, l in enumerate([l for l in arch.layers if l.kind == "linear"]):
            h = h @ ws[f"{l.name}.weight"].T + ws[f"{l.name}.bias"]
            if i < 2:
                h = wsnets.functional.activation(act, h)
                if drop[k] > 0:
                    h = h * chunk_masks[k][i][0].T
        loss = F.cross_entropy(h, yb[k])
        gr = torch.autograd.grad(loss, list(ws.values()))
        gd = dict(zip(ws, gr))
        # the engine's layout: per layer [in+1, out] (weight transposed, bias as the last row)
        ref.append(torch.cat([torch.cat([gd[f"{l.name}.weight"], gd[f"{l.name}.bias"][:, None]], 1).T.flatten()
                              for l in arch.layers if l.kind == "linear"]))
    torch.testing.assert_close(got, torch.stack(ref), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("flat", [True, False])
def test_engines_agree_without_dropout(monkeypatch, flat):
    """MLP engine (chunks of 2; parameters in one row per model or one block per layer) and autograd
    engine train a mixed SGD/AdamW group to the same weights."""
    from wsnets.zoo import trainer as T
    arch = wsnets.mlp(2, [6, 5], 4, "gelu")
    hps = [{"optimizer": "sgd", "lr": 0.1, "weight_decay": 0.01}, {"optimizer": "adam", "lr": 0.01},
           {"optimizer": "sgd", "lr": 0.03, "momentum": 0.0, "label_noise": 0.3, "grad_clip": 0.5},
           {"optimizer": "adam", "lr": 0.02, "weight_decay": 0.1, "train_fraction": 0.4}, {"optimizer": "sgd", "lr": 0.2}]
    runs = _runs(arch, hps)
    bank = DataBank.build(["blobs2"])
    b = list(train_group(arch, runs, epochs=2, checkpoints=[2], batch_size=128, bank=bank, engine="autograd"))[-1]
    real = T._MLPEngine.__init__
    monkeypatch.setattr(T._MLPEngine, "__init__", lambda self, *a, **kw: real(self, *a, chunk=2, flat=flat, **kw))
    a = list(train_group(arch, runs, epochs=2, checkpoints=[2], batch_size=128, bank=bank, engine="mlp"))[-1]
    for k in a.params:
        torch.testing.assert_close(a.params[k], b.params[k], rtol=1e-4, atol=1e-5)
    for k in ("test_acc", "train_loss"):
        torch.testing.assert_close(a.metrics[k], b.metrics[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_dropout_scales_have_each_models_rate_and_mean_one(monkeypatch, fused):
    """The MLP engine's CPU dropout factors are 0 or 1/keep' with keep' = keep rounded to 2**-16: each
    model keeps its own fraction of units, the factor averages to 1 (inverted dropout), masks change
    from draw to draw, and the dropped activations are the inputs times the factors (with the fused C
    loop or NumPy and torch)."""
    from wsnets.zoo import cpu_kernels
    if not fused:
        monkeypatch.setattr(cpu_kernels, "load", lambda: None)
    elif cpu_kernels.load() is None:
        pytest.skip(f"fused CPU loops unavailable: {cpu_kernels.status()}")
    from wsnets.zoo import trainer as T
    arch = wsnets.mlp(4, [64], 3)
    drop = torch.tensor([0.0, 0.1, 0.5, 0.8])
    bank = DataBank(["x"], torch.randn(1, 50, 4), torch.randint(0, 3, (1, 50)), torch.tensor([50]),
                    torch.randn(1, 10, 4), torch.randint(0, 3, (1, 10)), torch.tensor([10]), 3)
    eng = T._MLPEngine(arch, init_params(arch, torch.arange(4), torch.ones(4)), bank, 256, drop, 3,
                       torch.Generator().manual_seed(0))
    assert (eng.cpu_lib is not None) == fused
    keep = eng.keep[1:]
    y = torch.randn(3, 64, 256)
    out = torch.full((3, 65, 256), float("nan"))
    s1 = eng._dropout(0, 0, 1, 4, keep, y, out[:, :64]).clone()
    assert torch.equal(out[:, :64], y * s1) and bool(out[:, 64].isnan().all())
    s2 = eng._dropout(0, 0, 1, 4, keep, y, out[:, :64])
    assert s1.shape == (3, 64, 256) and not torch.equal(s1, s2)
    for r, p in enumerate([0.1, 0.5, 0.8]):
        k16 = round((1 - p) * 65536) / 65536
        vals = set(s1[r].unique().tolist())
        assert vals == {0.0, torch.tensor(1 / k16).float().item()}
        kept = float((s1[r] > 0).float().mean())
        assert abs(kept - (1 - p)) < 4 * ((p * (1 - p)) / s1[r].numel()) ** 0.5 + 1e-3, (p, kept)
        assert abs(float(s1[r].double().mean()) - 1) < 0.05
