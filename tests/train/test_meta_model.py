"""MetaModel artifact: save/load round trip, predict on any checkpoint form, GBM refit, clear errors."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _fakes  # noqa: E402

import wsnets  # noqa: E402
from wsnets.errors import ArchitectureMismatchError, CheckpointError, MissingKeyError  # noqa: E402
from wsnets.train import MetaModel, run_training  # noqa: E402


@pytest.fixture(scope="module")
def flat_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    res = run_training(_fakes.config(epochs=6), out=out, seeds=2, datasets=_fakes.splits())
    return out, res


def test_run_directory_and_metrics(flat_run):
    out, res = flat_run
    for f in ("model.safetensors", "config.json", "normalization.json", "metrics.json", "log.jsonl",
              "scatter_test_acc.png", "scatter_gen_gap.png", "confusion_dataset.png", "seeds/1/model.safetensors"):
        assert (out / f).is_file(), f
    m = json.loads((out / "metrics.json").read_text())
    taus = [s["test"]["test_acc"]["kendall_tau"] for s in m["seeds"]]
    agg = m["test"]["test_acc"]["kendall_tau"]
    assert agg["n"] == 2 and agg["mean"] == pytest.approx(sum(taus) / 2)
    assert agg["std"] == pytest.approx(torch.tensor(taus, dtype=torch.float64).std().item())
    assert taus[0] != taus[1]                            # two seeds really are two models
    events = [json.loads(l)["event"] for l in (out / "log.jsonl").read_text().splitlines()]
    assert events.count("test") == 2 and "epoch" in events


def test_load_predicts_like_the_trained_model(flat_run, tmp_path):
    out, res = flat_run
    mm = MetaModel.load(out)
    test = _fakes.FakeZooDataset(24, seed=2)            # the test split of the run
    rows = mm.predict_records(list(test.ws))
    pred = torch.tensor([r["test_acc"] for r in rows])
    tau = wsnets.train.kendall_tau(pred, test.y["test_acc"])
    assert tau == pytest.approx(res["seeds"][0]["test"]["test_acc"]["kendall_tau"], abs=1e-9)
    assert all(abs(sum(r["dataset_probs"].values()) - 1) < 1e-5 and r["dataset"] in _fakes.CLASSES for r in rows)
    # every checkpoint form gives the same answer
    net = test.ws[3]
    wsnets.save(net, tmp_path / "a.safetensors")
    torch.save(net.to_module().state_dict(), tmp_path / "b.pt")
    forms = [net, net.to_module(), net.to_module().state_dict(), tmp_path / "a.safetensors", str(tmp_path / "b.pt")]
    for p in mm.predict_records(forms):
        assert p["test_acc"] == pytest.approx(rows[3]["test_acc"], abs=1e-6)


def test_fixed_architecture_encoder_refuses_other_architectures(flat_run):
    mm = MetaModel.load(flat_run[0])
    other = wsnets.WeightSpace.random(wsnets.mlp(4, [7], 3))
    with pytest.raises(ArchitectureMismatchError, match="trained on"):
        mm.predict_records([other])


def test_graph_meta_model_takes_unseen_architectures(tmp_path):
    run_training(_fakes.config("tiny-graph", epochs=2), out=tmp_path, datasets=_fakes.splits("graph"), plots=False)
    mm = MetaModel.load(tmp_path)
    nets = [wsnets.WeightSpace.random(wsnets.mlp(4, [16, 8], 3)), wsnets.WeightSpace.random(_fakes.ARCH)]
    rows = mm.predict_records(nets)
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["test_acc"])) for r in rows)
    # invariance of the whole meta-model to hidden-neuron permutations
    p = mm.predict_records([wsnets.random_permute(nets[0])])[0]
    assert p["test_acc"] == pytest.approx(rows[0]["test_acc"], abs=1e-5)


def test_gbm_meta_model_round_trip(tmp_path):
    cfg = _fakes.config("stat_gbm", encoder={"max_iter": 20})
    res = run_training(cfg, out=tmp_path, datasets=_fakes.splits("stats"), plots=False)
    mm = MetaModel.load(tmp_path)                       # refits from the stored training features
    test = _fakes.FakeZooDataset(24, seed=2)
    rows = mm.predict_records(list(test.ws))
    tau = wsnets.train.kendall_tau(torch.tensor([r["test_acc"] for r in rows]), test.y["test_acc"])
    assert tau == pytest.approx(res["seeds"][0]["test"]["test_acc"]["kendall_tau"], abs=1e-12)
    assert res["seeds"][0]["test"]["test_acc"]["kendall_tau"] > 0.2


@pytest.mark.parametrize("missing", ["model.safetensors", "config.json", "normalization.json"])
def test_missing_file_is_one_line(flat_run, tmp_path, missing):
    import shutil
    run = tmp_path / "r"
    shutil.copytree(flat_run[0], run)
    (run / missing).unlink()
    with pytest.raises(MissingKeyError, match=f"missing {missing}") as e:
        MetaModel.load(run)
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        MetaModel.load(tmp_path / "nope")


def test_fixed_architecture_batch_mixing_architectures_answers_per_network(flat_run):
    """In a batch, networks a fixed-architecture meta-model cannot read get a row saying so; the others are
    predicted as they are alone (a batch of only foreign networks is still refused, as above)."""
    import math
    mm = MetaModel.load(flat_run[0])
    own = wsnets.WeightSpace.random(_fakes.ARCH)
    other = wsnets.WeightSpace.random(wsnets.mlp(4, [7], 3))
    alone = mm.predict_records([own])[0]
    rows = mm.predict_records([other, own, other])
    assert rows[1]["test_acc"] == pytest.approx(alone["test_acc"], abs=1e-6) and rows[1]["dataset"] == alone["dataset"]
    for r in (rows[0], rows[2]):
        assert math.isnan(r["test_acc"]) and r["dataset"] is None and r["in_range"] is False
        assert "fixed-architecture" in r["range_reasons"][0] and "mlp:4-7-3" in r["range_reasons"][0]
    assert len({tuple(sorted(r)) for r in rows}) == 1
