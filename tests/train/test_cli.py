"""``wsnets train`` / ``wsnets predict``: one-line errors with exit 2, predictions printed and as JSON."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _fakes  # noqa: E402

import wsnets  # noqa: E402
from wsnets.cli import main  # noqa: E402
from wsnets.train import run_training  # noqa: E402


def _err_line(capsys, argv, contains):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and contains in err, err
    return err


@pytest.mark.parametrize("body, contains", [
    ('[encoder]\nname = "graph"\n[optim]\nlearning_rate = 0.1\n', "unknown key 'optim.learning_rate'"),
    ('[encoder]\nname = "graph"\n[optim]\nepochs = "many"\n', "'optim.epochs' must be int"),
    ('[encoder]\nname = "graph"\n[data]\ntargets = ["accuracy"]\n', "unknown target 'accuracy'"),
])
def test_train_bad_config(tmp_path, capsys, body, contains):
    cfg = tmp_path / "c.toml"
    cfg.write_text(body)
    err = _err_line(capsys, ["train", str(cfg), "--zoo", str(tmp_path), "--out", str(tmp_path / "r")], contains)
    assert str(cfg) in err


def test_train_bad_overrides(tmp_path, capsys):
    cfg = Path(__file__).resolve().parents[2] / "train" / "graph.toml"
    base = ["train", str(cfg), "--zoo", str(tmp_path), "--out", str(tmp_path / "r")]
    _err_line(capsys, base + ["--set", "optim.lr=fast"], "'optim.lr' must be float")
    _err_line(capsys, base + ["--optim.nope", "1"], "unknown key 'optim.nope'")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run_training(_fakes.config(epochs=3), out=out, datasets=_fakes.splits(), plots=False)
    return out


def test_predict_text_and_json(run, tmp_path, capsys):
    nets = _fakes.FakeZooDataset(2, seed=7).ws
    paths = []
    for i, n in enumerate(nets):
        paths.append(str(tmp_path / f"m{i}.safetensors"))
        wsnets.save(n, paths[-1])
    assert main(["predict", *paths, "--meta-model", str(run), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    expect = wsnets.train.MetaModel.load(run).predict_records(list(nets))
    assert [r["checkpoint"] for r in rows] == paths
    assert [r["test_acc"] for r in rows] == pytest.approx([e["test_acc"] for e in expect], abs=1e-6)
    assert main(["predict", paths[0], "--meta-model", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(paths[0]) and "test_acc" in out and "dataset" in out


def test_predict_errors(run, tmp_path, capsys):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    (bad / "normalization.json").unlink()
    ck = tmp_path / "m.safetensors"
    wsnets.save(_fakes.FakeZooDataset(1).ws[0], ck)
    _err_line(capsys, ["predict", str(ck), "--meta-model", str(bad)], "missing normalization.json")
    _err_line(capsys, ["predict", str(tmp_path / "none.pt"), "--meta-model", str(run)], "no such file")
    other = tmp_path / "other.safetensors"
    wsnets.save(wsnets.WeightSpace.random(wsnets.mlp(4, [9], 3)), other)
    _err_line(capsys, ["predict", str(other), "--meta-model", str(run)], "trained on")


def test_python_m_wsnets_train_entry_point(tmp_path):
    """The module torchrun launches (``-m wsnets.train``) is the same command with the same errors."""
    import subprocess
    cfg = tmp_path / "c.toml"
    cfg.write_text('[encoder]\nname = "graph"\n[optim]\nepochs = 1.5\n')
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-m", "wsnets.train", str(cfg), "--zoo", str(tmp_path), "--out",
                        str(tmp_path / "r")], capture_output=True, text=True, cwd=root, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "'optim.epochs' must be int" in r.stderr
