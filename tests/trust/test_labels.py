"""Labels that say what a number is: validation metrics on the training bar, checkpoints vs models, the sign of
the mean-α row, the FlatMLP row's few test models."""

import importlib.util
from pathlib import Path

import pytest

from wsnets.cli import main
from wsnets.zoo import build, parse_recipe

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("train_fakes", ROOT / "tests" / "train" / "_fakes.py")
_fakes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fakes)


def test_the_training_bar_labels_validation_metrics_as_validation(tmp_path, capsys):
    from wsnets.train import run_training
    cfg = _fakes.config(epochs=1)
    cfg.log.progress = True
    run_training(cfg, out=tmp_path / "r", datasets=_fakes.splits(), plots=False)
    err = capsys.readouterr().err
    assert "val test_acc_tau=" in err and "val loss=" in err and "train loss=" in err
    assert ", test_acc_tau=" not in err  # never a bare test_* name for a validation number


def test_train_says_checkpoints_and_models(tmp_path, capsys):
    build(parse_recipe({"name": "l", "seed": 0, "population": 16, "datasets": ["digits"], "epochs": 2,
                        "checkpoints": [1, 2], "architecture": {"kind": "mlp", "depth": 1, "width": 8}}),
          tmp_path / "z", progress=False)
    assert main(["train", "statnn-gbm", "--zoo", str(tmp_path / "z"), "--out", str(tmp_path / "r"), "--no-progress",
                 "--encoder.max_iter", "5"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    import json
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    n, c = m["models"], m["sizes"]
    assert all(c[s] == 2 * n[s] for s in ("train", "val", "test"))  # two checkpoints per model
    assert f"checkpoints train/val/test: {c['train']}/{c['val']}/{c['test']} (of {n['train']}/{n['val']}/{n['test']} models)" \
        in first


def _res(slope: float, tau_line: float) -> dict:
    def ms(v):
        return {"mean": v, "std": 0.0, "n": 1}
    test = {"test_acc": {"kendall_tau": ms(tau_line), "r2": ms(0.02), "kendall_tau_raw_alpha": ms(-tau_line if slope < 0
                                                                                               else tau_line)},
            "gen_gap": {"kendall_tau": ms(0.05), "r2": ms(-0.05), "kendall_tau_raw_alpha": ms(0.05)}}
    flat = {"test": {"test_acc": {"kendall_tau": ms(0.81), "r2": ms(0.19)}, "gen_gap": {"kendall_tau": ms(0.7),
                                                                                       "r2": ms(-0.9)}},
            "sizes": {"test": 7}, "only_architecture": "mlp:64-8-10:relu"}
    return {"methods": {"flatmlp": flat, "esd-alpha": {"test": test, "slope": {"test_acc": slope, "gen_gap": 0.1},
                                                     "alpha": {"valid": 152}}},
            "timings": {"flatmlp": 1.0, "esd-alpha": 1.0, "total": 2.0}, "regions": {}}


def test_the_report_says_what_the_mean_alpha_row_is_and_flags_the_flatmlp_row():
    from wsnets.report import results_table
    table = results_table(_res(slope=-0.05, tau_line=0.086))
    row = next(line for line in table.splitlines() if line.startswith("| ESD mean α"))
    assert "‡" in row and "| 0.086 |" in row
    note = next(line for line in table.splitlines() if line.startswith("‡"))
    assert "slope -0.05" in note and "τ(α) = -0.086" in note and "sign of the slope" in note
    flat = next(line for line in table.splitlines() if line.startswith("| FlatMLP"))
    assert "only 7 test models" in flat
    assert "too noisy" in table
