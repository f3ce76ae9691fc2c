import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import wsnets
from wsnets.cli import main
from wsnets.landscape import Surface
from wsnets.zoo import datasets


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    wsnets.save(wsnets.WeightSpace.random(wsnets.mlp(64, [4], 10), generator=torch.Generator().manual_seed(0)), path)
    return path


def _run(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_surface_json_npz_and_plots(ckpt, tmp_path, capsys):
    code, out, _ = _run(capsys, ["landscape", "surface", str(ckpt), "--dataset", "digits", "--grid", "5", "--json",
                                 "--out", str(tmp_path / "s.npz"), "--plot", str(tmp_path)])
    assert code == 0
    res = json.loads(out)
    x, y, _, _ = datasets.load("digits")
    ref = F.cross_entropy(wsnets.load(ckpt).to_module()(x), y)
    assert res["loss_at_model"] == pytest.approx(float(ref.detach()), rel=1e-5)
    s = Surface.load(tmp_path / "s.npz")
    assert s.loss.shape == (5, 5) and s.meta["dataset"] == "digits"
    assert np.isclose(s.loss[2, 2], res["loss_at_model"])
    assert all((tmp_path / p).stat().st_size > 0 for p in ("surface_contour.png", "surface_3d.png"))


def test_hessian_json(ckpt, capsys):
    code, out, _ = _run(capsys, ["landscape", "hessian", str(ckpt), "--top-k", "2", "--trace-samples", "20",
                                 "--slq-vectors", "2", "--slq-steps", "6", "--batch-size", "700", "--json"])
    assert code == 0
    res = json.loads(out)
    assert res["params"] == 64 * 4 + 4 + 4 * 10 + 10
    assert res["top_eigenvalues"][0] >= res["top_eigenvalues"][1]
    assert res["slq"]["max"] == pytest.approx(res["top_eigenvalues"][0], rel=0.2)


def test_bad_input_is_one_line_exit_2(ckpt, tmp_path, capsys):
    code, _, err = _run(capsys, ["landscape", "surface", str(ckpt), "--dataset", "mnist1d", "--grid", "3"])
    assert code == 2 and "mnist1d" in err and "expects (64,)" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, ["landscape", "intrinsic", str(ckpt), "--dims", "1,x"])
    assert code == 2 and "--dims" in err
    code, _, err = _run(capsys, ["landscape", "hessian", str(tmp_path / "missing.safetensors")])
    assert code == 2 and "missing.safetensors" in err
