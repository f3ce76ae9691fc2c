"""Every command on a corpus of bad inputs written here: one line on stderr, exit code 2, no traceback, and
every input byte for byte as it was. Commands run in-process (``wsnets.cli.main``); a few via subprocess.

The corpus covers each class of bad input at each boundary: checkpoints (empty, garbage, truncated at
several points, pickles with code, non-string names, sparse/complex/integer/boolean tensors, non-tensor
entries, NaN weights, shapes that do not chain), safetensors metadata (architecture JSON that is a list,
a number, null, deeply nested, not JSON, not an architecture; a bad batch size), zoo directories (empty,
garbage, foreign, corrupt index; no index; a damaged shard for merge; Small CNN Zoo layouts with missing
columns, bad offsets, bad numbers), recipes and configs (wrong types, signs and ranges, bad TOML) and
meta-model directories (missing or corrupt files).
"""

import io
import json
import pickle
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
RECIPE = """name = "c"
seed = 1
population = 12
datasets = ["digits"]
epochs = 1
batch_size = 128
[architecture]
kind = "mlp"
depth = 1
width = 8
"""


class _Evil:
    def __reduce__(self):
        return (print, ("this pickle ran code",))


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10))


def _checkpoints(d: Path) -> list[Path]:
    sd = _mlp().state_dict()
    good = d / "good.pt"
    torch.save(sd, good)
    raw = good.read_bytes()
    out = {}
    out["empty.pt"] = b""
    out["garbage.pt"] = bytes(range(256)) * 8
    for frac in (0.1, 0.5, 0.9):
        out[f"truncated{int(frac * 100)}.pt"] = raw[:int(len(raw) * frac)]
    buf = io.BytesIO()
    torch.save(sd, buf, _use_new_zipfile_serialization=False)
    out["truncated_legacy.pt"] = buf.getvalue()[:len(buf.getvalue()) // 2]
    out["code.pt"] = pickle.dumps({"0.weight": _Evil()})
    for name, obj in {
        "intkey.pt": {0: sd["0.weight"], **sd},
        "sparse.pt": {**sd, "0.weight": sd["0.weight"].to_sparse()},
        "complex.pt": {k: v.to(torch.complex64) for k, v in sd.items()},
        "integer.pt": {k: (v * 100).long() for k, v in sd.items()},
        "boolean.pt": {k: v > 0 for k, v in sd.items()},
        "notensor.pt": {**sd, "2.bias": [1.0] * 10},
        "tensor_only.pt": sd["0.weight"],
        "nan.pt": {**sd, "2.weight": torch.full_like(sd["2.weight"], float("nan"))},
        "nochain.pt": {**sd, "2.weight": torch.randn(10, 9)},
        # architectures that keys and shapes do not determine (the spine refuses them, saying how to give one)
        "bare_conv.pt": nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten(), nn.Linear(4, 10)).state_dict(),
        "bare_residual.pt": {"a.weight": torch.randn(8, 64), "a.bias": torch.zeros(8), "b.weight": torch.randn(8, 8),
                             "b.bias": torch.zeros(8), "c.weight": torch.randn(10, 8), "c.bias": torch.zeros(10)},
    }.items():
        b = io.BytesIO()
        torch.save(obj, b)
        out[name] = b.getvalue()
    for name, data in out.items():
        (d / name).write_bytes(data)
    st = {k: v.contiguous() for k, v in sd.items()}
    metas = {"meta_list": "[1, 2]", "meta_number": "3", "meta_null": "null", "meta_deep": "[" * 100_000 + "]" * 100_000,
             "meta_notjson": "{'layers':", "meta_wrongdict": json.dumps({"layers": "x"}),
             "meta_emptydict": "{}"}
    for name, meta in metas.items():
        save_file(st, str(d / f"{name}.safetensors"), metadata={"wsnets.arch": meta})
    import wsnets
    wsnets.load(_mlp()).save(d / "good.safetensors")
    good_st = (d / "good.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(good_st[:len(good_st) // 2])
    (d / "header_garbage.safetensors").write_bytes((100).to_bytes(8, "little") + b"\xff" * 100)
    tensors, meta = wsnets.io.read_safetensors(d / "good.safetensors")
    save_file(tensors, str(d / "meta_batch.safetensors"), metadata={**meta, "wsnets.batch_size": "-3"})
    (d / "notes.txt").write_text("not a checkpoint")
    (d / "a_directory.pt").mkdir()
    return sorted(p for p in d.iterdir() if p.name != "good.pt" and p.name != "good.safetensors") + [d / "missing.pt"]


def _zoos(d: Path, good_zoo: Path) -> list[Path]:
    out = []
    for kind in ("empty", "garbage", "foreign", "corrupt", "noindex"):
        z = d / f"zoo_{kind}"
        z.mkdir()
        if kind == "empty":
            (z / "index.sqlite").write_bytes(b"")
        elif kind == "garbage":
            (z / "index.sqlite").write_bytes(b"\x00\x01garbage" * 500)
        elif kind == "foreign":
            con = sqlite3.connect(str(z / "index.sqlite"))
            con.execute("CREATE TABLE meta (a, b)")
            con.commit()
            con.close()
        elif kind == "corrupt":
            data = bytearray((good_zoo / "index.sqlite").read_bytes())
            data[100:2000] = b"\xee" * 1900
            (z / "index.sqlite").write_bytes(bytes(data))
        out.append(z)
    import shutil
    damaged = d / "zoo_damaged"
    shutil.copytree(good_zoo, damaged)
    shard = sorted((damaged / "shards").glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:300])
    out.append(damaged)
    # Small CNN Zoo layouts
    from wsnets.zoo.cnnzoo import write_cnn_zoo
    torch.manual_seed(0)
    mods = [nn.Sequential(nn.Conv2d(1, 3, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 10))
            for _ in range(2)]
    metrics = [{"config.activation": "relu", "config.dataset": "mnist", "modeldir": f"r{i}", "step": 1,
                "train_accuracy": 0.5, "test_accuracy": 0.4, "train_loss": 1.0, "test_loss": 1.1} for i in range(2)]
    base = d / "cnn_base"
    write_cnn_zoo(base, mods, metrics)
    layout = (base / "layout.csv").read_text()
    variants = {
        "cnn_nocolumn": lambda z: (z / "layout.csv").write_text(layout.replace("start_idx", "begin")),
        "cnn_offsets": lambda z: (z / "layout.csv").write_text(layout.replace(",0,3,3,", ",0,300000,3,", 1)),
        "cnn_overlap": lambda z: (z / "layout.csv").write_text(layout.replace(",3,30,27,", ",2,29,27,", 1)),
        "cnn_noacc": lambda z: _rewrite_metrics(z, lambda r: {k: v for k, v in r.items() if k != "test_accuracy"}),
        "cnn_badnumber": lambda z: _rewrite_metrics(z, lambda r: {**r, "step": "ten"}),
        "cnn_1d": lambda z: np.save(z / "weights.npy", np.zeros(5, np.float32)),
    }
    for name, fn in variants.items():
        z = d / name
        shutil.copytree(base, z)
        fn(z)
        out.append(z)
    shutil.rmtree(base)
    return out


