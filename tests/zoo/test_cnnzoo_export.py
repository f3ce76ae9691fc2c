"""The cnn-zoo recipe builds (a few models), its checkpoints reproduce their recorded accuracy, and
``zoo export --format cnn-zoo`` writes the public layout: NFN's / Neural-Graphs' reading steps and the nfn
package take it unchanged, and wsnets' own reader gives back the same weights, metrics and functions."""

import gzip
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from wsnets.zoo import build, datasets, open as open_zoo, parse_recipe
from wsnets.zoo.cnnzoo import PUBLIC_COLUMNS, export_cnn_zoo

ROOT = Path(__file__).resolve().parents[2]
pd = pytest.importorskip("pandas")


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    """8 models of zoo/cnn-zoo.toml with every model on a tenth of its data (4 or 12 steps per epoch), so that
    the 86 epochs and the public checkpoint epochs stay (step 86 is what the public loaders select)."""
    raw = tomllib.loads((ROOT / "zoo" / "cnn-zoo.toml").read_text())
    raw["hyperparameters"]["train_fraction"] = [0.1]
    raw["population"] = 8
    raw["datasets"] = ["digits-img16", "mnist1d-seq"]
    r = parse_recipe(raw, "cnn-zoo-test")
    out = tmp_path_factory.mktemp("zoo") / "z"
    build(r, out, progress=False, workers=1)
    return out


def test_recipe_checkpoints_reproduce_their_accuracy(zoo_dir):
    zoo = open_zoo(zoo_dir)
    assert zoo.epochs == [0, 1, 2, 3, 20, 40, 60, 80, 86] and len({r["model_id"] for r in zoo}) == 8
    last = zoo.filter(epoch=86)
    assert {r["dataset"] for r in last} == {"digits-img16", "mnist1d-seq"}
    for rec in last:
        _, _, xt, yt = datasets.load(rec["dataset"])
        with torch.no_grad():
            acc = (rec.to_module()(xt).argmax(1) == yt).sum().item() / len(yt)
        assert acc == rec["test_acc"], rec["model_id"]
    assert max(r["test_acc"] for r in last) > 0.5  # some of them learn


def _nfn_read(d: Path, step: int = 86):
    """NFN's ZooDataset.__init__ (experiments/data_utils.py), also Neural-Graphs' and ScaleGMN's NFNZooDataset:
    their reading steps verbatim, minus the train/val/test split."""
    data = np.load(d / "weights.npy")
    shuffled_idcs = pd.read_csv(d / "split_idcs.csv", header=None).values.flatten()
    data = data[shuffled_idcs]
    metrics = pd.read_csv(d / "metrics.csv.gz", compression="gzip")
    metrics = metrics.iloc[shuffled_idcs]
    layout = pd.read_csv(d / "layout.csv")
    isfinal = metrics["step"] == step
    metrics = metrics[isfinal]
    data = data[isfinal]
    assert np.isfinite(data).all()
    weights, biases = [], []
    for _, row in layout.iterrows():
        arr = data[:, row["start_idx"]:row["end_idx"]]
        arr = arr.reshape((arr.shape[0], *eval(row["shape"])))
        if row["varname"].endswith("kernel:0"):
            if arr.ndim == 5:
                arr = arr.transpose(0, 4, 3, 1, 2)
            elif arr.ndim == 3:
                arr = arr.transpose(0, 2, 1)
            weights.append(arr)
        elif row["varname"].endswith("bias:0"):
            biases.append(arr)
        else:
            raise ValueError(row["varname"])
    return weights, biases, metrics


def test_export_is_read_by_the_nfn_loader_and_round_trips(zoo_dir, tmp_path):
    zoo = open_zoo(zoo_dir)
    s = export_cnn_zoo(zoo_dir, tmp_path / "out", progress=False)
    dirs = {d["dataset"]: Path(d["dir"]) for d in s["directories"]}
    assert set(dirs) == {"digits-img16", "mnist1d-seq"} and sum(d["rows"] for d in s["directories"]) == len(zoo)
    for ds, d in dirs.items():
        assert sorted(p.name for p in d.iterdir()) == ["layout.csv", "metrics.csv.gz", "split_idcs.csv", "weights.npy"]
        with gzip.open(d / "metrics.csv.gz", "rt") as f:
            assert f.readline().rstrip("\n").split(",")[:len(PUBLIC_COLUMNS)] == PUBLIC_COLUMNS
        weights, biases, metrics = _nfn_read(d)
        last = {r["model_id"]: r for r in zoo.filter(epoch=86, dataset=ds)}
        assert len(metrics) == len(last) and set(metrics["modeldir"]) == set(last)
        assert bool(metrics["laststep"].all()) and set(metrics["config.activation"]) <= {"relu", "tanh"}
        entry = next(x for x in s["directories"] if x["dataset"] == ds)  # the summary names every activation
        assert entry["architecture"].rsplit(":", 1)[1].split("/") == sorted(set(metrics["config.activation"]))
        conv = [l for l in zoo.arch_of(next(iter(last.values()))).layers if l.is_weight]
        for i, (mid, acc) in enumerate(zip(metrics["modeldir"], metrics["test_accuracy"])):
            ws = last[mid].load()
            assert acc == pytest.approx(last[mid]["test_acc"], abs=1e-12)
            for layer, w, b in zip(conv, weights, biases):  # PyTorch layouts; Conv1d kernels as (out, in, 1, k)
                ref = ws.params[f"{layer.name}.weight"]
                assert np.array_equal(w[i], (ref[:, :, None] if ref.dim() == 3 else ref).numpy())
                assert np.array_equal(b[i], ws.params[f"{layer.name}.bias"].numpy())
        # wsnets' own reader: same weights, metrics and functions
        back = open_zoo(d)
        orig = {(r["model_id"], r["epoch"]): r for r in zoo.filter(dataset=ds)}
        assert len(back) == len(orig)
        _, _, xt, yt = datasets.load(ds)
        for rec in back:
            o = orig[(rec["model_id"], rec["epoch"])]
            for k in ("test_acc", "train_acc", "test_loss", "train_loss", "gen_gap", "activation", "dataset", "lr",
                      "dropout", "train_fraction", "optimizer"):
                assert rec[k] == pytest.approx(o[k], abs=1e-12) if isinstance(o[k], float) else rec[k] == o[k], k
            a, b = rec.load().params, o.load().params
            assert all(torch.equal(x, y.reshape(x.shape)) for x, y in zip(a.values(), b.values()))
            if rec["epoch"] == 86:  # the reader's padding and stride from config.padding / config.cnn_stride
                x = xt[:, :, None] if xt.dim() == 3 else xt  # 1 x L sequences as 1 x 1 x L images
                with torch.no_grad():
                    assert (rec.to_module()(x).argmax(1) == yt).sum().item() / len(yt) == o["test_acc"]


