"""A second corpus of bad and odd inputs, of kinds the first (``test_bad_input_corpus.py``) does not hold:
float8 weights, weights finite but too large for float32 arithmetic, zero-width layers, 1-d weights,
meta-device and quantized tensors; architecture JSON with a zero stride, a head count that does not
divide the width, a non-boolean bias; ``--module`` files that call ``sys.exit`` on import or that only
``torch.export`` can try; zoo indexes whose rows hold text in a metric, a NULL architecture, a negative
position, or point at a key, position, shard or shapes their shard does not have; option values out of
range (``--grid 0``, ``--range 1 -1``, ``--trace-samples 0``, ``--device banana``, ``--seeds a``) and a
config that is not UTF-8. Every command: one line on stderr, exit code 2, inputs untouched. The Python API
raises :class:`wsnets.errors.WSNetsError` subclasses for the same inputs.
"""

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import wsnets
import wsnets.esd
import wsnets.train
import wsnets.zoo
from wsnets import errors as E
from wsnets.cli import main

ROOT = Path(__file__).resolve().parents[2]
RECIPE = """name = "odd"
seed = 2
population = 12
datasets = ["digits"]
epochs = 1
batch_size = 128
[architecture]
kind = "mlp"
depth = 1
width = 6
"""


def _sd():
    torch.manual_seed(0)
    return {k: v.contiguous() for k, v in nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10)).state_dict().items()}


def _checkpoints(d: Path) -> list[Path]:
    sd = _sd()
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in sd.items()}, str(d / "float8.safetensors"))
    import warnings
    with warnings.catch_warnings():  # torch deprecates quantized tensors (we make one to see it refused)
        warnings.simplefilter("ignore")
        out = {"float8_e5m2.pt": {k: v.to(torch.float8_e5m2) for k, v in sd.items()},
               "huge32.pt": {**sd, "2.weight": torch.full((10, 8), 3e38)},
               "huge64.pt": {k: v.double() * 1e300 for k, v in sd.items()},
               "weight_1d.pt": {"0.weight": torch.zeros(8), "0.bias": torch.zeros(8)},
               "meta_device.pt": {k: torch.empty(v.shape, device="meta") for k, v in sd.items()},
               "quantized.pt": {k: torch.quantize_per_tensor(v, 0.1, 0, torch.qint8) for k, v in sd.items()}}
        for name, obj in out.items():
            torch.save(obj, d / name)
    save_file({"0.weight": torch.zeros(0, 64), "0.bias": torch.zeros(0), "2.weight": torch.zeros(10, 0),
               "2.bias": torch.zeros(10)}, str(d / "width0.safetensors"))
    return sorted(p for p in d.iterdir() if p.suffix in (".pt", ".safetensors"))


def _archs(d: Path) -> list[Path]:
    conv = {"kind": "conv2d", "name": "0", "in_features": 1, "out_features": 2, "kernel_size": [3, 3],
            "stride": [1, 1], "padding": [1, 1]}
    base = [conv, {"kind": "act", "fn": "relu"}, {"kind": "gap"}, {"kind": "flatten"},
            {"kind": "linear", "name": "3", "in_features": 2, "out_features": 10}]
    mha = {"kind": "mha", "name": "a", "out_features": 8, "heads": 3, "inputs": [0, 0, 0]}
    variants = {
        "zero_stride": {"layers": [{**conv, "stride": [0, 0]}] + base[1:], "input_shape": [1, 8, 8]},
        "negative_padding": {"layers": [{**conv, "padding": [-2, -2]}] + base[1:], "input_shape": [1, 8, 8]},
        "bias_text": {"layers": [{**conv, "bias": "yes"}] + base[1:], "input_shape": [1, 8, 8]},
        "zero_width": {"layers": [{**conv, "out_features": 0}] + base[1:], "input_shape": [1, 8, 8]},
        "input_shape_zero": {"layers": base, "input_shape": [1, 0, 8]},
        "heads_not_dividing": {"layers": [{"kind": "linear", "name": "p", "in_features": 8, "out_features": 8}, mha,
                                          {"kind": "mean", "dim": -2}], "input_shape": [4, 8]},
        "heads_zero": {"layers": [{"kind": "linear", "name": "p", "in_features": 8, "out_features": 8},
                                  {**mha, "heads": 0}, {"kind": "mean", "dim": -2}], "input_shape": [4, 8]},
        "layers_list_of_lists": {"layers": [[1, 2]], "input_shape": [64]},
        "a_list": [1, 2],
    }
    for name, obj in variants.items():
        (d / f"arch_{name}.json").write_text(json.dumps(obj))
    return sorted(d.glob("arch_*.json"))


