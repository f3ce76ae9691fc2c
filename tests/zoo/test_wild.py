"""Heterogeneous zoos: traced residual CNNs and transformers drawn by recipes and trained batched (DAG engine)."""

import sqlite3

import pytest
import torch
import torch.nn.functional as F

import wsnets
from wsnets.errors import ConfigError
from wsnets.functional import forward
from wsnets.models import ResidualMLP, ViT
from wsnets.models.families import WildCNN
from wsnets.trace import trace
from wsnets.zoo import build, datasets, open as open_zoo, parse_recipe
from wsnets.zoo.dag_engine import train_forward
from wsnets.zoo.recipe import RunSpec, family_module
from wsnets.zoo.trainer import DataBank, init_params, train_group


MODULES = {
    "resnet-bn-stride": (lambda: WildCNN(depth=3, width=4, residual=True, batchnorm=True, downsample="stride"), (1, 8, 8)),
    "resnet-k5-maxpool": (lambda: WildCNN(depth=3, width=4, kernel_size=5, residual=True, activation="tanh",
                                          downsample="maxpool"), (1, 8, 8)),
    "plain-bn-maxpool": (lambda: WildCNN(depth=3, width=4, batchnorm=True, activation="gelu", downsample="maxpool"),
                         (1, 8, 8)),
    "vit-cls": (lambda: ViT(patch=4, dim=8, heads=2, depth=2, hidden=16, activation="gelu"), (1, 8, 8)),
    "vit-mean-relu": (lambda: ViT(patch=2, dim=8, heads=4, depth=1, hidden=8, pool="mean"), (1, 8, 8)),
    "resmlp-bn": (lambda: ResidualMLP(12, 8, 2, 4, norm="batchnorm"), (12,)),
}


@pytest.mark.parametrize("name", list(MODULES))
def test_dag_engine_forward_equals_functional_forward_in_training(name):
    """Outputs, gradients and BatchNorm running statistics of the grouped-layout interpreter equal
    wsnets.functional.forward(train=True) on K models with their own batches; in evaluation mode its
    outputs equal wsnets.functional.forward's."""
    make, shape = MODULES[name]
    arch = trace(make(), shape)
    K, B = 3, 64
    g = torch.Generator().manual_seed(0)
    p = init_params(arch, torch.arange(K), torch.ones(K))
    for k, v in p.items():  # away from the norm layers' initial 1/0 values
        v.add_(0.1 * torch.randn(v.shape, generator=g))
    q = {k: v.clone() for k, v in p.items()}
    # off-centre inputs, as digits' pixels (0-16): a BatchNorm that sums squares in float32 (PyTorch's
    # channels-last CPU kernel) is 30-60x less accurate on them, enough to fail
    x = 8 + 3 * torch.randn(K, B, *shape, generator=g)
    keys = [k for k in p if not k.endswith(("running_mean", "running_var"))]
    for d in (p, q):
        for k in keys:
            d[k].requires_grad_(True)
    a, b = train_forward(arch, p, x), forward(arch, q, x, train=True)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    w = torch.randn(a.shape, generator=g)
    ga = torch.autograd.grad((a * w).sum(), [p[k] for k in keys])
    gb = torch.autograd.grad((b * w).sum(), [q[k] for k in keys])
    # a weight BatchNorm makes scale-free has a ~0 gradient: rounding noise, ~2e-6 of the largest gradient here
    # (from float64's both ways on resnet-bn-stride's 1x1 shortcut from the input channel)
    scale = max(float(v.abs().max()) for v in gb)
    for k, u, v in zip(keys, ga, gb):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5 * scale, msg=lambda e: f"{k}: {e}")
    for k in p:
        if k.endswith(("running_mean", "running_var")):
            assert not torch.equal(p[k], init_params(arch, torch.arange(K), torch.ones(K))[k])  # updated
            torch.testing.assert_close(p[k], q[k])
    # evaluation mode (the recorded metrics): BatchNorm with those running statistics
    with torch.no_grad():
        torch.testing.assert_close(train_forward(arch, p, x, train=False), forward(arch, q, x), rtol=1e-5, atol=1e-6)


