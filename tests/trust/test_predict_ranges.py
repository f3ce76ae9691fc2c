"""Predictions that know their limits: each meta-model records what it was trained on; predict flags networks
outside that range (and says why), shows the meta-model's own test metrics, clips bounded targets, reads
half/double precision and batches of mixed depths, and still loads runs saved without the new metadata."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import wsnets
from wsnets.cli import main
from wsnets.train import MetaModel, load_config, run_training
from wsnets.zoo import ZooDataset, build, open as open_zoo, parse_recipe

ROOT = Path(__file__).resolve().parents[2]
MLP = {"name": "r", "seed": 4, "population": 48, "datasets": ["digits"], "epochs": 2, "checkpoints": [2],
       "batch_size": 128, "architecture": {"kind": "mlp", "depth": [1, 2], "width": [8, 16]},
       "hyperparameters": {"lr": {"log_uniform": [1e-3, 0.2]}, "train_fraction": {"uniform": [0.3, 1.0]}}}


def _train(config: str, zoo: Path, out: Path, *sets: str):
    cfg = load_config(ROOT / "train" / f"{config}.toml", ["log.progress=false", *sets])
    return run_training(cfg, zoo=zoo, out=out, plots=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("ranges")
    build(parse_recipe(MLP), d / "zoo", progress=False)
    _train("graph", d / "zoo", d / "graph", "encoder.hidden=8", "encoder.layers=1", "optim.epochs=2")
    _train("statnn-gbm", d / "zoo", d / "gbm", "encoder.max_iter=20")
    return d


def _save(module: nn.Module, path: Path, **kw) -> str:
    wsnets.load(module, **kw).save(path)
    return str(path)


def _predict_json(capsys, *argv) -> list[dict]:
    assert main(["predict", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_networks_unlike_the_training_zoo_are_flagged_with_the_reason(runs, tmp_path, capsys):
    torch.manual_seed(0)
    cnn = _save(nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                              nn.Linear(8, 10)), tmp_path / "cnn.safetensors", input_shape=(1, 8, 8))
    deep = _save(nn.Sequential(nn.Linear(64, 12), *[m for _ in range(4) for m in (nn.ReLU(), nn.Linear(12, 12))],
                               nn.ReLU(), nn.Linear(12, 10)), tmp_path / "deep.safetensors")
    test = ZooDataset(runs / "zoo", "graph", ["test_acc"], split="test").weightspaces()
    assert len(test) >= 5
    paths = []
    for i, w in enumerate(test):
        paths.append(str(tmp_path / f"t{i}.safetensors"))
        w.save(paths[-1])
    rows = _predict_json(capsys, cnn, deep, *paths, "--meta-model", runs / "graph")
    assert rows[0]["in_range"] is False and any("family cnn2d (trained on mlp)" in r for r in rows[0]["range_reasons"])
    assert rows[1]["in_range"] is False and any("depth 5 outside the trained 1-2" in r for r in rows[1]["range_reasons"])
    inside = [r["in_range"] for r in rows[2:]]
    assert sum(inside) >= 0.7 * len(inside)  # the zoo's own held-out networks: in range (threshold: training 0.99)
    assert all(r["distance"] >= 0 and r["threshold"] > 0 for r in rows)
    assert all(0 <= r["test_acc"] <= 1 for r in rows)
    assert main(["predict", cnn, paths[0], "--meta-model", str(runs / "graph")]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert "WARNING out of range" in lines[0] and "WARNING" not in lines[1]
    assert "1 of 2 network(s) lie outside" in err
    assert "its test split: test_acc τ" in lines[-1] and "trained on" in lines[-1] and "depth 1-2" in lines[-1]


def test_stats_meta_models_take_a_batch_of_mixed_depths_and_refuse_deeper_ones_per_network(runs, tmp_path, capsys):
    torch.manual_seed(1)
    one = _save(nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)), tmp_path / "a.safetensors")
    two = _save(nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 10)),
                tmp_path / "b.safetensors")
    five = _save(nn.Sequential(nn.Linear(64, 8), *[m for _ in range(4) for m in (nn.ReLU(), nn.Linear(8, 8))],
                               nn.ReLU(), nn.Linear(8, 10)), tmp_path / "c.safetensors")
    rows = _predict_json(capsys, one, two, five, "--meta-model", runs / "gbm")
    alone = [_predict_json(capsys, p, "--meta-model", runs / "gbm")[0] for p in (one, two)]
    for r, a in zip(rows[:2], alone):  # batched with another depth = predicted alone
        assert r["test_acc"] == pytest.approx(a["test_acc"], abs=1e-12)
    assert rows[2]["test_acc"] is None or rows[2]["test_acc"] != rows[2]["test_acc"]  # NaN: no prediction
    assert rows[2]["in_range"] is False and "deeper than every network" in rows[2]["range_reasons"][0]


def test_a_gbm_trains_on_a_zoo_whose_splits_have_different_depths(tmp_path):
    """Features are padded to the deepest architecture of the whole zoo, not of each split."""
    raw = {**MLP, "population": 12, "seed": 0, "name": "tiny", "epochs": 1, "checkpoints": [1]}
    build(parse_recipe(raw), tmp_path / "z", progress=False)
    widths = {s: ZooDataset(tmp_path / "z", "stats", ["test_acc"], split=s).features().shape[1]
              for s in ("train", "val", "test")}
    assert len(set(widths.values())) == 1
    res = _train("statnn-gbm", tmp_path / "z", tmp_path / "run", "encoder.max_iter=10")
    assert res["sizes"]["test"] > 0


def test_bounded_targets_are_clipped_and_the_raw_value_kept(runs, tmp_path, capsys):
    run = tmp_path / "shifted"
    shutil.copytree(runs / "graph", run)
    norm = json.loads((run / "normalization.json").read_text())
    for target, shift in (("test_acc", 3.0), ("gen_gap", -4.0)):   # the heads now answer far above 1 / below -1
        entry = norm[target]
        entry["mean"] += shift
        if "quantiles" in entry:    # heads trained on rank scores map back through the training quantiles
            entry["quantiles"] = [q + shift for q in entry["quantiles"]]
    (run / "normalization.json").write_text(json.dumps(norm))
    p = _save(nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)), tmp_path / "m.safetensors")
    r = _predict_json(capsys, p, "--meta-model", run)[0]
    assert r["test_acc"] == 1.0 and r["test_acc_unclipped"] > 1.5
    assert r["gen_gap"] == -1.0 and r["gen_gap_unclipped"] < -2
    df = MetaModel.load(run).predict([p])
    assert df["test_acc"].tolist() == [1.0]
    assert main(["predict", p, "--meta-model", str(run)]) == 0
    assert "(clipped from" in capsys.readouterr().out


def test_half_and_double_precision_weights_are_cast_and_said(runs, tmp_path, capsys):
    torch.manual_seed(2)
    m = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    f32 = _save(m, tmp_path / "f32.safetensors")
    torch.save({k: v.half() for k, v in m.state_dict().items()}, tmp_path / "f16.pt")
    torch.save({k: v.double() for k, v in m.state_dict().items()}, tmp_path / "f64.pt")
    for run in ("graph", "gbm"):
        rows = _predict_json(capsys, f32, tmp_path / "f16.pt", tmp_path / "f64.pt", "--meta-model", runs / run)
        assert rows[0]["cast"] is None and "float16 weights, computed in float32" in rows[1]["cast"]
        assert "float64" in rows[2]["cast"]
        assert rows[1]["test_acc"] == pytest.approx(rows[0]["test_acc"], abs=0.05)
        assert rows[2]["test_acc"] == pytest.approx(rows[0]["test_acc"], abs=1e-5)


def test_a_run_saved_without_the_range_still_loads_and_says_unknown(runs, tmp_path, capsys):
    run = tmp_path / "old"
    shutil.copytree(runs / "graph", run)
    meta = json.loads((run / "config.json").read_text())
    del meta["trained_on"], meta["test_metrics"]
    (run / "config.json").write_text(json.dumps(meta))
    (run / "reference.safetensors").unlink()
    p = _save(nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)), tmp_path / "m.safetensors")
    r = _predict_json(capsys, p, "--meta-model", run)[0]
    assert r["in_range"] is None and "unknown" in r["range_reasons"][0]
    assert main(["predict", p, "--meta-model", str(run)]) == 0
    assert "training range unknown" in capsys.readouterr().out


def test_region_classifiers_flag_networks_that_are_not_fine_tunes_of_their_bases(tmp_path, capsys):
    raw = {"name": "reg", "seed": 0, "population": 60, "epochs": 2, "checkpoints": [2], "batch_size": 128,
           "datasets": ["digits+noise0.3", "digits+flip", "digits+perm1"],
           "pretrain": {"dataset": "digits", "bases": 2, "epochs": 3, "optimizer": "adam", "lr": 0.003},
           "architecture": {"kind": "mlp", "depth": 1, "width": 16},
           "hyperparameters": {"optimizer": "adam", "lr": {"log_uniform": [3e-4, 3e-3]}}}
    build(parse_recipe(raw), tmp_path / "z", progress=False)
    _train("statnn-gbm", tmp_path / "z", tmp_path / "run", "encoder.max_iter=20", 'data.targets=["dataset"]')
    tuned = ZooDataset(tmp_path / "z", "stats", ["dataset"], split="test").weightspaces()
    torch.manual_seed(3)
    fresh = wsnets.load(nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)))
    scratch = open_zoo(tmp_path / "z")[0].load().map(lambda t: t + 0.5 * torch.randn_like(t))  # far from any base
    paths = []
    for i, w in enumerate([fresh, scratch, *tuned]):
        paths.append(str(tmp_path / f"n{i}.safetensors"))
        w.save(paths[-1])
    rows = _predict_json(capsys, *paths, "--meta-model", tmp_path / "run")
    for r in rows[:2]:
        assert r["in_range"] is False and any("not a fine-tune of the meta-model's bases" in x for x in r["range_reasons"])
        assert r["base_distance"] > r["base_threshold"]
    assert sum(r["in_range"] for r in rows[2:]) >= 0.7 * len(rows[2:])


def test_json_rows_share_one_schema_and_are_standard_json(runs, tmp_path, capsys):
    """Whatever happens to a network (read, cast, clipped, too deep for the features, foreign), every row of
    ``predict --json`` has the same keys, and the output is standard JSON (no NaN)."""
    test = ZooDataset(runs / "zoo", "graph", ["test_acc"], split="test").weightspaces()
    own = str(tmp_path / "own.safetensors")
    test[0].save(own)
    half = str(tmp_path / "half.safetensors")
    wsnets.WeightSpace(test[0].arch, {k: v.half() for k, v in test[0].params.items()}).save(half)
    deep = _save(nn.Sequential(nn.Linear(64, 12), *[m for _ in range(5) for m in (nn.ReLU(), nn.Linear(12, 12))],
                               nn.ReLU(), nn.Linear(12, 10)), tmp_path / "deep.safetensors")
    cnn = _save(nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                              nn.Linear(8, 10)), tmp_path / "cnn.safetensors", input_shape=(1, 8, 8))
    for run in ("graph", "gbm"):
        assert main(["predict", own, half, deep, cnn, "--meta-model", str(runs / run), "--json"]) == 0
        text = capsys.readouterr().out
        rows = json.loads(text, parse_constant=lambda c: pytest.fail(f"{run}: {c} in --json output"))
        assert len({tuple(sorted(r)) for r in rows}) == 1, [sorted(r) for r in rows]
        assert rows[0]["cast"] is None and "float16" in rows[1]["cast"]
        assert rows[0]["test_acc_unclipped"] == rows[0]["test_acc"]
    assert rows[2]["test_acc"] is None and rows[2]["in_range"] is False  # gbm: deeper than its features


def test_an_activation_the_meta_model_never_saw_is_out_of_range(runs, tmp_path):
    import dataclasses
    for run in ("graph", "gbm"):
        mm = MetaModel.load(runs / run)
        net = ZooDataset(runs / "zoo", "graph", ["test_acc"], split="test").weightspaces()[0]
        other = next(a for a in ("tanh", "sigmoid", "gelu") if a not in mm.trained_on.activations)
        arch = wsnets.Architecture(tuple(dataclasses.replace(l, fn=other) if l.kind == "act" else l
                                         for l in net.arch.layers), net.arch.input_shape)
        a, b = mm.predict_records([net, wsnets.WeightSpace(arch, dict(net.params))])
        assert not any("activation" in w for w in a["range_reasons"])
        assert b["in_range"] is False and f"activation {other} (trained on" in "; ".join(b["range_reasons"])


def test_graph_meta_model_answers_per_network_when_a_kernel_is_wider_than_it_reads(runs, tmp_path, capsys):
    """A graph encoder's edge features hold kernels up to the size it was trained with: a network with wider
    kernels gets a row saying so, and the rest of the batch is predicted (was: the whole batch refused)."""
    mm = MetaModel.load(runs / "graph")
    cap = mm._edge_capacity()
    assert cap is not None and cap < 25
    torch.manual_seed(1)
    wide = _save(nn.Sequential(nn.Conv2d(1, 4, 5, padding=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                               nn.Linear(4, 10)), tmp_path / "k5.safetensors", input_shape=(1, 8, 8))
    own = str(tmp_path / "own.safetensors")
    ZooDataset(runs / "zoo", "graph", ["test_acc"], split="test").weightspaces()[0].save(own)
    alone = _predict_json(capsys, own, "--meta-model", runs / "graph")[0]
    rows = _predict_json(capsys, wide, own, "--meta-model", runs / "graph")
    assert rows[1]["test_acc"] == pytest.approx(alone["test_acc"], abs=1e-6)
    assert rows[0]["test_acc"] is None and rows[0]["in_range"] is False
    assert f"largest kernel has 25 taps" in rows[0]["range_reasons"][0] and f"at most {cap}" in rows[0]["range_reasons"][0]


def test_a_convolution_of_another_stride_or_padding_is_out_of_range():
    """A CNN with the training networks' tensor shapes but another padding or stride computes another
    function: the range keeps each convolution's geometry, and a run saved without it checks none."""
    from wsnets.train.ranges import TrainingRange
    trained = wsnets.cnn(1, [4, 6], 10, stride=2, padding=1, input_shape=(1, 8, 8))
    r = TrainingRange.fit([trained] * 3)
    same = wsnets.WeightSpace.random(trained)
    for kw, what in (({"stride": 2, "padding": 0}, "k3x3/s2x2/p0x0"), ({"stride": 1, "padding": 1}, "k3x3/s1x1/p1x1")):
        other = wsnets.WeightSpace(wsnets.cnn(1, [4, 6], 10, input_shape=(1, 8, 8), **kw), dict(same.params))
        a, b = r.check([same, other])
        assert a["in_range"] and not a["reasons"]
        assert not b["in_range"] and b["reasons"] == [f"convolution {what} (trained on k3x3/s2x2/p1x1)"]
    old = {k: v for k, v in r.to_json().items() if k != "convs"}
    assert TrainingRange.from_json(old).check([other])[0]["in_range"]


def test_predict_says_when_a_meta_model_is_not_permutation_invariant():
    """FlatMLP reads the raw parameter vector: a permuted copy (the same function) gets another output, and
    predict's meta-model line says so; an invariant encoder's line does not."""
    from types import SimpleNamespace
    from wsnets.nn.baselines import FlatMLP
    from wsnets.symmetry import random_permute
    from wsnets.train.cli import _meta_model_line
    arch = wsnets.mlp(8, [6], 3)
    ws = wsnets.WeightSpace.random(arch, generator=torch.Generator().manual_seed(0))
    enc = FlatMLP(arch, out_dim=4, hidden=(16,)).eval()
    moved = random_permute(ws, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(enc(ws.batched()), enc(moved.batched()), atol=1e-4)
    lines = {name: _meta_model_line(SimpleNamespace(config={"encoder": {"name": name}}, test_metrics={},
                                                    trained_on=None), "RUN") for name in ("flat", "graph", "stats")}
    assert "not permutation invariant" in lines["flat"]
    assert not any("invariant" in lines[n] for n in ("graph", "stats"))
