"""Heads (target normalization, losses) and the config registry."""

import pytest
import torch
import torch.nn.functional as F

import wsnets
from wsnets.errors import ConfigError, ShapeMismatchError
from wsnets.nn import ClassificationHead, RegressionHead, build_encoder, build_gbm, build_head, represent

from .helpers import ARCHS, mixed, nets


def test_regression_head_normalizes_targets():
    y = torch.tensor([[0.5, 10.0], [0.7, 30.0], [0.9, 20.0], [float("nan"), 40.0]])
    head = RegressionHead(8, 2).fit_targets(y)
    torch.testing.assert_close(head.y_mean, torch.tensor([0.7, 25.0]))
    yn = head.normalize(y)
    torch.testing.assert_close(torch.nanmean(yn, 0), torch.zeros(2), atol=1e-6, rtol=0)
    z = torch.randn(4, 8)
    torch.testing.assert_close(head(z), head.denormalize(head.forward_normalized(z)))
    assert torch.isfinite(head.loss(z, y))  # NaN targets are ignored
    # the loss lives in standardized units: rescaling targets (and refitting) does not change it
    head2 = RegressionHead(8, 2)
    head2.load_state_dict(head.state_dict())
    head2.fit_targets(y * 1000 - 3)
    torch.testing.assert_close(head2.loss(z, y * 1000 - 3), head.loss(z, y))
    with pytest.raises(ShapeMismatchError, match="2 target"):
        head.loss(z, torch.zeros(4, 3))


def test_classification_head_is_cross_entropy():
    head = ClassificationHead(8, 5)
    z, y = torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    torch.testing.assert_close(head.loss(z, y), F.cross_entropy(head(z), y))
    assert head.predict(z).tolist() == head(z).argmax(1).tolist()
    with pytest.raises(ShapeMismatchError, match=r"\[0, 5\)"):
        head.loss(z, torch.tensor([0, 1, 2, 3, 4, 5]))


@pytest.mark.parametrize("config", [
    {"name": "graph", "hidden": 8, "layers": 1, "out_dim": 5},
    {"name": "transformer", "hidden": 8, "layers": 1, "heads": 2, "out_dim": 5},
    {"name": "np", "hidden": 4, "layers": 1, "out_dim": 5},
    {"name": "hnp", "hidden": 4, "layers": 1, "out_dim": 5},
    {"name": "stats", "out_dim": 5},
    {"name": "flat", "out_dim": 5, "permutation_augment": True},
    {"name": "esd", "out_dim": 5},
])
def test_every_encoder_builds_from_config_and_embeds(config):
    ws = nets(ARCHS["mlp_bn"], 3)
    enc = build_encoder(config, ws)
    assert enc.representation in ("graph", "tensors", "flat", "stats", "esd")
    out = enc.eval()(represent(enc, ws))
    assert out.shape == (3, enc.out_dim) == (3, 5)
    head = build_head({"name": "classification", "n_classes": 4, "hidden": []}, enc.out_dim)
    assert head(out).shape == (3, 4)


def test_graph_encoders_need_no_example_and_take_mixed_lists():
    enc = build_encoder({"name": "graph", "hidden": 8, "layers": 1})
    assert enc(represent("graph", mixed())).shape == (8, enc.out_dim)


def test_bad_configs_are_config_errors():
    ws = nets(ARCHS["mlp"], 2)
    with pytest.raises(ConfigError, match="unknown encoder 'gnn'"):
        build_encoder({"name": "gnn"})
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['width'\]"):
        build_encoder({"name": "graph", "width": 3})
    with pytest.raises(ConfigError, match="one architecture"):
        build_encoder({"name": "hnp"})
    with pytest.raises(ConfigError, match="needs a 'name'"):
        build_head({"n_targets": 1}, 4)
    with pytest.raises(ConfigError, match="n_classes"):
        build_head({"name": "classification"}, 4)
    with pytest.raises(wsnets.ArchitectureMismatchError):
        build_encoder({"name": "np"}, mixed())
    with pytest.raises(ConfigError, match="unknown representation"):
        represent("pixels", ws)
    assert build_gbm({"name": "esd_gbm", "max_iter": 5}).representation == "esd"


@pytest.mark.parametrize("name", ["stats", "esd"])
def test_feature_encoders_take_an_explicit_in_features_when_it_matches(name):
    ws = nets(ARCHS["mlp"], 4)
    derived = build_encoder({"name": name, "out_dim": 3}, ws).in_features
    enc = build_encoder({"name": name, "out_dim": 3, "in_features": derived}, ws)
    assert enc.in_features == derived
    assert enc(represent(enc, ws)).shape == (4, 3)
    assert float(enc.std.sub(1).abs().sum()) > 0        # the example still fits the standardization
    bare = build_encoder({"name": name, "in_features": derived})   # no example needed
    assert bare.in_features == derived and float(bare.std.sub(1).abs().sum()) == 0
    with pytest.raises(ConfigError, match=f"in_features={derived + 1} but the example networks give {derived}"):
        build_encoder({"name": name, "in_features": derived + 1}, ws)
    for bad in (0, "7", 2.5, True):
        with pytest.raises(ConfigError, match="positive integer"):
            build_encoder({"name": name, "in_features": bad})
    with pytest.raises(ConfigError, match="needs 'in_features'"):
        build_encoder({"name": name})
