"""wsnets.load: modules, state_dicts, files; and every bad input gets its own clear error."""

import pickle
import subprocess
import sys

import pytest
import torch
from torch import nn

import wsnets
from wsnets.testing import assert_same_function

from tests.spine.helpers import Custom, Skippy, architectures, random_ws

ARCHS = architectures()
ROOT = __import__('pathlib').Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name,arch,shape", ARCHS, ids=[a[0] for a in ARCHS])
def test_module_roundtrip(name, arch, shape):
    module = random_ws(arch).to_module()
    ws = wsnets.load(module)
    assert ws.arch.group_sizes == arch.group_sizes
    assert_same_function(module, ws.to_module(), input_shape=shape)


def test_local_pooling_with_default_stride_builds_and_runs():
    from wsnets.arch import Architecture, Layer
    arch = Architecture((Layer("conv2d", "0", 1, 4, kernel_size=(3, 3), padding=(1, 1), dims=2), Layer("act", fn="relu"),
                         Layer("maxpool", kernel_size=(2, 2), dims=2), Layer("gap", dims=2), Layer("flatten"),
                         Layer("linear", "5", 4, 3)))
    ws = random_ws(arch)
    assert ws.to_module()(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    assert_same_function(ws.to_module(), wsnets.load(ws.to_module()).to_module(), input_shape=(1, 8, 8))


def test_batchnorm_cumulative_momentum_roundtrips():
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=None), nn.ReLU(), nn.Linear(4, 2))
    rebuilt = wsnets.load(m).to_module()
    assert rebuilt[1].momentum is None


def test_loaded_mlp_equals_builder_architecture():
    arch = wsnets.mlp(12, [16, 8], 5, "relu")
    module = random_ws(arch).to_module()
    assert wsnets.load(module).arch == arch
    assert wsnets.load(module.state_dict()).arch == arch


def test_nested_sequential_and_original_key_names():
    m = nn.Sequential(nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU()), nn.Dropout(0.1),
                      nn.Sequential(nn.Linear(6, 3)))
    m[0][1].running_mean.normal_()
    m.eval()
    ws = wsnets.load(m)
    assert list(ws.params)[:2] == ["0.0.weight", "0.0.bias"]
    assert_same_function(m, ws.to_module(), input_shape=(5,))


def test_custom_container_read_from_its_forward():
    m = Custom()
    assert_same_function(m, wsnets.load(m).to_module(), input_shape=(6,))
    # registration order lies (the activation is never applied): the traced forward says what runs
    ws = wsnets.load(Skippy())
    assert [l.kind for l in ws.arch.layers] == ["linear", "linear"]
    sk = Skippy()
    assert_same_function(sk, wsnets.load(sk).to_module(), input_shape=(6,))


@pytest.mark.parametrize("name,arch,shape", ARCHS, ids=[a[0] for a in ARCHS])
def test_state_dict_inference(name, arch, shape):
    ws = random_ws(arch)
    module = ws.to_module()
    if arch.is_conv:  # padding, stride and pooling are not in a state_dict: refused, unless given
        with pytest.raises(wsnets.UnsupportedLayerError, match=r"convolution.*--module file.py:Class.*--arch"):
            wsnets.load(module.state_dict())
        given = wsnets.load(module.state_dict(), arch=wsnets.convert.canonical(arch))
        assert_same_function(module, given.to_module(), input_shape=shape)
        return
    inferred = wsnets.load(module.state_dict(), activation=arch.activation)
    assert inferred.arch.group_sizes == arch.group_sizes
    assert [l.kind for l in inferred.arch.layers if l.kind != "dropout"] == \
        [l.kind for l in arch.layers if l.kind != "dropout"]
    assert_same_function(module, inferred.to_module(), input_shape=shape)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth"])
def test_file_roundtrip(tmp_path, suffix):
    ws = random_ws(wsnets.cnn(2, [4, 6], 5, batchnorm=True))
    path = tmp_path / f"m{suffix}"
    if suffix == ".safetensors":
        wsnets.save(ws, path, {"note": "hello"})
        meta = wsnets.io.read_safetensors(path)[1]
        assert meta["note"] == "hello" and "wsnets.arch" in meta
    else:
        torch.save({"epoch": 3, "state_dict": ws.to_module().state_dict()}, path)
    # a bare CNN state_dict needs its architecture (padding/stride/pooling are not in it)
    back = wsnets.load(path) if suffix == ".safetensors" else wsnets.load(path, module=ws.to_module())
    assert_same_function(ws.to_module(), back.to_module(), input_shape=(2, 8, 8))
    if suffix == ".safetensors":
        assert back.arch == ws.arch


def test_batched_safetensors_roundtrip(tmp_path):
    b = wsnets.WeightSpace.random(wsnets.mlp(4, [5], 2), 7)
    b.save(tmp_path / "b.safetensors")
    back = wsnets.load(tmp_path / "b.safetensors")
    assert back.batch_size == 7 and torch.equal(back.flat(), b.flat())


WRITE_ONE = """
import sys, torch
from wsnets.io import write_safetensors
g = torch.Generator().manual_seed(0)
t = {"b.weight": torch.randn(3, 4, generator=g), "a.bias": torch.arange(5, dtype=torch.int64),
     "c": torch.randn(2, generator=g).half()}
write_safetensors(sys.argv[1], t, {f"key{i}": f"value {i}" for i in (3, 0, 4, 1, 2)})
"""


