"""TOML configs: schema checking, overrides, and the shipped configs in train/."""

from pathlib import Path

import pytest

from wsnets.errors import ConfigError
from wsnets.train.config import apply_overrides, from_dict, load_config, split_cli_overrides

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_and_overrides():
    cfg = from_dict({"encoder": {"name": "graph", "hidden": 32}})
    assert cfg.optim.lr == 1e-3 and cfg.encoder["hidden"] == 32
    cfg2 = apply_overrides(cfg, ["optim.lr=0.01", "epochs=3", "data.targets=[\"dataset\"]", "encoder.hidden=8",
                                 "name=x y"])
    assert (cfg2.optim.lr, cfg2.optim.epochs, cfg2.data.targets, cfg2.encoder["hidden"], cfg2.name) == \
        (0.01, 3, ["dataset"], 8, "x y")
    assert cfg.optim.lr == 1e-3                      # the original is unchanged
    assert split_cli_overrides(["--optim.lr", "0.1", "--amp", "--patience=-1"]) == \
        ["optim.lr=0.1", "amp=true", "patience=-1"]


@pytest.mark.parametrize("d, msg", [
    ({"encoder": {"name": "g"}, "optim": {"lrr": 1}}, "unknown key 'optim.lrr'"),
    ({"encoder": {"name": "g"}, "optim": {"epochs": "ten"}}, "'optim.epochs' must be int"),
    ({"encoder": {"name": "g"}, "optim": {"amp": 1}}, "'optim.amp' must be bool"),
    ({"encoder": {"name": "g"}, "data": {"targets": ["acc"]}}, "unknown target 'acc'"),
    ({"encoder": {"name": "g"}, "bogus": 1}, "unknown key 'bogus'"),
    ({"encoder": {}}, "needs a 'name'"),
])
def test_bad_config_one_line(d, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        from_dict(d, "c.toml")
    assert "\n" not in str(e.value) and str(e.value).startswith("c.toml")


def test_bad_overrides():
    cfg = from_dict({"encoder": {"name": "g"}})
    with pytest.raises(ConfigError, match="unknown key 'nope'"):
        apply_overrides(cfg, ["nope=1"])
    with pytest.raises(ConfigError, match="must be float"):
        apply_overrides(cfg, ["optim.lr=fast"])


def test_shipped_configs_parse():
    files = sorted((ROOT / "train").glob("*.toml"))
    assert len(files) >= 8
    names = {load_config(f).encoder_name for f in files}
    assert {"graph", "transformer", "np", "hnp", "nfn-hnp", "stats", "stat_gbm", "flat", "esd"} <= names


def test_transformer_probes_is_transformer_with_probes():
    """The table's 'graph transformer + probes' config is transformer.toml with exactly the two options added."""
    import dataclasses
    plain = load_config("transformer", ["encoder.probes=32", "encoder.readout_norm=true"])
    probes = load_config("transformer-probes")
    assert probes.encoder == plain.encoder
    assert dataclasses.replace(probes, name=plain.name) == plain


def test_toml_errors(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[optim\nlr = 1")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(p)
    with pytest.raises(ConfigError, match="no such config"):
        load_config(tmp_path / "missing.toml")
