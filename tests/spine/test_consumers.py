"""Every consumer follows the DAG spine: the batched functional forward (eval and per-network BatchNorm
training), landscapes (surface, Hessian against an exact one, intrinsic dimension), barriers after weight
matching, soups, and predictions of a graph meta-model on residual networks and transformers."""

import pytest
import torch
from torch import nn

import wsnets
from wsnets import models as M
from wsnets.functional import forward
from wsnets.symmetry import permute, random_permutations


def _nets():
    torch.manual_seed(0)
    res = M.small_resnet(3, widths=(3, 4), in_channels=1)
    vit = M.ViT(8, 4, 1, 8, 2, 1, 8, 3)
    return [("resnet", res, (1, 8, 8)), ("vit", vit, (1, 8, 8))]


@pytest.mark.parametrize("name,m,shape", _nets(), ids=["resnet", "vit"])
def test_batched_forward_equals_modules_in_eval_and_train(name, m, shape):
    mods = [m] + [_clone_init(m, s) for s in (1, 2)]
    wss = [wsnets.load(x, input_shape=shape) for x in mods]
    batch = wsnets.stack(wss)
    x = torch.randn(6, *shape)
    with torch.no_grad():
        ref = torch.stack([x_.eval()(x) for x_ in mods])
        torch.testing.assert_close(forward(batch.arch, batch.params, x), ref, rtol=1e-4, atol=1e-5)
    # training mode: each network normalizes with its own batch statistics and updates its running stats
    params = {k: v.clone() for k, v in batch.params.items()}
    out = forward(batch.arch, params, x, train=True)
    for i, mod in enumerate(mods):
        mod.train()
        torch.testing.assert_close(out[i], mod(x), rtol=1e-4, atol=1e-5)
        sd = mod.state_dict()
        for k in params:
            if k.endswith("running_mean") or k.endswith("running_var"):
                torch.testing.assert_close(params[k][i], sd[k], rtol=1e-5, atol=1e-6)
        mod.eval()


def _clone_init(m, seed):
    import copy
    torch.manual_seed(seed)
    out = copy.deepcopy(m)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return out.eval()


def test_hessian_of_a_residual_network_matches_the_exact_one():
    from wsnets.landscape import HessianOperator, top_eigenvalues
    from wsnets.landscape._functional import FunctionalNet
    torch.manual_seed(0)
    m = M.ResidualMLP(4, 3, 1, 2)
    ws = wsnets.load(m, input_shape=(4,)).to(torch.float64)
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 2, (16,))
    net = FunctionalNet(ws)
    exact = torch.autograd.functional.hessian(lambda t: nn.functional.cross_entropy(net(t, x), y), net.theta0)
    want = torch.linalg.eigvalsh(exact).flip(0)[:3]
    got, _ = top_eigenvalues(HessianOperator(ws, (x, y)), k=3, m=net.num_params)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


def test_surface_intrinsic_barrier_soup_on_dags():
    from wsnets.landscape import intrinsic_dimension, random_direction, surface_1d
    from wsnets.merge.align import weight_matching
    from wsnets.merge.functional import evaluate
    from wsnets.merge.interpolate import interpolation_curve
    from wsnets.merge.soup import uniform_soup
    for name, m, shape in _nets():
        ws = wsnets.load(m, input_shape=shape)
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(40, *shape, generator=g), torch.randint(0, 3, (40,), generator=g)
        surf = surface_1d(ws, random_direction(ws, generator=g), (x, y), [0.0, 0.5])
        loss0 = nn.functional.cross_entropy(ws.to_module()(x), y).item()
        assert abs(surf.loss[0] - loss0) < 1e-5, name
        r = intrinsic_dimension(ws, (x, y), (x, y), [4], steps=3)
        assert len(r.test_acc) == 1
        # a permuted copy: weight matching undoes it, the barrier of the aligned pair is zero
        b = permute(ws, random_permutations(ws.arch, generator=g))
        b2, _ = weight_matching(ws, b)
        curve = interpolation_curve(ws, b2, x, y, steps=3, bn_data=x)
        assert abs(curve.barrier) < 1e-5, name
        soup = uniform_soup([ws, b2])
        assert all(torch.allclose(soup.params[k], ws.params[k], atol=1e-6) for k in ws.params)
        acc = evaluate(ws, x, y)
        assert acc is not None


def test_graph_encoder_batches_dags_with_mlps():
    """A graph encoder takes residual networks, transformers and MLPs in one batch unchanged."""
    from wsnets.nn.graph_encoder import NeuralGraphEncoder
    torch.manual_seed(0)
    enc = NeuralGraphEncoder(hidden=8, layers=2, out_dim=4, edge_dim=16).eval()
    nets = [wsnets.load(m, input_shape=s) for _, m, s in _nets()] + [wsnets.WeightSpace.random(wsnets.mlp(4, [5], 3))]
    out = enc(wsnets.to_batch(nets))
    assert out.shape == (3, 4) and torch.isfinite(out).all()


def test_predict_cli_takes_a_resnet_and_a_transformer(tmp_path, capsys):
    """``wsnets predict`` with a graph meta-model (trained on a tiny MLP zoo) on bare ResNet and transformer
    checkpoints given with --module: the graphs go through the encoder unchanged."""
    import json
    from pathlib import Path
    from wsnets.cli import main
    from wsnets.zoo import build
    root = Path(__file__).resolve().parents[2]
    (tmp_path / "r.toml").write_text(
        'name = "spine-predict"\nseed = 0\npopulation = 24\ndatasets = ["digits"]\nepochs = 1\n'
        'checkpoints = [0, 1]\nbatch_size = 64\n[architecture]\nkind = "mlp"\ndepth = [1]\nwidth = [8]\n'
        'activation = ["relu"]\n[hyperparameters]\noptimizer = ["adam"]\nlr = {log_uniform = [1e-3, 0.1]}\n')
    build(tmp_path / "r.toml", tmp_path / "zoo", progress=False)
    run = tmp_path / "run"
    assert main(["train", str(root / "train" / "graph.toml"), "--zoo", str(tmp_path / "zoo"), "--out", str(run),
                 "--no-progress", "--set", "optim.epochs=1", "--set", "encoder.hidden=8", "--set",
                 "encoder.layers=1"]) == 0
    capsys.readouterr()
    f = tmp_path / "nets.py"
    f.write_text("from wsnets import models\n"
                 "def resnet():\n    return models.small_resnet(3, widths=(3, 4), in_channels=1)\n"
                 "def transformer():\n    return models.Transformer(8, 16, 2, 1, 16, 3)\n")
    torch.manual_seed(0)
    import importlib.util
    spec = importlib.util.spec_from_file_location("nets", f)
    nets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nets)
    for name in ("resnet", "transformer"):
        ck = tmp_path / f"{name}.pt"
        torch.save(getattr(nets, name)().state_dict(), ck)
        assert main(["predict", str(ck), "--meta-model", str(run)]) == 2   # bare: the architecture is needed
        assert "--module" in capsys.readouterr().err
        assert main(["predict", str(ck), "--module", f"{f}:{name}", "--meta-model", str(run), "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert len(rows) == 1 and isinstance(rows[0]["test_acc"], float)


def test_equivariant_np_layers_refuse_dags_clearly():
    from wsnets.nn.equivariant import HNPEncoder
    ws = wsnets.load(*_nets()[0][1:2], input_shape=(1, 8, 8))
    with pytest.raises(wsnets.UnsupportedLayerError, match="graph encoder"):
        HNPEncoder(ws.arch)