def test_safetensors_files_are_byte_reproducible(tmp_path):
    """The safetensors library writes metadata in a per-process random order; wsnets' files depend only
    on their content (zoo shards of the same recipe and seed are byte-identical), and stay readable."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    paths = [tmp_path / f"f{i}.safetensors" for i in range(4)]
    for p in paths:  # separate processes: each draws its own hash-map seed
        subprocess.run([sys.executable, "-c", WRITE_ONE, str(p)], check=True, cwd=str(ROOT))
    assert len({p.read_bytes() for p in paths}) == 1
    t = load_file(str(paths[0]))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(t["b.weight"], torch.randn(3, 4, generator=g)) and torch.equal(t["a.bias"], torch.arange(5))
    assert t["c"].dtype == torch.float16 and torch.equal(t["c"], torch.randn(2, generator=g).half())
    with safe_open(str(paths[0]), "pt") as f:
        assert f.metadata() == {f"key{i}": f"value {i}" for i in range(5)}
    assert int.from_bytes(paths[0].read_bytes()[:8], "little") % 8 == 0  # header padded as the library pads it


# -- bad input -----------------------------------------------------------------------------------
class Payload:
    """Unpickling this would create a file (code execution)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_with_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"0.weight": Payload(str(marker))}, f)
    torch.save({"w": torch.ones(1)}, tmp_path / "ok.pt")
    # torch.save files are zip archives; put the payload into one the way torch would
    import zipfile
    evil_zip = tmp_path / "evil2.pt"
    with zipfile.ZipFile(tmp_path / "ok.pt") as src, zipfile.ZipFile(evil_zip, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("data.pkl"):
                data = pickle.dumps({"0.weight": Payload(str(marker))}, protocol=2)
            dst.writestr(item, data)
    for p in (path, evil_zip):
        with pytest.raises(wsnets.UnsafeCheckpointError, match=p.name):
            wsnets.load(p)
    assert not marker.exists()


def test_truncated_and_empty_and_garbage_files(tmp_path):
    ws = random_ws(wsnets.mlp(8, [8], 2))
    good = tmp_path / "m.safetensors"
    ws.save(good)
    data = good.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all" * 10)
    torch.save(ws.to_module().state_dict(), tmp_path / "m.pt")
    (tmp_path / "trunc.pt").write_bytes((tmp_path / "m.pt").read_bytes()[:300])
    (tmp_path / "emptyzip.pt").write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip archive
    (tmp_path / "noise.pt").write_bytes(bytes(range(256)) * 2)
    for name in ("trunc.safetensors", "empty.safetensors", "garbage.pt", "trunc.pt", "emptyzip.pt", "noise.pt"):
        with pytest.raises(wsnets.CheckpointError, match=name) as err:
            wsnets.load(tmp_path / name)
        assert not isinstance(err.value, wsnets.UnsafeCheckpointError), err.value  # no code in them
    with pytest.raises(wsnets.CheckpointError, match="no such file"):
        wsnets.load(tmp_path / "missing.safetensors")


def test_nonfinite_weights(tmp_path):
    ws = random_ws(wsnets.mlp(8, [8], 2))
    ws.params["2.weight"][0, 0] = float("nan")
    ws.save(tmp_path / "nan.safetensors")
    with pytest.raises(wsnets.NonFiniteWeightsError, match=r"NaN in tensor '2.weight'.*nan.safetensors"):
        wsnets.load(tmp_path / "nan.safetensors")
    assert torch.isnan(wsnets.load(tmp_path / "nan.safetensors", allow_nonfinite=True).params["2.weight"]).any()


def test_unsupported_layer_named():
    class WithRNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.rnn = nn.LSTM(4, 4)
    with pytest.raises(wsnets.UnsupportedLayerError, match="LSTM at 'rnn'"):
        wsnets.load(WithRNN())


def test_shapes_that_do_not_chain_name_both_layers():
    sd = {"0.weight": torch.randn(8, 4), "0.bias": torch.randn(8), "2.weight": torch.randn(3, 7)}
    with pytest.raises(wsnets.ShapeMismatchError, match=r"'2'.*'0'"):
        wsnets.load(sd)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(9, 2))
    with pytest.raises(wsnets.ShapeMismatchError, match=r"'2'.*'0'"):
        wsnets.load(m)


def test_flatten_over_spatial_positions_is_refused():
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    with pytest.raises(wsnets.SpatialFlattenError, match="flatten over spatial positions"):
        wsnets.load(m)
    sd = {"0.weight": torch.randn(4, 1, 3, 3), "3.weight": torch.randn(10, 144)}
    with pytest.raises(wsnets.UnsupportedLayerError, match="convolution"):  # refused before any guess
        wsnets.load(sd)


def test_missing_key_and_wrong_shape_in_wsnets_file(tmp_path):
    from safetensors.torch import save_file
    ws = random_ws(wsnets.mlp(8, [8], 2))
    meta = {"wsnets.arch": ws.arch.to_json()}
    params = dict(ws.params)
    del params["2.bias"]
    save_file({k: v.contiguous() for k, v in params.items()}, str(tmp_path / "missing.safetensors"), metadata=meta)
    with pytest.raises(wsnets.MissingKeyError, match="missing.safetensors: missing tensor '2.bias'"):
        wsnets.load(tmp_path / "missing.safetensors")
    params = dict(ws.params)
    params["0.weight"] = torch.randn(8, 9)
    save_file({k: v.contiguous() for k, v in params.items()}, str(tmp_path / "shape.safetensors"), metadata=meta)
    with pytest.raises(wsnets.ShapeMismatchError, match=r"'0.weight'.*\(8, 9\)"):
        wsnets.load(tmp_path / "shape.safetensors")
