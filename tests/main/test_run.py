"""The main job end to end on a tiny zoo: every stage runs and the report is complete and consistent."""

import json

import pytest

from wsnets.cli import main


def test_run_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "report"
    rc = main(["run", "--limit", "120", "--epochs", "1", "--methods", "graph,statnn-gbm,flatmlp,esd-alpha",
               "--cache", str(tmp_path / "cache"), "--out", str(out), "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["methods"]) == {"graph", "statnn-gbm", "flatmlp", "esd-alpha"}
    flat = res["methods"]["flatmlp"]   # one architecture of a 120-model zoo: too few models, reported not fatal
    assert flat.get("only_architecture", "").startswith("mlp:") or "no rows" in flat["error"]
    for m in ("graph", "statnn-gbm", "esd-alpha"):
        tau = res["methods"][m]["test"]["test_acc"]["kendall_tau"]["mean"]
        assert -1.0 <= tau <= 1.0, m
    assert set(res["regions"]) == {"graph", "statnn-gbm"}
    for m in ("graph", "statnn-gbm"):
        acc = res["regions"][m]["test"]["dataset"]["accuracy"]["mean"]
        assert 0.0 <= acc <= 1.0
    saved = json.loads((out / "results.json").read_text())
    assert saved["methods"]["statnn-gbm"]["test"] == res["methods"]["statnn-gbm"]["test"]
    md = (out / "results.md").read_text()
    assert "StatNN (GBM)" in md and "ESD mean α" in md and "dataset accuracy" in md and "FlatMLP" in md
    for png in ("predicted_vs_true.png", "esd_alpha_vs_test_acc.png", "embeddings_regions.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG", saved["plots"].get(png)
    # the second run reuses the cached zoos (no rebuild): same zoo directory
    assert res["zoo"].startswith(str(tmp_path / "cache"))


def test_unknown_method_fails_fast(tmp_path, capsys):
    rc = main(["run", "--methods", "graph,nope", "--cache", str(tmp_path), "--out", str(tmp_path / "r")])
    assert rc == 2
    assert "nope" in capsys.readouterr().err
    assert not any(tmp_path.iterdir()) or not (tmp_path / "r").exists()