def _modules(d: Path) -> list[str]:
    (d / "m_exit.py").write_text("import sys\nsys.exit(3)\n")
    (d / "m_branch.py").write_text(
        "from torch import nn\nclass Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.a = nn.Linear(64, 8)\n        self.b = nn.Linear(8, 10)\n    def forward(self, x):\n"
        "        if x.sum() > 0:\n            return self.b(self.a(x))\n        return self.b(self.a(x).relu())\n")
    (d / "m_width.py").write_text(
        "from torch import nn\nclass Net(nn.Module):\n    def __init__(self, w=8):\n        super().__init__()\n"
        "        self.s = nn.Sequential(nn.Linear(64, w), nn.ReLU(), nn.Linear(w, 10))\n"
        "    def forward(self, x):\n        return self.s(x)\n")
    return [f"{d / 'm_exit.py'}:Net", f"{d / 'm_branch.py'}:Net", f"{d / 'm_width.py'}:Net(w=0)"]


def _zoos(d: Path, good: Path) -> tuple[list[Path], list[Path]]:
    """(zoos refused when opened, zoos refused by --verify and zoo merge)."""
    def variant(name: str, sql: str) -> Path:
        z = d / f"zoo_{name}"
        shutil.copytree(good, z)
        con = sqlite3.connect(str(z / "index.sqlite"))
        con.execute(sql)
        con.commit()
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        con.close()
        for s in ("-wal", "-shm"):
            Path(f"{z / 'index.sqlite'}{s}").unlink(missing_ok=True)
        return z
    wrong = json.dumps({"layers": [{"kind": "linear", "name": "0", "in_features": 64, "out_features": 7},
                                   {"kind": "act", "fn": "relu"},
                                   {"kind": "linear", "name": "2", "in_features": 7, "out_features": 10}],
                        "input_shape": [64]})
    on_open = [variant("text_metric", "UPDATE checkpoints SET test_acc = 'high' WHERE idx = 1"),
               variant("null_arch", "UPDATE checkpoints SET arch = NULL WHERE idx = 2"),
               variant("negative_idx", "UPDATE checkpoints SET idx = -1 WHERE idx = 2"),
               variant("acc_above_1", "UPDATE checkpoints SET test_acc = 7.5 WHERE idx = 1"),
               variant("negative_loss", "UPDATE checkpoints SET train_loss = -0.5 WHERE idx = 1")]
    on_verify = [variant("idx_beyond", "UPDATE checkpoints SET idx = 999 WHERE idx = 2"),
                 variant("key_absent", "UPDATE checkpoints SET key = 'e9999' WHERE idx = 2"),
                 variant("arch_garbage", "UPDATE checkpoints SET arch = '{not json' WHERE idx = 2"),
                 variant("arch_shapes", f"UPDATE checkpoints SET arch = '{wrong}' WHERE idx = 2"),
                 variant("shard_elsewhere", "UPDATE checkpoints SET shard = '../../x.safetensors' WHERE idx = 2")]
    return on_open, on_verify


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from wsnets.zoo import build
    d = tmp_path_factory.mktemp("odd")
    (d / "good").mkdir()
    (d / "good" / "recipe.toml").write_text(RECIPE)
    build(str(d / "good" / "recipe.toml"), d / "good" / "zoo", progress=False)
    torch.save(_sd(), d / "good" / "good.pt")
    torch.save({"s." + k: v for k, v in _sd().items()}, d / "good" / "wrapped.pt")
    torch.save(nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 1)).state_dict(), d / "good" / "one_output.pt")
    torch.save(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(2, 10)).state_dict(), d / "good" / "conv.pt")
    (d / "bad").mkdir()
    on_open, on_verify = _zoos(d / "bad", d / "good" / "zoo")
    (d / "bad" / "latin1.toml").write_bytes(b'[encoder]\nname = "gr\xe9ph"\n')
    return {"dir": d, "good": d / "good", "ckpts": _checkpoints(d / "bad"), "archs": _archs(d / "bad"),
            "modules": _modules(d / "bad"), "zoos_open": on_open, "zoos_verify": on_verify, "out": d / "out"}


