"""Offline datasets with fixed train/test splits, and transformed variants that group into tasks.

Every dataset is generated locally (nothing is downloaded) and has one fixed split, so a zoo's
recorded accuracies can be re-measured by anyone.

Base datasets
-------------
``digits``       scikit-learn 8x8 digits as flat 64 features in [0, 1]; 1437 train / 360 test
                 (a fixed permutation with seed 0).
``digits-img``   the same split as 1x8x8 images.
``digits-img16`` the same split as 1x16x16 images in [-1, 1]: each pixel repeated 2x2 (nearest-neighbour
                 upsampling), scaled as the Small CNN Zoo scales its images (``2 x - 1``). Three
                 unpadded 3x3 stride-2 convolutions fit it (16 -> 7 -> 3 -> 1) with every kernel tap
                 reading the image, as on the public zoo's 28x28 and 32x32 images (on 8x8 images the
                 third layer would need padding that leaves 5 of its 9 taps reading only zeros).
``mnist1d``      MNIST-1D (Greydanus 2020) generated with ``mnist1d.data.make_dataset`` and its
                 default arguments (seed 42, never the download): 40 features, 4000 / 1000.
``mnist1d-seq``  the same as 1x40 sequences (for Conv1d).
``blobs``        a Gaussian mixture: 10 classes in 64 dimensions (3000 / 1000).
``classif``      ``sklearn.datasets.make_classification``: 10 classes, 64 features (16 informative).
``blobs2``       an easy 2-d, 4-class Gaussian mixture (2000 / 1000), for tiny tests and plots.

Transforms (suffixes joined with ``+``, applied left to right)
-------------------------------------------------------------
``noise<s>``     add N(0, s^2) input noise (fixed seed per name), e.g. ``digits+noise0.3``
``invert``       digits, digits-img: ``1 - x``; other data: ``-x``
``flip``         mirror images left-right, reverse sequences
``rot90`` / ``rot180`` / ``rot270``   rotate images (digits, digits-img, digits-img16 only)
``perm<k>``      permute the class labels with seed ``k`` (a new task)
``classes<a>-<b>``   keep classes a..b, relabelled 0..b-a (a new task)

Input transforms (noise, invert, flip, rot) change the *dataset* but keep the *task*; label
transforms (perm, classes) make a new task. :func:`info` reports both, and the ``regions`` zoo uses
them as targets (Gueta et al. 2023, "Knowledge is a region in weight space").

Examples
--------
>>> from wsnets.zoo import datasets
>>> x, y, xt, yt = datasets.load("digits")
>>> tuple(x.shape), x.dtype, int(y.max()) + 1
((1437, 64), torch.float32, 10)
>>> datasets.info("digits+noise0.3")["task"], datasets.info("digits+perm1")["task"]
('digits', 'digits+perm1')
"""

from __future__ import annotations

import random
import re
import zlib
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError

Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]

_BASES: dict[str, dict[str, Any]] = {
    "digits": {"family": "digits", "input_shape": (64,), "num_classes": 10},
    "digits-img": {"family": "digits", "input_shape": (1, 8, 8), "num_classes": 10},
    "digits-img16": {"family": "digits", "input_shape": (1, 16, 16), "num_classes": 10},
    "mnist1d": {"family": "mnist1d", "input_shape": (40,), "num_classes": 10},
    "mnist1d-seq": {"family": "mnist1d", "input_shape": (1, 40), "num_classes": 10},
    "blobs": {"family": "blobs", "input_shape": (64,), "num_classes": 10},
    "classif": {"family": "classif", "input_shape": (64,), "num_classes": 10},
    "blobs2": {"family": "blobs2", "input_shape": (2,), "num_classes": 4},
}
_LABEL_TRANSFORMS = ("perm", "classes")
_TRANSFORM_RE = re.compile(r"^(noise(?P<noise>\d+(\.\d+)?)|invert|flip|rot(?P<rot>90|180|270)|"
                           r"perm(?P<perm>\d+)|classes(?P<lo>\d+)-(?P<hi>\d+))$")


def names() -> list[str]:
    """Base datasets plus the named variants the shipped recipes use (any valid composition loads)."""
    variants = ["digits+noise0.3", "digits+noise0.6", "digits+invert", "digits+flip", "digits+rot90",
                "digits+perm1", "digits+perm1+noise0.3", "digits+classes0-4", "digits+classes5-9",
                "digits-img+rot90", "mnist1d+noise0.5", "mnist1d+flip", "blobs+noise1.0"]
    return list(_BASES) + variants