def _rewrite_metrics(z: Path, fn) -> None:
    """Rewrite the metrics as a plain metrics.csv (the reader takes either), each row through ``fn``."""
    import csv
    import gzip
    with gzip.open(z / "metrics.csv.gz", "rt") as f:
        rows = [fn(r) for r in csv.DictReader(f)]
    (z / "metrics.csv.gz").unlink()
    with open(z / "metrics.csv", "w", newline="") as f:
        csv.writer(f).writerows([list(rows[0])] + [list(r.values()) for r in rows])


def _write_all(d: Path, prefix: str, texts: dict[str, str]) -> list[Path]:
    out = []
    for name, text in texts.items():
        p = d / f"{prefix}_{name}.toml"
        p.write_text(text)
        out.append(p)
    return out


def _recipes(d: Path) -> list[Path]:
    bad = {
        "epochs_text": RECIPE.replace("epochs = 1", 'epochs = "ten"'),
        "batch_negative": RECIPE.replace("batch_size = 128", "batch_size = -3"),
        "width_negative": RECIPE.replace("width = 8", "width = -8"),
        "width_choice_zero": RECIPE.replace("width = 8", "width = [8, 0]"),
        "lr_negative": RECIPE + "[hyperparameters]\nlr = -0.1\n",
        "lr_interval": RECIPE + "[hyperparameters]\nlr = {uniform = [-1, 0.1]}\n",
        "train_fraction": RECIPE + "[hyperparameters]\ntrain_fraction = 1.5\n",
        "dropout_one": RECIPE + "[hyperparameters]\ndropout = 1.0\n",
        "population_zero": RECIPE.replace("population = 12", "population = 0"),
        "population_float": RECIPE.replace("population = 12", "population = 4.5"),
        "name_path": RECIPE.replace('name = "c"', 'name = "../escape"'),
        "dataset_unknown": RECIPE.replace('"digits"', '"imagenet"'),
        "datasets_number": RECIPE.replace('["digits"]', "3"),
        "architecture_string": RECIPE.split("[architecture]")[0] + 'architecture = "mlp"\n',
        "checkpoints_past": RECIPE.replace("batch_size = 128", "batch_size = 128\ncheckpoints = [5]"),
        "bad_toml": "name = \n[[[",
        "binary": "\x00\x01\x02",
        "empty": "",
    }
    return _write_all(d, "recipe", bad)


