"""Recipes: shipped files parse, draws are per model and deterministic, bad recipes are clear errors."""

from pathlib import Path

import pytest

from wsnets.errors import ConfigError
from wsnets.zoo import load_recipe, parse_recipe, plan
from wsnets.zoo import datasets as zds

ZOO = Path(__file__).resolve().parents[2] / "zoo"


@pytest.mark.parametrize("name", ["digits-mlp", "digits-cnn", "mnist1d-cnn", "regions", "cnn-zoo"])
def test_shipped_recipes_parse_and_plan(name):
    r = load_recipe(ZOO / f"{name}.toml")
    assert load_recipe(name).digest == r.digest  # a bare name finds zoo/<name>.toml
    groups = plan(r)
    assert sum(len(g.runs) for g in groups) == r.population
    assert all(len(g.runs) <= r.group_size and len({x.arch for x in g.runs}) == 1 for g in groups)
    assert all(len({(x.dataset, x.hp["train_fraction"]) for x in g.runs}) == 1 for g in groups
               if r.steps_per_epoch == "subset")
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


def test_cnn_zoo_recipe_is_the_small_cnn_zoo():
    """The public zoo's network (4970 parameters on 2-d inputs), its checkpoint epochs and hyperparameter ranges;
    an epoch is a pass over the model's subset; 3 in 4 models on digits."""
    r = load_recipe("cnn-zoo")
    runs = r.runs()
    assert r.population >= 4000 and r.epochs == 86 and r.checkpoints == [0, 1, 2, 3, 20, 40, 60, 80, 86]
    two_d = [x for x in runs if x.dataset == "digits-img16"]
    assert {x.arch.num_params for x in two_d} == {4970} and 0.7 < len(two_d) / len(runs) < 0.8
    assert {x.arch.describe() for x in runs} == {f"cnn{d}d:1-16-16-16-10:{a}" for d in (1, 2) for a in ("relu", "tanh")}
    assert {x.hp["optimizer"] for x in runs} == {"sgd", "adam", "rmsprop"} and {x.hp["momentum"] for x in runs} == {0.0}
    assert {x.hp["init"] for x in runs} == {"normal", "truncated_normal", "he_normal", "glorot_normal", "orthogonal"}
    assert {x.hp["train_fraction"] for x in runs} == {0.1, 0.25, 0.5, 1.0}
    for key, lo, hi in (("lr", 5e-4, 5e-2), ("l2", 1e-8, 1e-2), ("init_std", 1e-3, 0.5), ("dropout", 0.0, 0.7)):
        v = [x.hp[key] for x in runs]
        assert lo <= min(v) and max(v) <= hi and (max(v) - min(v)) > 0.9 * (hi - lo), key
    g = plan(r)
    assert {x.steps for x in g if x.runs[0].dataset == "digits-img16"} == {1437 // 10 // 32, 359 // 32, 718 // 32, 1437 // 32}


def test_optional_hyperparameters_only_where_named():
    r = load_recipe("digits-mlp")
    assert not any(k in x.hp for x in r.runs(20) for k in ("init", "init_std", "l2"))
    assert r.steps(r.runs(3)) is None and r.bucket(r.runs(1)[0]) == r.runs(1)[0].structure


@pytest.mark.parametrize("patch, msg", [
    ({"hyperparameters": {"init": ["xavier"]}}, "init"), ({"hyperparameters": {"optimizer": "adagrad"}}, "optimizer"),
    ({"engine": "jax"}, "engine"), ({"steps_per_epoch": "half"}, "steps_per_epoch"),
    ({"datasets": ["digits-img"], "architecture": {"kind": "cnn", "padding": "full"}}, "padding"),
    ({"architecture": {"kind": "cnn"}}, "kind 'cnn' needs"),
])
def test_bad_training_options(patch, msg):
    raw = {"name": "x", "population": 3, "datasets": ["digits"], "epochs": 2}
    raw.update(patch)
    with pytest.raises(ConfigError, match=msg):
        parse_recipe(raw).runs()


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
