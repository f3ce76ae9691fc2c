"""Reader for the public Small CNN Zoo layout (Unterthiner et al. 2020, "Predicting Neural Network
Accuracy from Weights"), so a user who downloaded it can use it like any wsnets zoo.

Layout of a directory::

    weights.npy       [rows, params] float32, one flattened network per row
    metrics.csv(.gz)  one line per row: config.* hyperparameters, step, train/test accuracy and loss
    layout.csv        varname,start_idx,end_idx,size,shape  (where each variable sits in a row)

Variables are TensorFlow's: ``.../conv2d/kernel:0`` in HWIO ``(kh, kw, in, out)``, ``.../dense/kernel:0``
as ``(in, out)``, biases stored before kernels. They become PyTorch ``[out, in, kh, kw]`` / ``[out, in]``.
The network is conv (stride ``stride``, padding ``k // 2``) -> activation per layer -> global average
pooling -> dense. TensorFlow's ``"same"`` padding with stride 2 pads asymmetrically, which PyTorch's
symmetric padding cannot express: weights are exact, but ``to_module()`` outputs of the original
TF networks may differ at image borders.
"""

from __future__ import annotations

import ast
import csv
import gzip
import io
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..arch import Architecture, Layer
from ..errors import CheckpointError, MissingKeyError
from .records import Zoo

_COLS = {"train_acc": "train_accuracy", "test_acc": "test_accuracy", "train_loss": "train_loss", "test_loss": "test_loss"}
_HP = {"optimizer": "config.optimizer", "lr": "config.learning_rate", "weight_decay": "config.l2reg",
       "dropout": "config.dropout", "init_scale": "config.init_std", "train_fraction": "config.train_fraction"}