def _configs(d: Path) -> list[Path]:
    graph = (ROOT / "train" / "graph.toml").read_text()
    bad = {
        "epochs_text": "[encoder]\nname = \"graph\"\n[optim]\nepochs = \"ten\"\n",
        "batch_negative": "[encoder]\nname = \"graph\"\n[data]\nbatch_size = -3\n",
        "lr_negative": "[encoder]\nname = \"graph\"\n[optim]\nlr = -0.1\n",
        "dropout": "[encoder]\nname = \"graph\"\n[head]\ndropout = 2.0\n",
        "hidden_negative": "[encoder]\nname = \"graph\"\nhidden = -4\n",
        "hidden_text": "[encoder]\nname = \"graph\"\nhidden = \"wide\"\n",
        "unknown_key": graph + "\n[optim2]\nx = 1\n",
        "unknown_encoder": "[encoder]\nname = \"resnet9000\"\n",
        "fractions": "[encoder]\nname = \"graph\"\n[data]\nfractions = [0.9, 0.9, 0.1]\n",
        "target": "[encoder]\nname = \"graph\"\n[data]\ntargets = [\"beauty\"]\n",
        "bad_toml": "[encoder\nname=",
        "section_value": "encoder = 3\n",
    }
    return _write_all(d, "config", bad)


def _edit_trained_on(r: Path, fn) -> None:
    meta = json.loads((r / "config.json").read_text())
    (r / "config.json").write_text(json.dumps({**meta, "trained_on": fn(meta["trained_on"])}))


def _runs(d: Path, good_run: Path) -> list[Path]:
    import shutil
    out = []
    variants = {
        "run_missing": lambda r: (r / "normalization.json").unlink(),
        "run_badjson": lambda r: (r / "config.json").write_text("{oops"),
        "run_listjson": lambda r: (r / "config.json").write_text("[1, 2]"),
        "run_format": lambda r: (r / "config.json").write_text(json.dumps({"format": "other"})),
        "run_weights": lambda r: (r / "model.safetensors").write_bytes((r / "model.safetensors").read_bytes()[:100]),
        "run_norm": lambda r: (r / "normalization.json").write_text('{"test_acc": {"mean": "x"}}'),
        "run_config": lambda r: (r / "config.json").write_text(json.dumps(
            {**json.loads((r / "config.json").read_text()), "config": {"optim": {"epochs": "ten"}}})),
        # the training range's calibration (a NaN threshold compared false: every network was in range)
        "run_nan_threshold": lambda r: _edit_trained_on(r, lambda t: {**t, "threshold": float("nan")}),
        "run_trained_on_list": lambda r: _edit_trained_on(r, lambda t: [1, 2]),
        "run_no_reference": lambda r: (r / "reference.safetensors").unlink(),
        "run_kind": lambda r: (r / "config.json").write_text(json.dumps(
            {**json.loads((r / "config.json").read_text()), "kind": "quantum"})),
        "run_example_arch": lambda r: (r / "config.json").write_text(json.dumps(
            {**json.loads((r / "config.json").read_text()), "example_arch": "{oops"})),
    }
    for name, fn in variants.items():
        r = d / name
        shutil.copytree(good_run, r)
        fn(r)
        out.append(r)
    (d / "run_notadir").write_text("x")
    out.append(d / "run_notadir")
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from wsnets.train import load_config, run_training
    from wsnets.zoo import build
    d = tmp_path_factory.mktemp("corpus")
    (d / "good").mkdir()
    (d / "good" / "recipe.toml").write_text(RECIPE)
    build(str(d / "good" / "recipe.toml"), d / "good" / "zoo", progress=False)
    cfg = load_config(ROOT / "train" / "graph.toml", ["encoder.hidden=8", "encoder.layers=1", "optim.epochs=1",
                                                     "log.progress=false", "data.fractions=[0.5, 0.25, 0.25]"])
    run_training(cfg, zoo=d / "good" / "zoo", out=d / "good" / "run", plots=False)
    torch.save(_mlp().state_dict(), d / "good" / "good.pt")
    (d / "bad").mkdir()
    ckpts = _checkpoints(d / "bad")
    zoos = _zoos(d / "bad", d / "good" / "zoo")
    recipes = _recipes(d / "bad")
    configs = _configs(d / "bad")
    runs = _runs(d / "bad", d / "good" / "run")
    return {"dir": d, "good": d / "good", "ckpts": ckpts, "zoos": zoos, "recipes": recipes, "configs": configs,
            "runs": runs, "out": d / "out"}


