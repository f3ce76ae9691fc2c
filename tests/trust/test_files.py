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
    files = [tmp_path / "report.json", tmp_path / "m.safetensors", tmp_path / "z" / "index.sqlite",
             *(tmp_path / "z" / "shards").glob("*.safetensors")]
    assert len(files) == 4
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
