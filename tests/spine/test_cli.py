"""`wsnets graph` prints counts; bad input is one line on stderr and exit code 2."""

import json
import subprocess
import sys

import pytest
import torch

import wsnets

from tests.spine.helpers import random_ws


def run(*args):
    return subprocess.run([sys.executable, "-m", "wsnets", *args], capture_output=True, text=True, timeout=120)


def test_graph_json_counts(tmp_path):
    ws = random_ws(wsnets.mlp(64, [32, 32], 10))
    ws.save(tmp_path / "m.safetensors")
    r = run("graph", str(tmp_path / "m.safetensors"), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["nodes"], out["edges"], out["parameters"]) == (138, 3392, 3466)
    r = run("graph", str(tmp_path / "m.safetensors"))
    assert "nodes: 138" in r.stdout and "edges: 3,392" in r.stdout


@pytest.mark.parametrize("case", ["empty", "nan", "spatial", "missing"])
def test_bad_input_is_one_line_exit_2(tmp_path, case):
    path = tmp_path / "bad.pt"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "nan":
        sd = random_ws(wsnets.mlp(4, [4], 2)).to_module().state_dict()
        sd["0.weight"][0, 0] = float("inf")
        torch.save(sd, path)
    elif case == "spatial":
        torch.save({"0.weight": torch.randn(4, 1, 3, 3), "3.weight": torch.randn(10, 144)}, path)
    else:
        path = tmp_path / "nope.pt"
    r = run("graph", str(path))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wsnets graph: error:") and "Traceback" not in r.stderr
    assert path.name in lines[0] or case == "spatial"
