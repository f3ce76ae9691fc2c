"""Streaming merges of files: formats in and out, provenance, bad input, a killed merge, TOML configs."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import save_file

import wsnets
from wsnets.cli import main
from wsnets.errors import ArchitectureMismatchError, CheckpointError, ConfigError, OutputExistsError
from wsnets.merge import TensorRule, ingredients, merge_checkpoints, merge_config, open_checkpoint, ties
from wsnets.merge.shards import Checkpoint, ShardWriter, read_header


def _sd(seed, shapes=None, scale=1.0, base=None):
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"embed.weight": (40, 16), "layer.0.weight": (16, 16), "layer.0.bias": (16,),
                        "layer.1.weight": (8, 16), "ids": (1, 5)}
    out = {}
    for k, s in shapes.items():
        if k == "ids":
            out[k] = torch.arange(5).reshape(s)
        else:
            out[k] = (base[k] if base else 0) + scale * torch.randn(s, generator=g)
    return out


def _hf_dir(path: Path, sd, shard_names):
    """A Hugging Face layout written by the safetensors library: shards, index, config.json."""
    path.mkdir(parents=True)
    weight_map = {}
    for fname, keys in shard_names.items():
        save_file({k: sd[k] for k in keys}, str(path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in keys})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text('{"model_type": "toy"}')
    return path


@pytest.fixture()
def family(tmp_path):
    base = _sd(0)
    fts = [_sd(i, scale=0.05, base=base) for i in (1, 2)]
    split = {"a.safetensors": ["embed.weight", "ids"], "b.safetensors": ["layer.0.weight", "layer.0.bias",
                                                                          "layer.1.weight"]}
    dirs = [_hf_dir(tmp_path / n, sd, split) for n, sd in zip(("base", "ft1", "ft2"), (base, *fts))]
    return base, fts, dirs


def _read_all(path):
    ck = open_checkpoint(path)
    try:
        return {n: ck.read(n).reshape(i.shape).clone() for n, i in ck.infos.items()}, ck.metadata
    finally:
        ck.close()


def _hashes(root: Path):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_sharded_in_sharded_out_equals_in_memory(family, tmp_path):
    base, fts, dirs = family
    ref = merge_checkpoints("ties", fts, base=base, density=0.5).tensors
    out = tmp_path / "merged"
    r = merge_checkpoints("ties", dirs[1:], base=dirs[0], out=out, density=0.5, shard_size=1500)
    assert len(r.files) > 2 and (out / "model.safetensors.index.json").is_file() and (out / "config.json").is_file()
    got = {}
    for f in r.files:                                          # readable by the safetensors library
        with safe_open(str(f), framework="pt") as h:
            got.update({k: h.get_tensor(k) for k in h.keys()})
            assert h.metadata()["wsnets.merge.method"] == "ties"
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in ref.values())
    assert set(index["weight_map"]) == set(ref)


@pytest.mark.parametrize("method, kw", [("linear", {"weight": [1, 2, 3]}), ("ties", {"density": 0.5}),
                                        ("dare_linear", {"density": 0.5, "seed": 3})])
def test_reused_slice_buffers_give_the_in_memory_result(family, tmp_path, method, kw):
    """Files of mixed dtypes (float32, bfloat16, float16) merged in slices of 40 bytes, the buffers of
    one slice reused for the next: the same tensors as merging the values in memory, whole."""
    base, fts, _ = family
    dts = [torch.float32, torch.bfloat16, torch.float16]
    sds = [{k: v.to(dt) if v.is_floating_point() else v for k, v in sd.items()} for sd, dt in zip([base, *fts], dts)]
    paths = []
    for i, sd in enumerate(sds):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file(sd, str(paths[-1]))
    b, ms = (paths[0], paths[1:]) if method != "linear" else (None, paths)
    got = merge_checkpoints(method, ms, base=b, chunk_mb=40 / 2**20, **kw).tensors
    whole = [{k: v.float() if v.is_floating_point() else v for k, v in sd.items()} for sd in sds]
    ref = merge_checkpoints(method, whole[1:] if b else whole, base=whole[0] if b else None, **kw).tensors
    for k in ref:
        assert torch.equal(got[k], ref[k].to(got[k].dtype)), k


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "state_dict", "index"])
def test_inputs_of_every_format(family, tmp_path, fmt):
    base, fts, dirs = family
    ref = merge_checkpoints("linear", [base, *fts]).tensors
    if fmt == "state_dict":
        srcs = [base, *fts]
    elif fmt == "index":
        srcs = [d / "model.safetensors.index.json" for d in dirs]
    else:
        srcs = []
        for i, sd in enumerate([base, *fts]):
            p = tmp_path / f"m{i}.{fmt}"
            save_file(sd, str(p)) if fmt == "safetensors" else torch.save(sd, p)
            srcs.append(p)
    out = tmp_path / "avg.safetensors"
    merge_checkpoints("linear", srcs, out=out)
    got, meta = _read_all(out)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    assert meta["wsnets.merge.method"] == "linear" and meta["format"] == "pt"


def test_provenance_records_dtype_and_hashes(family, tmp_path):
    base, fts, dirs = family
    half = []
    for i, sd in enumerate([base, *fts]):
        p = tmp_path / f"h{i}.safetensors"
        save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}, str(p))
        half.append(p)
    out = tmp_path / "m.safetensors"
    merge_checkpoints("ties", half[1:], base=half[0], out=out, density=0.5)
    got, meta = _read_all(out)
    assert meta["wsnets.merge.dtype"] == "float32" and got["embed.weight"].dtype == torch.bfloat16
    ing = json.loads(meta["wsnets.merge.ingredients"])
    assert meta["wsnets.merge.digest"] == "xxh3_128"
    assert [i["digest"] for i in ing] == ["xxh3_128:" + xxhash.xxh3_128(p.read_bytes()).hexdigest() for p in half[1:]]
    params = json.loads(meta["wsnets.merge.parameters"])
    assert params["density"] == [0.5, 0.5] and meta["wsnets.merge.scope"] == "model"
    merge_checkpoints("ties", half[1:], base=half[0], out=out, density=0.5, dtype="bfloat16", out_dtype="float32",
                      digest=None, overwrite=True)
    got, meta = _read_all(out)
    assert meta["wsnets.merge.dtype"] == "bfloat16" and meta["wsnets.merge.out_dtype"] == "float32"
    assert got["embed.weight"].dtype == torch.float32
    assert json.loads(meta["wsnets.merge.ingredients"])[0]["digest"] is None
    assert meta["wsnets.merge.digest"] == "none"
    # a sharded directory's digest covers its index and shards
    merge_checkpoints("linear", dirs, out=out, digest="sha256", overwrite=True)
    _, meta = _read_all(out)
    assert meta["wsnets.merge.digest"] == "sha256"
    for d, i in zip(dirs, json.loads(meta["wsnets.merge.ingredients"])):
        index = d / "model.safetensors.index.json"            # the index, then its shards as it names them
        files = [index, *(d / f for f in dict.fromkeys(json.loads(index.read_text())["weight_map"].values()))]
        lines = "".join(f"{f.name} {hashlib.sha256(f.read_bytes()).hexdigest()}\n" for f in files)
        assert i["digest"] == "sha256:" + hashlib.sha256(lines.encode()).hexdigest()


@pytest.mark.parametrize("algorithm", ["xxh3_128", "sha256"])
def test_recorded_digest_changes_with_one_input_byte(family, tmp_path, algorithm):
    """The recorded digest equals a reference computation (xxhash/hashlib over the file's bytes) and
    changes when one byte of an input changes, the tensors (and so the merged output) unchanged."""
    base, fts, _ = family
    paths = []
    for i, sd in enumerate([base, *fts]):
        p = tmp_path / f"m{i}.safetensors"
        save_file(sd, str(p), metadata={"note": "a"})
        paths.append(p)
    ref = {"xxh3_128": lambda b: xxhash.xxh3_128(b).hexdigest(), "sha256": lambda b: hashlib.sha256(b).hexdigest()}
    out = tmp_path / "out.safetensors"

    def merged():
        merge_checkpoints("ties", paths[1:], base=paths[0], out=out, density=0.5, digest=algorithm)
        t, meta = _read_all(out)
        out.unlink()
        return t, {e["role"] + e["path"]: e["digest"] for e in ingredients(meta)}
    t0, d0 = merged()
    assert d0 == {("base" if i == 0 else "model") + str(p): f"{algorithm}:{ref[algorithm](p.read_bytes())}"
                  for i, p in enumerate(paths)}
    raw = bytearray(paths[2].read_bytes())
    at = raw.index(b'"note":"a"') + len('"note":"')
    raw[at:at + 1] = b"b"                                          # one byte of the header's metadata
    paths[2].write_bytes(bytes(raw))
    t1, d1 = merged()
    changed = {k for k in d0 if d0[k] != d1[k]}
    assert changed == {"model" + str(paths[2])}
    assert d1["model" + str(paths[2])] == f"{algorithm}:{ref[algorithm](bytes(raw))}"
    assert all(torch.equal(t0[k], t1[k]) for k in t0)


def test_ingredients_reads_older_sha256_entries():
    old = {"wsnets.merge.ingredients": json.dumps([{"path": "a.safetensors", "sha256": "ab" * 32},
                                                   {"path": "b.safetensors", "sha256": None}]),
           "wsnets.merge.base": json.dumps({"path": "base.safetensors", "sha256": "cd" * 32})}
    assert ingredients(old) == [{"role": "base", "path": "base.safetensors", "digest": "sha256:" + "cd" * 32},
                                {"role": "model", "path": "a.safetensors", "digest": "sha256:" + "ab" * 32},
                                {"role": "model", "path": "b.safetensors", "digest": None}]


def test_weightspace_outputs_load_back_with_their_architecture(tmp_path):
    arch = wsnets.mlp(6, [32, 32], 3, batchnorm=True)
    g = torch.Generator().manual_seed(0)
    base = wsnets.WeightSpace.random(arch, generator=g)
    paths = [base.save(tmp_path / "base.safetensors")]
    for i in range(2):
        ft = base.map(lambda t: t + 0.05 * torch.randn(t.shape, generator=g))
        paths.append(ft.save(tmp_path / f"ft{i}.safetensors"))
    out = tmp_path / "merged"
    r = merge_checkpoints("ties", paths[1:], base=paths[0], out=out, density=0.3, shard_size=3000)
    assert len(r.files) >= 2
    loaded = wsnets.load(out)                                   # a sharded directory, architecture from metadata
    ref = ties(paths[0], paths[1:], density=0.3)
    assert loaded.arch == arch
    torch.testing.assert_close(loaded.flat(), ref.flat(), atol=0, rtol=0)
    torch.testing.assert_close(wsnets.load(out / "model.safetensors.index.json").flat(), ref.flat())


def test_shared_only_lists_what_was_left_out(family, tmp_path):
    base, fts, _ = family
    odd = dict(fts[1])
    odd.pop("layer.1.weight")
    odd["extra"] = torch.zeros(3)
    odd["layer.0.bias"] = torch.zeros(17)
    with pytest.raises(ArchitectureMismatchError, match=r"^ft2: tensor 'layer.0.bias' has shape \(17,\), base has \(16,\)$"):
        merge_checkpoints("ties", [fts[0], odd], base=base, names=["ft1", "ft2"])
    r = merge_checkpoints("ties", [fts[0], odd], base=base, shared_only=True, density=0.5, names=["ft1", "ft2"],
                          out=tmp_path / "m.safetensors")
    assert sorted(r.left_out) == ["extra", "layer.0.bias", "layer.1.weight"]
    got, meta = _read_all(tmp_path / "m.safetensors")
    assert sorted(json.loads(meta["wsnets.merge.left_out"])) == sorted(r.left_out)
    assert set(got) == {"embed.weight", "layer.0.weight", "ids"}


def _cli_err(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_input_is_one_line_exit_2_inputs_untouched(family, tmp_path, capsys):
    base, fts, dirs = family
    out = str(tmp_path / "o.safetensors")
    other = _sd(3, shapes={"embed.weight": (40, 16), "layer.0.weight": (16, 15), "layer.0.bias": (16,),
                           "layer.1.weight": (8, 16), "ids": (1, 5)})
    save_file(other, str(tmp_path / "other.safetensors"))
    renamed = {("layer.9.weight" if k == "layer.1.weight" else k): v for k, v in fts[0].items()}
    save_file(renamed, str(tmp_path / "renamed.safetensors"))
    before = _hashes(tmp_path)
    b, f1, f2 = (str(d) for d in dirs)
    err = _cli_err(capsys, ["merge", "ties", "--base", b, f1, str(tmp_path / "other.safetensors"), "-o", out])
    assert "other.safetensors: tensor 'layer.0.weight' has shape (16, 15)" in err
    err = _cli_err(capsys, ["merge", "ties", "--base", b, f1, str(tmp_path / "renamed.safetensors"), "-o", out])
    assert "renamed.safetensors: no tensor 'layer.1.weight'" in err and "--shared-only" in err
    err = _cli_err(capsys, ["merge", "ties", "--base", b, f1, f1, "-o", out])
    assert "listed twice (as model 1 and as model 2)" in err
    err = _cli_err(capsys, ["merge", "ties", "--base", b, b, f2, "-o", out])
    assert "listed twice (as the base and as model 1)" in err
    err = _cli_err(capsys, ["merge", "linear", b, f1, "-o", out, "--weights", "1,-1"])
    assert "weights [1.0, -1.0] sum to 0" in err
    err = _cli_err(capsys, ["merge", "linear", b, f1, "-o", out, "--weights", "0.3,0.3", "--no-normalize"])
    assert "sum to 0.6, not 1" in err
    err = _cli_err(capsys, ["merge", "ties", "--base", b, f1, f2, "-o", out, "--density", "0.5,1.5"])
    assert f"ties ({f2}): density 1.5 is outside (0, 1]" in err
    err = _cli_err(capsys, ["merge", "dare-ties", "--base", b, f1, f2, "-o", out, "--density", "0"])
    assert "density 0 is outside (0, 1]" in err
    err = _cli_err(capsys, ["merge", "ties", "--base", b, f1, f2, "-o", str(dirs[1] / "out")])
    assert "would overwrite the input" in err
    # corrupt shards: truncated data, garbage header, a shard the index names but that is missing
    bad = tmp_path / "bad"
    import shutil
    shutil.copytree(dirs[2], bad)
    shard = bad / "b.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    err = _cli_err(capsys, ["merge", "ties", "--base", b, f1, str(bad), "-o", out])
    assert "b.safetensors: corrupt or truncated safetensors file (tensor 'layer." in err and "beyond" not in err
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    err = _cli_err(capsys, ["merge", "ties", "--base", b, f1, str(bad), "-o", out])
    assert "b.safetensors: corrupt or truncated safetensors file (header is not JSON" in err
    shard.unlink()
    err = _cli_err(capsys, ["merge", "ties", "--base", b, f1, str(bad), "-o", out])
    assert "shard 'b.safetensors' (tensor 'layer.0.weight') does not exist" in err
    shutil.rmtree(bad)
    nan = dict(fts[0])
    nan["layer.0.bias"] = nan["layer.0.bias"].clone()
    nan["layer.0.bias"][3] = float("nan")
    save_file(nan, str(tmp_path / "nan.safetensors"))
    err = _cli_err(capsys, ["merge", "linear", b, str(tmp_path / "nan.safetensors"), "-o", out])
    assert "nan.safetensors: tensor 'layer.0.bias' has NaN or Inf values" in err
    (tmp_path / "nan.safetensors").unlink()
    assert _hashes(tmp_path) == before and not (tmp_path / "o.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]        # no temporaries left


def test_architecture_aware_merges_say_they_need_an_architecture(family, tmp_path, capsys):
    _, _, dirs = family
    f = str(dirs[1] / "a.safetensors")
    err = _cli_err(capsys, ["merge", "align", f, str(dirs[2] / "a.safetensors"), "-o", str(tmp_path / "x.safetensors")])
    assert err.startswith("wsnets merge align: error: alignment needs each model's architecture (")
    assert err.endswith("a per-tensor merge needs none (wsnets merge methods)")
    err = _cli_err(capsys, ["merge", "average", f, str(dirs[2] / "a.safetensors"), "-o", str(tmp_path / "x.safetensors"),
                            "--dataset", "digits"])
    assert "recomputing BatchNorm statistics (--dataset) needs each model's architecture (" in err
    assert main(["merge", "average", f, str(dirs[2] / "a.safetensors"), "-o", str(tmp_path / "x.safetensors")]) == 0


def test_writer_layout_is_aligned_and_readable(tmp_path):
    tensors = {"a": torch.arange(3, dtype=torch.int8), "b": torch.randn(5, dtype=torch.float64),
               "c": torch.randn(2, 3).to(torch.bfloat16), "d": torch.tensor([True, False])}
    w = ShardWriter(tmp_path / "x.safetensors", [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()],
                    metadata={"k": "v"})
    for k, v in tensors.items():
        w.write(k, 0, v.reshape(-1))
    w.finish({"k": "w"})
    infos, meta = read_header(tmp_path / "x.safetensors")
    assert meta == {"k": "w"}
    assert all(i.start % i.dtype.itemsize == 0 for i in infos.values())
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v)


KILLED = """
import sys, torch
from wsnets.merge import merge_checkpoints
big = {f"t{i}": torch.randn(256, 1024) for i in range(40)}
fts = [{k: v + 0.01 for k, v in big.items()} for _ in range(2)]
print("start", flush=True)
merge_checkpoints("ties", fts, base=big, out=sys.argv[1], density=0.3, chunk_mb=0.05, shard_size=2_000_000)
"""


def test_a_killed_merge_leaves_no_output(tmp_path):
    out = tmp_path / "merged"
    p = subprocess.Popen([sys.executable, "-c", KILLED, str(out)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert p.stdout.readline().strip() == "start"
    deadline = time.time() + 60
    while not any(q.name.startswith(".merged.") for q in tmp_path.iterdir()) and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert p.poll() is None, "the merge finished before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not out.exists()
    temps = [q for q in tmp_path.iterdir() if q.name.startswith(".merged.")]
    assert temps and temps[0].is_dir()                    # the killed writer's temporary, under a hidden name
    merge_checkpoints("linear", [{"w": torch.ones(2)}, {"w": torch.zeros(2)}], out=out)
    assert out.is_dir() and not [q for q in tmp_path.iterdir() if q.name.startswith(".")]   # stale temp removed


def test_toml_config_with_per_model_and_per_tensor_options(family, tmp_path, capsys):
    base, fts, dirs = family
    cfg = tmp_path / "merge.toml"
    cfg.write_text(f"""
method = "ties"
base = "{dirs[0].name}"
out = "merged"
scope = "tensor"
digest = "sha256"

[parameters]
density = 0.5

[[models]]
path = "{dirs[1].name}"
weight = 0.7

[[models]]
path = "{dirs[2].name}"
weight = 0.3
density = 0.25

[[tensors]]
match = "layer.0.*"
density = 1.0
weight = [1.0, 1.0]
""")
    assert main(["merge", "config", str(cfg), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["parameters"]["weight"] == [0.7, 0.3] and res["parameters"]["density"] == [0.5, 0.25]
    got, meta = _read_all(tmp_path / "merged")
    rules = [TensorRule("layer.0.*", {"density": 1.0, "weight": [1.0, 1.0]})]
    ref = merge_checkpoints("ties", fts, base=base, scope="tensor", density=[0.5, 0.25], weight=[0.7, 0.3],
                            tensor_rules=rules).tensors
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    assert json.loads(meta["wsnets.merge.tensor_options"])[0]["match"] == "layer.0.*"
    assert meta["wsnets.merge.digest"] == "sha256"                 # the config's choice
    plain = merge_checkpoints("ties", fts, base=base, scope="tensor", density=[0.5, 0.25], weight=[0.7, 0.3]).tensors
    assert not torch.equal(plain["layer.0.weight"], got["layer.0.weight"])
    assert torch.equal(plain["embed.weight"], got["embed.weight"])
    r = merge_config(cfg, tmp_path / "again.safetensors")
    assert r.out == tmp_path / "again.safetensors"
    for text, msg in (('method = "ties"\nmodels = ["ft1"]\nfoo = 1\n', "unknown key 'foo'"),
                      ('method = "linear"\nmodels = ["ft1"]\ndigest = "md5"\n', "merge.toml: unknown digest 'md5'"),
                      ('method = "ties"\nbase = "base"\nmodels = [{path = "ft1", gamma = 1}]\n', "merge.toml: ties: unknown option 'gamma'"),
                      ('method = "ties"\nbase = "base"\nmodels = [{path = "ft1", scale = 1}]\n',
                       "'scale' is not a per-model option"),
                      ('method = "ties"\nbase = "base"\nmodels = ["ft1", "ft2"]\nscope = "model"\n'
                       '[[tensors]]\nmatch = "*"\ndensity = 0.3\n', "per-tensor options need scope 'tensor'")):
        cfg.write_text(text)
        with pytest.raises(ConfigError, match=msg):
            merge_config(cfg, tmp_path / "x.safetensors")


def test_output_in_the_way_is_refused(family, tmp_path):
    base, fts, _ = family
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="exists and is not a checkpoint directory"):
        merge_checkpoints("linear", [base, *fts], out=tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    merge_checkpoints("linear", [base, *fts], out=tmp_path / "m")
    with pytest.raises(OutputExistsError, match="exists; pass --overwrite"):  # a previous output is kept...
        merge_checkpoints("linear", [base, fts[0]], out=tmp_path / "m")
    merge_checkpoints("linear", [base, fts[0]], out=tmp_path / "m", overwrite=True)   # ...unless asked
    got, _ = _read_all(tmp_path / "m")
    torch.testing.assert_close(got["embed.weight"], (base["embed.weight"] + fts[0]["embed.weight"]) / 2)
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        merge_checkpoints("linear", [tmp_path / "notes", base])


def test_stream_digest_is_the_file_digest_whatever_the_read_order(tmp_path):
    """Ranges fed in random order, overlapping, repeated, with gaps: the digest is the whole file's."""
    from wsnets.merge.digest import StreamDigest, digest_files
    data = torch.randint(0, 256, (300_000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    p = tmp_path / "f.bin"
    p.write_bytes(data.numpy().tobytes())
    raw = p.read_bytes()
    g = torch.Generator().manual_seed(1)
    for trial in range(20):
        d = StreamDigest("xxh3_128")
        fd = os.open(p, os.O_RDONLY)
        try:
            for _ in range(int(torch.randint(0, 12, (1,), generator=g))):
                a, b = sorted(int(v) for v in torch.randint(0, len(raw) + 1, (2,), generator=g))
                d.feed(fd, a, memoryview(raw)[a:b])
            got = d.hexdigest(fd)
        finally:
            os.close(fd)
        assert "xxh3_128:" + got == digest_files([p]) == "xxh3_128:" + xxhash.xxh3_128(raw).hexdigest()


def test_merge_digests_its_inputs_without_reading_them_twice(family, tmp_path, monkeypatch):
    """Inputs of one layout (a base and its fine-tunes, sharded): the digests come from the bytes the merge
    reads; only the headers and the index are read for the digest alone."""
    from wsnets.merge import digest
    _, _, dirs = family
    extra = []
    real = digest._hash_range
    monkeypatch.setattr(digest, "_hash_range", lambda h, fd, a, b, buf: extra.append(real(h, fd, a, b, buf) - a)
                        or a + extra[-1])
    merged = []
    read = Checkpoint.read
    monkeypatch.setattr(Checkpoint, "read", lambda self, n, a=0, b=None, out=None: merged.append(
        ((self.infos[n].numel if b is None else b) - a) * self.infos[n].dtype.itemsize) or read(self, n, a, b, out))
    out = tmp_path / "m.safetensors"
    merge_checkpoints("ties", dirs[1:], base=dirs[0], out=out, density=0.5, scope="tensor")   # one pass
    monkeypatch.setattr(Checkpoint, "read", read)
    _, meta = _read_all(out)
    total = sum(f.stat().st_size for d in dirs for f in d.iterdir() if f.name.endswith((".safetensors", ".json"))
                and f.name != "config.json")
    data = sum(i.nbytes for d in dirs for i in open_checkpoint(d).infos.values())
    assert sum(extra) + sum(merged) == total                 # every byte read once, by the merge or the digest
    assert sum(merged) > 0.95 * data                         # the digest read headers, indexes, a few tensors
    for d, e in zip(dirs, ingredients(meta)):
        index = d / "model.safetensors.index.json"
        files = [index, *(d / f for f in dict.fromkeys(json.loads(index.read_text())["weight_map"].values()))]
        assert e["digest"] == digest.digest_files(files)
