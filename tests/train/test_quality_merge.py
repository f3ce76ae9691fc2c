"""benchmarks/metamodel_quality.py --merge: seeds of one method pooled across files, mismatches refused."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mq():
    spec = importlib.util.spec_from_file_location("metamodel_quality", ROOT / "benchmarks" / "metamodel_quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _part(methods, ood=None):
    def entry(seeds):
        per = [{"seed": s, "test": {"test_acc": {"kendall_tau": v, "r2": v}, "gen_gap": {"kendall_tau": -v, "r2": v}}}
               for s, v in seeds.items()]
        return {"test": {}, "sizes": {"train": 7, "val": 2, "test": 3}, "wall_s": 10.0, "run": None, "per_seed": per}
    return {"zoo": "z", "targets": ["test_acc", "gen_gap"], "filter": ["epoch=15"], "ood": ood, "seeds": 1,
            "methods": {m: entry(s) for m, s in methods.items()}}


def test_merge_pools_seeds_and_recomputes_mean_std(mq, tmp_path, capsys):
    a = _part({"graph": {0: 0.6}, "statnn-gbm": {0: 0.5, 1: 0.5, 2: 0.5}})
    b = _part({"graph": {1: 0.7, 2: 0.8}})
    out = mq.merge([a, b])
    g = out["methods"]["graph"]
    assert [x["seed"] for x in g["per_seed"]] == [0, 1, 2] and g["wall_s"] == 20.0
    assert g["test"]["test_acc"]["kendall_tau"]["mean"] == pytest.approx(0.7)
    assert g["test"]["test_acc"]["kendall_tau"]["std"] == pytest.approx(0.1)   # sample std (ddof 1)
    assert g["test"]["gen_gap"]["kendall_tau"]["mean"] == pytest.approx(-0.7)
    assert out["seeds"] == 3
    files = [tmp_path / "a.json", tmp_path / "b.json"]
    for f, part in zip(files, (a, b)):
        f.write_text(json.dumps(part))
    assert mq.main(["--merge", *map(str, files), "--out", str(tmp_path / "m.json")]) == 0
    assert "| neural-graph encoder (PNA) | 0.700 ± " in capsys.readouterr().out
    assert json.loads((tmp_path / "m.json").read_text())["methods"]["graph"]["test"] == json.loads(json.dumps(g["test"]))


def test_merge_refuses_a_seed_twice_and_different_splits(mq):
    with pytest.raises(SystemExit, match=r"graph has seed\(s\) \[0\] twice"):
        mq.merge([_part({"graph": {0: 0.6}}), _part({"graph": {0: 0.7}})])
    with pytest.raises(SystemExit, match="differ in 'ood'"):
        mq.merge([_part({"graph": {0: 0.6}}), _part({"graph": {1: 0.7}}, ood="width:<=:32")])