def _runs(arch, hps, dataset="digits-img"):
    base = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0, "init_scale": 1.0, "dropout": 0.0,
            "label_noise": 0.0, "train_fraction": 1.0, "grad_clip": 1e9}
    return [RunSpec(i, f"t-{i}", 2000 + i, arch, dataset, {**base, **hp}) for i, hp in enumerate(hps)]


@pytest.mark.parametrize("name", ["resnet-bn-stride", "vit-cls"])
def test_dag_engine_training_matches_torch_optim_reference(name, reference_batches):
    """K models trained as one computation end where K nn.Modules (the family's own class) with
    torch.optim, fed the same batches, end; the recorded accuracy is the reference model's."""
    make, shape = MODULES[name]
    arch = trace(make(), shape)
    hps = [{"optimizer": "sgd", "lr": 0.1}, {"optimizer": "adam", "lr": 0.01, "weight_decay": 0.05},
           {"optimizer": "sgd", "lr": 0.03, "momentum": 0.0, "weight_decay": 0.01, "init_scale": 1.5,
            "train_fraction": 0.4}]
    runs = _runs(arch, hps)
    bank = DataBank.build(["digits-img"])
    B, E = 256, 1
    ck = list(train_group(arch, runs, epochs=E, checkpoints=[0, E], batch_size=B, bank=bank, engine="dag"))
    x, y = bank.x[0], bank.y[0]
    n = len(y)
    for k, r in enumerate(runs):
        m = make()
        missing, unexpected = m.load_state_dict({kk: v[k] for kk, v in ck[0].params.items()}, strict=False)
        assert not unexpected and all(x.endswith("num_batches_tracked") for x in missing)
        m.train()
        opt = (torch.optim.SGD(m.parameters(), lr=r.hp["lr"], momentum=r.hp["momentum"], weight_decay=r.hp["weight_decay"])
               if r.hp["optimizer"] == "sgd" else
               torch.optim.AdamW(m.parameters(), lr=r.hp["lr"], weight_decay=r.hp["weight_decay"]))
        for idx in reference_batches(r.seed, n, r.hp["train_fraction"], E, -(-n // B), B):
            opt.zero_grad()
            F.cross_entropy(m(x[idx]), y[idx]).backward()
            opt.step()
        for key, v in m.state_dict().items():
            got = ck[1].params[key][k] if not key.endswith("num_batches_tracked") else v
            if key.endswith("in_proj_bias"):  # the key bias shifts every score of a query alike: softmax makes its
                d = v.shape[0] // 3           # gradient ~1e-9 noise, which Adam turns into +-lr steps; skip it
                got, v = torch.cat([got[:d], got[2 * d:]]), torch.cat([v[:d], v[2 * d:]])
            # a 1x1 conv from the one input channel into BatchNorm: the output is (up to eps) the same for any scale
            # of each weight, so its gradient is ~rounding noise, which Adam also turns into +-lr steps
            atol = 1e-3 if key == "body.0.shortcut.0.weight" else 2e-5
            torch.testing.assert_close(got, v, rtol=1e-4, atol=atol, msg=lambda e: f"{k} {key}: {e}")
        m.eval()
        with torch.no_grad():
            acc = (m(bank.xt[0]).argmax(1) == bank.yt[0]).sum().item() / len(bank.yt[0])
        assert ck[1].metrics["test_acc"][k].item() == acc


def test_init_of_attention_embeddings_and_params_follows_the_modules_defaults():
    arch = trace(ViT(patch=4, dim=16, heads=2, depth=1), (1, 8, 8))
    K = 400
    p = init_params(arch, torch.arange(K), torch.full((K,), 2.0))
    d = 16
    w = p["blocks.0.self_attn.in_proj_weight"]                       # Xavier-uniform [3D, D], times 2
    b = 2 * (6 / (4 * d)) ** 0.5
    assert float(w.abs().max()) <= b and float(w.abs().max()) > 0.99 * b
    assert abs(float(w.std()) - b / 3 ** 0.5) < 0.01 * b
    assert float(p["blocks.0.self_attn.in_proj_bias"].abs().max()) == 0.0
    assert float(p["blocks.0.self_attn.out_proj.bias"].abs().max()) == 0.0
    wo = p["blocks.0.self_attn.out_proj.weight"]
    assert float(wo.abs().max()) <= 2 / d ** 0.5 and float(wo.abs().max()) > 0.99 * 2 / d ** 0.5
    pos = p["pos_embed"]                                              # N(0, 0.02^2), times 2
    assert abs(float(pos.std()) - 0.04) < 0.002 and abs(float(pos.mean())) < 0.002
    assert not torch.equal(pos[0], pos[1])
    assert torch.equal(p["norm.weight"], torch.full((K, d), 1.0))
    # a model's initial weights do not depend on the others in its group
    q = init_params(arch, torch.arange(5, 7), torch.full((2,), 2.0))
    for k in p:
        assert torch.equal(q[k][0], p[k][5])


WILD = {"name": "w", "seed": 1, "population": 10, "datasets": ["digits-img"], "epochs": 1, "checkpoints": [0, 1],
        "batch_size": 256, "architectures": 3,
        "architecture": {"kind": "wild-cnn", "depth": [2, 3], "width": [4], "residual": [True, False],
                         "batchnorm": [True, False], "kernel_size": [3, 5], "activation": ["relu", "tanh"],
                         "downsample": ["stride", "maxpool", "none"]},
        "hyperparameters": {"optimizer": ["sgd", "adam"], "lr": {"log_uniform": [1e-3, 0.1]},
                            "dropout": {"uniform": [0, 0.3], "zero": 0.5}, "label_noise": {"uniform": [0, 0.3], "zero": 0.5},
                            "train_fraction": {"uniform": [0.3, 1]}}}
VIT = {**WILD, "name": "v", "architectures": 2,
       "architecture": {"kind": "vit", "depth": [1, 2], "width": [8], "heads": [1, 2], "patch": [2, 4],
                        "mlp_ratio": [1, 2], "activation": ["relu", "gelu"], "pool": ["cls", "mean"]}}


def test_recipe_draws_a_pool_of_traced_architectures():
    r = parse_recipe({**WILD, "population": 60, "architectures": 4})
    runs = r.runs()
    archs = {x.arch for x in runs}
    assert 2 <= len(archs) <= 4
    assert all(x.arch.input_shape == (1, 8, 8) and x.width == 4 for x in runs)
    assert [x.arch for x in r.runs(7)] == [x.arch for x in runs[:7]]  # model i is model i whatever the limit
    again = parse_recipe({**WILD, "population": 60, "architectures": 4}).runs()
    assert [x.arch.to_json() for x in again] == [x.arch.to_json() for x in runs]
    assert len({x.hp["lr"] for x in runs}) == 60  # hyperparameters are per model
    many = parse_recipe({**WILD, "population": 200, "architectures": 40}).runs()
    fams = {x.arch.describe().split(":")[0] for x in many}
    assert fams == {"resnet", "cnn2d"}  # residual (DAG) and plain (chain) networks
    for x in many[:40]:  # the stored architecture is the family module's traced one
        assert not x.arch.is_chain or "add" not in {l.kind for l in x.arch.layers}
    vit = parse_recipe({**VIT, "population": 20}).runs()
    assert {x.arch.describe().split(":")[0] for x in vit} == {"transformer"}
    assert {l.kind for l in vit[0].arch.layers} >= {"mha", "layernorm", "param", "tokens"}


@pytest.mark.parametrize("bad,match", [
    ({"architectures": -1}, "architectures"),
    ({"architecture": {"kind": "wild-cnn", "downsample": "avg"}}, "downsample"),
    ({"architecture": {"kind": "vit", "width": 10, "heads": 4}}, "heads"),
    ({"datasets": ["digits"], "architecture": {"kind": "vit"}}, "needs \\[C, H, W\\]"),
])
def test_recipe_refuses_bad_draws_with_one_line(bad, match):
    with pytest.raises(ConfigError, match=match) as e:
        parse_recipe({**WILD, **bad}).runs()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("raw", [WILD, VIT], ids=["wild", "vit"])
def test_stored_checkpoint_reproduces_recorded_test_accuracy(tmp_path, raw):
    """A stored checkpoint, rebuilt as a plain nn.Module (WeightSpace.to_module(), and the family's own
    class with load_state_dict), gets exactly its recorded test accuracy."""
    r = parse_recipe(raw)
    build(r, tmp_path / "z", progress=False)
    zoo = open_zoo(tmp_path / "z")
    assert len(zoo) == r.population * 2
    fams = set()
    for rec, run in zip(zoo.filter(epoch=1), r.runs()):
        assert rec["model_id"] == run.model_id
        x, y, xt, yt = datasets.load(rec["dataset"])
        ws = rec.load()
        assert ws.arch == run.arch and ws.arch.describe() == rec["arch_desc"]
        fams.add(rec["arch_desc"].split(":")[0])
        for m in (rec.to_module(), family_module(run)):  # the interpreter module; the class it was drawn as
            if m.training:
                missing, unexpected = m.load_state_dict(ws.state_dict(), strict=False)
                assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
                m.eval()
            with torch.no_grad():
                acc = (m(xt).argmax(1) == yt).sum().item() / len(yt)
            assert acc == rec["test_acc"], (type(m).__name__, rec["model_id"], acc, rec["test_acc"])
        tensors, meta = wsnets.io.read_safetensors(tmp_path / "z" / rec["shard"])
        assert wsnets.Architecture.from_json(meta["wsnets.arch"]) == ws.arch
    assert fams == ({"resnet", "cnn2d"} if raw is WILD else {"transformer"})


def test_auto_engine_trains_dags_with_the_dag_engine(monkeypatch):
    from wsnets.zoo import dag_engine
    used = []
    real = dag_engine.DAGEngine.__init__
    monkeypatch.setattr(dag_engine.DAGEngine, "__init__", lambda self, *a: (used.append(1), real(self, *a))[1])
    arch = trace(MODULES["resnet-bn-stride"][0](), (1, 8, 8))
    list(train_group(arch, _runs(arch, [{}]), epochs=1, checkpoints=[1], batch_size=512, bank=DataBank.build(["digits-img"])))
    assert used == [1]
    with pytest.raises(ConfigError, match="engine 'nope'"):
        list(train_group(arch, _runs(arch, [{}]), epochs=1, checkpoints=[1], batch_size=512,
                         bank=DataBank.build(["digits-img"]), engine="nope"))


KILL_TOML = """
name = "wildkill"
seed = 2
population = 24
architectures = 12
datasets = ["digits-img"]
epochs = 1
checkpoints = [1]
batch_size = 512
group_size = 2
engine = "dag"
[hyperparameters]
optimizer = ["sgd", "adam"]
lr = {log_uniform = [1e-3, 0.1]}
"""
KILL_ARCH = {  # tiny draws of each new kind: residual/plain CNNs, and pre-LN transformers
    "wild": """
[architecture]
kind = "wild-cnn"
depth = [2, 3]
width = [4]
residual = [true, false]
batchnorm = [true, false]
downsample = ["stride", "maxpool"]
""",
    "vit": """
[architecture]
kind = "vit"
depth = [1, 2]
width = [8]
heads = [1, 2]
patch = [4]
mlp_ratio = [1]
pool = ["cls", "mean"]
""",
}


@pytest.mark.parametrize("kind", list(KILL_ARCH))
def test_sigkill_then_resume_equals_uninterrupted_build(tmp_path, kill_build_after, kind):
    recipe = tmp_path / "kill.toml"
    recipe.write_text(KILL_TOML + KILL_ARCH[kind])
    killed, ref = tmp_path / "killed", tmp_path / "ref"
    kill_build_after(2, recipe, killed, workers=1)
    partial = {r["model_id"] for r in _rows(killed)}
    assert 0 < len(partial) < 24
    summary = build(recipe, killed, progress=False)
    assert summary["groups_skipped"] >= 2
    build(recipe, ref, progress=False)
    a, b = _rows(killed), _rows(ref)
    assert len(a) == 24 and a == b
    shards = sorted(p.relative_to(killed) for p in killed.glob("shards/*.safetensors"))
    assert shards == sorted(p.relative_to(ref) for p in ref.glob("shards/*.safetensors"))
    assert all((killed / s).read_bytes() == (ref / s).read_bytes() for s in shards)
    assert not list(killed.glob("shards/.*.tmp"))


def test_family_column_gives_the_residual_ood_split(tmp_path):
    from wsnets.zoo.dataset import ZooDataset
    r = parse_recipe({**WILD, "population": 8, "architectures": 8, "checkpoints": [1]})
    build(r, tmp_path / "z", progress=False)
    zoo = open_zoo(tmp_path / "z")
    assert {x["family"] for x in zoo} == {x.arch.describe().split(":")[0] for x in r.runs()} == {"resnet", "cnn2d"}
    ood = {"family": ("!=", "resnet")}
    train = ZooDataset(zoo, "stats", split="train", ood=ood, fractions=(0.8, 0.2, 0.0))
    test = ZooDataset(zoo, "stats", split="test", ood=ood)
    assert train.rows and test.rows
    assert {x["family"] for x in train.rows} == {"cnn2d"} and {x["family"] for x in test.rows} == {"resnet"}
    assert len(zoo.filter(family="resnet")) == len(test)


def _rows(path):
    from wsnets.zoo.store import read_rows
    con = sqlite3.connect(str(path / "index.sqlite"))
    con.row_factory = sqlite3.Row
    try:
        return read_rows(con)
    finally:
        con.close()


def test_graph_meta_model_reads_the_zoos_largest_kernel_without_being_told(tmp_path):
    """A zoo with 5x5 kernels trains a graph encoder whose config leaves ``edge_dim`` out: it is set to the
    zoo's largest kernel (25 taps, recorded in the saved config), and the saved meta-model predicts a 5x5
    network; an explicit ``edge_dim`` still wins (and one too small is still a one-line error)."""
    from wsnets.errors import ShapeMismatchError
    from wsnets.train import MetaModel, load_config, run_training
    raw = {**WILD, "population": 8, "architectures": 8, "checkpoints": [1],
           "architecture": {**WILD["architecture"], "kernel_size": [5], "depth": [2]}}
    build(parse_recipe(raw), tmp_path / "z", progress=False)
    zoo = open_zoo(tmp_path / "z")
    assert {r.arch.max_kernel_numel for r in parse_recipe(raw).runs()} == {25}
    cfg = load_config("graph", ["optim.epochs=1", "encoder.hidden=8", "encoder.probes=0", "data.fractions=[0.5, 0.25, 0.25]"])
    assert "edge_dim" not in cfg.encoder
    run_training(cfg, zoo=tmp_path / "z", out=tmp_path / "run", plots=False)
    mm = MetaModel.load(tmp_path / "run")
    assert mm.config["encoder"]["edge_dim"] == 25
    assert mm.predict([zoo[0].load()])["test_acc"].notna().all()
    small = load_config("graph", ["optim.epochs=1", "encoder.hidden=8", "encoder.probes=0", "encoder.edge_dim=9",
                                  "data.fractions=[0.5, 0.25, 0.25]"])
    with pytest.raises(ShapeMismatchError, match="edge_dim=9"):
        run_training(small, zoo=tmp_path / "z", out=tmp_path / "run9", plots=False)
