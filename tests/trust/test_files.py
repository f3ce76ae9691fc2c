"""Files and folders like a good citizen: modes follow the umask, a closed output pipe ends quietly."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wsnets.io import atomic_write_text, save
from wsnets.zoo import build, parse_recipe

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_written_files_follow_the_umask(tmp_path, umask, mask):
    """Reports, checkpoints, zoo shards and the zoo index get 0o666 less the umask (as open() gives),
    not mkstemp's 0o600; rewriting a file keeps the mode it has."""
    import wsnets
    umask(mask)
    atomic_write_text(tmp_path / "report.json", "{}")
    save(wsnets.load(torch.nn.Sequential(torch.nn.Linear(3, 2))), tmp_path / "m.safetensors")
    build(parse_recipe({"name": "u", "population": 2, "datasets": ["digits"], "epochs": 1,
                        "architecture": {"kind": "mlp", "depth": 1, "width": 8}}), tmp_path / "z", progress=False)
    from safetensors.torch import save_file
    from wsnets.merge import merge_checkpoints
    ins = []
    for i in range(2):      # merged outputs are streamed into their own temporary file or folder
        ins.append(tmp_path / f"in{i}.safetensors")
        save_file({"a": torch.randn(64, 64), "b": torch.randn(64)}, str(ins[-1]))
    merge_checkpoints("linear", ins, out=tmp_path / "avg.safetensors")
    merge_checkpoints("linear", ins, out=tmp_path / "sharded", shard_size=8192)
    shards = sorted((tmp_path / "sharded").iterdir())
    assert len(shards) >= 3 and stat.S_IMODE((tmp_path / "sharded").stat().st_mode) == 0o777 & ~mask
    files = [tmp_path / "report.json", tmp_path / "m.safetensors", tmp_path / "z" / "index.sqlite",
             *(tmp_path / "z" / "shards").glob("*.safetensors"), tmp_path / "avg.safetensors", *shards]
    assert len(files) == 5 + len(shards)
    for f in files:
        assert _mode(f) == 0o666 & ~mask, (f, oct(_mode(f)))
    os.chmod(tmp_path / "report.json", 0o640)
    atomic_write_text(tmp_path / "report.json", "{\"again\": 1}")
    assert _mode(tmp_path / "report.json") == 0o640