def _parse(name: str) -> tuple[str, list[re.Match]]:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"dataset name must be a non-empty string, got {name!r}")
    base, *parts = name.split("+")
    if base not in _BASES:
        raise ConfigError(f"unknown dataset {name!r}: base {base!r} is not one of {', '.join(_BASES)}")
    matches = []
    for p in parts:
        m = _TRANSFORM_RE.match(p)
        if m is None:
            raise ConfigError(f"unknown transform {p!r} in dataset {name!r} "
                              "(known: noise<s>, invert, flip, rot90/180/270, perm<k>, classes<a>-<b>)")
        if m.group("rot") and _BASES[base]["family"] != "digits":
            raise ConfigError(f"transform {p!r} in {name!r} needs square images (digits, digits-img, digits-img16)")
        if p == "flip" and _BASES[base]["family"] not in ("digits", "mnist1d"):
            raise ConfigError(f"transform 'flip' in {name!r} needs images or sequences (digits, mnist1d)")
        matches.append(m)
    return base, matches


def info(name: str) -> dict[str, Any]:
    """What a dataset is: its ``dataset`` and ``task`` group names, input shape and number of classes.

    Returns
    -------
    dict with ``dataset`` (the name), ``task`` (base family plus label transforms), ``base``,
    ``family``, ``input_shape`` (tuple, no batch dim), ``num_classes``, ``n_train``, ``n_test``.
    """
    return dict(_info(name))


@lru_cache(maxsize=256)
def _info(name: str) -> dict[str, Any]:
    base, ms = _parse(name)
    b = _BASES[base]
    classes = b["num_classes"]
    task = [b["family"]]
    for m in ms:
        if m.group("lo") is not None:
            lo, hi = int(m.group("lo")), int(m.group("hi"))
            if not 0 <= lo <= hi < classes:
                raise ConfigError(f"class subset {m.group(0)!r} in {name!r} outside 0..{classes - 1}")
            classes = hi - lo + 1
        if m.group(0).startswith(_LABEL_TRANSFORMS):
            task.append(m.group(0))
    n_train, n_test = _sizes(base, name)
    return {"dataset": name, "task": "+".join(task), "base": base, "family": b["family"],
            "input_shape": tuple(b["input_shape"]), "num_classes": classes, "n_train": n_train, "n_test": n_test}


def _sizes(base: str, name: str) -> tuple[int, int]:
    x, _, xt, _ = _load(name) if "+classes" in name else _base(base)
    return int(x.shape[0]), int(xt.shape[0])


def load(name: str) -> Split:
    """``(x_train, y_train, x_test, y_test)``: float32 inputs ``[N, *input_shape]``, int64 labels ``[N]``.

    Deterministic: the same name always gives the same tensors (fresh copies, safe to modify).
    Raises :class:`~wsnets.errors.ConfigError` for an unknown name or transform.
    """
    return tuple(t.clone() for t in _load(name))  # type: ignore[return-value]


@lru_cache(maxsize=32)
def _load(name: str) -> Split:
    base, ms = _parse(name)
    x, y, xt, yt = (t.clone() for t in _base(base))
    family = _BASES[base]["family"]
    classes = _BASES[base]["num_classes"]
    seed = zlib.crc32(name.encode())
    for m in ms:
        t = m.group(0)
        if m.group("noise") is not None:
            g = torch.Generator().manual_seed(seed)
            s = float(m.group("noise"))
            x = x + s * torch.randn(x.shape, generator=g)
            xt = xt + s * torch.randn(xt.shape, generator=g)
        elif t == "invert":
            x, xt = (1 - x, 1 - xt) if base in ("digits", "digits-img") else (-x, -xt)
        elif t == "flip" or m.group("rot"):
            x, xt = _spatial(x, t, family), _spatial(xt, t, family)
        elif m.group("perm") is not None:
            p = torch.randperm(classes, generator=torch.Generator().manual_seed(int(m.group("perm"))))
            y, yt = p[y], p[yt]
        else:
            lo, hi = int(m.group("lo")), int(m.group("hi"))
            keep, keep_t = (y >= lo) & (y <= hi), (yt >= lo) & (yt <= hi)
            x, y, xt, yt = x[keep], y[keep] - lo, xt[keep_t], yt[keep_t] - lo
            classes = hi - lo + 1
    return x.contiguous().float(), y.long(), xt.contiguous().float(), yt.long()


