"""ZooDataset splits and representations; the zoo command line."""

import json

import pytest
import torch

import wsnets
from wsnets.cli import main
from wsnets.zoo import ZooDataset, build, parse_recipe

RAW = {"name": "ds", "seed": 0, "population": 12, "datasets": ["digits", "digits+perm1", "digits+invert"],
       "epochs": 1, "checkpoints": [0, 1], "batch_size": 256,
       "architecture": {"kind": "mlp", "depth": [1, 2], "width": [8, 16], "activation": "relu"},
       "hyperparameters": {"lr": {"log_uniform": [1e-3, 0.3]}}}


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("zoo") / "z"
    torch.set_num_threads(1)
    build(parse_recipe(RAW), d, progress=False)
    return d


def test_splits_are_by_model_deterministic_and_cover_all(zoo_dir):
    parts = {s: ZooDataset(zoo_dir, "flat", split=s, fractions=(0.5, 0.25, 0.25)) for s in ("train", "val", "test")}
    ids = {s: {r["model_id"] for r in d.rows} for s, d in parts.items()}
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    assert sum(len(d) for d in parts.values()) == len(ZooDataset(zoo_dir, "flat", split="all")) == 24
    again = ZooDataset(zoo_dir, "flat", split="train", fractions=(0.5, 0.25, 0.25))
    assert [r["model_id"] for r in again.rows] == [r["model_id"] for r in parts["train"].rows]
    other = ZooDataset(zoo_dir, "flat", split="train", split_seed=1, fractions=(0.5, 0.25, 0.25))
    assert {r["model_id"] for r in other.rows} != ids["train"]


def test_ood_split_holds_out_width(zoo_dir):
    ood = {"width": ("<=", 8)}
    tr = ZooDataset(zoo_dir, "stats", split="train", ood=ood)
    va = ZooDataset(zoo_dir, "stats", split="val", ood=ood)
    te = ZooDataset(zoo_dir, "stats", split="test", ood=ood)
    assert all(r["width"] <= 8 for r in tr.rows + va.rows) and all(r["width"] > 8 for r in te.rows)
    assert len(tr) + len(va) + len(te) == 24 and len(te) > 0


@pytest.mark.parametrize("rep", ["graph", "tensors", "flat", "stats"])
def test_representations_and_targets(zoo_dir, rep):
    flt = {"arch_desc": "mlp:64-8-10:relu"} if rep == "tensors" else None
    ds = ZooDataset(zoo_dir, rep, targets=["test_acc", "gen_gap", "dataset", "task"], split="all", filter=flt)
    assert ds.classes("dataset") == sorted({"digits", "digits+perm1", "digits+invert"})
    assert ds.classes("task") == ["digits", "digits+perm1"]
    x, y = ds[0]
    assert y["test_acc"] == ds.rows[0]["test_acc"] and ds.classes("dataset")[y["dataset"]] == ds.rows[0]["dataset"]
    bx, by = ds.collate([ds[i] for i in range(len(ds))])
    assert by["dataset"].dtype == torch.long and by["test_acc"].dtype == torch.float32
    ws = ds.weightspaces()
    if rep == "graph":
        assert bx.num_graphs == len(ds)
        assert torch.equal(bx[1].edge_attr, ws[1].to_graph().edge_attr)
    elif rep == "tensors":
        assert bx.batch_size == len(ds) and torch.equal(bx.params["0.weight"][2], ws[2].params["0.weight"])
    elif rep == "flat":
        assert torch.equal(bx[3, :ws[3].flat().numel()], ws[3].flat()) and float(bx[3, ws[3].flat().numel():].abs().sum()) == 0
    else:
        assert torch.allclose(bx[3, :len(ws[3].stat_features())], ws[3].stat_features())
    assert len(next(iter(ds.loader(batch_size=5)))[1]["task"]) == 5


def test_tensors_of_mixed_archs_is_a_clear_error(zoo_dir):
    ds = ZooDataset(zoo_dir, "tensors", split="all")
    with pytest.raises(wsnets.ArchitectureMismatchError):
        ds.collate([ds[i] for i in range(len(ds))])
    with pytest.raises(wsnets.ConfigError):
        ZooDataset(zoo_dir, "pixels")
    with pytest.raises(wsnets.MissingKeyError):
        ZooDataset(zoo_dir, "flat", targets=["nope"])


def test_cli_info_json_plot_and_errors(zoo_dir, tmp_path, capsys):
    assert main(["zoo", "info", str(zoo_dir), "--json", "--plot", str(tmp_path / "h.png")]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["models"] == 12 and s["per_epoch"] == {"0": 12, "1": 12} or s["per_epoch"] == {0: 12, 1: 12}
    assert (tmp_path / "h.png").stat().st_size > 1000
    acc = sorted(r["test_acc"] for r in wsnets.zoo.open(zoo_dir).filter(epoch=1))
    assert s["test_acc_last_epoch"]["min"] == acc[0] and s["test_acc_last_epoch"]["max"] == acc[-1]
    assert main(["zoo", "info", str(tmp_path / "missing")]) == 2
    assert "error" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\npopulation = 2\ndatasets = ["cifar10"]\nepochs = 1\n')
    assert main(["zoo", "build", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cifar10" in err[0]
    assert main(["zoo", "build", str(bad), "--out", str(tmp_path / "o"), "--shard", "3/2"]) == 2


def test_esd_representation_matches_esd_features(zoo_dir):
    esd = pytest.importorskip("wsnets.esd")
    ds = ZooDataset(zoo_dir, "esd", targets=["task"], split="all", filter={"arch_desc": "mlp:64-16-16-10:relu"})
    assert len(ds) > 0
    bx, by = ds.collate([ds[i] for i in range(len(ds))])
    ref = esd.esd_features(wsnets.stack(ds.weightspaces())).float()
    assert bx.shape == ref.shape and torch.allclose(bx, ref, equal_nan=True)
