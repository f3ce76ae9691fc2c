"""Per-tensor merge methods: closed forms, exact counts, slices vs whole tensors, the registry."""

import math

import pytest
import torch

from wsnets.errors import ConfigError
from wsnets.merge import get_method, keep_count, list_methods, merge_checkpoints
from wsnets.merge.engine import run_in_memory, select
from wsnets.merge.registry import Option

TASK_METHODS = ["task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "model_stock"]


def _family(K=3, seed=0, scale=0.05, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = {"a.weight": torch.randn(24, 10, generator=g), "a.bias": torch.randn(24, generator=g),
            "b.weight": torch.randn(3, 4, 5, generator=g), "b.bias": torch.randn(3, generator=g)}
    base = {k: v.to(dtype) for k, v in base.items()}
    fts = [{k: (v.float() + scale * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()}
           for _ in range(K)]
    return base, fts


def _merge(method, fts, base=None, **kw):
    return merge_checkpoints(method, fts, base=base, **kw).tensors


def test_registry_reads_options_from_signatures():
    ms = list_methods()
    assert set(ms) == {"linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                       "breadcrumbs_ties", "model_stock"}
    ties = get_method("ties")
    d = ties.option("density")
    assert (d.per_model, d.default, d.type) == (True, 0.2, float) and "magnitude" in d.help
    assert get_method("dare-ties").option("rescale").choices == ("density", "l1", "none")
    assert get_method("average") is ms["linear"]
    opts = ties.resolve({"density": "0.3,0.5", "normalize": "false"}, 2)
    assert opts["density"] == (0.3, 0.5) and opts["weight"] == (1.0, 1.0) and opts["normalize"] is False
    with pytest.raises(ConfigError, match=r"ties \(ft2\): density 1.5 is outside \(0, 1\]"):
        ties.resolve({"density": [0.5, 1.5]}, 2, model_names=["ft1", "ft2"])
    with pytest.raises(ConfigError, match="density 0 is outside"):
        ties.resolve({"density": 0.0}, 2)
    with pytest.raises(ConfigError, match="unknown option 'densty'"):
        ties.resolve({"densty": 0.5}, 2)
    with pytest.raises(ConfigError, match="3 values of 'weight' for 2 models"):
        ties.resolve({"weight": [1, 2, 3]}, 2)
    with pytest.raises(ConfigError, match="unknown merge method 'tie'"):
        get_method("tie")
    assert Option("x", int, 0).parse("3", "m") == 3
    with pytest.raises(ConfigError, match="must be int"):
        Option("x", int, 0).parse("3.5", "m")


def test_keep_count_is_exact():
    # the example: 0.2 of MiniLM's 22,713,216 floating-point entries is 4,542,643.2 -> keep 4,542,644;
    # the product in float32 is 4,542,643.0 (one too few), and 0.07 * 100 in float64 is 7.000000000000001
    P = 22_713_216
    assert keep_count(0.2, P) == 4_542_644
    assert math.ceil(torch.tensor(0.2 * P).item()) == 4_542_643
    assert keep_count(0.07, 100) == 7 and math.ceil(0.07 * 100) == 8
    assert keep_count(1.0, 5) == 5 and keep_count(1e-9, 5) == 1 and keep_count(0.5, 0) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("largest", [True, False])
def test_select_equals_a_stable_sort(dtype, largest):
    g = torch.Generator().manual_seed(1)
    v = torch.randint(0, 40, (3, 1000), generator=g).to(dtype) * 0.125    # many ties
    v[1] = torch.rand(1000, generator=g).to(dtype)
    counts = [0, 137, 1000]
    order = torch.sort(v, dim=1, descending=largest, stable=True).indices
    ref = torch.zeros_like(v, dtype=torch.bool)
    for r, c in enumerate(counts):
        ref[r, order[r, :c]] = True
    assert torch.equal(select(v, counts, largest=largest), ref)
    counts = [5, 999, 500]
    for r, c in enumerate(counts):
        ref[r] = False
        ref[r, order[r, :c]] = True
    assert torch.equal(select(v, counts, largest=largest), ref)


def test_trim_counts_are_exact_on_many_ties():
    from wsnets.merge import trim
    tv = torch.ones(2, 10)
    t = trim(tv, 0.3)
    assert (t != 0).sum(1).tolist() == [3, 3] and t[:, :3].eq(1).all()      # the first three of equal values


@pytest.mark.parametrize("method", TASK_METHODS + ["linear", "slerp"])
def test_slices_give_the_same_numbers_as_whole_tensors(method):
    base, fts = _family()
    fts = fts[:2] if method == "slerp" else fts
    kw = {"rescale": "l1", "seed": 3} if method.startswith("dare") else {}
    b = None if method in ("linear", "slerp") else base
    models = fts if b is not None else ([base, *fts] if method == "linear" else fts)
    whole = _merge(method, models, b, scope="tensor", **kw)
    sliced = _merge(method, models, b, scope="tensor", chunk_mb=64 / 2**20, **kw)       # 16 floats a slice
    for k in whole:
        torch.testing.assert_close(sliced[k], whole[k], atol=1e-6, rtol=1e-6)
    if method == "model_stock":
        a = _merge(method, models, b, filter_wise=True)
        s = _merge(method, models, b, filter_wise=True, chunk_mb=16 / 2**20)          # slices inside rows
        for k in a:
            torch.testing.assert_close(s[k], a[k], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", TASK_METHODS)
def test_identical_models_return_the_model(method):
    base, _ = _family()
    same = [dict(base), dict(base)]
    out = _merge(method, same, base)
    for k in base:
        torch.testing.assert_close(out[k], base[k], atol=0, rtol=0)
    # fine-tunes identical to each other (not to the base): averages and model stock return them
    _, (ft, *_) = _family()
    for m in ("linear", "model_stock"):
        out = _merge(m, [ft, ft], None if m == "linear" else base)
        for k in ft:
            torch.testing.assert_close(out[k], ft[k], atol=1e-6, rtol=1e-6)


def test_linear_is_the_weighted_average():
    _, fts = _family()
    out = _merge("linear", fts, weight=[1, 2, 5])
    for k in out:
        torch.testing.assert_close(out[k], (fts[0][k] + 2 * fts[1][k] + 5 * fts[2][k]) / 8)
    out = _merge("linear", fts, weight=[0.5, 0.25, 0.25], normalize=False)
    torch.testing.assert_close(out["a.bias"], 0.5 * fts[0]["a.bias"] + 0.25 * (fts[1]["a.bias"] + fts[2]["a.bias"]))
    with pytest.raises(ConfigError, match="sum to 0"):
        _merge("linear", fts, weight=[1, -1, 0])
    with pytest.raises(ConfigError, match="sum to 2, not 1"):
        _merge("linear", fts, weight=[1, 0.5, 0.5], normalize=False)


def test_ties_at_density_one_is_task_arithmetic():
    base, fts = _family()
    for scope in ("tensor", "model"):
        a = _merge("ties", fts[:1], base, density=1.0, scale=0.7, scope=scope)
        b = _merge("task_arithmetic", fts[:1], base, scale=0.7)
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
            assert (a[k] - base[k]).abs().max() > 1e-3
    # several task vectors whose signs agree everywhere: the disjoint sum is their sum
    pos = [{k: base[k] + (f[k] - base[k]).abs() for k in base} for f in fts]
    a = _merge("ties", pos, base, density=1.0, normalize=False)
    b = _merge("task_arithmetic", pos, base, scale=1.0)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_ties_follows_the_paper_elementwise():
    base, fts = _family(K=3, seed=4)
    got = _merge("ties", fts, base, density=0.3, scale=0.8, scope="tensor")
    for k in base:
        tv = torch.stack([f[k] - base[k] for f in fts]).flatten(1)
        n = tv.shape[1]
        kept = torch.zeros_like(tv)
        for t in range(3):
            idx = sorted(range(n), key=lambda p: (-abs(float(tv[t, p])), p))[:keep_count(0.3, n)]
            kept[t, idx] = tv[t, idx]
        out = torch.zeros(n)
        for p in range(n):
            col = [float(v) for v in kept[:, p]]
            s = sum(col)
            agree = [v for v in col if v != 0 and (v > 0) == (s > 0) and s != 0]
            out[p] = sum(agree) / len(agree) if agree else 0.0
        torch.testing.assert_close(got[k].flatten(), base[k].flatten() + 0.8 * out, atol=1e-5, rtol=1e-5)


def test_model_scope_trims_over_the_whole_model():
    base, fts = _family(K=2, seed=2)
    got = _merge("ties", fts, base, density=0.25, scope="model")
    tv = torch.stack([torch.cat([(f[k] - base[k]).flatten() for k in base]) for f in fts])
    P = tv.shape[1]
    kept_per_model = []
    for t in range(2):
        thr = tv[t].abs().sort(descending=True).values[keep_count(0.25, P) - 1]
        kept_per_model.append(int((tv[t].abs() >= thr).sum()))
    assert kept_per_model == [keep_count(0.25, P)] * 2               # no ties: exactly the count
    flat = torch.cat([(got[k] - base[k]).flatten() for k in base])
    assert 0 < int((flat != 0).sum()) <= 2 * keep_count(0.25, P)


def test_slerp_endpoints_and_closed_form():
    _, (a, b, _) = _family()
    for t, ref in ((0.0, a), (1.0, b)):
        out = _merge("slerp", [a, b], t=t)
        for k in a:
            torch.testing.assert_close(out[k], ref[k], atol=1e-6, rtol=0)
    x, y = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])      # 90 degrees apart
    out = _merge("slerp", [{"v": x}, {"v": y}], t=0.5)["v"]
    c = math.sin(math.pi / 4) / math.sin(math.pi / 2)
    torch.testing.assert_close(out, c * x + c * y)
    par = _merge("slerp", [{"v": x}, {"v": 3 * x}], t=0.25)["v"]        # collinear: linear fallback
    torch.testing.assert_close(par, 0.75 * x + 0.25 * 3 * x)
    with pytest.raises(ConfigError, match="exactly 2 models"):
        _merge("slerp", [a, b, a])


def test_dare_is_seeded_and_unbiased():
    base, fts = _family(K=2)
    one = _merge("dare_linear", fts, base, density=0.3, seed=5)
    again = _merge("dare_linear", fts, base, density=0.3, seed=5, chunk_mb=64 / 2**20)
    other = _merge("dare_linear", fts, base, density=0.3, seed=6)
    for k in one:
        assert torch.equal(one[k], again[k])
    assert any(not torch.equal(one[k], other[k]) for k in one)
    # kept fraction ~ density; rescaled by 1 / density the expected task vector is unchanged
    big = {"w": torch.zeros(200_000)}
    ft = {"w": torch.ones(200_000)}
    out = _merge("dare_linear", [ft], big, density=0.3, seed=1)["w"]
    frac = float((out != 0).float().mean())
    assert abs(frac - 0.3) < 0.005 and torch.allclose(out[out != 0], torch.tensor(1 / 0.3))
    assert abs(float(out.mean()) - 1.0) < 0.02
    # density 1 keeps everything: DARE-linear is task arithmetic, DARE-TIES is TIES at density 1
    for m, ref in (("dare_linear", "task_arithmetic"), ("dare_ties", "ties")):
        a = _merge(m, fts, base, density=1.0)
        b = _merge(ref, fts, base, **({"density": 1.0} if ref == "ties" else {"scale": 1.0}))
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_breadcrumbs_drops_outliers_and_small_entries():
    base = {"w": torch.zeros(100)}
    ft = {"w": torch.arange(1, 101, dtype=torch.float32)}             # magnitudes 1..100
    out = _merge("breadcrumbs", [ft], base, density=0.5, gamma=0.1)["w"]
    kept = (out != 0).nonzero().squeeze(1) + 1
    assert kept.tolist() == list(range(41, 91))                         # 10 largest and 40 smallest dropped
    out = _merge("breadcrumbs", [ft], base, density=0.95, gamma=0.1)["w"]
    assert out[:95].ne(0).all() and out[95:].eq(0).all()            # 5 outliers go when 10 and 95 kept do not fit


def test_model_stock_closed_form():
    base = {"w": torch.zeros(2)}
    a, b = {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}   # cos = 0: t = 0, the base
    torch.testing.assert_close(_merge("model_stock", [a, b], base)["w"], torch.zeros(2))
    c = {"w": torch.tensor([1.0, 1.0]) / math.sqrt(2)}                         # cos 45 degrees with a
    cos = 1 / math.sqrt(2)
    t = 2 * cos / (1 + cos)
    torch.testing.assert_close(_merge("model_stock", [a, c], base)["w"], t * (a["w"] + c["w"]) / 2)
    with pytest.raises(ConfigError, match="at least 2 models besides the base"):
        _merge("model_stock", [a], base)


def test_running_statistics_average_the_fine_tunes():
    base = {"bn.weight": torch.ones(4), "bn.running_mean": torch.zeros(4), "bn.num_batches_tracked": torch.tensor(3)}
    fts = [{"bn.weight": torch.full((4,), 2.0), "bn.running_mean": torch.full((4,), float(i)),
            "bn.num_batches_tracked": torch.tensor(10 + i)} for i in (1, 3)]
    r = merge_checkpoints("ties", fts, base=base, density=1.0)
    assert r.stats == ["bn.running_mean"] and r.copied == ["bn.num_batches_tracked"]
    torch.testing.assert_close(r.tensors["bn.running_mean"], torch.full((4,), 2.0))
    assert int(r.tensors["bn.num_batches_tracked"]) == 3                # copied from the base


def test_compute_dtype_is_float32_for_half_inputs():
    base, fts = _family(dtype=torch.bfloat16)
    r = merge_checkpoints("ties", fts, base=base, density=0.5)
    assert r.compute_dtype == "float32" and r.tensors["a.weight"].dtype == torch.bfloat16
    r32 = {k: v.float() for k, v in base.items()}
    ref = _merge("ties", [{k: v.float() for k, v in f.items()} for f in fts], r32, density=0.5)
    for k in ref:
        torch.testing.assert_close(r.tensors[k], ref[k].to(torch.bfloat16), atol=0, rtol=0)
    r = merge_checkpoints("ties", fts, base=base, density=0.5, dtype="float64", out_dtype="float32")
    assert r.compute_dtype == "float64" and r.tensors["a.weight"].dtype == torch.float32


def test_run_in_memory_leaves_inputs_alone():
    tv = torch.randn(3, 50)
    keep = tv.clone()
    m = get_method("ties")
    run_in_memory(m, m.resolve({}, 3), tv, torch.zeros(50))
    assert torch.equal(tv, keep)


def test_overflow_in_the_compute_dtype_is_an_error():
    from wsnets.errors import NonFiniteWeightsError
    base = {"w": torch.zeros(4, dtype=torch.float16)}
    fts = [{"w": torch.full((4,), 60000.0, dtype=torch.float16)}] * 2
    with pytest.raises(NonFiniteWeightsError, match="merging tensor 'w' overflowed the compute dtype float16"):
        merge_checkpoints("task_arithmetic", [dict(f) for f in fts], base=base, scale=1.0, dtype="float16")
    out = merge_checkpoints("task_arithmetic", [dict(f) for f in fts], base=base, scale=0.5).tensors["w"]
    assert out.dtype == torch.float16 and out.eq(60000).all()            # float32 compute by default