def _spatial(x: torch.Tensor, t: str, family: str) -> torch.Tensor:
    """Flip/rotate images (flat digits are viewed as 8x8) or reverse sequences."""
    if family == "mnist1d":
        return x.flip(-1)
    side = round(x[0].numel() ** 0.5)  # 8 (digits, digits-img) or 16 (digits-img16)
    img = x.reshape(-1, side, side)
    img = img.flip(-1) if t == "flip" else torch.rot90(img, int(t[3:]) // 90, dims=(-2, -1))
    return img.reshape(x.shape)


_CACHE_VERSION = 1  # bump when a base dataset's generation changes


@lru_cache(maxsize=None)
def _base(base: str) -> Split:
    """A base dataset's split, generated once and kept in ``~/.cache/wsnets/datasets`` (safetensors):
    a new process (a zoo-build worker) then loads it in milliseconds instead of importing scikit-learn
    (~1.7 s) or rerunning the MNIST-1D generator. A missing, unreadable or unwritable cache only
    means generating again."""
    from ..io import cache_dir, write_safetensors
    path = cache_dir("datasets") / f"{base}-v{_CACHE_VERSION}.safetensors"
    keys = ("x", "y", "xt", "yt")
    if path.is_file():
        try:
            from safetensors.torch import load_file
            t = load_file(str(path))
            return tuple(t[k] for k in keys)  # type: ignore[return-value]
        except Exception:  # noqa: BLE001 - a corrupt cache file is regenerated below
            pass
    split = _generate(base)
    try:
        write_safetensors(path, dict(zip(keys, split)))
    except OSError:
        pass
    return split


def _generate(base: str) -> Split:
    if base == "digits-img16":
        x, y, xt, yt = _generate("digits-img")
        up = [(2 * t.repeat_interleave(2, -1).repeat_interleave(2, -2) - 1).contiguous() for t in (x, xt)]
        return up[0], y, up[1], yt
    if base in ("digits", "digits-img"):
        from sklearn.datasets import load_digits
        d = load_digits()
        x = torch.tensor(d.data, dtype=torch.float32) / 16.0
        y = torch.tensor(d.target, dtype=torch.int64)
        p = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        x, y = x[p], y[p]
        if base == "digits-img":
            x = x.reshape(-1, 1, 8, 8)
        n = 1437
        return x[:n], y[:n], x[n:], y[n:]
    if base in ("mnist1d", "mnist1d-seq"):
        x, y, xt, yt = _mnist1d()
        if base == "mnist1d-seq":
            x, xt = x[:, None], xt[:, None]
        return x, y, xt, yt
    if base in ("blobs", "blobs2"):
        from sklearn.datasets import make_blobs
        d, c, n_train, std = (64, 10, 3000, 6.0) if base == "blobs" else (2, 4, 2000, 1.5)
        xs, ys = make_blobs(n_samples=n_train + 1000, n_features=d, centers=c, cluster_std=std,
                            center_box=(-5.0, 5.0), random_state=0)
        return _split(xs, ys, n_train)
    if base == "classif":
        from sklearn.datasets import make_classification
        xs, ys = make_classification(n_samples=4000, n_features=64, n_informative=16, n_redundant=8,
                                     n_classes=10, n_clusters_per_class=2, class_sep=1.5, random_state=0)
        return _split(xs, ys, 3000)
    raise ConfigError(f"unknown dataset {base!r}")  # pragma: no cover - _parse checks first


def _split(xs: np.ndarray, ys: np.ndarray, n_train: int) -> Split:
    x = torch.tensor(xs, dtype=torch.float32)
    y = torch.tensor(ys, dtype=torch.int64)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


@lru_cache(maxsize=1)
def _mnist1d() -> Split:
    """MNIST-1D from its generator with the default arguments; global RNG states are left untouched."""
    from mnist1d.data import get_dataset_args, make_dataset
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return (torch.tensor(d["x"], dtype=torch.float32), torch.tensor(d["y"], dtype=torch.int64),
            torch.tensor(d["x_test"], dtype=torch.float32), torch.tensor(d["y_test"], dtype=torch.int64))
