"""Recipes: shipped files parse, draws are per model and deterministic, bad recipes are clear errors."""

from pathlib import Path

import pytest

from wsnets.errors import ConfigError
from wsnets.zoo import load_recipe, parse_recipe, plan
from wsnets.zoo import datasets as zds

ZOO = Path(__file__).resolve().parents[2] / "zoo"


@pytest.mark.parametrize("name", ["digits-mlp", "digits-cnn", "mnist1d-cnn", "regions"])
def test_shipped_recipes_parse_and_plan(name):
    r = load_recipe(ZOO / f"{name}.toml")
    assert load_recipe(name).digest == r.digest  # a bare name finds zoo/<name>.toml
    groups = plan(r)
    assert sum(len(g.runs) for g in groups) == r.population
    assert all(len(g.runs) <= r.group_size and len({x.arch for x in g.runs}) == 1 for g in groups)
    assert sorted(x.index for g in groups for x in g.runs) == list(range(r.population))


def test_regions_has_six_datasets_in_three_tasks():
    r = load_recipe(ZOO / "regions.toml")
    assert len(r.datasets) >= 6 and len({zds.info(d)["task"] for d in r.datasets}) >= 3
    assert r.pretrain and len({x.arch for x in r.runs()}) == 1


def test_draws_are_per_model_and_deterministic():
    r = load_recipe(ZOO / "digits-mlp.toml")
    a, b = r.runs(50), r.runs()[:50]
    assert [(x.model_id, x.seed, x.hp, x.arch) for x in a] == [(x.model_id, x.seed, x.hp, x.arch) for x in b]
    lrs = [x.hp["lr"] for x in r.runs()]
    assert 5e-4 <= min(lrs) < 1e-3 and 0.3 < max(lrs) <= 0.5  # log-uniform covers its range
    wd = [x.hp["weight_decay"] for x in r.runs()]
    assert 0.3 < sum(w == 0 for w in wd) / len(wd) < 0.5  # zero = 0.4
    assert {x.depth for x in r.runs()} == {1, 2, 3, 4} and {x.width for x in r.runs()} == {8, 16, 32, 64}


@pytest.mark.parametrize("patch, msg", [
    ({"colour": 1}, "unknown key"), ({"datasets": ["imagenet"]}, "unknown dataset"),
    ({"hyperparameters": {"lr": {"log_uniform": [0, 1]}}}, "positive"),
    ({"hyperparameters": {"momentun": 0.9}}, "unknown hyperparameter"),
    ({"checkpoints": [5]}, "checkpoints"), ({"hyperparameters": {"lr": {"uniform": [1]}}}, "interval"),
])
def test_bad_recipes(patch, msg):
    raw = {"name": "x", "population": 3, "datasets": ["digits"], "epochs": 2}
    raw.update(patch)
    with pytest.raises(ConfigError, match=msg):
        parse_recipe(raw).runs()
