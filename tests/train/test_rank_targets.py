"""Rank-score targets (``data.target_transform = "rank"``): the transform, its inverse, the artifact."""

import json
import sys
from pathlib import Path

import pytest
import torch
from scipy.stats import norm

sys.path.insert(0, str(Path(__file__).parent))
import _fakes  # noqa: E402

import wsnets  # noqa: E402
from wsnets.errors import CheckpointError  # noqa: E402
from wsnets.train import MetaModel, run_training  # noqa: E402
from wsnets.train.loop import normalization  # noqa: E402
from wsnets.train.meta_model import rank_score, rank_value  # noqa: E402


def test_rank_score_is_the_normal_score_of_the_empirical_cdf_and_inverts():
    g = torch.Generator().manual_seed(0)
    y = torch.rand(500, generator=g, dtype=torch.float64) ** 3          # skewed, like test accuracies of a zoo
    q = torch.quantile(y, (torch.arange(256, dtype=torch.float64) + 0.5) / 256)
    z = rank_score(y, q)
    ranks = y.argsort().argsort().double()
    inside = (y > q[0]) & (y < q[-1])                                   # the tails are clamped to the grid
    p = torch.tensor(norm.cdf(z.numpy()))                               # scipy's normal CDF of the score...
    assert (p - (ranks + 0.5) / 500)[inside].abs().max() < 1 / 256      # ...is the rank's quantile, up to the grid
    assert torch.equal(z[inside].argsort(), y[inside].argsort())        # strictly order-preserving
    torch.testing.assert_close(rank_value(z, q)[inside], y[inside])     # inverse within the grid
    assert rank_value(torch.tensor([-50.0, 50.0], dtype=torch.float64), q).tolist() == [q[0].item(), q[-1].item()]


def test_rank_targets_train_save_and_load(tmp_path):
    cfg = _fakes.config(epochs=4, data={"target_transform": "rank"})
    res = run_training(cfg, out=tmp_path, datasets=_fakes.splits(), plots=False)
    norm_ = json.loads((tmp_path / "normalization.json").read_text())
    assert len(norm_["test_acc"]["quantiles"]) == 256
    mm = MetaModel.load(tmp_path)
    test = _fakes.FakeZooDataset(24, seed=2)
    pred = torch.tensor([r.get("test_acc_unclipped", r["test_acc"]) for r in mm.predict_records(list(test.ws))])
    assert wsnets.train.kendall_tau(pred, test.y["test_acc"]) == pytest.approx(
        res["seeds"][0]["test"]["test_acc"]["kendall_tau"], abs=1e-9)
    lo, hi = norm_["test_acc"]["quantiles"][0], norm_["test_acc"]["quantiles"][-1]
    assert lo <= float(pred.min()) and float(pred.max()) <= hi          # predictions in target units
    norm_["test_acc"]["quantiles"] = [0.5, 0.1]
    (tmp_path / "normalization.json").write_text(json.dumps(norm_))
    with pytest.raises(CheckpointError, match="quantiles"):
        MetaModel.load(tmp_path)


def test_standard_normalization_is_unchanged():
    ds = _fakes.splits()["train"]
    n = normalization(ds, ["test_acc"])
    assert set(n["test_acc"]) == {"mean", "std"}


def test_an_ensemble_averages_its_members_and_round_trips(tmp_path):
    from wsnets.train.meta_model import MetaModelEnsemble
    cfg = _fakes.config(epochs=3, optim={"ensemble": 2})
    res = run_training(cfg, out=tmp_path, datasets=_fakes.splits(), plots=False)
    assert len(res["seeds"][0]["best_epoch"]) == 2
    mm = MetaModel.load(tmp_path)
    assert isinstance(mm, MetaModelEnsemble) and len(mm.members) == 2
    test = _fakes.FakeZooDataset(24, seed=2)
    x, _ = test.collate([test[i] for i in range(len(test))])
    out, parts = mm(x), [m(x) for m in mm.members]
    torch.testing.assert_close(out["test_acc"], (parts[0]["test_acc"] + parts[1]["test_acc"]) / 2)
    probs = (parts[0]["dataset"].softmax(-1) + parts[1]["dataset"].softmax(-1)) / 2
    torch.testing.assert_close(out["dataset"].softmax(-1), probs)
    assert not torch.allclose(parts[0]["test_acc"], parts[1]["test_acc"])     # two different members
    pred = torch.tensor([r.get("test_acc_unclipped", r["test_acc"]) for r in mm.predict_records(list(test.ws))])
    assert wsnets.train.kendall_tau(pred, test.y["test_acc"]) == pytest.approx(
        res["seeds"][0]["test"]["test_acc"]["kendall_tau"], abs=1e-9)


def test_a_transformer_run_saved_before_edge_values_and_io_codes_loads_as_it_was(tmp_path):
    """Runs saved before NeuralGraphTransformer gained io_code / edge values / local-attention factors lack those
    tensors; they load with them at zero, which is the old model (checked against the old class by hand: 1.6e-7)."""
    from safetensors.torch import load_file, save_file
    cfg = _fakes.config("transformer", epochs=1, encoder={"hidden": 8, "layers": 1, "heads": 2, "out_dim": 8})
    run_training(cfg, out=tmp_path, datasets=_fakes.splits("graph"), plots=False)
    full = load_file(tmp_path / "model.safetensors")
    new = [k for k in full if {"io_code", "value_fwd", "value_bwd", "value_dir", "neighbour"} & set(k.split("."))]
    assert any("io_code" in k for k in new) and any("neighbour" in k for k in new)
    save_file({k: v for k, v in full.items() if k not in new}, tmp_path / "model.safetensors",
              metadata={"wsnets.metamodel": "wsnets.metamodel/1"})
    old = MetaModel.load(tmp_path)
    assert all(not old.state_dict()[k].any() for k in new)
    test = _fakes.FakeZooDataset(12, seed=2, representation="graph")
    x, _ = test.collate([test[i] for i in range(len(test))])
    ref = MetaModel.load(tmp_path)                      # the same weights with the new tensors zeroed by hand
    sd = {**full, **{k: torch.zeros_like(v) for k, v in full.items() if k in new}}
    ref.load_state_dict(sd)
    torch.testing.assert_close(old(x)["test_acc"], ref(x)["test_acc"])
    assert not torch.allclose(old(x)["test_acc"], _loaded_with(full, tmp_path)(x)["test_acc"])
    full_missing = {k: v for k, v in full.items() if not k.endswith("qkv.weight")}
    save_file(full_missing, tmp_path / "model.safetensors", metadata={"wsnets.metamodel": "wsnets.metamodel/1"})
    with pytest.raises(wsnets.errors.MissingKeyError, match="qkv.weight"):   # other missing tensors still refused
        MetaModel.load(tmp_path)


def _loaded_with(tensors, run):
    mm = MetaModel.load(run)
    mm.load_state_dict(tensors)
    return mm.eval()
