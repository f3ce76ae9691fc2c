"""Small CNN Zoo reader: a fixture written in exactly the public layout from known PyTorch weights."""

import gzip

import numpy as np
import pytest
import torch
from torch import nn

import wsnets
from wsnets.zoo import ZooDataset, open as open_zoo
from wsnets.zoo.cnnzoo import write_cnn_zoo


def _cnn(act):
    A = nn.ReLU if act == "relu" else nn.Tanh
    return nn.Sequential(nn.Conv2d(1, 4, 3, 2, 1), A(), nn.Conv2d(4, 5, 3, 2, 1), A(), nn.Conv2d(5, 6, 3, 2, 1), A(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 10)).eval()


@pytest.fixture()
def fixture(tmp_path):
    mods = [_cnn("relu" if i % 2 == 0 else "tanh") for i in range(5)]
    metrics = [{"config.activation": "relu" if i % 2 == 0 else "tanh", "config.dataset": "mnist",
                "config.learning_rate": 10 ** -(i + 1), "config.optimizer": "adam", "config.l2reg": 0.0,
                "config.dropout": 0.1 * i, "config.init_std": 0.05, "config.train_fraction": 1.0,
                "modeldir": f"run{i // 2}", "step": 86 * i, "train_accuracy": 0.5 + 0.05 * i,
                "test_accuracy": 0.45 + 0.05 * i, "train_loss": 1.0 - 0.1 * i, "test_loss": 1.1 - 0.1 * i}
               for i in range(5)]
    write_cnn_zoo(tmp_path / "cnnzoo", mods, metrics)
    return tmp_path / "cnnzoo", mods, metrics


def test_layout_is_the_public_one(fixture):
    root, mods, _ = fixture
    lines = (root / "layout.csv").read_text().splitlines()
    assert lines[0] == "varname,start_idx,end_idx,size,shape"
    assert lines[1].startswith("sequential/conv2d/bias:0,0,4,4,") and "(3, 3, 1, 4)" in lines[2]  # bias first, HWIO
    w = np.load(root / "weights.npy")
    assert w.shape == (5, sum(p.numel() for p in mods[0].parameters()))
    with gzip.open(root / "metrics.csv.gz", "rt") as f:
        assert "config.learning_rate" in f.readline()


def test_reader_recovers_weights_function_and_metrics(fixture):
    root, mods, metrics = fixture
    zoo = open_zoo(root)
    assert len(zoo) == 5
    x = torch.randn(7, 1, 28, 28)
    for i, rec in enumerate(zoo):
        ref = wsnets.load(mods[i], input_shape=(1, 28, 28))
        ws = rec.load()
        for (k, v), (k2, v2) in zip(ws.params.items(), ref.params.items()):
            assert torch.equal(v, v2), (k, k2)  # exact (float32 in, float32 out)
        torch.testing.assert_close(rec.to_module()(x), mods[i](x))
        assert rec["activation"] == metrics[i]["config.activation"] and rec["epoch"] == 86 * i
        assert rec["test_acc"] == pytest.approx(metrics[i]["test_accuracy"])
        assert rec["gen_gap"] == pytest.approx(0.05)
        assert rec["lr"] == pytest.approx(10 ** -(i + 1))
    # the same ZooDataset API works on it (split by modeldir: checkpoints of one run stay together)
    ds = ZooDataset(zoo, "graph", targets=["test_acc"], split="all")
    batch, y = ds.collate([ds[i] for i in range(len(ds))])
    assert batch.num_graphs == 5 and torch.allclose(y["test_acc"], torch.tensor([m["test_accuracy"] for m in metrics]))


def test_inconsistent_directory_is_a_clear_error(fixture):
    root, _, _ = fixture
    np.save(root / "weights.npy", np.zeros((3, 10), dtype=np.float32))
    with pytest.raises(wsnets.CheckpointError, match="metrics has 5 rows"):
        open_zoo(root)
    (root / "layout.csv").unlink()
    with pytest.raises(wsnets.MissingKeyError):
        open_zoo(root)