def _commands(c) -> list[list[str]]:
    g, out = c["good"], c["out"]
    good = str(g / "good.pt")
    cmds = []
    for ck in map(str, c["ckpts"]):
        if not any(t in ck for t in ("huge", "width0")):  # esd reports those per layer (failed, skipped)
            cmds.append(["esd", ck])
        cmds += [["graph", ck], ["merge", "barrier", ck, good, "--dataset", "digits", "--steps", "3"],
                 ["landscape", "surface", ck, "--dataset", "digits", "--grid", "3"],
                 ["landscape", "intrinsic", ck, "--dataset", "digits", "--dims", "2", "--steps", "2"]]
    cmds += [["graph", str(g / "conv.pt"), "--arch", str(a)] for a in c["archs"]]
    cmds += [["graph", str(g / "wrapped.pt"), "--module", m] for m in c["modules"]]
    for z in map(str, c["zoos_open"]):
        cmds += [["zoo", "info", z], ["zoo", "merge", str(out / "m"), z],
                 ["train", str(ROOT / "train" / "statnn-gbm.toml"), "--zoo", z, "--out", str(out / "run")]]
    for z in map(str, c["zoos_verify"]):
        cmds += [["zoo", "info", z, "--verify"], ["zoo", "merge", str(out / "m"), z]]
    cmds += [["landscape", "surface", good, "--grid", "0"], ["landscape", "surface", good, "--range", "1", "-1"],
             ["landscape", "surface", good, "--range", "nan", "1"], ["landscape", "surface", good, "--grid", "-3"],
             ["landscape", "hessian", good, "--trace-samples", "0"], ["landscape", "hessian", good, "--slq-steps", "0"],
             ["landscape", "hessian", good, "--top-k", "-1"], ["landscape", "intrinsic", good, "--batch-size", "0"],
             ["landscape", "intrinsic", good, "--steps", "0"], ["esd", good, "--min-evals", "0"],
             ["merge", "barrier", good, "--dataset", "digits"],
             ["predict", good, "--meta-model", str(g), "--device", "banana"],
             ["graph", good, "--json", "--no-such-option"],
             ["train", str(ROOT / "train" / "graph.toml"), "--zoo", str(g / "zoo"), "--out", str(out / "r"), "--seeds", "a"],
             ["train", str(c["dir"] / "bad" / "latin1.toml"), "--zoo", str(g / "zoo"), "--out", str(out / "r")],
             # an output under a file: refused before the work (a surface was computed, then not written)
             ["landscape", "surface", good, "--grid", "3", "--out", str(g / "good.pt" / "s.npz")],
             ["landscape", "hessian", good, "--top-k", "1", "--trace-samples", "2", "--slq-vectors", "0",
              "--out", str(g / "good.pt" / "deeper" / "h.json")],
             ["esd", good, "--plot", str(g / "good.pt" / "p.png")],
             # a network with fewer outputs than the dataset's classes (an IndexError in the loss)
             ["merge", "barrier", str(g / "one_output.pt"), str(g / "one_output.pt"), "--dataset", "digits"],
             # an encoder width of 0 built, trained and predicted NaN
             ["train", str(ROOT / "train" / "graph.toml"), "--zoo", str(g / "zoo"), "--out", str(out / "r"),
              "--set", "encoder.hidden=0", "--set", "data.fractions=[0.5, 0.25, 0.25]", "--set", "optim.epochs=1",
              "--no-progress"]]
    return cmds


def test_every_command_on_every_odd_input_is_one_line_exit_2_and_touches_nothing(corpus, contract_failures, hash_tree):
    before = hash_tree(corpus["dir"])
    cmds = _commands(corpus)
    failures = contract_failures(cmds)
    assert not failures, f"{len(failures)} of {len(cmds)}:\n" + "\n".join(failures[:40])
    assert hash_tree(corpus["dir"]) == before  # every input untouched, nothing written beside them