def test_output_to_a_closed_pipe_ends_quietly(tmp_path):
    """``wsnets esd --json | head -1``: no BrokenPipeError traceback, nothing on stderr."""
    from safetensors.torch import save_file
    save_file({f"{i}.weight": torch.randn(12, 12) for i in range(0, 600, 2)}, str(tmp_path / "big.safetensors"))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = f"{sys.executable} -m wsnets esd {tmp_path / 'big.safetensors'} --json | head -1"
    p = subprocess.run(["bash", "-c", cmd + "; exit ${PIPESTATUS[0]}"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.stdout.strip() == "{"
    assert p.stderr == "", p.stderr
    assert p.returncode == 141  # as a Unix tool killed by SIGPIPE reports it to the shell


def test_an_unexpected_error_is_one_line_not_a_traceback(monkeypatch, capsys):
    """A bug (here: an invented TypeError inside a command) is reported as one line and exit code 1;
    WSNETS_DEBUG=1 shows the traceback."""
    import wsnets.graph
    from wsnets.cli import main

    def broken(ws):
        raise TypeError("unexpected thing\nsecond line")
    monkeypatch.setattr(wsnets.graph, "graph_summary", broken)
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2)).state_dict(), "/tmp/_wsnets_cli_bug.pt")
    assert main(["graph", "/tmp/_wsnets_cli_bug.pt"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "internal error" in err and "WSNETS_DEBUG" in err
    monkeypatch.setenv("WSNETS_DEBUG", "1")
    with pytest.raises(TypeError):
        main(["graph", "/tmp/_wsnets_cli_bug.pt"])


def _png(p: Path) -> bool:
    return p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_takes_a_png_file_or_a_folder_with_one_meaning_everywhere(tmp_path):
    """``--plot x.png`` writes the command's main plot to that file (others beside it as x_*.png), never a
    folder named x.png; ``--plot folder`` writes the plots into the folder under their own names."""
    import wsnets
    from wsnets.cli import main
    torch.manual_seed(0)
    for name in ("a", "b"):
        wsnets.load(torch.nn.Sequential(torch.nn.Linear(64, 12), torch.nn.ReLU(), torch.nn.Linear(12, 10))).save(
            tmp_path / f"{name}.safetensors")
    build(parse_recipe({"name": "p", "population": 3, "datasets": ["digits"], "epochs": 1,
                        "architecture": {"kind": "mlp", "depth": 1, "width": 8}}), tmp_path / "z", progress=False)
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    land = ["--dataset", "digits"]
    commands = {
        "zoo": (["zoo", "info", str(tmp_path / "z")], "zoo_test_accuracy.png", []),
        "barrier": (["merge", "barrier", a, b, "--dataset", "digits", "--steps", "3"], "barrier.png", []),
        "esd": (["esd", a, "--min-evals", "4"], "alpha_per_layer.png", ["esd_"]),
        "surface": (["landscape", "surface", a, *land, "--grid", "3"], "surface_contour.png", ["surface_3d.png"]),
        "hessian": (["landscape", "hessian", a, *land, "--top-k", "1", "--trace-samples", "2", "--slq-vectors", "1",
                     "--slq-steps", "5"], "hessian_density.png", []),
        "intrinsic": (["landscape", "intrinsic", a, *land, "--dims", "5,10", "--steps", "3"], "intrinsic_dimension.png",
                      []),
    }
    for name, (argv, main_name, others) in commands.items():
        f = tmp_path / f"{name}.png"
        assert main([*argv, "--plot", str(f)]) == 0, name
        assert _png(f), name  # the file itself, not a folder called x.png
        for o in others:
            assert any(_png(p) for p in tmp_path.glob(f"{name}_{o}*")), (name, o)
        d = tmp_path / f"{name}_dir"
        assert main([*argv, "--plot", str(d)]) == 0, name
        assert _png(d / main_name), (name, sorted(p.name for p in d.iterdir()))
        for o in others:
            assert any(_png(p) for p in d.glob(f"{o}*")), (name, o)
    assert main(["zoo", "info", str(tmp_path / "z"), "--plot", str(tmp_path / "x.pdf")]) == 2
    assert not (tmp_path / "x.pdf").exists()


def test_an_existing_run_is_never_overwritten_without_overwrite(tmp_path, capsys):
    """``wsnets train --out RUN`` on a run refuses (exit 2, the run byte for byte as before); ``--overwrite``
    replaces it whole (a 1-seed run over a 2-seed one leaves no seeds/1); ``wsnets run`` keeps a report."""
    import hashlib
    from wsnets.cli import main
    build(parse_recipe({"name": "o", "seed": 1, "population": 16, "datasets": ["digits"], "epochs": 1,
                        "architecture": {"kind": "mlp", "depth": [1, 2], "width": 8}}), tmp_path / "z", progress=False)
    train = ["train", str(ROOT / "train" / "statnn-gbm.toml"), "--zoo", str(tmp_path / "z"), "--no-progress",
             "--encoder.max_iter", "5"]
    run = tmp_path / "run"
    assert main([*train, "--out", str(run), "--seeds", "2"]) == 0
    (run / "notes.txt").write_text("mine")

    def tree():
        return {str(p.relative_to(run)): hashlib.sha1(p.read_bytes()).hexdigest() for p in run.rglob("*") if p.is_file()}
    before = tree()
    capsys.readouterr()
    assert main([*train, "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--overwrite" in err
    assert tree() == before
    assert main([*train, "--out", str(run), "--overwrite"]) == 0
    assert (run / "seeds" / "0").is_dir() and not (run / "seeds" / "1").exists()
    assert (run / "notes.txt").read_text() == "mine"  # files wsnets did not write are left alone
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "results.json").write_text("{}")
    capsys.readouterr()
    assert main(["run", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "report")]) == 2
    assert "--overwrite" in capsys.readouterr().err and not (tmp_path / "cache").exists()
