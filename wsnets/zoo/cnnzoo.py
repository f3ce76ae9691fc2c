"""Reader for the public Small CNN Zoo layout (Unterthiner et al. 2020, "Predicting Neural Network
Accuracy from Weights"), so a user who downloaded it can use it like any wsnets zoo.

Layout of a directory::

    weights.npy       [rows, params] float32, one flattened network per row
    metrics.csv(.gz)  one line per row: config.* hyperparameters, step, train/test accuracy and loss
    layout.csv        varname,start_idx,end_idx,size,shape  (where each variable sits in a row)

Variables are TensorFlow's: ``.../conv2d/kernel:0`` in HWIO ``(kh, kw, in, out)``, ``.../dense/kernel:0``
as ``(in, out)``, biases stored before kernels. They become PyTorch ``[out, in, kh, kw]`` / ``[out, in]``.
Layers are taken in the order of their offsets in the flat row (Keras flattens ``model.weights`` layer by
layer), whatever the order of the lines of ``layout.csv``; a variable other than a 4-D conv or 2-D dense
kernel and its bias (BatchNorm's ``gamma``/``moving_mean``, a Conv1D kernel...) or a dense layer before a
conv is refused, since dropping or reordering it would compute another function.
The network is conv (stride ``stride``) -> activation per layer -> global average pooling -> dense.
The public layout does not record padding: its Keras ``Conv2D`` layers used Keras' default, ``"valid"``
(no padding), which is this reader's default too. A ``config.cnn_stride`` / ``config.padding`` column
(written by :func:`export_cnn_zoo`: a number, ``valid`` or ``same``) overrides stride and padding per row.
TensorFlow's ``"same"`` is exact only with stride 1 and an odd kernel (``k // 2`` on each side); with a
larger stride TensorFlow pads asymmetrically, by an amount that depends on the input size, which
symmetric padding cannot express, so such rows are refused rather than read as another function.
Rows whose weights are not all finite (diverged runs) are left out, as the paper's code does; the zoo's
``meta["nonfinite_rows"]`` counts them.
"""

from __future__ import annotations

import ast
import csv
import gzip
import io
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..arch import Architecture, Layer
from ..errors import (CNNZooFormatError, ConfigError, MissingKeyError, ShapeMismatchError, UnsupportedLayerError,
                      WSNetsError)
from .records import Zoo

_COLS = {"train_acc": "train_accuracy", "test_acc": "test_accuracy", "train_loss": "train_loss", "test_loss": "test_loss"}
_REQUIRED = ("test_accuracy",)
_HP = {"optimizer": "config.optimizer", "lr": "config.learning_rate", "weight_decay": "config.l2reg",
       "dropout": "config.dropout", "init_scale": "config.init_std", "train_fraction": "config.train_fraction"}


