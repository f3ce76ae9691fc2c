import hashlib
import json
from pathlib import Path

import pytest
import torch
import xxhash

import wsnets
from wsnets.cli import main
from wsnets.io import read_safetensors
from wsnets.merge import digest_files, task_arithmetic, ties, weight_matching


@pytest.fixture()
def ckpts(tmp_path):
    arch = wsnets.mlp(64, [16], 10)
    g = torch.Generator().manual_seed(0)
    base = wsnets.WeightSpace.random(arch, generator=g)
    paths = {"base": base.save(tmp_path / "base.safetensors")}
    for i in range(3):
        paths[f"ft{i}"] = base.map(lambda t: t + 0.05 * torch.randn(t.shape, generator=g)).save(tmp_path / f"ft{i}.safetensors")
    paths["other"] = wsnets.WeightSpace.random(wsnets.mlp(64, [17], 10)).save(tmp_path / "other.safetensors")
    return {k: str(v) for k, v in paths.items()}


def test_average_writes_provenance(ckpts, tmp_path, capsys):
    out = tmp_path / "avg.safetensors"
    assert main(["merge", "average", ckpts["ft0"], ckpts["ft1"], "-o", str(out), "--weights", "1,3", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["method"] == "linear"  # `average` is the registered linear method's alias
    tensors, meta = read_safetensors(out)
    assert meta["wsnets.merge.method"] == "linear"
    ing = json.loads(meta["wsnets.merge.ingredients"])
    assert [i["path"] for i in ing] == [ckpts["ft0"], ckpts["ft1"]] and ing[0]["digest"] == digest_files([ckpts["ft0"]])
    assert ing[1]["digest"] == "xxh3_128:" + xxhash.xxh3_128(Path(ckpts["ft1"]).read_bytes()).hexdigest()
    assert json.loads(meta["wsnets.merge.parameters"])["weight"] == [1.0, 3.0]
    a, b, m = wsnets.load(ckpts["ft0"]), wsnets.load(ckpts["ft1"]), wsnets.load(out)
    torch.testing.assert_close(m.flat(), 0.25 * a.flat() + 0.75 * b.flat())


@pytest.mark.parametrize("flags, want", [(["--hash", "sha256"], "sha256"), (["--no-hash"], "none"),
                                         (["--hash", "none"], "none")])
def test_hash_option_chooses_the_recorded_digest(ckpts, tmp_path, flags, want):
    out = tmp_path / "avg.safetensors"
    assert main(["merge", "linear", ckpts["ft0"], ckpts["ft1"], "-o", str(out), "--json", *flags]) == 0
    _, meta = read_safetensors(out)
    ing = json.loads(meta["wsnets.merge.ingredients"])
    assert meta["wsnets.merge.digest"] == want
    assert [i["digest"] for i in ing] == ([None, None] if want == "none" else
                                          ["sha256:" + hashlib.sha256(Path(ckpts[k]).read_bytes()).hexdigest()
                                           for k in ("ft0", "ft1")])


@pytest.mark.parametrize("method", ["ties", "task-arithmetic"])
def test_task_merges_match_the_library(method, ckpts, tmp_path):
    out = tmp_path / "m.safetensors"
    fts = [ckpts["ft0"], ckpts["ft1"], ckpts["ft2"]]
    assert main(["merge", method, "--base", ckpts["base"], *fts, "-o", str(out)]) == 0
    fn = ties if method == "ties" else task_arithmetic
    ref = fn(wsnets.load(ckpts["base"]), [wsnets.load(p) for p in fts])
    torch.testing.assert_close(wsnets.load(out).flat(), ref.flat())
    _, meta = read_safetensors(out)
    assert json.loads(meta["wsnets.merge.base"])["path"] == ckpts["base"]


def test_mismatch_is_one_line_and_exit_2(ckpts, tmp_path, capsys):
    code = main(["merge", "average", ckpts["ft0"], ckpts["other"], "-o", str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "other.safetensors" in err and ("'0.weight' has shape (17, 64)" in err or "'0.bias' has shape (17,)" in err)
    assert not (tmp_path / "x.safetensors").exists()


def test_align_and_barrier(ckpts, tmp_path, capsys):
    out = tmp_path / "al.safetensors"
    assert main(["merge", "align", ckpts["ft0"], ckpts["other"].replace("other", "ft1"), "-o", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    _, perms = weight_matching(wsnets.load(ckpts["ft0"]), wsnets.load(ckpts["ft1"]))
    assert printed["permutations"]["1"] == perms[1].tolist()
    png = tmp_path / "curve.png"
    assert main(["merge", "barrier", ckpts["ft0"], ckpts["ft1"], "--dataset", "digits", "--align", "--steps", "5",
                 "--plot", str(png), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["curves"]) == {"straight line", "after weight matching"}
    assert png.stat().st_size > 1000
    assert main(["merge", "barrier", ckpts["ft0"], ckpts["ft1"]]) == 2  # needs --dataset


def test_greedy_soup_cli(ckpts, tmp_path, capsys):
    out = tmp_path / "soup.safetensors"
    fts = [ckpts["ft0"], ckpts["ft1"], ckpts["ft2"]]
    assert main(["merge", "soup", *fts, "--dataset", "digits", "-o", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["soup_score"] >= max(res["ingredient_scores"])
    _, meta = read_safetensors(out)
    assert meta["wsnets.merge.method"] == "greedy_soup"


def test_missing_file_and_no_method(ckpts, tmp_path, capsys):
    assert main(["merge", "average", ckpts["ft0"], str(tmp_path / "nope.safetensors"), "-o", str(tmp_path / "o.safetensors")]) == 2
    assert "nope.safetensors: no such file" in capsys.readouterr().err
    assert main(["merge"]) == 2


def test_methods_are_listed_with_their_options(capsys):
    assert main(["merge", "methods", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["ties"]["options"]["density"] == {"type": "float", "default": 0.2, "per_model": True, "choices": None,
                                                   "range": "(0, 1]", "help": listed["ties"]["options"]["density"]["help"]}
    assert listed["linear"]["aliases"] == ["average"] and listed["slerp"]["models"] == [2, 2]
    assert main(["merge", "methods"]) == 0
    assert "dare-ties" in capsys.readouterr().out


def test_docstring_examples_run():
    import doctest
    import importlib

    for name in ("registry", "stream", "task_arithmetic", "average"):
        mod = importlib.import_module(f"wsnets.merge.{name}")
        failed, tried = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
        assert tried > 0 and failed == 0, mod.__name__


@pytest.mark.parametrize("cmd", [
    ["linear", "{ft0}", "{ft1}"],
    ["ties", "--base", "{base}", "{ft0}", "{ft1}"],
    ["linear", "--dataset", "digits", "{ft0}", "{ft1}"],
    ["soup", "--uniform", "{ft0}", "{ft1}"],
    ["align", "{ft0}", "{ft1}"],
    ["config", "{cfg}"],
])
def test_every_merge_output_refuses_an_existing_file_and_never_replaces_an_input(cmd, ckpts, tmp_path):
    """Each command that writes a model: ``-o`` naming one of its inputs is refused even with --overwrite (the
    architecture-aware ones replaced the input); an existing output is kept unless --overwrite."""
    cfg = tmp_path / "m.toml"
    cfg.write_text(f'method = "linear"\nmodels = ["{ckpts["ft0"]}", "{ckpts["ft1"]}"]\n')
    args = ["merge"] + [a.format(cfg=cfg, **ckpts) for a in cmd]
    digest = {k: hashlib.sha256(Path(v).read_bytes()).digest() for k, v in ckpts.items()}
    for victim in ("ft1", "base") if "--base" in cmd else ("ft1",):
        for flags in ([], ["--overwrite"]):
            assert main([*args, "-o", ckpts[victim], "--json", *flags]) == 2
            assert hashlib.sha256(Path(ckpts[victim]).read_bytes()).digest() == digest[victim]
    out = tmp_path / "existing.safetensors"
    out.write_bytes(b"an earlier result")
    assert main([*args, "-o", str(out), "--json"]) == 2
    assert out.read_bytes() == b"an earlier result"
    assert main([*args, "-o", str(out), "--json", "--overwrite"]) == 0
    assert wsnets.load(out).arch == wsnets.load(ckpts["ft0"]).arch


def test_output_onto_a_shard_of_a_sharded_input_is_refused(ckpts, tmp_path):
    from wsnets.merge import merge_checkpoints
    sharded = tmp_path / "sharded"
    merge_checkpoints("linear", [ckpts["ft0"], ckpts["ft1"]], out=sharded, shard_size=2048)
    shard = sharded / "model-00001-of-00003.safetensors"
    before = shard.read_bytes()
    for flags in ([], ["--overwrite"]):
        assert main(["merge", "linear", str(sharded / "model.safetensors.index.json"), ckpts["ft2"], "-o", str(shard),
                     "--json", *flags]) == 2
    assert shard.read_bytes() == before


@pytest.mark.parametrize("command", [["soup"], ["soup", "--uniform"], ["barrier"], ["align", "--method", "activation"]])
def test_dataset_inputs_are_reshaped_to_the_model_or_refused_in_one_line(command, tmp_path, capsys):
    """digits (64 features) and digits-img (1x8x8) are one dataset: every command taking --dataset reshapes it
    to the model's input (the greedy soup refused it, as the others did not); mnist1d (40 features) fits
    neither model: a one-line error naming the dataset (the greedy soup failed with an internal error)."""
    g = torch.Generator().manual_seed(0)
    paths = {}
    for kind, arch in (("mlp", wsnets.mlp(64, [8], 10)),
                       ("cnn", wsnets.cnn(1, [3], 10, dims=2, batchnorm=True, input_shape=(1, 8, 8)))):
        paths[kind] = [str(wsnets.WeightSpace.random(arch, generator=g).save(tmp_path / f"{kind}{i}.safetensors"))
                       for i in range(2)]
    out = [] if command[0] == "barrier" else ["-o", str(tmp_path / "out.safetensors"), "--overwrite"]
    for kind, dataset in (("mlp", "digits-img"), ("cnn", "digits")):
        assert main(["merge", *command, *paths[kind], "--dataset", dataset, *out, "--json"]) == 0
        capsys.readouterr()
    for kind in ("mlp", "cnn"):
        assert main(["merge", *command, *paths[kind], "--dataset", "mnist1d", *out, "--json"]) == 2
        err = capsys.readouterr().err.strip()
        assert "dataset 'mnist1d' has inputs (40,)" in err and "internal error" not in err and "\n" not in err


@pytest.mark.parametrize("command", [["align"], ["barrier", "--dataset", "digits"]])
def test_align_and_barrier_take_exactly_two_models(command, ckpts, tmp_path, capsys):
    """One model was an internal error (IndexError); a third was silently ignored while the output's provenance
    listed it as an ingredient of the alignment."""
    out = tmp_path / "b_aligned.safetensors"
    o = ["-o", str(out)] if command[0] == "align" else []
    for models in ([ckpts["ft0"]], [ckpts["ft0"], ckpts["ft1"], ckpts["ft2"]]):
        assert main(["merge", *command, *models, *o]) == 2
        err = capsys.readouterr().err.strip()
        assert f"takes exactly two models (A, then B), got {len(models)}" in err and "\n" not in err
        assert not out.exists()
    assert main(["merge", *command, ckpts["ft0"], ckpts["ft1"], *o, "--json"]) == 0


@pytest.mark.parametrize("flags", [["--chunk-mb", "nan"], ["--chunk-mb", "inf"], ["--shard-size", "inf"],
                                   ["--shard-size", "1e400GB"]])
def test_non_finite_sizes_are_one_line_errors(flags, ckpts, tmp_path, capsys):
    """NaN or infinite slice and shard sizes were internal errors (ValueError/OverflowError from int())."""
    assert main(["merge", "linear", ckpts["ft0"], ckpts["ft1"], "-o", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert "internal error" not in err and "\n" not in err and ("chunk_mb" in err or "bad size" in err)
    assert not (tmp_path / "out").exists()