def test_what_should_load_still_loads(corpus, capsys):
    """The checks refuse the bad, not the odd-but-fine: a zoo whose metric is NULL (SQLite stores a diverged
    model's NaN so), float16/bfloat16/float64 weights, a module built with literal arguments, a 1-point grid."""
    g = corpus["good"]
    z = corpus["dir"] / "out" / "zoo_null_metric"
    shutil.copytree(g / "zoo", z)
    con = sqlite3.connect(str(z / "index.sqlite"))
    con.execute("UPDATE checkpoints SET test_acc = NULL, gen_gap = NULL WHERE idx < 2")
    con.commit()
    con.close()
    assert main(["zoo", "info", str(z), "--verify", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["no_test_acc"] == 2 and s["verify"]["ok"]
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        p = corpus["dir"] / "out" / f"w_{str(dt)[6:]}.pt"
        torch.save({k: v.to(dt) for k, v in _sd().items()}, p)
        assert main(["graph", str(p)]) == 0
        assert main(["landscape", "surface", str(p), "--dataset", "digits", "--grid", "1", "--json"]) == 0
    # one Hutchinson sample: a trace estimate without a spread, and no torch warning on stderr
    import warnings
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as seen:  # (the CLI prints each warning as a line on stderr)
        warnings.simplefilter("always")
        assert main(["landscape", "hessian", str(g / "good.pt"), "--top-k", "1", "--trace-samples", "1",
                     "--slq-vectors", "0", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert not [str(w.message) for w in seen if "std()" in str(w.message)]
    assert r["trace"] > 0 and r["trace_stderr"] != r["trace_stderr"]  # NaN: one sample has no spread
    m = corpus["dir"] / "bad" / "m_width.py"
    assert main(["graph", str(g / "wrapped.pt"), "--module", f"{m}:Net(w=8)"]) == 0
    capsys.readouterr()


def test_api_raises_wsnets_errors(corpus):
    c = corpus
    cases = {
        "load(42)": lambda: wsnets.load(42),
        "load(None)": lambda: wsnets.load(None),
        "mlp width 0": lambda: wsnets.mlp(64, [0], 10),
        "mlp width -3": lambda: wsnets.mlp(64, [-3], 10),
        "cnn 0 channels": lambda: wsnets.cnn(1, [0], 10),
        "NaN eps": lambda: wsnets.Layer("layernorm", "n", 8, 8, eps=float("nan")),
        "input_shape 0": lambda: wsnets.Architecture(wsnets.mlp(64, [8], 10).layers, (0,)),
        "from_json list": lambda: wsnets.Architecture.from_json("[1]"),
        "random batch -2": lambda: wsnets.WeightSpace.random(wsnets.mlp(64, [8], 10), batch_size=-2),
        "non-tensor param": lambda: wsnets.WeightSpace(wsnets.mlp(4, [2], 2), {"0.weight": 3, "0.bias": 1,
                                                                                "2.weight": 2, "2.bias": 0}),
        "module sys.exit": lambda: wsnets.load(c["good"] / "wrapped.pt", module=c["modules"][0]),
        "zoo arch garbage": lambda: wsnets.zoo.open(c["zoos_verify"][2]).load(),
        "zoo text metric": lambda: wsnets.zoo.open(c["zoos_open"][0]),
        "zoo null arch": lambda: wsnets.zoo.open(c["zoos_open"][1]),
        "analyze(42)": lambda: wsnets.esd.analyze(42),
        "load_config(123)": lambda: wsnets.train.load_config(123),
        "parse_recipe(list)": lambda: wsnets.zoo.parse_recipe([1], "a list"),
    }
    cases.update({f"load {p.name}": (lambda p=p: wsnets.load(p)) for p in c["ckpts"]})
    cases.update({f"load arch {p.name}": (lambda p=p: wsnets.load(c["good"] / "conv.pt", arch=p)) for p in c["archs"]})
    wrong = {}
    for name, fn in cases.items():
        try:
            fn()
            wrong[name] = "no error"
        except E.WSNetsError:
            pass
        except BaseException as e:  # noqa: BLE001 - SystemExit of a user module included
            wrong[name] = f"{type(e).__name__}: {e}"
    assert not wrong, wrong
    with pytest.raises(TypeError):  # the class of a bad argument type is also a TypeError
        wsnets.load(42)


def test_nan_distance_is_out_of_range():
    """A network whose meta-model features are not finite is outside the training range (NaN compared
    false with the threshold and was reported in range)."""
    from wsnets.train.ranges import TrainingRange
    arch = wsnets.mlp(4, [3], 2)
    feats = torch.randn(20, 5)
    r = TrainingRange.fit([arch] * 20, feats, space="features")
    nets = [wsnets.WeightSpace.random(arch) for _ in range(2)]
    out = r.check(nets, torch.stack([feats[0], torch.full((5,), float("nan"))]))
    assert out[0]["in_range"] is True and out[1]["in_range"] is False, out


def test_huge_weights_in_esd_are_per_layer_statuses(corpus, capsys):
    """esd reads any tensors and reports each layer: a weight of magnitude 1e300 is a failed layer (its Gram
    matrix overflows: linalg.eigh failed to converge, an internal error), as a NaN one is."""
    assert main(["esd", str(corpus["dir"] / "bad" / "huge64.pt"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["layers"]
    assert rows and all(r["status"].startswith("failed: weights up to") for r in rows), rows