def test_nfn_package_takes_the_exported_weights(zoo_dir, tmp_path):
    layers = pytest.importorskip("nfn.layers")
    from nfn.common import WeightSpaceFeatures, network_spec_from_wsfeat
    s = export_cnn_zoo(zoo_dir, tmp_path / "out", progress=False)
    d = next(Path(x["dir"]) for x in s["directories"] if x["dataset"] == "digits-img16")
    weights, biases, _ = _nfn_read(d)
    # NFN's predict_gen: tensors with a channel dim, one network per batch row
    feats = WeightSpaceFeatures([torch.from_numpy(w)[:, None] for w in weights], [torch.from_numpy(b)[:, None] for b in biases])
    spec = network_spec_from_wsfeat(feats)
    out = layers.HNPLinear(spec, in_channels=1, out_channels=2)(feats)
    assert out.weights[0].shape == (len(weights[0]), 2, 16, 1, 3, 3) and out.biases[-1].shape[-1] == 10


def _tiny(tmp_path, name, **arch):
    raw = {"name": name, "population": 3, "datasets": ["digits"] if arch["kind"] == "mlp" else ["digits-img"],
           "epochs": 1, "checkpoints": [0, 1], "batch_size": 256, "architecture": arch}
    build(parse_recipe(raw), tmp_path / name, progress=False, workers=1)
    return tmp_path / name


def test_mlp_zoo_exports_as_fcn_and_unsupported_layers_are_one_line_errors(tmp_path):
    mlp = _tiny(tmp_path, "m", kind="mlp", depth=2, width=8, activation="tanh")
    export_cnn_zoo(mlp, tmp_path / "m-out", progress=False)
    weights, biases, metrics = _nfn_read(tmp_path / "m-out", step=1)
    assert [w.shape[1:] for w in weights] == [(8, 64), (8, 8), (10, 8)] and set(metrics["config.dnn_architecture"]) == {"fcn"}
    back = open_zoo(tmp_path / "m-out").filter(epoch=1)
    x = datasets.load("digits")[2]
    for rec, orig in zip(back, open_zoo(mlp).filter(epoch=1)):
        assert rec["model_id"] == orig["model_id"]
        torch.testing.assert_close(rec.to_module()(x), orig.to_module()(x))
    bn = _tiny(tmp_path, "b", kind="cnn2d", depth=1, width=4, batchnorm=True)
    r = subprocess.run([sys.executable, "-m", "wsnets.cli", "zoo", "export", "--format", "cnn-zoo", str(bn),
                        str(tmp_path / "b-out")], capture_output=True, text=True)
    assert r.returncode == 2 and "batchnorm" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "b-out").exists()
    r = subprocess.run([sys.executable, "-m", "wsnets.cli", "zoo", "export", "--json", str(mlp), str(tmp_path / "m2")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and '"rows": 6' in r.stdout


def test_padded_conv1d_networks_round_trip_through_the_public_layout(tmp_path):
    """Conv1d networks with padding (mnist1d-cnn: kernel 5, padding 2, stride 1 or 2) are exported as Conv2D
    (1, 5) kernels on 1 x 40 inputs; read back they compute the same function (the padding applies along
    the sequence only: padding the height-1 axis too added zero rows that the pooling averaged in)."""
    raw = tomllib.loads((ROOT / "zoo" / "mnist1d-cnn.toml").read_text())
    raw.update(population=4, epochs=1, checkpoints=[1])
    out = tmp_path / "z"
    build(parse_recipe(raw, "mnist1d-cnn-test"), out, progress=False, workers=1)
    zoo = open_zoo(out)
    assert {l.padding for r in zoo for l in zoo.arch_of(r).layers if l.kind == "conv1d"} == {(2,)}
    s = export_cnn_zoo(out, tmp_path / "out", progress=False)
    orig = {(r["model_id"], r["epoch"]): r for r in zoo}
    x = torch.randn(6, 1, 40)
    n = 0
    for d in s["directories"]:
        for rec in open_zoo(d["dir"]):
            assert rec.load().arch.input_shape == (1, 1, 40)
            want = orig[(rec["model_id"], rec["epoch"])].to_module()(x)
            torch.testing.assert_close(rec.to_module()(x[:, :, None]), want, atol=1e-5, rtol=1e-5)
            n += 1
    assert n == len(zoo)