def _read_csv(path: Path) -> list[dict[str, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", newline="") as f:  # type: ignore[operator]
            return list(csv.DictReader(f))
    except (OSError, EOFError, csv.Error) as e:
        raise CheckpointError(f"{path}: unreadable CSV ({e})") from None


def _layout(root: Path) -> list[tuple[str, int, int, tuple[int, ...]]]:
    out = []
    for r in _read_csv(root / "layout.csv"):
        try:
            shape = ast.literal_eval(r["shape"]) if r["shape"].strip().startswith("(") else \
                tuple(int(s) for s in r["shape"].replace("[", "").replace("]", "").split(",") if s.strip())
            out.append((r["varname"], int(r["start_idx"]), int(r["end_idx"]), tuple(int(s) for s in shape)))
        except (KeyError, ValueError, SyntaxError) as e:
            raise CheckpointError(f"{root / 'layout.csv'}: bad row {r} ({e})") from None
    return out


def _architecture(layout: Sequence[tuple[str, int, int, tuple[int, ...]]], activation: str,
                  stride: int) -> tuple[Architecture, list[tuple[str, str, str]]]:
    """Architecture plus, per tensor, ``(varname, torch key, kind)`` in the order of the layers."""
    prefixes: list[str] = []
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, _, _, shape in layout:
        prefix, _, var = name.rpartition("/")
        var = var.split(":")[0]
        if prefix not in shapes:
            prefixes.append(prefix)
            shapes[prefix] = {}
        shapes[prefix][var] = shape
    layers: list[Layer] = []
    mapping: list[tuple[str, str, str]] = []
    convs = [p for p in prefixes if len(shapes[p].get("kernel", ())) == 4]
    denses = [p for p in prefixes if len(shapes[p].get("kernel", ())) == 2]
    if not convs and not denses:
        raise CheckpointError("layout.csv has no conv or dense kernels")
    act = [] if activation in ("identity", "linear") else [Layer("act", fn=activation)]
    in_ch = None
    for p in convs:
        kh, kw, ci, co = shapes[p]["kernel"]
        in_ch = in_ch or ci
        name = str(len(layers))
        layers.append(Layer("conv2d", name, ci, co, (kh, kw), (stride, stride), (kh // 2, kw // 2), (1, 1),
                            bias="bias" in shapes[p], dims=2))
        mapping += [(f"{p}/kernel:0", f"{name}.weight", "conv")] + ([(f"{p}/bias:0", f"{name}.bias", "bias")]
                                                                   if "bias" in shapes[p] else [])
        layers += act
    if convs:
        layers += [Layer("gap", dims=2), Layer("flatten")]
    for j, p in enumerate(denses):
        ci, co = shapes[p]["kernel"]
        name = str(len(layers))
        layers.append(Layer("linear", name, ci, co, bias="bias" in shapes[p]))
        mapping += [(f"{p}/kernel:0", f"{name}.weight", "dense")] + ([(f"{p}/bias:0", f"{name}.bias", "bias")]
                                                                    if "bias" in shapes[p] else [])
        if j < len(denses) - 1:
            layers += act
    return Architecture(tuple(layers)), mapping


def open_cnn_zoo(root: str | Path, *, stride: int = 2) -> Zoo:
    """Read a Small CNN Zoo directory as a read-only :class:`Zoo` (rows, metrics, ``load()``)."""
    root = Path(root)
    mpath = next((root / n for n in ("metrics.csv.gz", "metrics.csv") if (root / n).exists()), None)
    if mpath is None:
        raise MissingKeyError(f"{root}: no metrics.csv or metrics.csv.gz next to weights.npy")
    if not (root / "layout.csv").exists():
        raise MissingKeyError(f"{root}: no layout.csv next to weights.npy")
    try:
        weights = np.load(root / "weights.npy", mmap_mode="r")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{root / 'weights.npy'}: unreadable ({e})") from None
    metrics = _read_csv(mpath)
    if len(metrics) != weights.shape[0]:
        raise CheckpointError(f"{root}: metrics has {len(metrics)} rows but weights.npy has {weights.shape[0]}")
    layout = _layout(root)
    end = max(e for _, _, e, _ in layout)
    if end > weights.shape[1]:
        raise CheckpointError(f"{root}: layout.csv needs {end} values per row, weights.npy has {weights.shape[1]}")
    spans = {name: (s, e, shape) for name, s, e, shape in layout}
    archs: dict[str, tuple[Architecture, list]] = {}
    rows = []
    for i, m in enumerate(metrics):
        act = (m.get("config.activation") or "relu").lower()
        if act not in archs:
            archs[act] = _architecture(layout, act, stride)
        arch = archs[act][0]
        num = {k: _float(m.get(v)) for k, v in _COLS.items()}
        ds = m.get("config.dataset", "")
        rows.append({
            "model_id": m.get("modeldir") or f"row{i}", "run": i, "recipe": "small-cnn-zoo", "arch": arch.to_json(),
            "arch_desc": arch.describe(), "depth": len(arch.weight_layers) - 1,
            "width": max(arch.group_sizes[1:-1], default=0), "activation": act, "num_params": arch.num_params,
            "dataset": ds, "task": ds, "epoch": int(float(m.get("step") or 0)), **num,
            "gen_gap": (num["train_acc"] - num["test_acc"]) if None not in (num["train_acc"], num["test_acc"]) else None,
            **{k: (m.get(v) if k == "optimizer" else _float(m.get(v))) for k, v in _HP.items()},
            "hyperparameters": json.dumps({k[7:]: v for k, v in m.items() if k.startswith("config.")}, sort_keys=True),
            "shard": "weights.npy", "key": "", "idx": i})

    def loader(rs: Sequence[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
        idx = np.asarray([r["idx"] for r in rs], dtype=np.int64)
        block = torch.from_numpy(np.ascontiguousarray(weights[np.sort(idx)]))
        block = block[torch.from_numpy(np.argsort(np.argsort(idx)))]  # back to the requested order
        out = []
        for j, r in enumerate(rs):
            mapping = archs[r["activation"]][1]
            sd = {}
            for var, key, kind in mapping:
                s, e, shape = spans[var]
                t = block[j, s:e].reshape(shape)
                sd[key] = t.permute(3, 2, 0, 1).contiguous() if kind == "conv" else (t.T.contiguous() if kind == "dense" else t.clone())
            out.append(sd)
        return out

    return Zoo(root, rows, loader, meta={"recipe": "small-cnn-zoo", "source": str(root)})


def _float(v: str | None) -> float | None:
    try:
        return float(v) if v not in (None, "") else None
    except ValueError:
        return None


def write_cnn_zoo(root: str | Path, modules: Sequence[torch.nn.Module], metrics: Sequence[dict[str, Any]]) -> None:
    """Write PyTorch CNNs (conv... -> GAP -> dense) in the Small CNN Zoo layout (biases before kernels,
    HWIO kernels, gzipped metrics): the inverse of :func:`open_cnn_zoo`, used for fixtures and export."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows, layout = [], []
    for mi, mod in enumerate(modules):
        parts, off = [], 0
        convs = [m for m in mod.modules() if isinstance(m, torch.nn.Conv2d)]
        denses = [m for m in mod.modules() if isinstance(m, torch.nn.Linear)]
        names = [(f"sequential/conv2d{'_%d' % i if i else ''}", m, "conv") for i, m in enumerate(convs)] + \
                [(f"sequential/dense{'_%d' % i if i else ''}", m, "dense") for i, m in enumerate(denses)]
        for name, m, kind in names:
            k = m.weight.detach().permute(2, 3, 1, 0) if kind == "conv" else m.weight.detach().T
            for var, t in (("bias", m.bias.detach()), ("kernel", k)):
                flat = t.reshape(-1).numpy().astype(np.float32)
                if mi == 0:
                    layout.append({"varname": f"{name}/{var}:0", "start_idx": off, "end_idx": off + flat.size,
                                   "size": flat.size, "shape": str(tuple(t.shape))})
                parts.append(flat)
                off += flat.size
        rows.append(np.concatenate(parts))
    np.save(root / "weights.npy", np.stack(rows))
    with open(root / "layout.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["varname", "start_idx", "end_idx", "size", "shape"])
        w.writeheader()
        w.writerows(layout)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(metrics[0]))
    w.writeheader()
    w.writerows(metrics)
    with gzip.open(root / "metrics.csv.gz", "wt") as f:
        f.write(buf.getvalue())