def _read_csv(path: Path) -> list[dict[str, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", newline="") as f:  # type: ignore[operator]
            return list(csv.DictReader(f))
    except (OSError, EOFError, csv.Error, UnicodeDecodeError) as e:
        raise CNNZooFormatError(f"{path}: unreadable CSV ({e})") from None


_LAYOUT_COLS = ("varname", "start_idx", "end_idx", "shape")


def _layout(root: Path, n_values: int) -> list[tuple[str, int, int, tuple[int, ...]]]:
    """``layout.csv`` checked where it enters: its columns, integer offsets with ``0 <= start < end <=
    n_values``, ``end - start`` equal to the shape's size (and to ``size`` where given), no two variables
    overlapping. Any failure is a :class:`CNNZooFormatError` naming the file, line and column."""
    path = root / "layout.csv"
    rows = _read_csv(path)
    if not rows:
        raise CNNZooFormatError(f"{path}: no variables (a header and one line per weight tensor are needed)")
    lost = [c for c in _LAYOUT_COLS if c not in rows[0]]
    if lost:
        raise CNNZooFormatError(f"{path}: no column {lost[0]!r} (needs {', '.join(_LAYOUT_COLS)}; has "
                                f"{', '.join(k for k in rows[0] if k)})")
    out = []
    for line, r in enumerate(rows, start=2):
        where = f"{path}: line {line} ({r.get('varname')!r})"
        try:
            text = str(r["shape"]).strip()
            shape = ast.literal_eval(text) if text.startswith("(") else \
                tuple(int(t) for t in text.replace("[", "").replace("]", "").split(",") if t.strip())
            shape = tuple(int(t) for t in (shape if isinstance(shape, tuple) else (shape,)))
            start, end = int(r["start_idx"]), int(r["end_idx"])
        except (KeyError, ValueError, SyntaxError, TypeError) as e:
            raise CNNZooFormatError(f"{where}: start_idx, end_idx and shape must be integers ({e})") from None
        if any(d < 1 for d in shape):
            raise CNNZooFormatError(f"{where}: shape {shape} has a dimension below 1")
        if not 0 <= start < end <= n_values:
            raise CNNZooFormatError(f"{where}: offsets {start}..{end} are not within 0..{n_values} (the values per "
                                    "row of weights.npy)")
        if end - start != math.prod(shape):
            raise CNNZooFormatError(f"{where}: offsets {start}..{end} hold {end - start} values, shape {shape} "
                                    f"needs {math.prod(shape)}")
        if str(r.get("size") or "").strip() not in ("", str(end - start)):
            raise CNNZooFormatError(f"{where}: size {r['size']} but offsets {start}..{end} hold {end - start} values")
        out.append((r["varname"], start, end, shape))
    spans = sorted((s, e, n) for n, s, e, _ in out)
    for (s0, e0, n0), (s1, _, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise CNNZooFormatError(f"{path}: variables {n0!r} ({s0}..{e0}) and {n1!r} (from {s1}) overlap")
    return out


def _architecture(layout: Sequence[tuple[str, int, int, tuple[int, ...]]], activation: str,
                  stride: int, padding: int | str = 0, spatial: tuple[int, ...] | None = None
                  ) -> tuple[Architecture, list[tuple[str, str, str]]]:
    """Architecture plus, per tensor, ``(varname, torch key, kind)`` in the order of the layers.
    ``padding``: symmetric zero padding, or ``"same"`` (TensorFlow's, exact only as ``k // 2`` at stride 1);
    ``spatial``: the input's spatial size (its channels are the first kernel's), None if unknown."""
    prefixes: list[str] = []
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    first: dict[str, int] = {}
    for name, start, _, shape in layout:
        prefix, _, var = name.rpartition("/")
        var = var.split(":")[0]
        if var not in ("kernel", "bias"):
            raise UnsupportedLayerError(f"variable {name!r} is neither a kernel nor a bias; the Small CNN Zoo layout "
                                        "holds conv/dense kernels and biases only (BatchNorm and other layers would be "
                                        "dropped, computing another function)")
        if prefix not in shapes:
            prefixes.append(prefix)
            shapes[prefix] = {}
        if var in shapes[prefix]:
            raise UnsupportedLayerError(f"variable {name!r} appears twice in layout.csv")
        shapes[prefix][var] = shape
        first[prefix] = min(first.get(prefix, start), start)
    prefixes.sort(key=first.__getitem__)  # layer order = order in the flat row, not the CSV's line order
    for p in prefixes:
        k, bias = shapes[p].get("kernel"), shapes[p].get("bias")
        if k is None or len(k) not in (2, 4):
            raise UnsupportedLayerError(f"layer {p!r}: " + (f"a {len(k)}-D kernel {k}; only 4-D conv (HWIO) and 2-D dense "
                                                            "kernels are supported" if k else "a bias without a kernel"))
        if bias is not None and bias != (k[-1],):
            raise ShapeMismatchError(f"layer {p!r}: bias of shape {bias} for a kernel {k} with {k[-1]} outputs")
    kinds = [len(shapes[p]["kernel"]) for p in prefixes]
    if kinds != sorted(kinds, reverse=True):
        raise UnsupportedLayerError(f"layers {prefixes} (in row order) put a dense layer before a conv layer; the Small "
                                    "CNN Zoo network is conv layers, global average pooling, then dense layers")
    layers: list[Layer] = []
    mapping: list[tuple[str, str, str]] = []
    convs = [p for p in prefixes if len(shapes[p].get("kernel", ())) == 4]
    denses = [p for p in prefixes if len(shapes[p].get("kernel", ())) == 2]
    if not convs and not denses:
        raise CNNZooFormatError("layout.csv has no conv (4-D) or dense (2-D) kernel")
    act = [] if activation in ("identity", "linear") else [Layer("act", fn=activation)]
    in_ch = None
    for p in convs:
        kh, kw, ci, co = shapes[p]["kernel"]
        in_ch = in_ch or ci
        name = str(len(layers))
        if padding == "same":
            if stride != 1 or kh % 2 == 0 or kw % 2 == 0:
                raise UnsupportedLayerError(
                    f"layer {p!r}: TensorFlow 'same' padding with stride {stride} and a {kh}x{kw} kernel pads "
                    "asymmetrically (by an amount that depends on the input size), which symmetric padding cannot "
                    "express; only stride 1 with an odd kernel is exact")
            pad = (kh // 2, kw // 2)
        else:
            # no padding along a 1-wide kernel axis: a (1, k) kernel is a Conv1d written as Conv2D on 1 x L inputs
            pad = (int(padding) if kh > 1 else 0, int(padding) if kw > 1 else 0)
        layers.append(Layer("conv2d", name, ci, co, (kh, kw), (stride, stride), pad, (1, 1),
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
    first_in = shapes[prefixes[0]]["kernel"][-2]
    arch = Architecture(tuple(layers), (first_in, *spatial) if spatial and convs else None)
    if arch.input_shape is not None:
        x, k = list(spatial), [l for l in layers if l.kind == "conv2d"]
        for l in k:
            x = [(n + 2 * p - kk) // s + 1 for n, p, kk, s in zip(x, l.padding, l.kernel_size, l.stride)]
            if min(x) < 1:
                raise ShapeMismatchError(f"a {'x'.join(map(str, spatial))} input is too small for conv layer "
                                         f"{l.name!r} (kernel {l.kernel_size}, stride {l.stride}, padding {l.padding})")
    return arch, mapping


def open_cnn_zoo(root: str | Path, *, stride: int = 2, padding: int | str = "valid") -> Zoo:
    """Read a Small CNN Zoo directory as a read-only :class:`Zoo` (rows, metrics, ``load()``); ``stride``
    and ``padding`` (a number, ``"valid"`` = 0 as Keras' default and the public zoo, or ``"same"``) of
    the conv layers where the rows do not say them (``config.cnn_stride``, ``config.padding``)."""
    root = Path(root)
    mpath = next((root / n for n in ("metrics.csv.gz", "metrics.csv") if (root / n).exists()), None)
    if mpath is None:
        raise MissingKeyError(f"{root}: no metrics.csv or metrics.csv.gz next to weights.npy")
    if not (root / "layout.csv").exists():
        raise MissingKeyError(f"{root}: no layout.csv next to weights.npy")
    try:
        weights = np.load(root / "weights.npy", mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:
        raise CNNZooFormatError(f"{root / 'weights.npy'}: unreadable ({e})") from None
    if weights.ndim != 2 or weights.dtype.kind != "f":
        raise CNNZooFormatError(f"{root / 'weights.npy'}: a {weights.ndim}-D {weights.dtype} array; the layout needs a "
                                "2-D floating-point array (one flattened network per row)")
    metrics = _read_csv(mpath)
    if len(metrics) != weights.shape[0]:
        raise CNNZooFormatError(f"{root}: metrics has {len(metrics)} rows but weights.npy has {weights.shape[0]}")
    lost = [c for c in _REQUIRED if metrics and c not in metrics[0]]
    if lost:
        raise CNNZooFormatError(f"{mpath}: no column {lost[0]!r} (the Small CNN Zoo's metrics have "
                                f"{', '.join(_REQUIRED)}, config.* and more)")
    layout = _layout(root, weights.shape[1])
    padding = _padding(padding, 0, f"{root}: padding")
    try:
        _architecture(layout, "relu", stride)
    except WSNetsError as e:
        raise CNNZooFormatError(f"{root / 'layout.csv'}: {e}") from None
    spans = {name: (s, e, shape) for name, s, e, shape in layout}
    finite = np.empty(weights.shape[0], dtype=bool)  # the public zoo holds diverged runs with NaN/inf weights
    for s in range(0, weights.shape[0], 4096):
        finite[s:s + 4096] = np.isfinite(weights[s:s + 4096]).all(axis=1)
    archs: dict[str, tuple[Architecture, list]] = {}
    rows = []
    for i, m in enumerate(metrics):
        where = f"{mpath}: line {i + 2}"
        if not finite[i]:
            continue
        act = (m.get("config.activation") or "relu").lower()
        st = _float(m.get("config.cnn_stride"), where, "config.cnn_stride")
        if st is not None and (not math.isfinite(st) or st < 1 or st != int(st)):
            raise CNNZooFormatError(f"{where}: column 'config.cnn_stride' holds {st:g}, not a whole number >= 1")
        geo = (act, int(st or stride), _padding(m.get("config.padding"), padding, where),
               _input_shape(m, where))
        if geo not in archs:
            try:
                archs[geo] = _architecture(layout, *geo)
            except WSNetsError as e:
                raise CNNZooFormatError(f"{where}: {e}") from None
        arch = archs[geo][0]
        num = {k: _float(m.get(v), where, v) for k, v in _COLS.items()}
        ds = m.get("config.dataset", "")
        step = _float(m.get("step"), where, "step")
        rows.append({
            "model_id": m.get("modeldir") or f"row{i}", "run": i, "recipe": "small-cnn-zoo", "arch": arch.to_json(),
            "arch_desc": arch.describe(), "depth": len(arch.weight_layers) - 1,
            "width": max(arch.group_sizes[1:-1], default=0), "activation": act, "num_params": arch.num_params,
            "dataset": ds, "task": ds, "epoch": int(step or 0), **num,
            "gen_gap": (num["train_acc"] - num["test_acc"]) if None not in (num["train_acc"], num["test_acc"]) else None,
            **{k: (m.get(v) if k == "optimizer" else _float(m.get(v), where, v)) for k, v in _HP.items()},
            "hyperparameters": json.dumps({k[7:]: v for k, v in m.items() if k.startswith("config.")}, sort_keys=True),
            "shard": "weights.npy", "key": "", "idx": i, "geometry": geo})

    def loader(rs: Sequence[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
        idx = np.asarray([r["idx"] for r in rs], dtype=np.int64)
        block = torch.from_numpy(np.ascontiguousarray(weights[np.sort(idx)], dtype=weights.dtype.newbyteorder("=")))
        block = block[torch.from_numpy(np.argsort(np.argsort(idx)))]  # back to the requested order
        out = []
        for j, r in enumerate(rs):
            mapping = archs[r["geometry"]][1]
            sd = {}
            for var, key, kind in mapping:
                s, e, shape = spans[var]
                t = block[j, s:e].reshape(shape)
                sd[key] = t.permute(3, 2, 0, 1).contiguous() if kind == "conv" else (t.T.contiguous() if kind == "dense" else t.clone())
            out.append(sd)
        return out

    return Zoo(root, rows, loader, meta={"recipe": "small-cnn-zoo", "source": str(root),
                                         "nonfinite_rows": int((~finite).sum())})


#: The public zoo's datasets and their images' spatial size (train_network.py: TFDS images, grayscale).
PUBLIC_INPUTS = {"mnist": (28, 28), "fashion_mnist": (28, 28), "cifar10": (32, 32), "svhn_cropped": (32, 32)}


def _input_shape(m: dict[str, str], where: str) -> tuple[int, ...] | None:
    """A row's input spatial size: ``config.input_shape`` (``HxW``, written by :func:`export_cnn_zoo`),
    else the public zoo's size for its ``config.dataset`` (:data:`PUBLIC_INPUTS`), else None."""
    text = str(m.get("config.input_shape") or "").strip()
    if text:
        try:
            dims = tuple(int(t) for t in text.lower().split("x"))
        except ValueError:
            dims = ()
        if not dims or min(dims) < 1:
            raise CNNZooFormatError(f"{where}: column 'config.input_shape' holds {text!r}, not sizes like 28x28")
        return dims
    return PUBLIC_INPUTS.get(str(m.get("config.dataset") or "").strip().lower())


def _padding(v: Any, default: int | str, where: str = "") -> int | str:
    """A row's ``config.padding``: a whole number >= 0, ``valid`` (0) or ``same``; ``default`` if absent."""
    if v is None or str(v).strip() == "":
        return default
    if str(v).strip().lower() == "valid":
        return 0
    if str(v).strip().lower() == "same":
        return "same"
    f = _float(v, where, "config.padding")
    if f is None:
        return default
    if not math.isfinite(f) or f < 0 or f != int(f):
        raise CNNZooFormatError(f"{where}: column 'config.padding' holds {v!r}, not valid, same or a whole number >= 0")
    return int(f)


def _float(v: str | None, where: str = "", column: str = "") -> float | None:
    """A number from a CSV cell; empty or absent is None, anything else that is not a number an error."""
    if v is None or str(v).strip() in ("", "nan", "NaN"):
        return None
    try:
        return float(v)
    except ValueError:
        raise CNNZooFormatError(f"{where}: column {column!r} holds {v!r}, not a number") from None


def write_cnn_zoo(root: str | Path, modules: Sequence[torch.nn.Module], metrics: Sequence[dict[str, Any]]) -> None:
    """Write PyTorch CNNs (conv... -> GAP -> dense) in the Small CNN Zoo layout (biases before kernels,
    HWIO kernels, gzipped metrics): the inverse of :func:`open_cnn_zoo`, used for fixtures (a zoo is
    exported with :func:`export_cnn_zoo`)."""
    convs = [m for m in modules[0].modules() if isinstance(m, torch.nn.Conv2d)]
    denses = [m for m in modules[0].modules() if isinstance(m, torch.nn.Linear)]
    names = [f"sequential/conv2d{'_%d' % i if i else ''}" for i in range(len(convs))] + \
            [f"sequential/dense{'_%d' % i if i else ''}" for i in range(len(denses))]
    layout = _layout_rows(names, [tuple(m.weight.shape[2:]) + (m.in_channels, m.out_channels) for m in convs]
                          + [(m.in_features, m.out_features) for m in denses])
    rows = []
    for mod in modules:
        ms = [m for m in mod.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        rows.append(torch.cat([t.detach().reshape(-1) for m in ms for t in
                               (m.bias, m.weight.permute(2, 3, 1, 0) if m.weight.dim() == 4 else m.weight.T)]))
    geo = {(c.stride, c.padding) for c in convs}  # written per row, so the reader rebuilds the same convs
    if len(geo) > 1 or any(isinstance(pad, str) or len(set(st)) > 1 or len(set(pad)) > 1 for st, pad in geo):
        raise UnsupportedLayerError("write_cnn_zoo: one numeric stride and padding for every conv layer and axis")
    if geo:
        st, pad = next(iter(geo))
        metrics = [{"config.cnn_stride": st[0], "config.padding": pad[0], **m} for m in metrics]
    _write_dir(Path(root), layout, [torch.stack(rows).numpy().astype(np.float32)], metrics, progress=None)


# -- export ------------------------------------------------------------------------------------------
#: The public metrics.csv's columns, in its order (an unnamed first column holds ``<modeldir>/permanent_ckpt-<step>``).
PUBLIC_COLUMNS = ["", "config.activation", "config.b_init", "config.dataset", "config.dnn_architecture",
                  "config.dropout", "config.epochs", "config.init_std", "config.l2reg", "config.learning_rate",
                  "config.num_layers", "config.num_units", "config.optimizer", "config.random_seed",
                  "config.train_fraction", "config.w_init", "modeldir", "step", "test_accuracy", "test_loss",
                  "train_accuracy", "train_loss", "laststep"]
#: wsnets' hyperparameters the public layout has no column for, written as extra ``config.*`` columns.
EXTRA_COLUMNS = ["config.batchsize", "config.cnn_stride", "config.padding", "config.input_shape", "config.momentum", "config.weight_decay",
                 "config.init_scale", "config.label_noise", "config.grad_clip", "diverged"]
_W_INIT = {"uniform": "torch_uniform", "normal": "RandomNormal", "truncated_normal": "TruncatedNormal",
           "he_normal": "he_normal", "glorot_normal": "glorot_normal", "orthogonal": "orthogonal"}


def _layout_rows(names: Sequence[str], kernels: Sequence[tuple[int, ...]]) -> list[dict[str, Any]]:
    """layout.csv rows: per layer its bias ``(out,)`` then its kernel (TF shape), packed in this order."""
    out, off = [], 0
    for name, shape in zip(names, kernels):
        for var, sh in (("bias", (shape[-1],)), ("kernel", shape)):
            n = math.prod(sh)
            out.append({"varname": f"{name}/{var}:0", "start_idx": off, "end_idx": off + n, "size": n, "shape": str(tuple(sh))})
            off += n
    return out


def _tf_layout(arch: Architecture) -> tuple[str, list[dict[str, Any]], list[tuple[str, str]], dict[str, Any]]:
    """How an architecture sits in the public layout: ``(key, layout rows, [(state-dict key, kind)], config)``
    (``kind``: conv, dense or bias, in the row order), or an UnsupportedLayerError naming the layer that
    the layout cannot hold. Conv1d layers become Conv2D kernels ``(1, k, in, out)`` (on ``1 x L`` inputs
    they compute the same, and NFN's loader transposes 4-d kernels only)."""
    ls = list(arch.layers)
    convs = [l for l in ls if l.kind in ("conv1d", "conv2d")]
    lins = [l for l in ls if l.kind == "linear"]
    acts = {l.fn for l in ls if l.kind == "act"}
    for l in ls:
        if l.kind not in ("conv1d", "conv2d", "linear", "act", "gap", "flatten"):
            raise UnsupportedLayerError(f"layer {l.name or l.kind!r} ({l.kind}) has no place in the Small CNN Zoo layout "
                                        "(conv -> activation ... -> global average pooling -> dense)")
        if l.is_weight and not l.bias:
            raise UnsupportedLayerError(f"layer {l.name!r} ({l.kind}) has no bias; the Small CNN Zoo layout stores one per layer")
    kinds = [l.kind for l in ls if l.kind != "act"]
    if convs and kinds[:len(convs) + 2] != [c.kind for c in convs] + ["gap", "flatten"]:
        raise UnsupportedLayerError(f"{arch.describe()}: the Small CNN Zoo layout needs conv layers, then global average "
                                    "pooling, then dense layers")
    if len(acts) > 1:
        raise UnsupportedLayerError(f"{arch.describe()}: one activation per network (config.activation), got {sorted(acts)}")
    geo = {(l.stride, l.padding, l.dilation) for l in convs}
    if len(geo) > 1 or any(len(set(g[0])) > 1 or len(set(g[1])) > 1 or set(g[2]) != {1} for g in geo):
        raise UnsupportedLayerError(f"{arch.describe()}: one stride and padding for every conv layer and axis "
                                    "(config.cnn_stride, config.padding)")
    names, kernels, keys = [], [], []
    for i, l in enumerate(convs):
        names.append(f"sequential/conv2d{'_%d' % i if i else ''}")
        k = l.kernel_size if l.dims == 2 else (1,) + tuple(l.kernel_size)
        kernels.append(tuple(k) + (l.in_features, l.out_features))
        keys += [(f"{l.name}.bias", "bias"), (f"{l.name}.weight", "conv")]
    for i, l in enumerate(lins):
        names.append(f"sequential/dense{'_%d' % i if i else ''}")
        kernels.append((l.in_features, l.out_features))
        keys += [(f"{l.name}.bias", "bias"), (f"{l.name}.weight", "dense")]
    layout = _layout_rows(names, kernels)
    hidden = [l.out_features for l in (convs or lins[:-1])]
    config = {"config.activation": next(iter(acts), "linear"), "config.dnn_architecture": "cnn" if convs else "fcn",
              "config.num_layers": len(convs) if convs else len(lins) - 1, "config.num_units": max(hidden, default=0),
              "config.cnn_stride": convs[0].stride[0] if convs else "", "config.padding": convs[0].padding[0] if convs else "",
              "config.input_shape": _spatial_text(arch) if convs else ""}
    return str([(r["varname"], r["shape"]) for r in layout]), layout, keys, config


def _spatial_text(arch: Architecture) -> str:
    """The input's spatial size as ``HxW`` (a Conv1d network's ``L`` as ``1xL``), "" if not recorded."""
    if arch.input_shape is None or len(arch.input_shape) < 2:
        return ""
    sp = tuple(arch.input_shape[1:])
    return "x".join(map(str, (1,) + sp if len(sp) == 1 else sp))


def _to_tf(sd: dict[str, torch.Tensor], keys: Sequence[tuple[str, str]]) -> torch.Tensor:
    """State dicts stacked ``[n, ...]`` -> rows ``[n, params]`` in the public layout's order."""
    parts = []
    for key, kind in keys:
        t = sd[key]
        if kind == "conv":
            t = t.permute(0, 3, 4, 2, 1) if t.dim() == 5 else t.permute(0, 3, 2, 1)[:, None]  # HWIO; 1-d: (1, k, in, out)
        elif kind == "dense":
            t = t.transpose(1, 2)
        parts.append(t.reshape(len(t), -1))
    return torch.cat(parts, 1)


def _metrics_row(r: dict[str, Any], hp: dict[str, Any], config: dict[str, Any], last: int) -> dict[str, Any]:
    opt = hp.get("optimizer", r.get("optimizer"))
    if opt == "sgd" and (hp.get("momentum") or 0) > 0:
        opt = "momentum"  # train_network.py's name for SGD with momentum
    elif opt == "adam" and (hp.get("weight_decay") or 0) > 0:
        opt = "adamw"
    init = hp.get("init", "uniform")
    row = {"": f"{r['model_id']}/permanent_ckpt-{r['epoch']}", **config, "config.epochs": last,
            "config.b_init": "torch_uniform" if init == "uniform" else "zeros", "config.dataset": r.get("dataset", ""),
            "config.dropout": hp.get("dropout", r.get("dropout")), "config.init_std": hp.get("init_std", ""),
            "config.l2reg": hp.get("l2", 0.0), "config.learning_rate": hp.get("lr", r.get("lr")), "config.optimizer": opt,
            "config.random_seed": r.get("seed", ""), "config.train_fraction": hp.get("train_fraction", r.get("train_fraction")),
            "config.w_init": _W_INIT.get(init, init), "modeldir": r["model_id"], "step": r["epoch"],
            "test_accuracy": r["test_acc"], "test_loss": r["test_loss"], "train_accuracy": r["train_acc"],
            "train_loss": r["train_loss"], "laststep": r["epoch"] == last, "config.batchsize": r.get("batch_size", ""),
            "config.momentum": hp.get("momentum", ""), "config.weight_decay": hp.get("weight_decay", ""),
            "config.init_scale": hp.get("init_scale", ""), "config.label_noise": hp.get("label_noise", ""),
            "config.grad_clip": hp.get("grad_clip", ""), "diverged": r.get("diverged", "")}
    return {c: row[c] for c in PUBLIC_COLUMNS + EXTRA_COLUMNS}


def export_cnn_zoo(src, out: str | Path, *, progress: bool = True, chunk: int = 4096) -> dict[str, Any]:
    """Write a zoo (a directory or an open :class:`~wsnets.zoo.records.Zoo`) in the public Small CNN Zoo
    layout, so that NFN's and Neural-Graphs' loaders read it unchanged.

    Each directory holds ``weights.npy`` (float32 ``[checkpoints, params]``), ``layout.csv`` (TF variable
    names ``sequential/conv2d/bias:0``..., HWIO kernels, biases before kernels), ``metrics.csv.gz``
    (the public columns :data:`PUBLIC_COLUMNS` -- ``config.*`` hyperparameters with Keras' names, ``step``
    = epoch, ``laststep``, accuracies and losses -- plus :data:`EXTRA_COLUMNS`) and ``split_idcs.csv``
    (a fixed random permutation of the rows, seed 0: the ``idcs_file`` those loaders shuffle by). Rows
    are model-major, epochs ascending. A zoo of one dataset and architecture goes into ``out`` itself;
    otherwise each (dataset, architecture) gets ``out/<dataset>`` (or ``out/<dataset>-<architecture>``)
    as the public zoo has one directory per dataset. Conv1d networks are written as Conv2D with
    ``(1, k)`` kernels; MLPs as Keras' ``fcn`` (dense layers only, ``config.dnn_architecture = fcn``).
    Networks with other layers (BatchNorm, pooling, a flatten over positions) or without biases are
    refused with an error naming the layer. Every file is written atomically; returns a summary.
    """
    from .records import Zoo, hyperparameters, open as open_zoo
    zoo = src if isinstance(src, Zoo) else open_zoo(src)
    if len(zoo) == 0:
        raise ConfigError(f"{zoo.root}: the zoo has no committed checkpoints to export")
    out = Path(out)
    groups: dict[tuple[str, str], list] = {}
    plans: dict[str, tuple] = {}
    for r in zoo.rows:
        if r["arch"] not in plans:
            plans[r["arch"]] = _tf_layout(zoo.arch_of(r))
        groups.setdefault((r.get("dataset") or "", plans[r["arch"]][0]), []).append(r)
    per_ds: dict[str, int] = {}
    for ds, _ in groups:
        per_ds[ds] = per_ds.get(ds, 0) + 1
    last: dict[str, int] = {}
    for r in zoo.rows:
        last[r["model_id"]] = max(last.get(r["model_id"], -1), int(r["epoch"]))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(zoo), desc="zoo export", unit="ckpt")
    written = []
    try:
        for (ds, key), rows in sorted(groups.items(), key=lambda kv: kv[0]):
            rows = sorted(rows, key=lambda r: (r["model_id"], int(r["epoch"])))
            _, layout, keys, _ = plans[rows[0]["arch"]]  # one layout; the activation (config) may differ per row
            d = out if len(groups) == 1 else out / _dir_name(ds, zoo.arch_of(rows[0]) if per_ds[ds] > 1 else None)
            metrics = [_metrics_row(r, hyperparameters(r), plans[r["arch"]][3], last[r["model_id"]]) for r in rows]
            blocks = (_to_tf(_stack_sd(zoo, rows[i:i + chunk]), keys).numpy() for i in range(0, len(rows), chunk))
            _write_dir(d, layout, blocks, metrics, progress=bar, n_rows=len(rows))
            written.append({"dir": str(d), "dataset": ds, "rows": len(rows), "models": len({r["model_id"] for r in rows}),
                            "params": layout[-1]["end_idx"], "architecture": _describe_all(zoo, rows)})
    finally:
        if bar is not None:
            bar.close()
    return {"zoo": str(zoo.root), "out": str(out), "directories": written}


def _describe_all(zoo, rows) -> str:
    """The architectures of ``rows`` (one layout): ``cnn2d:1-16-16-16-10:relu/tanh`` when only the activation differs."""
    first: dict[str, dict] = {}
    for r in rows:
        first.setdefault(r["arch"], r)
    descs = sorted({zoo.arch_of(r).describe() for r in first.values()})
    heads = {d.rsplit(":", 1)[0] for d in descs}
    if len(descs) > 1 and len(heads) == 1:
        return f"{heads.pop()}:{'/'.join(d.rsplit(':', 1)[1] for d in descs)}"
    return ", ".join(descs)


def _dir_name(dataset: str, arch: Architecture | None) -> str:
    name = dataset or "zoo"
    if arch is not None:
        name += "-" + arch.describe().rsplit(":", 1)[0].replace(":", "-")
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in name)


def _stack_sd(zoo, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The state dicts of ``rows`` stacked ``[n, ...]`` (the zoo's own loader: each shard opened once)."""
    sds = zoo._loader(rows)
    return {k: torch.stack([sd[k] for sd in sds]) for k in sds[0]}


def _write_dir(root: Path, layout: list[dict[str, Any]], blocks, metrics: list[dict[str, Any]], *, progress,
               n_rows: int | None = None) -> None:
    """Write one public-layout directory atomically: ``weights.npy`` filled block by block (``blocks``:
    float32 arrays ``[rows, params]`` in metrics order), ``layout.csv``, ``metrics.csv.gz``, ``split_idcs.csv``."""
    from ..io import atomic_write, atomic_write_text
    root.mkdir(parents=True, exist_ok=True)
    n = len(metrics) if n_rows is None else n_rows
    width = layout[-1]["end_idx"]

    def weights(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                                                     "fortran_order": False, "shape": (n, width)})
            done = 0
            for b in blocks:
                b = np.ascontiguousarray(b, dtype=np.float32)
                if b.ndim != 2 or b.shape[1] != width:
                    raise ShapeMismatchError(f"{root}: a block of shape {b.shape} does not fit layout.csv's {width} values")
                f.write(b.tobytes())
                done += len(b)
                if progress is not None:
                    progress.update(len(b))
            if done != n:
                raise ShapeMismatchError(f"{root}: wrote {done} weight rows for {n} metrics rows")
    atomic_write(root / "weights.npy", weights)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["varname", "start_idx", "end_idx", "size", "shape"], lineterminator="\n")
    w.writeheader()
    w.writerows(layout)
    atomic_write_text(root / "layout.csv", buf.getvalue())
    cols = list(metrics[0]) if metrics else []
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    w.writerows(metrics)
    data = buf.getvalue().encode()
    atomic_write(root / "metrics.csv.gz", lambda tmp: Path(tmp).write_bytes(gzip.compress(data, mtime=0)))
    perm = np.random.default_rng(0).permutation(n)
    atomic_write_text(root / "split_idcs.csv", "".join(f"{i}\n" for i in perm))
