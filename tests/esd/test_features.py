import torch

import wsnets
from wsnets.esd import esd_feature_names, esd_features, fit_powerlaw, layer_spectrum
from wsnets.symmetry import random_permute


def test_shape_names_and_batch_equals_single():
    arch = wsnets.mlp(64, [32, 32], 10)
    ws = wsnets.WeightSpace.random(arch, batch_size=3, generator=torch.Generator().manual_seed(1))
    f = esd_features(ws)
    assert f.shape == (3, len(esd_feature_names(arch)))
    assert torch.isfinite(f).all()
    torch.testing.assert_close(f[1], esd_features(ws[1]))


def test_invariant_to_hidden_permutations():
    # singular values do not change under row/column permutations
    ws = wsnets.WeightSpace.random(wsnets.mlp(16, [24, 12], 5), batch_size=2, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(esd_features(random_permute(ws)), esd_features(ws), rtol=1e-5, atol=1e-5)


def test_alpha_feature_is_the_fit_of_the_layer_spectrum():
    ws = wsnets.WeightSpace.random(wsnets.cnn(3, [8, 16], 10, dims=2), batch_size=2)
    f = esd_features(ws, fill=None)
    names = esd_feature_names(ws.arch)
    w = ws.params[f"{ws.arch.weight_layers[1].name}.weight"]
    ev = layer_spectrum(w[1], 4).evals
    expect = fit_powerlaw(ev).alpha[0]
    torch.testing.assert_close(f[1, names.index("layer1.alpha")].double(), expect, rtol=1e-6, atol=1e-6)


def test_too_small_layer_is_flagged_and_filled():
    ws = wsnets.WeightSpace.random(wsnets.mlp(4, [3], 2), batch_size=2)  # 3 and 2 eigenvalues < min_evals
    names = esd_feature_names(ws.arch)
    f = esd_features(ws)
    assert (f[:, names.index("layer0.fit_ok")] == 0).all()
    assert (f[:, names.index("layer0.alpha")] == 0).all()
    assert torch.isnan(esd_features(ws, fill=None)[:, names.index("layer0.alpha")]).all()


def test_nonfinite_network_gets_no_features_and_others_are_unaffected():
    ws = wsnets.WeightSpace.random(wsnets.mlp(16, [20], 12), batch_size=3)
    clean = esd_features(ws)
    ws.params["0.weight"][1, 2, 3] = float("nan")
    names = esd_feature_names(ws.arch)
    f = esd_features(ws, fill=None)
    assert f[1, names.index("layer0.fit_ok")] == 0 and torch.isnan(f[1, names.index("layer0.log_norm")])
    torch.testing.assert_close(torch.nan_to_num(f[[0, 2]], nan=0.0), clean[[0, 2]])
