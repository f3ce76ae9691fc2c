"""Never guess silently (issues 18 and 21): bare state_dicts load only where keys and shapes determine the
network; otherwise the user gives the architecture (a module, ``--module file.py:Class``, ``--arch``)."""

import json
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import wsnets
from wsnets import models
from wsnets.testing import assert_same_function


def test_layer_order_is_natural_not_file_order(tmp_path):
    """12 equal-width Linear layers in safetensors (keys stored alphabetically: '10' before '2')."""
    torch.manual_seed(0)
    m = nn.Sequential(*[nn.Linear(6, 6) if i % 2 == 0 else nn.Tanh() for i in range(23)])
    path = tmp_path / "deep.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    ws = wsnets.load(path, activation="tanh")
    assert [l.name for l in ws.arch.weight_layers] == [str(i) for i in range(0, 23, 2)]
    assert_same_function(m, ws.to_module(), input_shape=(6,))


def test_skip_connection_state_dict_is_refused_with_how_to(tmp_path):
    m = models.ResidualMLP(12, 8, 2, 5)
    with pytest.raises(wsnets.UnsupportedLayerError) as e:
        wsnets.load(m.state_dict())
    msg = str(e.value)
    assert "\n" not in msg and "not those of an nn.Sequential" in msg and "--module file.py:Class" in msg
    ws = wsnets.load(m.state_dict(), module=models.ResidualMLP(12, 8, 2, 5))
    assert_same_function(m, ws.to_module(), input_shape=(12,))


def test_attention_keys_are_refused():
    with pytest.raises(wsnets.UnsupportedLayerError, match="in_proj_weight"):
        wsnets.load(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True).state_dict())


def _write_module_file(tmp_path):
    f = tmp_path / "mynet.py"
    f.write_text("import torch\nfrom torch import nn\n"
                 "class Net(nn.Module):\n"
                 "    def __init__(self, width=8):\n"
                 "        super().__init__()\n"
                 "        self.a = nn.Linear(5, width)\n        self.b = nn.Linear(width, width)\n"
                 "        self.c = nn.Linear(width, 3)\n"
                 "    def forward(self, x):\n"
                 "        h = torch.relu(self.a(x))\n"
                 "        return self.c(h + torch.relu(self.b(h)))\n")
    return f


def test_module_spec_and_arch_json(tmp_path):
    f = _write_module_file(tmp_path)
    net = wsnets.io.load_module_spec(f"{f}:Net(width=6)")
    ckpt = tmp_path / "net.pt"
    torch.save(net.state_dict(), ckpt)
    with pytest.raises(wsnets.UnsupportedLayerError, match="nn.Sequential"):
        wsnets.load(ckpt)
    ws = wsnets.load(ckpt, module=f"{f}:Net(width=6)")
    assert_same_function(net, ws.to_module(), input_shape=(5,))
    arch_file = tmp_path / "arch.json"
    arch_file.write_text(ws.arch.to_json())
    ws2 = wsnets.load(ckpt, arch=arch_file)
    assert ws2.arch == ws.arch and all(torch.equal(ws2.params[k], ws.params[k]) for k in ws.params)
    with pytest.raises(wsnets.ConfigError, match="keyword=literal"):
        wsnets.io.load_module_spec(f"{f}:Net(width=__import__('os'))")
    with pytest.raises(wsnets.MissingKeyError, match="'a.weight'"):
        wsnets.load({"b.weight": torch.zeros(6, 6)}, arch=arch_file)


def test_unused_tensors_are_named_in_a_warning(tmp_path):
    f = _write_module_file(tmp_path)
    net = wsnets.io.load_module_spec(f"{f}:Net")
    sd = dict(net.state_dict(), **{"pooler.weight": torch.zeros(2, 2)})
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        wsnets.load(sd, module=net)
    assert any("pooler.weight" in str(x.message) for x in w)


def test_cli_module_and_arch_options(tmp_path):
    f = _write_module_file(tmp_path)
    net = wsnets.io.load_module_spec(f"{f}:Net")
    ckpt = tmp_path / "net.pt"
    torch.save(net.state_dict(), ckpt)
    run = lambda *a: subprocess.run([sys.executable, "-m", "wsnets", *a], capture_output=True, text=True)
    bad = run("graph", str(ckpt))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "--module" in bad.stderr
    ok = run("graph", str(ckpt), "--module", f"{f}:Net", "--json")
    assert ok.returncode == 0, ok.stderr
    out = json.loads(ok.stdout)
    assert out["architecture"].startswith("resmlp:5->3") and out["edges"] > 0
