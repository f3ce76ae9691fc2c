"""End to end on a real (tiny) zoo: ``wsnets train`` errors, and ``wsnets predict`` on a checkpoint
trained by a plain PyTorch loop outside the zoo code, with its true test accuracy beside the prediction."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from wsnets.cli import main

ROOT = Path(__file__).resolve().parents[2]
RECIPE = """
name = "train-test"
seed = 0
population = 24
datasets = ["digits"]
epochs = 4
checkpoints = [0, 1, 4]
batch_size = 64
[architecture]
kind = "mlp"
depth = [1]
width = [16]
activation = ["relu"]
[hyperparameters]
optimizer = ["sgd", "adam"]
lr = {log_uniform = [1e-3, 0.3]}
label_noise = {uniform = [0.0, 0.5]}
"""


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from wsnets.zoo import build
    d = tmp_path_factory.mktemp("zoo")
    (d / "r.toml").write_text(RECIPE)
    build(d / "r.toml", d / "zoo", progress=False)
    return d / "zoo"


def _train(zoo, out, *extra):
    return main(["train", str(ROOT / "train" / "statnn-gbm.toml"), "--zoo", str(zoo), "--out", str(out),
                 "--no-progress", "--set", "encoder.max_iter=60", *extra])


def _one_line_error(capsys, rc, contains):
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and contains in err, err


def test_zoo_errors(zoo, tmp_path, capsys):
    _one_line_error(capsys, _train(zoo, tmp_path / "a", "--set", "data.filter={width=999}"), "no rows in the 'train' split")
    _one_line_error(capsys, _train(zoo, tmp_path / "b", "--set", "data.ood={width=['<=',64]}"), "no rows in the 'test' split")
    _one_line_error(capsys, _train(zoo, tmp_path / "c", "--set", 'data.targets=["dataset"]'),
                    "target 'dataset' has fewer than two classes")
    _one_line_error(capsys, _train(tmp_path / "nozoo", tmp_path / "d"), "no such zoo directory")


def _plain_pytorch_model(epochs: int, seed: int):
    """An MLP trained by an ordinary PyTorch loop on digits (no wsnets code), and its true test accuracy."""
    from wsnets.zoo.datasets import load
    xtr, ytr, xte, yte = load("digits")
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(epochs):
        for i in range(0, len(xtr), 64):
            opt.zero_grad()
            nn.functional.cross_entropy(net(xtr[i:i + 64]), ytr[i:i + 64]).backward()
            opt.step()
    with torch.no_grad():
        acc = float((net(xte).argmax(1) == yte).float().mean())
    return net, acc


def test_predict_plain_pytorch_checkpoint(zoo, tmp_path, capsys):
    assert _train(zoo, tmp_path / "run") == 0
    capsys.readouterr()
    paths, true = [], []
    for name, epochs in (("trained", 4), ("untrained", 0)):
        net, acc = _plain_pytorch_model(epochs, seed=123)
        paths.append(str(tmp_path / f"{name}.pt"))
        torch.save(net.state_dict(), paths[-1])          # a bare state_dict, as users save them
        true.append(acc)
    assert main(["predict", *paths, "--meta-model", str(tmp_path / "run"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    pred = [r["test_acc"] for r in rows]
    with capsys.disabled():
        for p, t, r in zip(paths, true, rows):
            print(f"\n{Path(p).name}: predicted test acc {r['test_acc']:.3f}, true {t:.3f}, "
                  f"predicted gap {r['gen_gap']:.3f}")
    assert true[0] > 0.8 and true[1] < 0.3
    assert pred[0] > pred[1]                              # ranks the two correctly
    assert all(abs(p - t) < 0.2 for p, t in zip(pred, true)), (pred, true)


def test_statnn_mlp_on_zoo_round_trip(zoo, tmp_path):
    """A gradient-trained encoder on zoo features: the saved run predicts what training measured."""
    from wsnets.train import MetaModel, kendall_tau
    from wsnets.zoo import ZooDataset
    rc = main(["train", str(ROOT / "train" / "statnn-mlp.toml"), "--zoo", str(zoo), "--out", str(tmp_path / "r"),
               "--no-progress", "--epochs", "3"])
    assert rc == 0
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    test = ZooDataset(zoo, "stats", ["test_acc"], split="test")
    rows = MetaModel.load(tmp_path / "r").predict_records(test.weightspaces())
    tau = kendall_tau(torch.tensor([r["test_acc"] for r in rows]), [r["test_acc"] for r in test.rows])
    assert tau == pytest.approx(m["seeds"][0]["test"]["test_acc"]["kendall_tau"], abs=1e-6)


@pytest.mark.parametrize("method", ["statnn-mlp", "esd"])
def test_ood_split_with_deeper_test_networks_trains_and_predicts(tmp_path, method):
    """Trained on depth-1 MLPs, tested on depth-2 ones: feature rows are padded to the deeper networks,
    the encoder takes that width, and the saved meta-model predicts a deep checkpoint."""
    from wsnets.zoo import build, open as open_zoo
    (tmp_path / "r.toml").write_text(RECIPE.replace("depth = [1]", "depth = [1, 2]").replace("population = 24",
                                                                                             "population = 16"))
    build(tmp_path / "r.toml", tmp_path / "zoo", progress=False)
    deep = [r for r in open_zoo(tmp_path / "zoo").filter(epoch=4) if r["depth"] == 2]
    assert deep
    rc = main(["train", str(ROOT / "train" / f"{method}.toml"), "--zoo", str(tmp_path / "zoo"), "--out",
               str(tmp_path / "run"), "--no-progress", "--set", "optim.epochs=2", "--set", "data.filter={epoch=4}",
               "--set", "data.ood={depth=['<=',1]}", "--json"])
    assert rc == 0
    ck = tmp_path / "deep.safetensors"
    deep[0].load().save(ck)
    assert main(["predict", str(ck), "--meta-model", str(tmp_path / "run"), "--json"]) == 0
