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


# -- the public format as TensorFlow wrote it, built by hand (numpy only, not wsnets' writer) ------------------------
def _tf_conv(x, k, b, stride, padding):
    """TensorFlow's Conv2D on NHWC ``x`` with an HWIO kernel: 'valid', or 'same' with TF's padding rule
    (``pad_total = max((ceil(n/s) - 1) * s + k - n, 0)``, the extra pixel after)."""
    kh, kw = k.shape[:2]
    if padding == "same":
        pads = []
        for n, kk in zip(x.shape[1:3], (kh, kw)):
            tot = max((-(-n // stride) - 1) * stride + kk - n, 0)
            pads.append((tot // 2, tot - tot // 2))
        x = np.pad(x, ((0, 0), *pads, (0, 0)))
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]  # N,oh,ow,C,kh,kw
    return np.einsum("nijchw,hwco->nijo", win, k) + b


def _keras_cnn_dir(root, rng, *, n_models=3, layers=3, cin=1, hidden=5, k=3, acts=("relu", "tanh", "relu"),
                   padding_col=None, shuffle_lines=False, extra=()):
    """A Small CNN Zoo directory as the public one is stored: per layer ``bias`` then HWIO ``kernel`` flattened
    in C order, ``sequential/conv2d[_i]`` / ``sequential/dense`` names, an unnamed first column in
    metrics.csv.gz, no stride or padding column (Keras' Conv2D default: 'valid'), two checkpoints per model."""
    import csv
    import io
    names = [f"sequential/conv2d{'_%d' % i if i else ''}" for i in range(layers)] + ["sequential/dense"]
    shapes = [(k, k, cin if i == 0 else hidden, hidden) for i in range(layers)] + [(hidden, 10)]
    lines, off = [], 0
    for nm, sh in zip(names, shapes):
        for var, s in (("bias", (sh[-1],)), ("kernel", sh)):
            lines.append([f"{nm}/{var}:0", off, off + int(np.prod(s)), int(np.prod(s)), str(s)])
            off += int(np.prod(s))
    for nm, s in extra:
        lines.append([nm, off, off + int(np.prod(s)), int(np.prod(s)), str(s)])
        off += int(np.prod(s))
    rows, metrics, params = [], [], []
    for m in range(n_models):
        for step in (0, 86):
            p = [(rng.normal(0, 0.5, sh).astype(np.float32), rng.normal(0, 0.2, sh[-1]).astype(np.float32)) for sh in shapes]
            flat = np.concatenate([np.concatenate([b, w.reshape(-1)]) for w, b in p] +
                                  [rng.normal(size=int(np.prod(s))).astype(np.float32) for _, s in extra])
            rows.append(flat)
            params.append(p)
            md = f"/cns/smallcnnzoo/mnist/{m:04d}"
            row = {"": f"{md}/permanent_ckpt-{step}", "config.activation": acts[m % len(acts)], "config.dataset": "mnist",
                   "config.dnn_architecture": "cnn", "config.dropout": 0.0, "config.init_std": 0.05, "config.l2reg": 0.0,
                   "config.learning_rate": 0.01, "config.optimizer": "adam", "config.train_fraction": 1.0,
                   "config.w_init": "he_normal", "modeldir": md, "step": step, "test_accuracy": 0.5 + 0.01 * m,
                   "test_loss": 1.0, "train_accuracy": 0.6, "train_loss": 0.9}
            if padding_col is not None:
                row["config.padding"] = padding_col
            metrics.append(row)
    root.mkdir(parents=True)
    np.save(root / "weights.npy", np.stack(rows))
    if shuffle_lines:
        lines = [lines[i] for i in rng.permutation(len(lines))]
    buf = io.StringIO()
    csv.writer(buf).writerows([["varname", "start_idx", "end_idx", "size", "shape"]] + lines)
    (root / "layout.csv").write_text(buf.getvalue())
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(metrics[0]))
    w.writeheader()
    w.writerows(metrics)
    (root / "metrics.csv.gz").write_bytes(gzip.compress(buf.getvalue().encode()))
    return params, metrics


def _tf_forward(p, x_nchw, act, stride, padding):
    h = np.transpose(x_nchw, (0, 2, 3, 1)).astype(np.float64)
    for w, b in p[:-1]:
        h = _tf_conv(h, w.astype(np.float64), b, stride, padding)
        h = np.maximum(h, 0) if act == "relu" else np.tanh(h)
    return h.mean(axis=(1, 2)) @ p[-1][0] + p[-1][1]


@pytest.mark.parametrize("shuffle_lines", [False, True])
def test_public_layout_rebuilds_the_keras_function(tmp_path, shuffle_lines):
    """A directory in the public layout without stride/padding columns is read as the public zoo's Keras
    network (3x3 'valid' convs, stride 2), whatever the order of layout.csv's lines; the rebuilt module
    computes what TensorFlow computes on 28x28 and 32x32 inputs."""
    rng = np.random.default_rng(0)
    params, metrics = _keras_cnn_dir(tmp_path / "z", rng, shuffle_lines=shuffle_lines)
    zoo = open_zoo(tmp_path / "z")
    assert [r["model_id"] for r in zoo.rows] == [m["modeldir"] for m in metrics]
    for size in (28, 32):
        x = rng.normal(size=(3, 1, size, size)).astype(np.float32)
        for i, rec in enumerate(zoo):
            out = rec.to_module()(torch.from_numpy(x)).double().detach().numpy()
            np.testing.assert_allclose(out, _tf_forward(params[i], x, metrics[i]["config.activation"], 2, "valid"),
                                       atol=1e-4, rtol=1e-4)


def test_tf_same_padding_is_exact_at_stride_1_and_refused_where_asymmetric(tmp_path):
    import wsnets.zoo.cnnzoo as cz
    rng = np.random.default_rng(1)
    params, metrics = _keras_cnn_dir(tmp_path / "same", rng, padding_col="same", n_models=2)
    with pytest.raises(wsnets.CheckpointError, match="'same' padding with stride 2.*asymmetrically"):
        open_zoo(tmp_path / "same")
    zoo = cz.open_cnn_zoo(tmp_path / "same", stride=1)
    x = rng.normal(size=(2, 1, 9, 9)).astype(np.float32)
    for i, rec in enumerate(zoo):
        np.testing.assert_allclose(rec.to_module()(torch.from_numpy(x)).double().detach().numpy(),
                                   _tf_forward(params[i], x, metrics[i]["config.activation"], 1, "same"), atol=1e-4)


def test_variables_the_network_cannot_hold_are_refused_not_dropped(tmp_path):
    rng = np.random.default_rng(2)
    _keras_cnn_dir(tmp_path / "bn", rng, extra=[("sequential/batch_normalization/gamma:0", (5,))])
    with pytest.raises(wsnets.CheckpointError, match="batch_normalization/gamma:0.*neither a kernel nor a bias"):
        open_zoo(tmp_path / "bn")
    _keras_cnn_dir(tmp_path / "c1", rng, extra=[("sequential/conv1d/kernel:0", (3, 5, 5))])
    with pytest.raises(wsnets.CheckpointError, match="conv1d.*3-D kernel"):
        open_zoo(tmp_path / "c1")


def test_big_endian_weights_read_as_the_same_numbers(fixture):
    root, mods, _ = fixture
    w = np.load(root / "weights.npy")
    ref = [dict(r.load().params) for r in open_zoo(root)]
    np.save(root / "weights.npy", w.astype(">f4"))
    for r, sd in zip(open_zoo(root), ref):
        assert all(torch.equal(r.load().params[k], v) for k, v in sd.items())


def test_input_size_comes_from_the_public_dataset_or_the_exported_column(tmp_path):
    """The public zoo's rows name their dataset (mnist: 28x28, cifar10: 32x32 grayscale), so the networks get
    the input shape their 'valid' convs need (probe features and to_module() run them); an exported zoo says
    it in config.input_shape; an input too small for the convs is a one-line error."""
    from wsnets.nn.probes import input_shape
    rng = np.random.default_rng(3)
    _keras_cnn_dir(tmp_path / "z", rng, n_models=2)
    assert [input_shape(r.load().arch) for r in open_zoo(tmp_path / "z")] == [(1, 28, 28)] * 4  # mnist
    _set_column(tmp_path / "z", "config.dataset", "cifar10")
    assert {input_shape(r.load().arch) for r in open_zoo(tmp_path / "z")} == {(1, 32, 32)}
    _set_column(tmp_path / "z", "config.input_shape", "16x16")
    zoo = open_zoo(tmp_path / "z")
    assert {input_shape(r.load().arch) for r in zoo} == {(1, 16, 16)}
    assert zoo[0].to_module()(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    _set_column(tmp_path / "z", "config.input_shape", "8x8")  # 8 -> 3 -> 1 -> too small for the third 3x3 conv
    with pytest.raises(wsnets.CheckpointError, match="line 2: a 8x8 input is too small for conv layer '4'"):
        open_zoo(tmp_path / "z")


def _set_column(root, column, value):
    import csv
    import io
    with gzip.open(root / "metrics.csv.gz", "rt") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r[column] = value
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    (root / "metrics.csv.gz").write_bytes(gzip.compress(buf.getvalue().encode()))


def test_rows_with_nonfinite_weights_or_targets_are_left_out(tmp_path):
    """The public zoo holds diverged runs (NaN/inf weights, NaN accuracies): the reader leaves out rows whose
    weights are not finite, and a ZooDataset leaves out checkpoints without a finite target value (they
    crashed training: 'Input y contains NaN')."""
    from wsnets.zoo import ZooDataset
    rng = np.random.default_rng(4)
    _keras_cnn_dir(tmp_path / "z", rng, n_models=4)
    w = np.load(tmp_path / "z" / "weights.npy")
    w[1, 7], w[4, :] = np.nan, np.inf
    np.save(tmp_path / "z" / "weights.npy", w)
    zoo = open_zoo(tmp_path / "z")
    assert [r["idx"] for r in zoo.rows] == [0, 2, 3, 5, 6, 7] and zoo.meta["nonfinite_rows"] == 2
    assert all(torch.isfinite(t).all() for r in zoo for t in r.load().params.values())
    _set_column(tmp_path / "z", "test_accuracy", "nan")
    ds = ZooDataset(open_zoo(tmp_path / "z"), "stats", targets=["test_acc"], split="all")
    assert len(ds) == 0 and ds.left_out == 6
    ds = ZooDataset(open_zoo(tmp_path / "z"), "stats", targets=["train_acc"], split="all")
    assert len(ds) == 6 and ds.left_out == 0