def _commands(c) -> list[list[str]]:
    g, out = c["good"], c["out"]
    good = str(g / "good.pt")
    cmds = []
    for ck in map(str, c["ckpts"]):
        # esd reads any tensors and no architecture: metadata, NaN (a per-layer status), shapes that do not
        # chain non-tensor and sparse entries (reported as skipped) are fine there
        if not any(t in Path(ck).name for t in ("meta_", "nan", "nochain", "notensor", "sparse", "bare_")):
            cmds += [["esd", ck]]
        cmds += [["graph", ck], ["predict", ck, "--meta-model", str(g / "run")],
                 ["merge", "average", ck, good, "--out", str(out / "avg.safetensors")],
                 ["merge", "barrier", ck, good, "--dataset", "digits", "--steps", "3"],
                 ["landscape", "surface", ck, "--dataset", "digits", "--grid", "3"],
                 ["landscape", "hessian", ck, "--dataset", "digits", "--top-k", "1", "--trace-samples", "2", "--slq-vectors", "0"]]
    for z in map(str, c["zoos"]):
        cmds += [["zoo", "info", z, "--verify"], ["zoo", "merge", str(out / "merged"), z],
                 ["train", str(ROOT / "train" / "statnn-gbm.toml"), "--zoo", z, "--out", str(out / "run")]]
        if any(t in z for t in ("empty", "garbage", "foreign", "corrupt")):  # (it repairs a damaged zoo)
            cmds += [["zoo", "build", str(g / "recipe.toml"), "--out", z, "--json"]]
    for r in map(str, c["recipes"]):
        cmds += [["zoo", "build", r, "--out", str(out / "zoo"), "--json"],
                 ["run", r, "--cache", str(out / "cache"), "--out", str(out / "report"), "--no-regions"]]
    for cf in map(str, c["configs"]):
        cmds += [["train", cf, "--zoo", str(g / "zoo"), "--out", str(out / "run"), "--no-progress"]]
    for r in map(str, c["runs"]):
        cmds += [["predict", good, "--meta-model", r]]
    cmds += [["train", str(ROOT / "train" / "graph.toml"), "--zoo", str(g / "zoo"), "--out", str(out / "run"),
              "--no-progress", "--optim.lr", "-1"],
             ["run", "--methods", "graph,nonsense", "--cache", str(out / "cache"), "--out", str(out / "report")],
             ["zoo", "build", str(g / "recipe.toml"), "--out", str(g / "zoo"), "--shard", "5/2"]]
    return cmds


def test_every_command_on_every_bad_input_is_one_line_exit_2_and_touches_nothing(corpus, contract_failures, hash_tree):
    before = hash_tree(corpus["dir"])
    cmds = _commands(corpus)
    assert len(cmds) > 200
    failures = contract_failures(cmds)
    assert not failures, f"{len(failures)} of {len(cmds)}:\n" + "\n".join(failures[:40])
    assert hash_tree(corpus["dir"]) == before  # every input untouched, nothing written beside them


def test_bad_inputs_through_the_installed_entry_point(corpus):
    """The same contract through a real process (``python -m wsnets``): stderr one line, exit 2."""
    c = corpus
    cases = [["graph", str(c["dir"] / "bad" / "truncated50.pt")],
             ["zoo", "info", str(c["dir"] / "bad" / "zoo_garbage")],
             ["train", str(c["dir"] / "bad" / "config_epochs_text.toml"), "--zoo", str(c["good"] / "zoo"),
              "--out", str(c["out"] / "r")],
             ["zoo", "build", str(c["dir"] / "bad" / "recipe_width_negative.toml"), "--out", str(c["out"] / "z")]]
    for argv in cases:
        p = subprocess.run([sys.executable, "-m", "wsnets", *argv], capture_output=True, text=True, timeout=300,
                           env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, \
            (argv, p.stderr)
