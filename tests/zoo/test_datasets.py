"""Offline datasets: fixed splits, transforms that do what they say, task grouping."""

import numpy as np
import pytest
import torch

from wsnets.errors import ConfigError
from wsnets.zoo import datasets


@pytest.mark.parametrize("name", ["digits", "digits-img", "digits-img16", "blobs", "classif", "blobs2",
                                  "digits+perm1+noise0.3"])
def test_shapes_dtypes_and_determinism(name):
    x, y, xt, yt = datasets.load(name)
    i = datasets.info(name)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert tuple(x.shape[1:]) == i["input_shape"] == tuple(xt.shape[1:])
    assert (x.shape[0], xt.shape[0]) == (i["n_train"], i["n_test"])
    assert int(torch.cat([y, yt]).max()) + 1 == i["num_classes"]
    x2, y2, _, _ = datasets.load(name)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x2.add_(1)  # copies: mutating one load must not change the next
    assert torch.equal(datasets.load(name)[0], x)


def test_digits_matches_sklearn_and_split_is_disjoint():
    from sklearn.datasets import load_digits
    d = load_digits()
    x, y, xt, yt = datasets.load("digits")
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    allx = torch.cat([x, xt]) * 16
    # every sklearn row appears exactly once across train+test, with its label
    ref = {tuple(r): int(t) for r, t in zip(d.data.astype(int), d.target)}
    got = [tuple(r) for r in allx.round().int().tolist()]
    assert len(got) == len(d.data) and all(ref[g] == int(t) for g, t in zip(got, torch.cat([y, yt])))
    img = datasets.load("digits-img")[0]
    assert torch.equal(img.reshape(len(img), -1), x)


def test_digits_img16_is_digits_upsampled_and_scaled():
    """Each 8x8 pixel becomes a 2x2 block, scaled to [-1, 1] as the Small CNN Zoo scales images; same split."""
    x, y, xt, yt = datasets.load("digits-img16")
    x8, y8, xt8, yt8 = datasets.load("digits-img")
    assert x.shape == (1437, 1, 16, 16) and torch.equal(y, y8) and torch.equal(yt, yt8)
    for a, b in ((x, x8), (xt, xt8)):
        for dy in (0, 1):
            for dx in (0, 1):
                assert torch.equal(a[:, :, dy::2, dx::2], 2 * b - 1)
    assert torch.equal(datasets.load("digits-img16+rot90")[0], torch.rot90(x, 1, (-2, -1)))
    assert torch.equal(datasets.load("digits-img16+invert")[0], -x)


def test_mnist1d_generated_locally_and_rng_untouched():
    np.random.seed(123)
    before = np.random.rand()
    np.random.seed(123)
    datasets._mnist1d.cache_clear()
    x, y, xt, yt = datasets._generate("mnist1d")  # the generator itself, not the disk cache
    assert np.random.rand() == before  # generator's set_seed did not leak
    assert all(torch.equal(a, b) for a, b in zip((x, y, xt, yt), datasets.load("mnist1d")))
    assert tuple(x.shape) == (4000, 40) and tuple(xt.shape) == (1000, 40)
    assert torch.equal(datasets.load("mnist1d-seq")[0][:, 0], x)
    assert torch.equal(datasets.load("mnist1d+flip")[0], x.flip(-1))


def test_transforms():
    x, y, xt, yt = datasets.load("digits")
    assert torch.equal(datasets.load("digits+invert")[0], 1 - x)
    r = datasets.load("digits+rot90")[0].reshape(-1, 8, 8)
    assert torch.equal(torch.rot90(r, 3, dims=(1, 2)).reshape(x.shape), x)
    xn = datasets.load("digits+noise0.5")[0]
    assert abs(float((xn - x).std()) - 0.5) < 0.02
    _, yp, _, ytp = datasets.load("digits+perm3")
    # a label permutation is a bijection applied consistently to train and test
    mapping = {int(a): int(b) for a, b in zip(torch.cat([y, yt]), torch.cat([yp, ytp]))}
    assert sorted(mapping.values()) == list(range(10)) and len(mapping) == 10
    xs, ys, _, _ = datasets.load("digits+classes5-9")
    assert torch.equal(xs, x[y >= 5]) and torch.equal(ys, y[y >= 5] - 5)


def test_task_groups():
    assert datasets.info("digits+flip")["task"] == "digits"
    assert datasets.info("digits+perm2+invert")["task"] == "digits+perm2"
    assert datasets.info("digits+classes0-4")["num_classes"] == 5


@pytest.mark.parametrize("bad", ["cifar10", "digits+blur", "blobs+rot90", "digits+classes3-12", ""])
def test_bad_names(bad):
    with pytest.raises(ConfigError):
        datasets.info(bad)


def test_base_datasets_are_cached_on_disk_and_a_corrupt_cache_is_regenerated(tmp_path, monkeypatch):
    monkeypatch.setenv("WSNETS_CACHE", str(tmp_path))
    ref = datasets._generate("digits")
    datasets._base.cache_clear()
    try:
        first = datasets._base("digits")
        path = tmp_path / "datasets" / f"digits-v{datasets._CACHE_VERSION}.safetensors"
        assert path.is_file()
        datasets._base.cache_clear()
        assert all(torch.equal(a, b) for a, b in zip(datasets._base("digits"), ref))  # read back from disk
        path.write_bytes(path.read_bytes()[:50])  # truncated
        datasets._base.cache_clear()
        assert all(torch.equal(a, b) for a, b in zip(datasets._base("digits"), ref))
        assert all(torch.equal(a, b) for a, b in zip(first, ref))
        assert len(path.read_bytes()) > 50  # rewritten whole
    finally:
        datasets._base.cache_clear()
